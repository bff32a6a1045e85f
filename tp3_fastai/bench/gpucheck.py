"""The stages of `scripts/gpu_check.sh` that measure the input pipelines: real-JPEG throughput of each pipeline
against synthetic batches (`pipeline_check`), and one epoch per pipeline in which every host wait is an error on
CUDA and counted everywhere (`sync_check`). `CheckConfig` is the GPU configuration; `DRY_RUN` the same stages on
the CPU at tiny sizes (the suite runs them through the script's --dry-run)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.config import DEFAULT_CACHE
from ..core.device import device_name, env_info, pick_device, resolve_precision
from ..core.runs import write_json
from .freeze import jpeg_folder
from .loops import BatchLoader, synthetic_batches
from .pipelines import PipelinePlan, bench_pipeline, sync_debug_epoch
from .report import pipeline_markdown
from .timing import load_average


@dataclass
class CheckConfig:
    """What the pipeline stages measure: the model and batches of the issue's GPU goals (ResNet50, 224 px, batch
    128, AMP, channels_last on CUDA), each pipeline's timing (`warmup`, `repeats` groups of `steps`: 50 timed steps),
    and the sync-debug epoch's folder (`sync_images`)."""
    device: str = "auto"
    arch: str = "resnet50"
    size: int = 224
    bs: int = 128
    warmup: int = 5
    steps: int = 10
    repeats: int = 5
    modes: tuple[str, ...] = ("unfrozen", "frozen")
    pipelines: tuple[str, ...] = ("pil", "device", "cached")
    loops: tuple[str, ...] = ("package",)
    jpeg_images: int = 2560
    sync_images: int = 2560
    seed: int = 42
    lr: float = 1e-3
    cache_dir: str | Path = DEFAULT_CACHE


DRY_RUN = CheckConfig(device="cpu", arch="test_resnet", size=32, bs=4, warmup=1, steps=2, repeats=2,
                      modes=("frozen",), jpeg_images=40, sync_images=40)


def _dls(cfg: CheckConfig, n_images: int, dev: torch.device) -> dict[str, Any]:
    from ..data.images import image_dls

    folder = jpeg_folder(cfg.cache_dir, n_images, px=round(cfg.size * 1.75))
    # fastai's PIL pipeline at its best: a worker per core on a GPU machine (the others take their defaults)
    workers = {"pil": os.cpu_count()} if dev.type == "cuda" else {}
    return {p: image_dls(folder, size=cfg.size, bs=cfg.bs, seed=cfg.seed, device=dev, cache_dir=cfg.cache_dir,
                         pipeline=p, num_workers=workers.get(p)) for p in cfg.pipelines}


def pipeline_check(cfg: CheckConfig, out: str | Path, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Each pipeline in its own block (bench.pipelines.bench_pipeline) on a generated folder of real JPEGs, with
    the synthetic baseline of the same run; writes `<out>.md` and `<out>.json`, prints the summary rows."""
    from fastai.data.core import DataLoaders

    t0 = time.perf_counter()
    dev = pick_device(cfg.device)
    precision = resolve_precision("auto", dev)
    pipe_dls = _dls(cfg, cfg.jpeg_images, dev)
    first = next(iter(pipe_dls.values()))
    syn = DataLoaders(BatchLoader(synthetic_batches(1, cfg.bs, cfg.size, first.c, dev, cfg.seed), 1),
                      BatchLoader([], 0), device=dev)
    syn.c = first.c
    load_start = load_average()
    plan = PipelinePlan(cfg.arch, cfg.modes, precision, cfg.bs, cfg.size, cfg.seed, cfg.lr, cfg.warmup, cfg.steps,
                        cfg.repeats, cfg.loops)
    result = bench_pipeline(pipe_dls, syn, plan, dev, log=log)
    env = dict(env_info(dev), torch_threads=torch.get_num_threads())
    result.update(config=asdict(cfg), env=env, precision=precision, device_name=device_name(dev),
                  load_average=[load_start, load_average()], seconds=time.perf_counter() - t0)
    out = Path(out)
    write_json(out.with_suffix(".json"), result)
    head = [f"# Input pipelines: {cfg.arch}, {cfg.size} px, batch {cfg.bs}, {precision} on {device_name(dev)}", "",
            f"- config: {json.dumps(asdict(cfg))}",
            f"- torch {env['torch']}, torchvision {env['torchvision']}, fastai {env['fastai']}, "
            f"{env['torch_threads']} torch threads; load average at start / end {load_start} / {load_average()}",
            f"- {result['seconds']:.0f} s"]
    out.with_suffix(".md").write_text("\n".join(head + pipeline_markdown(result)) + "\n")
    if log:
        for line in summary_rows(result):
            log(line)
    return result


def summary_rows(result: dict[str, Any]) -> list[str]:
    """Markdown rows (pipeline | what | images/s | of synthetic | reads/step | blocking copies/step) of the figures
    the issue's goals name."""
    out = []
    for r in result["rows"]:
        if r["data"] == "synthetic" or r["loop"] in ("loader alone", "package"):
            what = r["loop"] if r["mode"] is None else f"{r['mode']} {r['loop']}"
            reads = r.get("reads_per_step")
            out.append(f"| {r.get('pipeline') or 'synthetic'} | {what} | {r['images_per_s']:.4g} | "
                       f"{r.get('of_synthetic', 1):.0%} | {'-' if reads is None else f'{reads:g}'} | "
                       f"{'-' if reads is None else format(r['blocking_copies_per_step'], 'g')} |")
    return out


def sync_check(cfg: CheckConfig, out: str | Path, log: Callable[[str], None] | None = print) -> bool:
    """One epoch of the package Learner per pipeline with every host wait of its training batches an error on
    CUDA (sync debug mode) and counted on every device; writes `out` (text). True when no pipeline waited."""
    dev = pick_device(cfg.device)
    precision = resolve_precision("auto", dev)
    lines, ok = [f"sync-debug epochs: {cfg.arch}, {cfg.size} px, batch {cfg.bs}, {precision} on {device_name(dev)}, "
                 f"{cfg.sync_images} real JPEGs, mode {cfg.modes[0]}"], True
    for p, dls in _dls(replace(cfg, jpeg_images=cfg.sync_images), cfg.sync_images, dev).items():
        try:
            r = sync_debug_epoch(dls, cfg.arch, dev, precision, cfg.seed, cfg.lr, mode=cfg.modes[0])
        except RuntimeError as e:  # CUDA's sync debug mode raises at the first wait
            ok = False
            lines.append(f"{p}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        waited = r["reads"] or r["blocking_copies"]
        ok = ok and not waited
        lines.append(f"{p}: {r['batches']} training batches, host reads {r['reads']}, blocking copies "
                     f"{r['blocking_copies']}, copies {r['copies']}, sync debug {r['sync_debug']}"
                     + (f"; reads at {r['where']}, blocking copies at {r['blocking_where']}" if waited else ""))
    lines.append("OK: no host wait in any training epoch" if ok else "NOT OK: see above")
    Path(out).write_text("\n".join(lines) + "\n")
    if log:
        log("\n".join(lines))
    return ok
