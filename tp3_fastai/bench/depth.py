"""What each freeze depth costs (issue "fine-tuning methods by depth"): the training step of every mode of a list
(frozen_to:K, surgical:K, gradual, discriminative:R, frozen, ...) timed in alternating rounds on the same synthetic
batches, with the activations autograd keeps for the backward pass (by stage group) and, on CUDA, the peak memory."""
from __future__ import annotations

import copy
import statistics
from typing import Any, Callable, Sequence

import torch
from fastai.callback.training import set_bn_eval

from ..train.learner import count_params
from ..train.modes import check_modes, mode_label, training_mode
from ..transfer.stages import saved_for_backward, stage_split
from .loops import BatchLoader, PlainLoop
from .modes import alternate_rounds, mode_learner
from .timing import StepPlan, free_device_memory, peak_memory_mb, reset_peak_memory, spread, step_stats

MIB = 2 ** 20


def _states(mode: str, n_groups: int, epochs: int) -> list[tuple[list[bool], int]]:
    """The frozen flags of each distinct state a mode trains in over `epochs` epochs (one, but for gradual), with
    the number of epochs it lasts."""
    m = training_mode(mode)
    if m.schedule != "gradual":
        return [(m.frozen_groups(n_groups), epochs)]
    states: dict[tuple[bool, ...], int] = {}
    for e in range(epochs):
        key = tuple(m.frozen_groups(n_groups, e))
        states[key] = states.get(key, 0) + 1
    return [(list(k), n) for k, n in states.items()]


def _with_state(model: torch.nn.Module, frozen: list[bool]) -> torch.nn.Module:
    """A copy of `model` whose stage groups train or not as `frozen` says (a gradual mode's epoch)."""
    model = copy.deepcopy(model)
    for group, f in zip(stage_split(model), frozen):
        for p in group:
            p.requires_grad_(not f)
    return model


def _saved(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], bn_eval: bool) -> dict[str, int]:
    """Bytes kept for backward by one training forward, the model in training mode as PlainLoop runs it."""
    was = model.training
    model.train()
    if bn_eval:
        set_bn_eval(model)
    try:
        return saved_for_backward(model, *batch)
    finally:
        model.train(was)


def bench_depth(dls, arch: str, modes: Sequence[str], batches, dev: torch.device, precision: str, seed: int,
                plan: StepPlan, epochs: int = 5, n_in: int = 3,
                log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Step time (plain PyTorch loop, the package's AdamW, synthetic batches), saved activations and peak memory of
    each mode, built by mode_learner (same initial weights). The modes alternate round by round, so that machine
    noise hits them alike. A gradual mode is timed in each state of its first `epochs` epochs (one more group
    trains each epoch); its row holds their mean over those epochs (peak memory: the largest). discriminative:R
    costs what every layer costs: its rates differ, not its work. `ratio_vs_first`: step time over the first mode's (median over rounds of the paired ratio)."""
    warmup, steps, repeats, bs, lr = plan.warmup, plan.steps, plan.repeats, plan.bs, plan.lr
    modes = check_modes(modes, "bench")
    loops: dict[str, PlainLoop] = {}
    info: dict[str, dict[str, Any]] = {}
    for mode in modes:
        m = training_mode(mode)
        base = mode_learner(dls, arch, mode, seed, precision, lr=lr, n_in=n_in).model.to(dev)
        n_groups = len(stage_split(base))
        states = _states(mode, n_groups, epochs)
        info[mode] = dict(states=[], bn_eval=m.bn_frozen or m.schedule == "gradual")
        for i, (frozen, n_epochs) in enumerate(states):
            model = _with_state(base, frozen) if m.schedule == "gradual" else base
            key = f"{mode}@{i + 1}" if m.schedule == "gradual" else mode
            saved = _saved(model, batches[0], info[mode]["bn_eval"])
            reset_peak_memory(dev)
            loop = PlainLoop(model, dev, precision, lr, bn_eval=info[mode]["bn_eval"])
            loop.run(BatchLoader(batches, warmup + 1), warmup, 1, 1)  # warm-up, and the peak memory of a step
            info[mode]["states"].append(dict(key=key, trainable_params=count_params(model)[0], saved=saved,
                                             peak_memory_mb=peak_memory_mb(dev), frozen=frozen, epochs=n_epochs))
            loops[key] = loop
    times = alternate_rounds(loops, lambda k: BatchLoader(batches, k), 1, steps, repeats)
    first = next(iter(loops))
    rows = []
    for mode in modes:
        states = info[mode]["states"]
        medians = [spread(times[s["key"]])["median"] for s in states]
        keys, weights = [s["key"] for s in states], [s["epochs"] for s in states]

        def mean(values: Sequence[float]) -> float:  # over the mode's epochs
            return sum(v * w for v, w in zip(values, weights)) / sum(weights)

        per_round = [mean([times[k][r] for k in keys]) for r in range(repeats)]
        stats = step_stats(per_round, steps, bs)
        ratios = [per_round[r] / times[first][r] for r in range(repeats)]
        saved = {g: mean([s["saved"][g] for s in states]) for g in states[0]["saved"]}
        peaks = [s["peak_memory_mb"] for s in states]
        rows.append(dict(mode=mode, label=mode_label(mode), precision=precision, **stats,
                         ratio_vs_first=statistics.median(ratios),
                         trainable_params=round(mean([s["trainable_params"] for s in states])),
                         total_params=count_params(loops[keys[0]].model)[1],
                         saved_mb=sum(saved.values()) / MIB, saved_mb_by_group={g: v / MIB for g, v in saved.items()},
                         peak_memory_mb=None if peaks[0] is None else max(peaks),
                         state_step_ms=[1000 * t / steps for t in medians] if len(states) > 1 else None,
                         frozen_groups=[sum(s["frozen"]) for s in states], state_epochs=weights))
        if log:
            r = rows[-1]
            log(f"  depth {mode:<18} {r['step_ms']['median']:8.2f} ms/step [{r['step_ms']['min']:.2f}-"
                f"{r['step_ms']['max']:.2f}] x{r['ratio_vs_first']:.3f} of {first.split('@')[0]}, saved for backward "
                f"{r['saved_mb']:.2f} MiB, {r['trainable_params']:,} weights train")
    del loops
    free_device_memory(dev)
    return rows


def falls_with_depth(rows: Sequence[dict[str, Any]], tolerance: float = 0.10) -> dict[str, Any]:
    """The goal on step time: each frozen_to:K of `rows` costs at most the previous K's step time, and
    frozen_to:5 is within `tolerance` of frozen (when both ran). Returns the check, with its numbers."""
    depth = sorted(((int(r["mode"].split(":")[1]), r) for r in rows if r["mode"].startswith("frozen_to:")),
                   key=lambda kr: kr[0])
    ms = {k: r["step_ms"]["median"] for k, r in depth}
    steps = [(a, b, ms[b] <= ms[a]) for (a, _), (b, _) in zip(depth, depth[1:])]
    out: dict[str, Any] = dict(step_ms=ms, monotone=all(ok for *_, ok in steps),
                               rises=[f"frozen_to:{a} -> frozen_to:{b}" for a, b, ok in steps if not ok])
    frozen = next((r for r in rows if r["mode"] == "frozen"), None)
    if frozen is not None and 5 in ms:
        ratio = ms[5] / frozen["step_ms"]["median"]
        out.update(k5_over_frozen=ratio, k5_like_frozen=abs(ratio - 1) <= tolerance)
    return out


def depth_markdown(rows: Sequence[dict[str, Any]], device_name: str) -> list[str]:
    """The depth section of a report: a table row per mode, and whether step time falls with every stage frozen."""
    first = rows[0]["mode"]
    mem = any(r["peak_memory_mb"] is not None for r in rows)
    lines = ["| mode | weights that train | step ms | x " + first + " | saved for backward MiB"
             + (" | peak MiB |" if mem else " |"), "|---|---|---|---|---|" + ("---|" if mem else "")]
    for r in rows:
        peak = f" {r['peak_memory_mb']:,.0f} |" if mem else ""
        lines.append(f"| {r['mode']} | {r['trainable_params']:,} | {r['step_ms']['median']:.4g} "
                     f"[{r['step_ms']['min']:.4g}-{r['step_ms']['max']:.4g}] | {r['ratio_vs_first']:.3f} | "
                     f"{r['saved_mb']:.2f} |{peak}")
    check = falls_with_depth(rows)
    if len(check["step_ms"]) > 1:
        verdict = ("yes: each K costs at most the previous K's step time" if check["monotone"]
                   else f"no: the step time rose at {', '.join(check['rises'])}")
        lines += ["", f"Step time falls with every stage frozen ({device_name}): {verdict}."]
        if "k5_over_frozen" in check:
            lines[-1] += (f" frozen_to:5 / frozen = {check['k5_over_frozen']:.3f} "
                          f"({'within' if check['k5_like_frozen'] else 'outside'} 10%).")
    return lines
