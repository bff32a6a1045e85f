"""Fine-tuning by depth, what each way costs and buys: accuracy on the offline target task (the label-efficiency
study: k labelled images per class, several seeds) against the cost per epoch (the depth bench: step time in
alternating rounds, activations kept for backward) for frozen_to:K (K = 0..5), surgical:K, gradual and
discriminative rates, in one figure; and surgical fine-tuning on two shifts (new labels: digits 5-9; the same
digits 0-4 with their images changed), against Lee et al.'s finding (ICLR 2023): the first blocks win for
input-level shifts, the last ones for output-level shifts."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastai.data.core import DataLoaders

from ..core.config import BODY_CACHE, build_config, config_dict
from ..core.device import device_name, env_info, pick_device, resolve_precision
from ..core.runs import markdown_table, new_run_dir, pyplot, save_figure, write_json
from ..data.tasks import SHIFTS
from ..train.modes import STAGE_GROUPS, check_modes, training_mode
from ..transfer.label_efficiency import StudyConfig, label_efficiency
from ..transfer.pretrain import DEFAULT_ARCH
from ..transfer.stages import check_stage_modes
from .depth import bench_depth, falls_with_depth
from .loops import BatchLoader, synthetic_batches
from .timing import StepPlan, load_average

DEPTHS = tuple(f"frozen_to:{k}" for k in range(STAGE_GROUPS))
SURGICAL = tuple(f"surgical:{k}" for k in range(STAGE_GROUPS - 1))
DEPTH_MODES = DEPTHS + SURGICAL + ("gradual", "discriminative:10")
# on the input-shift task: one stage at a time, between every layer (frozen_to:0) and the head alone (frozen_to:5)
SURGICAL_MODES = ("frozen_to:0",) + SURGICAL + ("frozen_to:5",)
STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
LEE_CLAIM = ("Lee et al. (Surgical fine-tuning improves adaptation to distribution shifts, ICLR 2023) find that "
             "tuning a single block matches or beats tuning every layer on small target sets, and that the block "
             "that wins depends on the shift: the first blocks for input-level shifts (corrupted images), the last "
             "ones for output-level shifts (new labels).")


@dataclass
class DepthConfig:
    """Everything the depth study is asked for (see depth_study); config.json holds it as it ran."""
    modes: Sequence[str] = DEPTH_MODES  # trained on the label-shift target (digits 5-9) and timed
    surgical_modes: Sequence[str] = SURGICAL_MODES  # trained on the input-shift target; () skips it
    shift: str = "invert"  # the input-level shift: invert, noise or blur
    ks: Sequence[int] = (10, 50)  # labelled target images per class
    seeds: Sequence[int] = (0, 1)
    arch: str = DEFAULT_ARCH
    size: int = 32
    n_in: int = 1
    epochs: int = 20
    bs: int = 32
    lr: float = 2e-3
    pretrain_epochs: int = 4  # the body's (cached by configuration: the main job's by default)
    weights: str | Path | None = None  # None: the body pretrained on digits 0-4; a weights file instead
    cache_dir: str | Path = BODY_CACHE
    retrain: bool = False
    steps: int = 3  # the cost: timed steps per round
    repeats: int = 5  # rounds, the modes alternating
    warmup: int = 2
    threads: int | None = None  # torch CPU threads during the run (restored afterwards)
    device: str = "auto"
    precision: str = "auto"
    out: str | Path = "runs/freeze_depth"
    overwrite: bool = False
    command: str = ""  # the command line that started the study, for the report


def check_depth(cfg: DepthConfig) -> DepthConfig:
    """The configuration with its lists checked (each mode trains in the study and runs in the bench), or a
    ValueError before any work."""
    modes = check_modes(cfg.modes, "label-efficiency")
    check_modes(modes, "bench")
    surgical = check_modes(cfg.surgical_modes, "label-efficiency") if cfg.surgical_modes else []
    if surgical:
        check_modes(surgical, "bench")
    if cfg.shift not in SHIFTS[1:]:
        raise ValueError(f"shift must be an input-level shift, one of {', '.join(SHIFTS[1:])}; got {cfg.shift!r}")
    ks = sorted(dict.fromkeys(int(k) for k in cfg.ks))
    seeds = list(dict.fromkeys(int(s) for s in cfg.seeds))
    if not ks or not seeds or min(ks) <= 0:
        raise ValueError(f"ks (positive) and seeds must each name at least one value, got {cfg.ks}, {cfg.seeds}")
    if surgical and max(ks) > 50:
        raise ValueError(f"the input-shift target holds 50 images per class to draw from (the 500 held-out source "
                         f"digits, half of them for testing): k={max(ks)} is too many, lower --ks")
    for name in ("steps", "repeats", "warmup", "epochs", "bs"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.threads is not None and cfg.threads <= 0:
        raise ValueError(f"threads must be positive, got {cfg.threads}")
    check_stage_modes(cfg.arch, [*modes, *surgical], cfg.n_in)
    return replace(cfg, modes=modes, surgical_modes=surgical, ks=ks, seeds=seeds)


def steps_per_epoch(n_images: int, bs: int) -> int:
    """Training steps of one epoch of tensor_dls: the last partial batch kept, except a batch of one."""
    return n_images // bs if n_images > bs and n_images % bs == 1 else math.ceil(n_images / bs)


def _study(cfg: DepthConfig, modes: Sequence[str], shift: str, out: Path, dev: torch.device, prec: str,
           log: Callable[[str], None], retrain: bool) -> dict[str, Any]:
    """The label-efficiency study of `modes` on the target of `shift`, in the run folder `out` (`retrain`: pretrain
    the body again even if cached)."""
    study = StudyConfig(ks=cfg.ks, seeds=cfg.seeds, modes=modes, arch=cfg.arch, size=cfg.size, n_in=cfg.n_in,
                        epochs=cfg.epochs, bs=cfg.bs, lr=cfg.lr, pretrain_epochs=cfg.pretrain_epochs, shift=shift,
                        weights=cfg.weights, cache_dir=cfg.cache_dir, retrain=retrain, device=str(dev),
                        precision=prec, out=out, overwrite=True, command=cfg.command)
    return label_efficiency(study, log=log)


def _cost(cfg: DepthConfig, modes: Sequence[str], dev: torch.device, prec: str,
          log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The depth bench on the study's model and input shape (synthetic batches of `bs` images, 5 classes)."""
    batches = synthetic_batches(4, cfg.bs, cfg.size, 5, dev, seed=0, n_in=cfg.n_in)
    dls = DataLoaders(BatchLoader(batches, 1), BatchLoader([], 0), device=dev)
    dls.c = 5
    plan = StepPlan(cfg.warmup, cfg.steps, cfg.repeats, cfg.bs, cfg.lr)
    return bench_depth(dls, cfg.arch, modes, batches, dev, prec, seed=0, plan=plan, epochs=cfg.epochs, n_in=cfg.n_in,
                       log=log)


def _points(accuracy: dict[str, dict[str, list[float]]], cost: dict[str, dict[str, Any]], ks: Sequence[int],
            n_classes: int, bs: int) -> list[dict[str, Any]]:
    """One row per (mode, k): accuracy over seeds, cost per epoch (steps x the measured step time), and accuracy
    per second of an epoch."""
    rows = []
    for mode, per_k in accuracy.items():
        for k in ks:
            acc = per_k.get(str(k)) or []
            if not acc or mode not in cost:
                continue
            step_s = cost[mode]["step_ms"]["median"] / 1000
            epoch_s = steps_per_epoch(k * n_classes, bs) * step_s
            mean = statistics.fmean(acc)
            rows.append(dict(mode=mode, k=k, accuracy=mean, std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                             min=min(acc), max=max(acc), n=len(acc), epoch_s=epoch_s, accuracy_per_s=mean / epoch_s,
                             saved_mb=cost[mode]["saved_mb"], trainable_params=cost[mode]["trainable_params"]))
    return rows


def middle_beats_ends(points: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """At `k`: which frozen_to:K with 0 < K < 5 beat both ends (K = 0 and 5) on accuracy per second of an epoch,
    and which lie above the straight line between the ends (more accuracy than mixing the ends at that cost)."""
    depth = {int(p["mode"].split(":")[1]): p for p in points if p["k"] == k and p["mode"] in DEPTHS}
    last = STAGE_GROUPS - 1
    if 0 not in depth or last not in depth:
        return dict(k=k, complete=False)
    lo, hi = depth[last], depth[0]
    middle = {K: p for K, p in depth.items() if 0 < K < last}

    def chord(p: dict[str, Any]) -> float:
        if hi["epoch_s"] == lo["epoch_s"]:
            return max(lo["accuracy"], hi["accuracy"])
        t = (p["epoch_s"] - lo["epoch_s"]) / (hi["epoch_s"] - lo["epoch_s"])
        return lo["accuracy"] + t * (hi["accuracy"] - lo["accuracy"])

    per_s = [K for K, p in middle.items() if p["accuracy_per_s"] > max(lo["accuracy_per_s"], hi["accuracy_per_s"])]
    above = [K for K, p in middle.items() if p["accuracy"] > chord(p)]
    dominate = [K for K, p in middle.items() if p["accuracy"] >= hi["accuracy"] and p["epoch_s"] < hi["epoch_s"]]
    return dict(k=k, complete=True, beats_both_per_s=per_s, above_the_line=above, as_accurate_as_k0_cheaper=dominate,
                ends={K: dict(accuracy=depth[K]["accuracy"], epoch_s=depth[K]["epoch_s"],
                              accuracy_per_s=depth[K]["accuracy_per_s"]) for K in (0, last)})


def surgical_verdict(label: dict[str, dict[str, list[float]]], shifted: dict[str, dict[str, list[float]]],
                     k: int) -> dict[str, Any]:
    """At `k`: the stage whose surgical fine-tuning scored best on each shift, and whether that agrees with Lee et
    al. (an early stage, stem or layer1, for the input-level shift; a late one, layer3 or layer4, for new labels)."""
    out: dict[str, Any] = dict(k=k)
    for task, acc in (("label", label), ("input", shifted)):
        scores = {i: statistics.fmean(acc[m][str(k)]) for i, m in enumerate(SURGICAL)
                  if m in acc and acc[m].get(str(k))}
        if len(scores) < len(SURGICAL):
            return dict(out, complete=False)
        best = max(scores, key=scores.get)
        out[task] = dict(best=STAGE_NAMES[best], best_accuracy=scores[best],
                         by_stage={STAGE_NAMES[i]: v for i, v in scores.items()},
                         every_layer=statistics.fmean(acc["frozen_to:0"][str(k)]) if "frozen_to:0" in acc else None)
    out["complete"] = True
    out["input_early"] = out["input"]["best"] in ("stem", "layer1")
    out["label_late"] = out["label"]["best"] in ("layer3", "layer4")
    out["holds"] = out["input_early"] and out["label_late"]
    return out


def plot_tradeoff(points: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Test accuracy against the cost of an epoch, a panel per k: every mode a point (the mean over seeds, the
    bar from the worst to the best seed) labelled by its name; the freeze depths frozen_to:0..5 joined."""
    plt = pyplot()
    ks = sorted({p["k"] for p in points})
    fig, axes = plt.subplots(1, len(ks), figsize=(6.4 * len(ks), 4.8), squeeze=False)
    colours = {"frozen_to": "C0", "surgical": "C1", "gradual": "C2", "discriminative": "C3", "frozen_bn_to": "C4"}
    for ax, k in zip(axes[0], ks):
        mine = [p for p in points if p["k"] == k]
        depth = sorted((p for p in mine if p["mode"] in DEPTHS), key=lambda p: int(p["mode"].split(":")[1]))
        if len(depth) > 1:
            ax.plot([p["epoch_s"] for p in depth], [p["accuracy"] for p in depth], "-", color="C0", alpha=0.5,
                    label="frozen_to:K, K = 0..5")
        for p in mine:
            c = colours.get(p["mode"].split(":")[0], "0.3")
            ax.errorbar(p["epoch_s"], p["accuracy"], yerr=[[p["accuracy"] - p["min"]], [p["max"] - p["accuracy"]]],
                        fmt="o", color=c, ms=5, capsize=2, lw=1)
            ax.annotate(p["mode"], (p["epoch_s"], p["accuracy"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7, color=c)
        ax.set_xlabel("cost per epoch (s): steps x measured step time")
        ax.set_ylabel("test accuracy (mean over seeds; bar: min to max)")
        ax.set_title(f"k = {k} labelled images per class", fontsize=9)
        ax.grid(alpha=0.3)
        if len(depth) > 1:
            ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def plot_surgical(label: dict[str, dict[str, list[float]]], shifted: dict[str, dict[str, list[float]]],
                  ks: Sequence[int], path: str | Path, shift: str, title: str = "") -> Path:
    """Accuracy by which stage trained (surgical:0..4) between every layer (frozen_to:0) and the head alone
    (frozen_to:5), a line per shift and a panel per k; every seed a dot."""
    plt = pyplot()
    names = ["every layer", *STAGE_NAMES, "head only"]
    fig, axes = plt.subplots(1, len(ks), figsize=(6.4 * len(ks), 4.4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for acc, what, c in ((label, "label shift: digits 5-9 (new classes)", "C0"),
                             (shifted, f"input shift: digits 0-4, {shift}", "C1")):
            xs, ys = [], []
            for i, mode in enumerate(SURGICAL_MODES):
                seeds = (acc.get(mode) or {}).get(str(k)) or []
                if seeds:
                    xs.append(i)
                    ys.append(statistics.fmean(seeds))
                    ax.plot([i] * len(seeds), seeds, ".", color=c, alpha=0.5, ms=4)
            ax.plot(xs, ys, "-o", color=c, ms=5, label=what)
        ax.axvspan(0.5, len(STAGE_NAMES) + 0.5, color="0.9", zorder=0)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_xlabel("what trains with the head (shaded: one stage alone, surgical:K)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"k = {k} labelled images per class", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def _markdown(cfg: DepthConfig, cost: list[dict[str, Any]], points: list[dict[str, Any]], verdicts: list[dict],
              surgical: list[dict], timing: dict[str, Any], dev_name: str, n_test: int) -> str:
    """depth.md: the cost table, the accuracy-against-cost table, and what was measured beside each claim."""
    from .depth import depth_markdown

    lines = [f"# Fine-tuning by depth: {cfg.arch}, {cfg.size} px, {cfg.n_in} channel(s)", "",
             f"Cost per training step ({dev_name}, batch {cfg.bs}, modes in {cfg.repeats} alternating rounds of "
             f"{cfg.steps} steps; load average {timing['load_average_start']} at the start):", ""]
    lines += depth_markdown(cost, dev_name)
    ks = sorted({p["k"] for p in points})
    table = []
    for mode in dict.fromkeys(p["mode"] for p in points):
        row: dict[str, Any] = {"mode": mode}
        for k in ks:
            p = next((q for q in points if q["mode"] == mode and q["k"] == k), None)
            if p:
                row[f"k={k} accuracy"] = f"{p['accuracy']:.3f} ± {p['std']:.3f} ({p['n']})"
                row[f"k={k} s/epoch"] = p["epoch_s"]
                row[f"k={k} accuracy per s"] = p["accuracy_per_s"]
        table.append(row)
    columns = ["mode", *[f"k={k} {c}" for k in ks for c in ("accuracy", "s/epoch", "accuracy per s")]]
    lines += ["", f"Test accuracy on the {n_test:,} unseen target digits (5-9), mean ± std over seeds {cfg.seeds} "
              f"(runs), {cfg.epochs} epochs, batch {cfg.bs}, lr {cfg.lr:g}; cost per epoch = training steps x the step time "
              "above:", "", markdown_table(table, columns), ""]
    for v in verdicts:
        if not v["complete"]:
            continue
        ends = v["ends"]
        per_s = ", ".join(f"frozen_to:{K}" for K in v["beats_both_per_s"]) or "none"
        above = ", ".join(f"frozen_to:{K}" for K in v["above_the_line"]) or "none"
        lines += [f"**At k = {v['k']}, does a depth strictly between 0 and 5 beat both ends on accuracy per unit of "
                  f"cost?** {'Yes' if v['beats_both_per_s'] else 'No'}: {per_s} (frozen_to:0: "
                  f"{ends[0]['accuracy']:.3f} at {ends[0]['epoch_s']:.3g} s/epoch, {ends[0]['accuracy_per_s']:.3g} "
                  f"per s; frozen_to:5: {ends[5]['accuracy']:.3f} at {ends[5]['epoch_s']:.3g} s/epoch, "
                  f"{ends[5]['accuracy_per_s']:.3g} per s). Above the straight line between the ends (more accuracy "
                  f"than the ends' cost-weighted mix): {above}.", ""]
    if surgical:
        lines += ["## Surgical fine-tuning: which stage to train", "", f"Paper: {LEE_CLAIM}", ""]
        for s in surgical:
            if not s["complete"]:
                continue
            fmt = lambda d: ", ".join(f"{n} {v:.3f}" for n, v in d["by_stage"].items())  # noqa: E731
            lines += [f"Measured here, k = {s['k']}: on the label shift (digits 5-9) the best single stage is "
                      f"**{s['label']['best']}** ({fmt(s['label'])}; every layer {s['label']['every_layer']:.3f}); on "
                      f"the input shift (digits 0-4, {cfg.shift}) it is **{s['input']['best']}** "
                      f"({fmt(s['input'])}; every layer {s['input']['every_layer']:.3f}). "
                      + ("The paper's finding holds here." if s["holds"] else
                         "The paper's finding does not hold here: "
                         + ("" if s["input_early"] else "the input shift's best stage is not an early one")
                         + ("" if s["input_early"] or s["label_late"] else "; ")
                         + ("" if s["label_late"] else "the label shift's best stage is not a late one") + "."), ""]
    lines += [f"Wall time: cost {timing['cost_s']:.0f} s, label-shift study {timing['label_s']:.0f} s"
              + (f", input-shift study {timing['input_s']:.0f} s" if "input_s" in timing else "")
              + f"; load average {timing['load_average_end']} at the end.", ""]
    if cfg.command:
        lines += [f"Command: `{cfg.command}`", ""]
    return "\n".join(lines)


def depth_study(config: DepthConfig | None = None, *, log: Callable[[str], None] = print,
                **options: Any) -> dict[str, Any]:
    """Accuracy against cost for each mode (frozen_to:0..5, surgical:0..4, gradual, discriminative:10 by default)
    on the offline target task, and surgical fine-tuning on both shifts. Writes config.json, tradeoff.png,
    surgical.png (when `surgical_modes`), depth.md, summary.json, and the two label-efficiency studies'
    folders (label_shift/, input_shift/). `config`: a DepthConfig (or its fields as keywords in `options`).

    The cost is measured first, on the study's model and input shape with synthetic batches (bench_depth: plain
    loop, modes in alternating rounds), then each study trains its modes from the body pretrained on digits 0-4
    (cached, shared with the main job). The device and the precision are resolved once, here."""
    cfg = check_depth(build_config(DepthConfig, config, options))
    dev = pick_device(cfg.device)
    prec = resolve_precision(cfg.precision, dev)
    run = new_run_dir(cfg.out, cfg.overwrite)
    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        timing: dict[str, Any] = dict(load_average_start=load_average())
        config = dict(config_dict(cfg), device=str(dev), device_name=device_name(dev), precision=prec,
                      mode_settings={m: training_mode(m).settings() for m in [*cfg.modes, *cfg.surgical_modes]},
                      env=env_info(dev), torch_threads=torch.get_num_threads())
        write_json(run / "config.json", config)
        log(f"freeze depth: {cfg.arch}, {cfg.size} px; cost of {len(cfg.modes)} modes on {device_name(dev)}")
        t = time.perf_counter()
        cost = _cost(cfg, list(dict.fromkeys([*cfg.modes, *cfg.surgical_modes])), dev, prec, log)
        timing["cost_s"] = time.perf_counter() - t
        by_mode = {r["mode"]: r for r in cost}
        t = time.perf_counter()
        label = _study(cfg, cfg.modes, "label", run / "label_shift", dev, prec, log, cfg.retrain)
        timing["label_s"] = time.perf_counter() - t
        shifted = None
        if cfg.surgical_modes:
            t = time.perf_counter()
            # the body the first study (re)trained: --retrain pretrains once, and both studies start from one body
            shifted = _study(cfg, cfg.surgical_modes, cfg.shift, run / "input_shift", dev, prec, log, retrain=False)
            timing["input_s"] = time.perf_counter() - t
        timing["load_average_end"] = load_average()
        first = label["runs"][0]
        points = _points(label["accuracy"], by_mode, cfg.ks, first["n_train"] // first["k"], cfg.bs)
        verdicts = [middle_beats_ends(points, k) for k in cfg.ks]
        surgical = [surgical_verdict(label["accuracy"], shifted["accuracy"], k) for k in cfg.ks] if shifted else []
        title = (f"{cfg.arch} ({cfg.size} px), body pretrained on digits 0-4, target digits 5-9\n{cfg.epochs} epochs, "
                 f"seeds {cfg.seeds}; cost on {device_name(dev)}")
        plot_tradeoff(points, run / "tradeoff.png", title=title)
        if shifted:
            plot_surgical(label["accuracy"], shifted["accuracy"], cfg.ks, run / "surgical.png", cfg.shift,
                          title=f"Surgical fine-tuning of {cfg.arch}: which stage to train, two shifts\n"
                                f"{cfg.epochs} epochs, seeds {cfg.seeds}")
        timing["seconds"] = time.perf_counter() - t0
        (run / "depth.md").write_text(_markdown(cfg, cost, points, verdicts, surgical, timing, device_name(dev),
                                                label["config"]["target_sizes"]["test"]))
        summary = dict(run_dir=str(run), config=config, cost=cost, points=points, verdicts=verdicts,
                       falls_with_depth=falls_with_depth(cost), surgical=surgical, lee_claim=LEE_CLAIM,
                       label_shift=dict(run_dir=label["run_dir"], accuracy=label["accuracy"],
                                        target=label["config"]["target"]),
                       input_shift=dict(run_dir=shifted["run_dir"], accuracy=shifted["accuracy"],
                                        target=shifted["config"]["target"]) if shifted else None,
                       body=label["body"], timing=timing)
        write_json(run / "summary.json", summary)
        log(f"\nfreeze depth: {run / 'depth.md'} ({timing['seconds']:.0f}s)")
        return summary
    finally:
        torch.set_num_threads(previous)
