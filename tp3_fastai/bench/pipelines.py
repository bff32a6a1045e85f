"""The input pipelines measured: real image batches of each pipeline (pil, device, cached; tp3_fastai.data.pipeline)
against synthetic on-device batches, in one run; and the host waits per training step they cause.

Each pipeline is timed in a block of its own, after a warm-up of at least workers x prefetch batches (so that no
cell is timed while another pipeline's workers fill their queues): its loader alone, then each loop fed by it, next
to each other; the synthetic baseline is timed in the same run, first. Host reads and copies that would block on
CUDA are counted per training step of the package Learner on real batches (`pipeline_syncs`), and
`sync_debug_epoch` runs one epoch with every host wait an error (CUDA) or counted (CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Any, Callable, Mapping, Sequence

import torch
from fastai.callback.core import Callback

from ..core.checks import check_name
from .loops import (BatchLoader, HostReadCounter, LearnerLoop, PlainLoop, StreamLoader, cycle_loader,
                    synthetic_batches)
from .modes import mode_learner
from .timing import free_device_memory, step_stats, timed

PIPELINE_LOOPS = ("plain", "package", "stock")
PIPELINE_MODES = ("unfrozen", "frozen_bn", "frozen")  # the modes of train.modes that train on real batches
TORCH_PREFETCH = 2  # batches each torch DataLoader worker prepares ahead (its prefetch_factor)


def workers_of(dl) -> int:
    """A DataLoader's worker processes (fastai keeps the count in `fake_l`; `dl.num_workers` is 1)."""
    fake = getattr(dl, "fake_l", None)
    return getattr(fake, "num_workers", getattr(dl, "num_workers", 0))


def prefetch_of(dl) -> int:
    """Batches a DataLoader prepares ahead on its background thread (tp3_fastai.data.pipeline.ImageFolderDL)."""
    return int(getattr(dl, "prefetch_depth", 0))


def warmup_batches(dl, warmup: int) -> int:
    """Batches drawn before timing a loader: `warmup`, and at least what its workers and background thread hold
    ahead (workers x torch's prefetch factor, plus the thread's queue), so that timing starts in the steady state."""
    return max(warmup, workers_of(dl) * TORCH_PREFETCH + prefetch_of(dl) + 1)


def pipeline_syncs(loop: LearnerLoop, dl, device: torch.device) -> dict[str, Any]:
    """Host reads and host-to-device copies (all, and those that would block on CUDA) per training step of `loop`
    on real batches of `dl`: two counted fits over loaders of exactly 2 and 3 of `dl`'s batches (one warm-up step
    each), differenced so that per-fit and per-epoch work cancels out. The readers found are kept in `where`."""
    counts = []
    for steps in (1, 2):
        sub = dl.new(n=(1 + steps) * dl.bs, shuffle=True, drop_last=True)
        with HostReadCounter(device) as c:
            loop.run(sub, 1, steps, 1)
        counts.append(c)
        del sub
    a, b = counts
    return dict(reads_per_step=float(b.total - a.total), blocking_copies_per_step=float(b.blocking_copies -
                                                                                       a.blocking_copies),
                copies_per_step=float(b.copies.copies - a.copies.copies),
                where={k: v - a.where.get(k, 0) for k, v in b.where.items() if v != a.where.get(k, 0)},
                blocking_where={k: v - a.copies.where.get(k, 0) for k, v in b.copies.where.items()
                                if v != a.copies.where.get(k, 0)})


def _loop(name: str, dls, arch: str, mode: str, dev: torch.device, precision: str, seed: int, lr: float,
          cl: bool):
    if name == "plain":
        m = mode_learner(dls, arch, mode, seed, precision).model
        return PlainLoop(m.to(memory_format=torch.channels_last) if cl else m, dev, precision, lr,
                         bn_eval=mode == "frozen")
    return LearnerLoop(mode_learner(dls, arch, mode, seed, precision, lr=lr, stock=name == "stock",
                                    channels_last=cl), dev, lr, name)


def _row(stats: dict[str, Any], **facts: Any) -> dict[str, Any]:
    return dict(facts, **stats, max_over_min=stats["step_ms"]["max"] / stats["step_ms"]["min"])


@dataclass
class PipelinePlan:
    """What `bench_pipeline` measures: the model trained (`arch`, each of `modes` by each of `loops`, `precision`,
    `lr`, `seed`), the batches (`bs` images of `size` px) and the timing (`warmup`, then `repeats` groups of `steps`
    timed steps); `channels_last` None: on CUDA only; `count`: the package Learner's host waits per step."""
    arch: str
    modes: Sequence[str]
    precision: str
    bs: int
    size: int
    seed: int = 0
    lr: float = 1e-3
    warmup: int = 5
    steps: int = 10
    repeats: int = 3
    loops: Sequence[str] = PIPELINE_LOOPS
    channels_last: bool | None = None
    count: bool = True


def bench_pipeline(pipe_dls: Mapping[str, Any], syn_dls, plan: PipelinePlan, dev: torch.device,
                   log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Synthetic on-device batches against each input pipeline of `pipe_dls` ({name: DataLoaders} on one image
    folder). First, per mode, each of `loops` (plain PyTorch loop, package Learner, fastai's stock loop) on synthetic
    batches; then each pipeline in its own block: after `warmup_batches`, its training loader alone, then each loop
    fed by it, `repeats` groups of `steps` timed steps each (at least 40 in all for the GPU figures), and (`count`)
    the package Learner's host reads and blocking copies per step on its real batches. Models train as the practical
    would on the device: `channels_last` defaults to True on CUDA, False on a CPU. Throughput ratios are to the same
    loop and mode on synthetic batches."""
    arch, modes, precision, seed, lr = plan.arch, plan.modes, plan.precision, plan.seed, plan.lr
    bs, size = plan.bs, plan.size
    warmup, steps, repeats, count = plan.warmup, plan.steps, plan.repeats, plan.count
    cl = dev.type == "cuda" if plan.channels_last is None else plan.channels_last
    loops = list(plan.loops)
    for mode in modes:
        check_name(mode, PIPELINE_MODES, "pipeline mode")
    for name in loops:
        check_name(name, PIPELINE_LOOPS, "pipeline loop")
    first_dls = next(iter(pipe_dls.values()))
    batches = synthetic_batches(2, bs, size, first_dls.c, dev, seed + 1, channels_last=cl)
    rows: list[dict[str, Any]] = []
    synthetic: dict[tuple[str, str], float] = {}
    for mode in modes:
        for name in loops:
            loop = _loop(name, syn_dls, arch, mode, dev, precision, seed, lr, cl)
            s = step_stats(loop.run(BatchLoader(batches, warmup + steps * repeats), warmup, steps, repeats), steps, bs)
            synthetic[mode, name] = s["images_per_s"]
            rows.append(_row(s, block="synthetic", pipeline=None, mode=mode, loop=name, data="synthetic",
                             precision=precision, of_synthetic=1.0))
            if log:
                log(f"  pipeline synthetic {mode:<16} {name:<8} {s['images_per_s']:9.1f} images/s")
            del loop
        free_device_memory(dev)
    loaders = []
    for p, dls in pipe_dls.items():
        dl = dls.train
        info = getattr(getattr(dls, "info", None), "pipeline_info", {}) or {}
        w = warmup_batches(dl, warmup)
        stream = cycle_loader(dl)
        for _ in range(w):
            next(stream)
        times = [timed(lambda: [next(stream) for _ in range(steps)], dev) for _ in range(repeats)]
        loader = _row(step_stats(times, steps, bs), block=p, pipeline=p, mode=None, loop="loader alone",
                      data="real", precision=None, ran=info.get("pipeline", p), workers=workers_of(dl),
                      prefetch=prefetch_of(dl), warmup_batches=w, fill_s=info.get("fill_s"),
                      cached=info.get("cached"), streamed=info.get("streamed"),
                      augmentation=info.get("augmentation"))
        loaders.append(loader)
        rows.append(loader)
        if log:
            log(f"  pipeline {p:<8} loader alone ({loader['workers']} workers, {w} warm-up batches): "
                f"{loader['images_per_s']:9.1f} images/s")
        for mode in modes:
            for name in loops:
                loop = _loop(name, first_dls, arch, mode, dev, precision, seed, lr, cl)
                source = StreamLoader(stream, warmup + steps * repeats, plain=name == "plain", bs=bs)
                s = step_stats(loop.run(source, warmup, steps, repeats), steps, bs)
                row = _row(s, block=p, pipeline=p, mode=mode, loop=name, data="real", precision=precision,
                           of_synthetic=s["images_per_s"] / synthetic[mode, name])
                if count and name == "package":
                    row.update(pipeline_syncs(loop, dl, dev))
                rows.append(row)
                if log:
                    syncs = (f", host reads/step {row['reads_per_step']:g}, blocking copies/step "
                             f"{row['blocking_copies_per_step']:g}") if "reads_per_step" in row else ""
                    log(f"  pipeline {p:<8} {mode:<16} {name:<8} {s['images_per_s']:9.1f} images/s "
                        f"({row['of_synthetic']:.0%} of synthetic){syncs}")
                del loop
            free_device_memory(dev)
        stream.close()  # stops the loader's background thread
    first = loaders[0]["images_per_s"] if loaders else None
    for r in loaders:
        r["ratio_vs_first"] = r["images_per_s"] / first
    info = getattr(first_dls, "info", None)
    aug = getattr(getattr(first_dls, "augmentation", None), "name", None)
    return dict(loader=loaders[0] if loaders else None, loaders=loaders, rows=rows, pipelines=list(pipe_dls),
                loops=loops, aug=aug, memory_format="channels_last" if cl else "contiguous",
                data=str(getattr(info, "source", "")),
                note="each pipeline in its own block after its warm-up: loader alone (reading, decoding, crops, "
                     "augmentation, Normalize; no model), then each loop on its batches; of synthetic: images/s / "
                     "the same loop's on synthetic on-device batches in this run; reads and blocking copies per "
                     "training step of the package Learner on real batches (a blocking copy: host-to-device from "
                     "memory that is not staged)")


class SyncDebug(Callback):
    """During the training batches of each epoch (the loader's start and end included), every host wait is an error
    on CUDA (`torch.cuda.set_sync_debug_mode('error')`) and counted (HostReadCounter) on every device."""
    order = -100  # its after_train runs before the Recorder's, which reads the epoch's values

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.counters: list[HostReadCounter] = []
        self._open: HostReadCounter | None = None

    def before_train(self) -> None:
        self._open = HostReadCounter(self.device).__enter__()
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")

    def after_train(self) -> None:
        self._close()

    def after_fit(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self.counters.append(self._open)
            self._open = None


def sync_debug_epoch(dls, arch: str, device: torch.device, precision: str, seed: int = 0, lr: float = 1e-3,
                     mode: str = "unfrozen", warmup: int = 2) -> dict[str, Any]:
    """One training epoch of the package Learner (built as the bench builds it) on `dls`, after `warmup` untimed
    batches, with every host wait of its training batches an error on CUDA and counted on every device (SyncDebug);
    returns the batches, reads and blocking copies counted, and where the reads came from."""
    from fastai.data.core import DataLoaders

    dev = torch.device(device)
    learn = mode_learner(dls, arch, mode, seed, precision, lr=lr)
    # cudnn's first calls, the allocator, the first pinned buffers: in a short fit outside the checked epoch
    learn.dls = DataLoaders(dls.train.new(n=warmup * dls.bs, shuffle=True, drop_last=True), BatchLoader([], 0),
                            device=dev)
    learn.fit(1, lr)
    learn.dls = DataLoaders(dls.train, BatchLoader([], 0), device=dev)  # the training epoch alone
    cb = SyncDebug(dev)
    with learn.added_cbs(cb):
        learn.fit(1, lr)
    c = cb.counters[0]
    return dict(device=str(dev), precision=precision, mode=mode, batches=len(dls.train),
                reads=c.total, blocking_copies=c.blocking_copies, copies=c.copies.copies, where=dict(c.where),
                blocking_where=dict(c.copies.where),
                sync_debug="error (CUDA: any wait raises)" if dev.type == "cuda" else "n/a on CPU (counted instead)")
