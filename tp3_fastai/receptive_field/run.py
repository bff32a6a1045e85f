"""Models by name and the receptive-field run: table, measurements, figures and a run folder."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.device import env_info
from ..core.checks import check_name
from ..mnist.models import MODELS, create_model
from ..core.runs import new_run_dir, write_json
from .measure import RFMeasurement, effective_receptive_field, measure_receptive_field
from .plots import plot_erf, plot_rf_box
from .tables import fmt_axes, fmt_start, rf_table_markdown, write_rf_table
from .trace import find_node, parse_input_shape, receptive_fields, select_rows


def model_from_name(arch: str) -> nn.Module:
    """Build an untrained model by name: package model, then torchvision, then timm (never downloads weights).

    A prefix picks the registry when a name exists in several: 'timm:resnet50', 'torchvision:resnet50'.
    """
    import timm   # heavy imports, only when a name has to be looked up
    import torchvision

    source, _, name = arch.rpartition(":")
    if source not in ("", "package", "torchvision", "timm"):
        raise ValueError(f"unknown registry prefix {source!r} in {arch!r}: use package:, torchvision: or timm:")
    if source in ("", "package") and name in MODELS:
        return create_model(name)
    tv_names = torchvision.models.list_models()
    if source in ("", "torchvision") and name in tv_names:
        return torchvision.models.get_model(name, weights=None)
    timm_names = timm.list_models()
    if source in ("", "timm") and name in timm_names:
        return timm.create_model(name, pretrained=False)
    known = {"": [*MODELS, *tv_names, *timm_names], "package": list(MODELS), "torchvision": tv_names,
             "timm": timm_names}[source]
    check_name(name, sorted(set(known)), f"{source or 'package, torchvision or timm'} architecture")
    raise AssertionError("unreachable")


def default_input_shape(arch: str, model: nn.Module | None = None) -> tuple[int, ...]:
    """A sensible input shape for `arch`: MNIST size for package models, the timm default or 3x224x224."""
    if arch.removeprefix("package:") in MODELS:
        return (1, 1, 28, 28)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (1, *size) if size else (1, 3, 224, 224)


def _load_weights(model: nn.Module, weights: str | Path) -> None:
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{weights} does not hold a state dict")
    result = model.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(model.state_dict()):
        raise ValueError(f"no tensor of {weights} matches the model's parameter names")


def receptive_field_run(arch: str | nn.Module, input_shape: str | Sequence[int] | None = None, *,
                        layers: str | None = None, verify: bool = False, erf: bool = False,
                        image: str | Path | None = None, node: str | None = None, weights: str | Path | None = None,
                        out: str | Path | None = None, overwrite: bool = False, seed: int = 42,
                        log: Callable[[str], None] = print) -> dict:
    """Trace a model, optionally measure / map / draw; write table, figures, config.json and summary.json."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)   # the random initialisation (and so the effective field) is reproducible
    if isinstance(arch, nn.Module):
        model, arch_name = arch, type(arch).__name__
    else:
        model, arch_name = model_from_name(arch), arch
    if weights:
        _load_weights(model, weights)
    if image and not Path(image).is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    shape = parse_input_shape(input_shape) if input_shape else default_input_shape(arch_name, model)
    rows = receptive_fields(model, shape)
    shown = select_rows(rows, layers)
    if node is not None:
        focus = find_node(rows, node)
    else:
        spatial = [r for r in shown if r.R and not all(r.whole)]
        focus = spatial[-1] if spatial else shown[-1]
    run = new_run_dir(out or Path("runs") / f"receptive_field-{arch_name.replace(':', '-')}", overwrite)
    config = dict(arch=arch_name, input_shape=list(shape), layers=layers, verify=verify, erf=erf, seed=seed,
                  image=str(image) if image else None, node=focus.name, weights=str(weights) if weights else None,
                  env=env_info(torch.device("cpu")))
    write_json(run / "config.json", config)
    measurements: list[RFMeasurement] = []
    for r in shown:
        if verify and r.name != "input" and r.R:
            m = measure_receptive_field(model, r.name, shape)
            measurements.append(m)
            log(f"measured {m.name}: R {fmt_axes(m.R)} (analytic {fmt_axes(m.R_analytic)}), "
                f"J {fmt_axes(m.J)}, start {fmt_start(m.start)} at input {fmt_axes(m.input_shape[2:])}"
                f"{'' if m.agrees else '  << DISAGREES'} ({m.seconds:.1f}s)")
    files = {k: str(v) for k, v in write_rf_table(shown, run, measurements).items()}
    summary: dict[str, Any] = dict(
        run_dir=str(run), arch=arch_name, input_shape=list(shape), nodes=len(rows), shown=len(shown),
        output=dict(name=rows[-1].name, R=list(rows[-1].R), whole=list(rows[-1].whole)),
        device=config["env"]["device_name"], files=files)
    if verify:
        summary["measurements"] = [asdict(m) for m in measurements]
        summary["all_agree"] = all(m.agrees for m in measurements)
    if erf:
        e = effective_receptive_field(model, focus.name, shape)
        summary["erf"] = e.summary()
        files["erf"] = str(plot_erf(e, run / "erf.png"))
        log(f"effective field of {e.name}: {e.mass_inside:.1%} of the gradient mass inside the theoretical field; "
            + ", ".join(f"{q:.0%} of the mass in {v:.1%} of its area" for q, v in e.area_fraction.items()))
    if image:
        files["rf_box"] = str(plot_rf_box(image, focus, run / "rf_box.png", size=shape[2:]))
        summary["rf_box_node"] = focus.name
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(run / "summary.json", summary)
    log("\n" + rf_table_markdown(shown, measurements) + f"\nrun folder: {run}")
    return summary
