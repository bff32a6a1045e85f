"""Training modes x speed levers: what frozen and full fine-tuning cost (issue "bench_freeze"). The modes and
levers, the same model built for every mode, and the measurements: one mode with one set of levers, the package's
fastai loop against the plain PyTorch loop (the input pipelines: bench.pipelines)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from fastai.torch_core import set_seed
from torch import nn

from ..data.mnist import TensorLoader
from ..core.device import synchronize
from ..core.checks import check_name
from ..train.learner import count_params
from ..train.modes import DEFAULT_MODES, check_modes, training_mode
from ..train.optimizer import default_opt_func
from .loops import BatchLoader, LearnerLoop, PlainLoop, host_reads_per_step
from .timing import (StepPlan, step_stats, free_device_memory, peak_memory_mb, reset_peak_memory,
                     set_cudnn_benchmark, spread, timed)

BENCH_MODES = DEFAULT_MODES["bench"]  # every mode of the table that applies to the bench, in the bench's order
LEVER_PRECISIONS = ("fp32", "fp16", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")
LOOPS = ("plain", "package", "stock", "package_fastai_adam")
LOOP_LABELS = {
    "plain": "plain PyTorch loop (the package's AdamW as a bare torch optimiser, OneCycleLR)",
    "package": "package Learner as built by resnet_learner / train_head_on_features (its default optimiser, torch "
               "AdamW, and lean loop: no per-batch host reads, events only to their callbacks, plain tensors)",
    "stock": "the same Learner built as fastai's own (stock=True: fastai's Learner class, Recorder, metrics, "
             "MixedPrecision, loss and tensor subclasses; what the package ran before)",
    "package_fastai_adam": "package Learner with fastai's own Adam (the package's default before; not the same "
                           "optimiser)",
}


def lever_skip_reason(device: torch.device, precision: str, cudnn_benchmark: bool | None) -> str | None:
    """Why a lever cannot run on `device` (reported, never faked), or None when it runs."""
    if precision not in LEVER_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose from {', '.join(LEVER_PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        return "skipped: needs CUDA"  # fastai's and torch's AMP paths here are CUDA-only (fp16 on CPU does not run)
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "skipped: this GPU has no bf16"
    if cudnn_benchmark is not None and device.type != "cuda":
        return "skipped: needs CUDA"
    return None


@dataclass(frozen=True)
class Levers:
    """The speed levers of one measurement: precision, memory format, torch.compile and cudnn.benchmark (None:
    not applicable, on a CPU)."""
    precision: str = "fp32"
    memory_format: str = "contiguous"
    compile: bool = False
    cudnn_benchmark: bool | None = None


# --- building the same model for every mode -------------------------------------------------------------------

def mode_learner(dls, arch: str, mode: str, seed: int, precision: str = "fp32", opt: str = "package",
                 lr: float = 1e-3, stock: bool = False, channels_last: bool | None = None, n_in: int = 3):
    """A learner built by transfer.resnet_learner (random init, same seed: same weights in every mode) and put in
    `mode` (a bench mode of train.modes' table; precomputed: as frozen) by set_mode. `opt`: 'package'
    (resnet_learner's default, torch AdamW: the plain loop's optimiser) or 'fastai' (fastai's Adam). `stock`:
    fastai's stock loop instead of the package's lean one. `n_in`: input channels."""
    from fastai.optimizer import Adam as FastaiAdam

    from ..transfer.learner import resnet_learner, set_mode

    check_modes([mode], "bench")
    set_seed(seed)
    learn = resnet_learner(dls, arch, pretrained=False, n_in=n_in, precision=precision,
                           train_bn=training_mode(mode).train_bn, progress=False, log=None, lr=lr, name=mode,
                           channels_last=channels_last, stock=stock)
    check_name(opt, ["package", "fastai"], "benchmark optimiser")
    if opt == "fastai":
        learn.opt_func = FastaiAdam
    set_mode(learn, mode)
    learn.bench_mode = mode
    return learn


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train."""
    return {n for n, p in model.named_parameters() if p.requires_grad}



# --- measurements ---------------------------------------------------------------------------------------------

def measure_cell(base: Mapping[str, nn.Module], mode: str, batches, dev: torch.device, levers: Levers,
                 plan: StepPlan) -> dict[str, Any]:
    """Throughput, step time and peak memory of one mode with one set of levers, in the plain loop on the
    synthetic batches (for 'precomputed': the one-off caching pass and the head's training step)."""
    from ..transfer.features import feature_split, precompute_features

    precision, memory_format, compiled, cudnn_benchmark = (levers.precision, levers.memory_format, levers.compile,
                                                           levers.cudnn_benchmark)
    warmup, steps, repeats, bs, lr = plan.warmup, plan.steps, plan.repeats, plan.bs, plan.lr
    row: dict[str, Any] = dict(mode=mode, precision=precision, memory_format=memory_format, compile=compiled,
                               cudnn_benchmark=cudnn_benchmark)
    reason = lever_skip_reason(dev, precision, cudnn_benchmark)
    if reason:
        return dict(row, status=reason)
    cl = memory_format == "channels_last"
    prev = set_cudnn_benchmark(cudnn_benchmark)
    model = copy.deepcopy(base[mode]).to(dev)
    try:
        if cl:
            model = model.to(memory_format=torch.channels_last)
            batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
        row["trainable_params"], row["total_params"] = count_params(model)
        reset_peak_memory(dev)
        if mode == "precomputed":
            extractor, head = feature_split(model)
            fwd = torch.compile(extractor) if compiled else extractor
            row["trainable_params"] = count_params(head)[0]

            def cache(k: int):
                return precompute_features(fwd, BatchLoader(batches, k), dev, precision, cl)

            synchronize(dev)
            t = time.perf_counter()
            cache(warmup)
            synchronize(dev)
            row["cache_warmup_s"] = time.perf_counter() - t
            cache_s = [timed(lambda: cache(steps), dev) for _ in range(repeats)]
            c = step_stats(cache_s, steps, bs)
            row["cache_step_ms"], row["cache_images_per_s"] = c["step_ms"], c["images_per_s"]
            feats, labels = precompute_features(extractor, BatchLoader(batches, len(batches)), dev, precision)
            n = (warmup + steps * repeats) * bs
            idx = torch.arange(n, device=dev) % len(labels)
            loader = TensorLoader(feats[idx], labels[idx], bs, shuffle=True, drop_last=True, device=dev)
            loop = PlainLoop(head, dev, precision, lr, compiled=compiled)
        else:
            loader = BatchLoader(batches, warmup + steps * repeats)
            loop = PlainLoop(model, dev, precision, lr, compiled=compiled, bn_eval=training_mode(mode).bn_frozen)
        g = loop.run(loader, warmup, steps, repeats)
        row.update(step_stats(g, steps, bs))
        row["warmup_s"] = loop.warmup_s
        row["peak_memory_mb"] = peak_memory_mb(dev)
        row["status"] = "ok"
    except Exception as e:  # out of memory, a compile failure, ...: reported, and the other cells still run
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        set_cudnn_benchmark(prev)
        del model
        free_device_memory(dev)
    return row


def alternate_rounds(loops: Mapping[str, Any], make_loader: Callable[[int], Any], warmup: int, steps: int,
                     repeats: int) -> dict[str, list[float]]:
    """Time every loop in rounds (one group of `steps` each per round, loops in turn), so that machine noise hits
    them alike. The first round warms up with `warmup` steps, later ones with one step."""
    times: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(repeats):
        w = warmup if r == 0 else 1
        for name, loop in loops.items():
            times[name] += loop.run(make_loader(w + steps), w, steps, 1)
    return times


def bench_overhead(dls, arch: str, modes: Sequence[str], batches, dev: torch.device, precision: str, seed: int,
                   plan: StepPlan, count_reads: bool = True, loops: Sequence[str] = LOOPS,
                   log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """The package's fastai loop against the plain PyTorch loop: same model and initial weights, optimiser
    (the package's AdamW, except 'package_fastai_adam'), one-cycle schedule, data (synthetic on-device batches, or
    their precomputed features) and precision; 'stock' is fastai's stock loop. Ratio = median step time / the
    plain loop's."""
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam as FastaiAdam

    from fastai.losses import CrossEntropyLossFlat as FastaiCrossEntropyLossFlat

    from ..train.loop import CrossEntropyLossFlat
    from ..transfer.features import feature_learner, feature_split, precompute_features

    warmup, steps, repeats, bs, lr = plan.warmup, plan.steps, plan.repeats, plan.bs, plan.lr
    rows = []
    for mode in check_modes(modes, "bench"):
        built: dict[str, Any] = {}
        if mode == "precomputed":
            extractor, head = feature_split(mode_learner(dls, arch, mode, seed, precision).model.to(dev))
            feats, labels = precompute_features(extractor, BatchLoader(batches, len(batches)), dev, precision)

            def make_loader(k: int, feats=feats, labels=labels):
                idx = torch.arange(k * bs, device=dev) % len(labels)
                return TensorLoader(feats[idx], labels[idx], bs, shuffle=True, drop_last=True, device=dev)

            def head_learner(opt_func, stock=False):
                set_seed(seed)
                loss_func = FastaiCrossEntropyLossFlat() if stock else CrossEntropyLossFlat()
                return feature_learner(copy.deepcopy(head), dls, loss_func, opt_func, lr, metrics=accuracy,
                                       precision=precision, stock=stock)

            for name in loops:
                if name == "plain":
                    built[name] = PlainLoop(copy.deepcopy(head), dev, precision, lr)
                else:
                    opt = FastaiAdam if name == "package_fastai_adam" else default_opt_func(dev)
                    built[name] = LearnerLoop(head_learner(opt, name == "stock"), dev, lr, name)
        else:
            def make_loader(k: int):
                return BatchLoader(batches, k)

            for name in loops:
                if name == "plain":
                    model = mode_learner(dls, arch, mode, seed, precision).model
                    built[name] = PlainLoop(model, dev, precision, lr, bn_eval=training_mode(mode).bn_frozen)
                else:
                    learn = mode_learner(dls, arch, mode, seed, precision,
                                         opt="fastai" if name == "package_fastai_adam" else "package",
                                         lr=lr, stock=name == "stock")
                    built[name] = LearnerLoop(learn, dev, lr, name)
        times = alternate_rounds(built, make_loader, warmup, steps, repeats)
        reads = {k: host_reads_per_step(v, make_loader) if count_reads else None for k, v in built.items()}
        plain_med = spread(times["plain"])["median"] if "plain" in times else math.nan
        for name in built:
            s = step_stats(times[name], steps, bs)
            ratio = spread(times[name])["median"] / plain_med
            rows.append(dict(mode=mode, loop=name, precision=precision, **s, ratio_vs_plain=ratio,
                             overhead_ms_per_step=s["step_ms"]["median"] - plain_med / steps * 1000,
                             host_reads_per_step=reads[name], same_optimizer=name != "package_fastai_adam"))
            if log:
                log(f"  overhead {mode:<16} {name:<20} {s['step_ms']['median']:9.2f} ms/step "
                    f"x{ratio:.3f} of plain, host reads/step {reads[name]}")
        del built
        free_device_memory(dev)
    return rows
