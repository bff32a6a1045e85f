"""Timing harness: warm-up, synchronisation, medians with spread; the package's loop against a plain PyTorch loop;
what each training mode (unfrozen, frozen, precomputed features) costs with each speed lever."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelStepException, event
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import AvgSmoothLoss, Recorder
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed
from torch import nn
from torch.overrides import TorchFunctionMode

from .data import TensorLoader, mnist_dls
from .device import autocast, device_name, env_info, pick_device, resolve_precision, synchronize
from .learners import Learner as PackageLearner
from .learners import mnist_learner
from .models import check_name, count_params, create_model
from .runs import new_run_dir, write_json


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that `fn` takes, with the device synchronised before and after."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def spread(times: list[float]) -> dict[str, float]:
    """Median, min and max of repeated timings."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def plain_epoch(model: nn.Module, opt: torch.optim.Optimizer, train: tuple[torch.Tensor, torch.Tensor],
                valid: tuple[torch.Tensor, torch.Tensor], bs: int, gen: torch.Generator) -> dict[str, float]:
    """One epoch of the textbook PyTorch loop: train on shuffled slices, then validate; mean loss and accuracy."""
    loss_func = nn.CrossEntropyLoss()
    sums = torch.zeros(6, dtype=torch.float64, device=train[0].device)  # loss, correct, count: train, valid
    model.train()
    x, y = train
    idx = torch.randperm(len(y), generator=gen).to(x.device)
    for i in range(0, len(y), bs):
        b = idx[i:i + bs]
        out = model(x[b])
        loss = loss_func(out, y[b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sums[:3] += torch.stack([loss.detach() * len(b), (out.argmax(-1) == y[b]).sum(), torch.tensor(len(b))])
    model.eval()
    x, y = valid
    with torch.no_grad():
        for i in range(0, len(y), bs * 2):
            out = model(x[i:i + bs * 2])
            n = len(out)
            sums[3:] += torch.stack([loss_func(out, y[i:i + n]) * n, (out.argmax(-1) == y[i:i + n]).sum(),
                                     torch.tensor(n)])
    s = sums.tolist()
    return {"train_loss": s[0] / s[2], "train_accuracy": s[1] / s[2], "valid_loss": s[3] / s[5],
            "valid_accuracy": s[4] / s[5]}


def bench_mnist_loop(arch: str = "cnn", epochs: int = 3, repeats: int = 3, bs: int = 64, lr: float = 1e-3,
                     device: str = "auto", seed: int = 42, log: Callable[[str], None] = print) -> dict:
    """Seconds per epoch (train + validate, loss and accuracy of both): the package's fastai Learner vs a plain
    PyTorch loop on the same tensors, model and optimizer.

    Both use torch.optim.Adam at a constant learning rate; timings alternate between the two loops so that
    machine noise hits both alike. The first epoch of each is a warm-up and is not counted.
    """
    dev = pick_device(device)
    dls, _ = mnist_dls(bs=bs, device=dev, seed=seed)
    train, valid = (dls.train.x, dls.train.y), (dls.valid.x, dls.valid.y)
    adam = partial(OptimWrapper, opt=torch.optim.Adam)
    fastai_times, plain_times = [], []
    for r in range(repeats):
        set_seed(seed + r)
        learn = mnist_learner(dls, arch, lr=lr, opt_func=adam, progress=False, log=None)
        learn.fit(1, lr)  # warm-up, and builds the optimizer
        fastai_times += [timed(lambda: learn.fit(1, lr), dev) for _ in range(epochs)]
        set_seed(seed + r)
        model = create_model(arch).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        plain_epoch(model, opt, train, valid, bs, gen)  # warm-up
        plain_times += [timed(lambda: plain_epoch(model, opt, train, valid, bs, gen), dev) for _ in range(epochs)]
    f, p = spread(fastai_times), spread(plain_times)
    result = dict(arch=arch, bs=bs, train_images=len(train[1]), valid_images=len(valid[1]), device=str(dev), device_name=device_name(dev),
                  optimizer="torch.optim.Adam", fastai_epoch_s=f, plain_epoch_s=p,
                  ratio=f["median"] / p["median"])
    log(f"{arch} on {result['device_name']}, {len(train[1])}+{len(valid[1])} images, bs {bs}: fastai Learner {f['median']:.3f}s/epoch "
        f"(min {f['min']:.3f}, max {f['max']:.3f}); plain PyTorch {p['median']:.3f}s/epoch "
        f"(min {p['min']:.3f}, max {p['max']:.3f}); ratio {result['ratio']:.3f}x")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Training modes x speed levers: what frozen and full fine-tuning cost (issue "bench_freeze")
# ---------------------------------------------------------------------------------------------------------------

FREEZE_MODES = ("unfrozen", "frozen_train_bn", "frozen", "precomputed")
MODE_LABELS = {
    "unfrozen": "unfrozen (everything trains)",
    "frozen_train_bn": "frozen, train_bn=True (fastai default: BatchNorm trains, backward crosses the body)",
    "frozen": "frozen, train_bn=False (backward stops at the head)",
    "precomputed": "frozen, precomputed body features (head trains on a cache)",
}
LEVER_PRECISIONS = ("fp32", "fp16", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")
LOOPS = ("plain", "package", "tuned", "package_fastai_adam")
LOOP_LABELS = {
    "plain": "plain PyTorch loop (torch.optim.Adam, OneCycleLR)",
    "package": "package Learner as built by resnet_learner / train_head_on_features (optimiser: torch.optim.Adam)",
    "tuned": "package Learner + tune_learner (event dispatch, no per-batch host syncs, plain tensors)",
    "package_fastai_adam": "package Learner with fastai's own Adam (resnet_learner's default; not the same optimiser)",
}
CPU_MEMORY_NOTE = "n/a on CPU (peak device memory is measured with torch.cuda.max_memory_allocated on CUDA only)"
PRESETS = {
    # the GPU configuration (default) and the CI configuration (--quick: sized for a 2-core CPU)
    "gpu": dict(arch="resnet50", size=224, bs=128, steps=10, repeats=5, warmup=5, jpeg_images=2560,
                epoch_images=10_000, overhead_modes=("unfrozen", "frozen", "precomputed"),
                pipeline_modes=("unfrozen", "frozen")),
    "quick": dict(arch="resnet18", size=64, bs=16, steps=3, repeats=3, warmup=2, jpeg_images=200,
                  epoch_images=1_000, overhead_modes=("frozen", "precomputed"), pipeline_modes=("frozen",)),
}


# --- small device helpers (CUDA-specific calls, to move into device.py) ---------------------------------------

def set_cudnn_benchmark(flag: bool | None) -> bool:
    """Set `torch.backends.cudnn.benchmark` (None leaves it); returns the previous value."""
    prev = bool(torch.backends.cudnn.benchmark)
    if flag is not None:
        torch.backends.cudnn.benchmark = bool(flag)
    return prev


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak device memory allocated by tensors since `reset_peak_memory`, in MiB; None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks to the device between measurements."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def driver_version(device: torch.device) -> str | None:
    """The NVIDIA driver version (from nvidia-smi), None on CPU or when unknown."""
    if device.type != "cuda":
        return None
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def tf32_flags(device: torch.device) -> dict[str, bool] | None:
    """Whether fp32 matmuls and convolutions may run as TF32 on this GPU (PyTorch's defaults: matmul no, cuDNN
    convolutions yes): 'fp32' figures on Ampere and later GPUs depend on it. None on CPU."""
    if device.type != "cuda":
        return None
    return dict(matmul=bool(torch.backends.cuda.matmul.allow_tf32), cudnn=bool(torch.backends.cudnn.allow_tf32))


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


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (timings on a shared machine are only as good as this)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --- loaders and loops ----------------------------------------------------------------------------------------

class BatchLoader:
    """`n` batches cycling through a fixed list of (x, y) batches: enough of a loader for a fastai Learner."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], n: int):
        self.batches, self.n = list(batches), n
        self.bs = len(self.batches[0][0]) if self.batches else 0

    def __len__(self) -> int:
        return self.n if self.batches else 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self.batches[i % len(self.batches)]

    def to(self, device: torch.device | str) -> "BatchLoader":
        self.batches = [(x.to(device), y.to(device)) for x, y in self.batches]
        return self

    def new(self, **kwargs) -> "BatchLoader":
        return self

    def one_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[0]


class StreamLoader:
    """The next `n` batches of a shared stream (a real DataLoader cycled epoch after epoch), as plain tensors
    when `plain`; every loop drawing from one stream sees the same pipeline."""

    def __init__(self, stream: Iterator, n: int, plain: bool = False, bs: int = 0):
        self.stream, self.n, self.plain, self.bs = stream, n, plain, bs

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            b = next(self.stream)
            yield tuple(t.as_subclass(torch.Tensor) for t in b[:2]) if self.plain else b

    def to(self, device) -> "StreamLoader":
        return self

    def new(self, **kwargs) -> "StreamLoader":
        return self


def cycle_loader(dl) -> Iterator:
    """Batches of `dl`, epoch after epoch (each epoch restarts the loader, workers included)."""
    while True:
        yield from dl


def synthetic_batches(n: int, bs: int, size: int, n_classes: int, device: torch.device, seed: int,
                      channels_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` seeded batches of normalised-looking random images and labels, already on `device` (compute bound)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 3, size, size, generator=gen).to(device)
        y = torch.randint(0, n_classes, (bs,), generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, y))
    return out


def _group_times(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])]


class PlainLoop:
    """The textbook PyTorch training step (autocast + GradScaler, torch.optim.Adam, OneCycleLR) on a given model;
    `run` times groups of `steps` steps after `warmup` untimed ones, synchronising only at group edges."""
    name = "plain"

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32", lr: float = 1e-3,
                 compiled: bool = False, bn_eval: bool = False):
        self.model, self.device, self.precision, self.lr = model.to(device), device, precision, lr
        self.bn_eval = bn_eval
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.forward = torch.compile(model) if compiled else model
        self.warmup_s = math.nan

    def run(self, loader, warmup: int, steps: int, groups: int) -> list[float]:
        from fastai.callback.training import set_bn_eval

        total = warmup + steps * groups
        sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=self.lr, total_steps=total + 1)
        self.model.train()
        if self.bn_eval:
            set_bn_eval(self.model)  # what fastai's BnFreeze does: frozen BatchNorm keeps its running statistics
        synchronize(self.device)
        marks, start = [], time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i == total:
                break
            with autocast(self.device, self.precision):
                loss = F.cross_entropy(self.forward(x), y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            sched.step()
            n = i + 1
            if n >= warmup and (n - warmup) % steps == 0:
                synchronize(self.device)
                marks.append(time.perf_counter())
        if len(marks) != groups + 1:
            raise ValueError(f"the loader gave {i + 1} batches, fewer than the {total} needed")
        self.warmup_s = marks[0] - start
        return _group_times(marks)


class GroupTimer(Callback):
    """Synchronise and read the clock after batch `warmup` and every `steps` training batches after it."""
    order = 1000  # after every other callback

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.marks: list[float] = []

    def before_fit(self) -> None:
        self.i, self.marks = 0, []
        self.start = time.perf_counter()

    def after_batch(self) -> None:
        if not self.training:
            return
        self.i += 1
        if self.i >= self.warmup and (self.i - self.warmup) % self.steps == 0:
            synchronize(self.device)
            self.marks.append(time.perf_counter())


class LearnerLoop:
    """A fastai Learner's `fit_one_cycle(1)` over a loader, timed like PlainLoop (groups of steps after warm-up)."""

    def __init__(self, learn, device: torch.device, lr: float = 1e-3, name: str = "package"):
        self.learn, self.device, self.lr, self.name = learn, device, lr, name
        self.warmup_s = math.nan

    def run(self, loader, warmup: int, steps: int, groups: int) -> list[float]:
        from fastai.data.core import DataLoaders

        dev = self.device
        self.learn.dls = DataLoaders(loader, BatchLoader([], 0), device=None)
        self.learn.dls.device = dev
        timer = GroupTimer(dev, warmup, steps)
        synchronize(dev)
        with self.learn.added_cbs(timer):
            self.learn.fit_one_cycle(1, self.lr)
        if len(timer.marks) != groups + 1:
            raise ValueError(f"the learner ran {timer.i} batches, not the {warmup + steps * groups} asked for")
        self.warmup_s = timer.marks[0] - timer.start
        return _group_times(timer.marks)


# --- making the package's fastai loop cheap -------------------------------------------------------------------

class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss kept on the loss's device: fastai's AvgSmoothLoss moves every batch's loss
    to the CPU (`to_detach(..., cpu=True)`), a host synchronisation per batch on a GPU."""

    def accumulate(self, learn) -> None:
        self.count += 1
        loss = learn.loss.detach().mean().float()
        if self.val.device != loss.device:
            self.val = self.val.to(loss.device)
        self.val = torch.lerp(loss, self.val, self.beta)


class HostLosses(Callback):
    """After fitting, the Recorder's smoothed losses as CPU tensors again (one transfer for the whole fit)."""
    order = 51  # after Recorder

    def after_fit(self) -> None:
        rec = getattr(self.learn, "recorder", None)
        if rec is not None and rec.losses and isinstance(rec.losses[0], torch.Tensor):
            rec.losses = list(torch.stack([t.float() for t in rec.losses]).cpu().unbind())


class PlainTensors(Callback):
    """Strip fastai's tensor subclasses from each batch (TensorImage, TensorCategory) and from the loss (fastai's
    loss wrappers return a TensorBase): every op on a subclass, the backward pass included, goes through fastai's
    `__torch_function__`. Left alone in `get_preds`, whose decoding needs the types."""
    order = -5

    def before_batch(self) -> None:
        if hasattr(self.learn, "gather_preds"):
            return
        self.learn.xb = tuple(x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x for x in self.xb)
        self.learn.yb = tuple(y.as_subclass(torch.Tensor) if isinstance(y, torch.Tensor) else y for y in self.yb)

    def after_loss(self) -> None:
        if hasattr(self.learn, "gather_preds") or not isinstance(self.learn.loss_grad, torch.Tensor):
            return
        self.learn.loss_grad = self.learn.loss_grad.as_subclass(torch.Tensor)
        self.learn.loss = self.learn.loss.as_subclass(torch.Tensor)


class LeanRecorder(Recorder):
    """fastai's Recorder reading the learning rate from the optimiser's last parameter group directly (fastai's
    `opt.hypers` rebuilds every group's hyper-parameters each batch when the optimiser is an OptimWrapper)."""

    def after_batch(self) -> None:
        if len(self.yb) == 0:
            return
        mets = self._train_mets if self.training else self._valid_mets
        for met in mets:
            met.accumulate(self.learn)
        if not self.training:
            return
        opt = self.opt
        self.lrs.append(opt.opt.param_groups[-1]["lr"] if isinstance(opt, OptimWrapper) else opt.hypers[-1]["lr"])
        self.losses.append(self.smooth_loss.value)
        self.learn.smooth_loss = self.smooth_loss.value


class QuietMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision without `scaler.get_scale()` each step (one more host sync per step on CUDA than
    the plain AMP loop, where GradScaler.step's own overflow check is the only one)."""

    def before_step(self) -> None:
        self.skipped = True
        self.scaler.step(self)
        if self.skipped:
            raise CancelStepException()


def _cb_order(cb) -> float:
    return cb.order


class FastLearner(PackageLearner):
    """The package's Learner with cheaper event dispatch: no fastcore `L` built for every event and callbacks sorted
    with the built-in `sorted` (fastai builds an `L` and sorts the callbacks through fastcore for every event,
    eight or more events a batch)."""

    def __call__(self, event_name) -> None:
        if isinstance(event_name, str):
            self._call_one(event_name)
        else:
            for e in event_name:
                self._call_one(e)

    def _call_one(self, event_name: str) -> None:
        if not hasattr(event, event_name):
            raise ValueError(f"unknown training-loop event {event_name!r}")
        for cb in sorted(self.cbs, key=_cb_order):
            if event_name == "after_fit" or event_name in cb.__dict__ or hasattr(type(cb), event_name):
                cb(event_name)


def tune_learner(learn):
    """Remove the fastai loop's avoidable per-batch costs, in place: FastLearner (the package's Learner, whose
    events go only to callbacks that handle them, with cheaper dispatch); the smoothed loss kept on the device and
    the learning rate read directly (DeviceSmoothLoss, LeanRecorder): no host sync per batch; no loss-scale
    read-back in mixed precision (QuietMixedPrecision); plain tensors into the model and out of the loss
    (PlainTensors). Training maths is unchanged."""
    if not isinstance(learn, FastLearner):
        learn.__class__ = FastLearner  # vision_learner builds fastai's own Learner class
    rec = getattr(learn, "recorder", None)
    if rec is not None and not isinstance(rec.smooth_loss, DeviceSmoothLoss):
        rec.smooth_loss = DeviceSmoothLoss(beta=rec.smooth_loss.beta)
        if type(rec) is Recorder:
            object.__setattr__(rec, "__class__", LeanRecorder)  # Callback.__setattr__ warns about learner names
        learn.add_cb(HostLosses())
    for mp in [cb for cb in learn.cbs if type(cb) is MixedPrecision]:
        kwargs = {k: v for k, v in mp.kwargs.items() if k != "enabled"}
        learn.remove_cb(mp)
        learn.add_cb(QuietMixedPrecision(amp_mode=mp.amp_mode, **kwargs))
    if not any(isinstance(cb, PlainTensors) for cb in learn.cbs):
        learn.add_cb(PlainTensors())
    learn.tuned = True
    return learn


class HostReadCounter(TorchFunctionMode):
    """Counts tensor reads back to the host (item, cpu, tolist, numpy, float, int, bool): on CUDA each read of a
    device tensor waits for the GPU. On a CUDA run only reads of device tensors count (exact). On a CPU run every
    tensor is a CPU tensor, so reads count unless they come from code whose tensors stay on the CPU on every
    device (torch.optim's step counters, fastai's schedule positions, GradScaler's bookkeeping): a CPU run then
    shows where a GPU run would synchronise."""
    NAMES = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")
    CPU_RESIDENT = ("torch.optim", "fastai.callback.schedule", "torch.amp")

    def __init__(self, device: torch.device):
        super().__init__()
        self.on_cpu = torch.device(device).type == "cpu"
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor):
            if args[0].device.type != "cpu":
                counted = True
            else:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                counted = self.on_cpu and not caller.startswith(self.CPU_RESIDENT)
            if counted:
                self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def host_reads_per_step(loop, make_loader: Callable[[int], Any]) -> float:
    """Host reads per training step of `loop` (PlainLoop or LearnerLoop): runs of 1 and 2 timed steps after one
    warm-up step, differenced so that per-fit work cancels out."""
    counts = []
    for steps in (1, 2):
        with HostReadCounter(loop.device) as c:
            loop.run(make_loader(1 + steps), 1, steps, 1)
        counts.append(c.total)
    return float(counts[1] - counts[0])


# --- building the same model for every mode -------------------------------------------------------------------

def _mode_args(mode: str) -> tuple[str, bool]:
    """transfer.set_mode arguments (mode, train_bn) of a benchmark mode."""
    return {"unfrozen": ("scratch", True), "frozen_train_bn": ("frozen", True), "frozen": ("frozen", False),
            "precomputed": ("frozen", False)}[mode]


def mode_learner(dls, arch: str, mode: str, seed: int, precision: str = "fp32", opt: str = "torch",
                 lr: float = 1e-3, tuned: bool = False):
    """A learner built by transfer.resnet_learner (random init, same seed: same weights in every mode) and put in
    `mode` by transfer.set_mode. `opt`: 'torch' (torch.optim.Adam through OptimWrapper, as the plain loop) or
    'fastai' (fastai's Adam, resnet_learner's default)."""
    from fastai.optimizer import Adam as FastaiAdam

    from .transfer import resnet_learner, set_mode

    check_name(mode, FREEZE_MODES, "benchmark mode")
    fastai_mode, train_bn = _mode_args(mode)
    set_seed(seed)
    learn = resnet_learner(dls, arch, pretrained=False, precision=precision, train_bn=train_bn, progress=False,
                           log=None, lr=lr, name=mode)
    learn.opt_func = partial(OptimWrapper, opt=torch.optim.Adam) if opt == "torch" else FastaiAdam
    set_mode(learn, fastai_mode, train_bn)
    learn.bench_mode = mode
    return tune_learner(learn) if tuned else learn


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- one measurement ------------------------------------------------------------------------------------------

def _stats(group_s: list[float], steps: int, bs: int) -> dict[str, Any]:
    per_step = [g / steps for g in group_s]
    s = spread(per_step)
    return dict(step_ms={k: (v * 1000 if k != "n" else v) for k, v in s.items()},
                images_per_s=bs / s["median"])


def _cell_label(row: Mapping[str, Any]) -> str:
    parts = [row["mode"], row["precision"], "CL" if row["memory_format"] == "channels_last" else "contig"]
    if row.get("compile"):
        parts.append("compile")
    if row.get("cudnn_benchmark") is not None:
        parts.append(f"cudnn.bm={'on' if row['cudnn_benchmark'] else 'off'}")
    return " | ".join(parts)


def measure_cell(base: Mapping[str, nn.Module], mode: str, batches, dev: torch.device, precision: str,
                 memory_format: str, compiled: bool, cudnn_benchmark: bool | None, warmup: int, steps: int,
                 repeats: int, bs: int, lr: float) -> dict[str, Any]:
    """Throughput, step time and peak memory of one mode with one set of levers, in the plain loop on the
    synthetic batches (for 'precomputed': the one-off caching pass and the head's training step)."""
    from .features import feature_split, precompute_features

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
            c = _stats(cache_s, steps, bs)
            row["cache_step_ms"], row["cache_images_per_s"] = c["step_ms"], c["images_per_s"]
            feats, labels = precompute_features(extractor, BatchLoader(batches, len(batches)), dev, precision)
            n = (warmup + steps * repeats) * bs
            idx = torch.arange(n, device=dev) % len(labels)
            loader = TensorLoader(feats[idx], labels[idx], bs, shuffle=True, drop_last=True, device=dev)
            loop = PlainLoop(head, dev, precision, lr, compiled=compiled)
        else:
            loader = BatchLoader(batches, warmup + steps * repeats)
            loop = PlainLoop(model, dev, precision, lr, compiled=compiled, bn_eval=mode == "frozen")
        g = loop.run(loader, warmup, steps, repeats)
        row.update(_stats(g, steps, bs))
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


def _alternate(loops: Mapping[str, Any], make_loader: Callable[[int], Any], warmup: int, steps: int,
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
                   warmup: int, steps: int, repeats: int, bs: int, lr: float, count_reads: bool = True,
                   loops: Sequence[str] = LOOPS, log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """The package's fastai loop against the plain PyTorch loop: same model and initial weights, optimiser
    (torch.optim.Adam, except 'package_fastai_adam'), one-cycle schedule, data (synthetic on-device batches, or
    their precomputed features) and precision. Ratio = median step time / the plain loop's."""
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.optimizer import Adam as FastaiAdam

    from .features import feature_learner, feature_split, precompute_features

    rows = []
    for mode in modes:
        check_name(mode, FREEZE_MODES, "benchmark mode")
        built: dict[str, Any] = {}
        if mode == "precomputed":
            extractor, head = feature_split(mode_learner(dls, arch, mode, seed, precision).model.to(dev))
            feats, labels = precompute_features(extractor, BatchLoader(batches, len(batches)), dev, precision)

            def make_loader(k: int, feats=feats, labels=labels):
                idx = torch.arange(k * bs, device=dev) % len(labels)
                return TensorLoader(feats[idx], labels[idx], bs, shuffle=True, drop_last=True, device=dev)

            def head_learner(opt_func, tuned=False):
                set_seed(seed)
                learn = feature_learner(copy.deepcopy(head), dls, CrossEntropyLossFlat(), opt_func, lr,
                                        metrics=accuracy, precision=precision)
                return tune_learner(learn) if tuned else learn

            for name in loops:
                if name == "plain":
                    built[name] = PlainLoop(copy.deepcopy(head), dev, precision, lr)
                else:
                    opt = FastaiAdam if name == "package_fastai_adam" else partial(OptimWrapper, opt=torch.optim.Adam)
                    built[name] = LearnerLoop(head_learner(opt, name == "tuned"), dev, lr, name)
        else:
            def make_loader(k: int):
                return BatchLoader(batches, k)

            for name in loops:
                if name == "plain":
                    model = mode_learner(dls, arch, mode, seed, precision).model
                    built[name] = PlainLoop(model, dev, precision, lr, bn_eval=mode == "frozen")
                else:
                    learn = mode_learner(dls, arch, mode, seed, precision,
                                         opt="fastai" if name == "package_fastai_adam" else "torch",
                                         lr=lr, tuned=name == "tuned")
                    built[name] = LearnerLoop(learn, dev, lr, name)
        times = _alternate(built, make_loader, warmup, steps, repeats)
        reads = {k: host_reads_per_step(v, make_loader) if count_reads else None for k, v in built.items()}
        plain_med = spread(times["plain"])["median"] if "plain" in times else math.nan
        for name in built:
            s = _stats(times[name], steps, bs)
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


def jpeg_folder(cache_dir: str | Path, n: int = 512, px: int = 392, seed: int = 0, quality: int = 90) -> Path:
    """A folder of `n` real JPEGs (`train/` + `valid/`, classes face / non_face): the 200 embedded LFW images
    (skimage.data.lfw_subset) resized to `px` x `px` RGB, cycled, written once into `cache_dir`."""
    import numpy as np
    from PIL import Image

    if n < 20 or px < 8:
        raise ValueError(f"jpeg_folder needs n >= 20 images of px >= 8 pixels, got n={n}, px={px}")
    root = Path(cache_dir).expanduser()
    final = root / f"bench_jpeg_{n}_{px}"
    if (final / "info.json").is_file():
        return final
    from skimage.data import lfw_subset

    images = lfw_subset()
    labels = np.repeat(np.arange(2), 100)
    classes = ("face", "non_face")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".bench_jpeg-"))
    try:
        order = np.random.default_rng(seed).permutation(n) % len(images)
        n_valid = max(2, n // 5)
        for j, i in enumerate(order):
            split = "valid" if j < n_valid else "train"
            c = classes[labels[i]]
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
            im = Image.fromarray((images[i] * 255).round().astype(np.uint8), mode="L").convert("RGB")
            im.resize((px, px), Image.BICUBIC).save(tmp / split / c / f"{c}_{j:05d}.jpg", quality=quality)
        (tmp / "info.json").write_text(json.dumps(dict(source="skimage.data.lfw_subset() resized", n=n, px=px,
                                                        quality=quality, n_valid=n_valid)) + "\n")
        if final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def bench_pipeline(real_dls, syn_dls, arch: str, modes: Sequence[str], dev: torch.device, precision: str,
                   seed: int, warmup: int, steps: int, repeats: int, bs: int, size: int, lr: float,
                   log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Synthetic on-device batches against the real image pipeline (image decode + item transforms on the
    loader's workers + `aug_transforms` on the device): the loader alone, then training steps of the plain loop
    on both, and of the package's Learner on the real pipeline."""
    n_classes = real_dls.c
    stream = cycle_loader(real_dls.train)
    for _ in range(warmup):
        next(stream)
    loader_s = [timed(lambda: [next(stream) for _ in range(steps)], dev) for _ in range(repeats)]
    loader = _stats(loader_s, steps, bs)
    fake = getattr(real_dls.train, "fake_l", None)  # fastai keeps the worker count there (dl.num_workers is 1)
    workers = getattr(fake, "num_workers", getattr(real_dls.train, "num_workers", 0))
    if log:
        log(f"  pipeline loader alone ({workers} workers): {loader['images_per_s']:.1f} images/s")
    batches = synthetic_batches(2, bs, size, n_classes, dev, seed + 1)
    rows = []
    for mode in modes:
        check_name(mode, ["unfrozen", "frozen_train_bn", "frozen"], "pipeline mode")
        bn_eval = mode == "frozen"
        built = {
            "plain/synthetic": PlainLoop(mode_learner(syn_dls, arch, mode, seed, precision).model, dev, precision,
                                         lr, bn_eval=bn_eval),
            "plain/real": PlainLoop(mode_learner(real_dls, arch, mode, seed, precision).model, dev, precision, lr,
                                    bn_eval=bn_eval),
            "package/real": LearnerLoop(mode_learner(real_dls, arch, mode, seed, precision, lr=lr), dev, lr),
            "tuned/real": LearnerLoop(mode_learner(real_dls, arch, mode, seed, precision, lr=lr, tuned=True), dev,
                                      lr, "tuned"),
        }
        times: dict[str, list[float]] = {k: [] for k in built}
        for r in range(repeats):
            w = warmup if r == 0 else 1
            for name, loop in built.items():
                source = BatchLoader(batches, w + steps) if name.endswith("synthetic") else \
                    StreamLoader(stream, w + steps, plain=name.startswith("plain"), bs=bs)
                times[name] += loop.run(source, w, steps, 1)
        syn = spread(times["plain/synthetic"])["median"]
        plain_real = spread(times["plain/real"])["median"]
        for name in built:
            loop_name, data = name.split("/")
            s = _stats(times[name], steps, bs)
            med = spread(times[name])["median"]
            rows.append(dict(mode=mode, loop=loop_name, data=data, precision=precision, **s,
                             ratio_vs_synthetic=med / syn, ratio_vs_plain_real=med / plain_real))
            if log:
                log(f"  pipeline {mode:<16} {name:<16} {s['images_per_s']:9.1f} images/s  x{med / syn:.3f} of "
                    "synthetic step time")
        del built
        free_device_memory(dev)
    return dict(loader=dict(workers=workers, **loader), rows=rows,
                data=str(getattr(getattr(real_dls, "info", None), "source", "")),
                note="loader alone: batches drawn (decode, item transforms, collation, device copy, aug_transforms) "
                     "with no model; ratio_vs_synthetic: step time / the plain loop's on synthetic on-device batches")


# --- the whole benchmark --------------------------------------------------------------------------------------

def _split_opt(value: str | Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value or [])
    items = [p for p in dict.fromkeys(items) if p]
    for p in items:
        check_name(p, list(known), what)
    return items


def _cudnn_options(device: torch.device, cudnn_benchmark: str) -> list[bool | None]:
    if cudnn_benchmark not in ("both", "on", "off"):
        raise ValueError(f"cudnn_benchmark must be 'both', 'on' or 'off', got {cudnn_benchmark!r}")
    if device.type != "cuda":
        return [None]  # cudnn.benchmark does nothing on a CPU: one column value, 'n/a'
    return {"both": [False, True], "on": [True], "off": [False]}[cudnn_benchmark]


def resolve_config(quick: bool = False, **given: Any) -> dict[str, Any]:
    """The preset ('quick' or 'gpu') with every non-None value of `given` on top."""
    cfg = dict(PRESETS["quick" if quick else "gpu"])
    cfg.update({k: v for k, v in given.items() if v is not None})
    for k in ("size", "bs", "steps", "repeats", "warmup", "jpeg_images", "epoch_images"):
        if not isinstance(cfg[k], int) or cfg[k] <= 0:
            raise ValueError(f"{k} must be a positive integer, got {cfg[k]!r}")
    return cfg


def bench_training_modes(arch: str | None = None, size: int | None = None, bs: int | None = None,
                         steps: int | None = None, repeats: int | None = None, warmup: int | None = None,
                         modes: str | Sequence[str] = FREEZE_MODES, precisions: str | Sequence[str] = LEVER_PRECISIONS,
                         formats: str | Sequence[str] = MEMORY_FORMATS, compile: bool = False,
                         cudnn_benchmark: str = "both", overhead: bool = True,
                         overhead_modes: str | Sequence[str] | None = None, pipeline: bool = True,
                         pipeline_modes: str | Sequence[str] | None = None,
                         data: str = "jpeg", jpeg_images: int | None = None, num_workers: int | None = None,
                         n_classes: int = 2, epoch_images: int | None = None, epochs_estimate: int = 5,
                         lr: float = 1e-3, device: str = "auto", seed: int = 42, count_reads: bool = True,
                         out: str | Path = "runs/bench_freeze", overwrite: bool = False,
                         cache_dir: str | Path = "~/.cache/tp3_fastai", quick: bool = False, command: str = "",
                         threads: int | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Training throughput, step time (median, min, max) and peak memory of a timm model in each training mode
    (unfrozen; frozen with train_bn True / False; frozen on precomputed features) crossed with the speed levers
    (precision, memory format, torch.compile, cudnn.benchmark); the fastai loop against a plain PyTorch loop;
    synthetic on-device batches against the real image pipeline. Writes config.json, bench.json, bench.md and
    bench.png into a new run folder and returns what bench.json holds.

    Unset sizes (and the overhead / pipeline modes) come from the preset: `quick` (resnet18, 64 px, batch 16; loop
    and pipeline comparisons on the frozen modes only) or the GPU one (resnet50, 224 px, batch 128). Levers that
    cannot run on the device are reported as skipped, never imitated. Every figure carries its ratio to the unfrozen
    fp32 baseline measured in the same run. `threads` sets torch's CPU threads for the run (restored afterwards):
    on a CPU shared with other jobs, fewer threads than cores avoids OpenMP threads waiting on each other.
    """
    if threads is not None and threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    kwargs = {k: v for k, v in locals().items() if k != "threads"}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_training_modes(**kwargs)
    finally:
        torch.set_num_threads(previous)


def _bench_training_modes(arch, size, bs, steps, repeats, warmup, modes, precisions, formats, compile, cudnn_benchmark,
                          overhead, overhead_modes, pipeline, pipeline_modes, data, jpeg_images, num_workers,
                          n_classes, epoch_images, epochs_estimate, lr, device, seed, count_reads, out, overwrite,
                          cache_dir, quick, command, log) -> dict[str, Any]:
    from fastai.data.core import DataLoaders

    t_start = time.perf_counter()
    cfg = resolve_config(quick, arch=arch, size=size, bs=bs, steps=steps, repeats=repeats, warmup=warmup,
                         jpeg_images=jpeg_images, epoch_images=epoch_images, overhead_modes=overhead_modes,
                         pipeline_modes=pipeline_modes)
    overhead_modes, pipeline_modes = cfg.pop("overhead_modes"), cfg.pop("pipeline_modes")
    arch, size, bs, steps, repeats, warmup = (cfg[k] for k in ("arch", "size", "bs", "steps", "repeats", "warmup"))
    from .transfer import check_arch

    check_arch(arch)
    modes = _split_opt(modes, FREEZE_MODES, "benchmark mode")
    precisions = _split_opt(precisions, LEVER_PRECISIONS, "precision")
    formats = _split_opt(formats, MEMORY_FORMATS, "memory format")
    overhead_modes = _split_opt(overhead_modes, FREEZE_MODES, "overhead mode") if overhead else []
    pipeline_modes = _split_opt(pipeline_modes, ("unfrozen", "frozen_train_bn", "frozen"), "pipeline mode") \
        if pipeline else []
    if not modes or not precisions or not formats:
        raise ValueError("modes, precisions and formats each need at least one value")
    if lr <= 0 or epochs_estimate <= 0 or n_classes < 2:
        raise ValueError(f"lr and epochs_estimate must be positive and n_classes >= 2, got lr={lr}, "
                         f"epochs_estimate={epochs_estimate}, n_classes={n_classes}")
    dev = pick_device(device)
    cudnn_opts = _cudnn_options(dev, cudnn_benchmark)
    loop_precision = resolve_precision("auto", dev)  # what users train with: fp16 AMP on CUDA, fp32 on CPU
    if dev.type == "cpu" and not quick and size * bs >= 224 * 64 and log:
        log("note: the default configuration is sized for a GPU; on a CPU use --quick (or a small --size / --bs)")

    run = new_run_dir(out, overwrite)
    env = env_info(dev)
    env.update(driver=driver_version(dev), tf32=tf32_flags(dev), torch_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count())
    config = dict(cfg, arch=arch, modes=modes, precisions=precisions, formats=formats, compile=compile,
                  cudnn_benchmark=cudnn_benchmark, overhead_modes=overhead_modes, pipeline_modes=pipeline_modes,
                  data=data, num_workers=num_workers, n_classes=n_classes, epochs_estimate=epochs_estimate, lr=lr,
                  device=str(dev), device_name=device_name(dev), loop_precision=loop_precision, seed=seed,
                  quick=quick, command=command, env=env, load_average_start=load_average())
    write_json(run / "config.json", config)
    if log:
        log(f"bench_freeze: {arch}, {size} px, batch {bs} on {device_name(dev)}; load average "
            f"{config['load_average_start']}; run folder {run}")

    real_dls = None
    if pipeline_modes:
        folder = jpeg_folder(cache_dir, cfg["jpeg_images"], px=round(size * 1.75)) if data == "jpeg" else data
        from .image_data import image_dls

        kw = {} if num_workers is None else dict(num_workers=num_workers)
        real_dls = image_dls(folder, size=size, bs=bs, seed=seed, aug="default", device=dev, cache_dir=cache_dir, **kw)
        n_classes = real_dls.c
    batches = synthetic_batches(4, bs, size, n_classes, dev, seed)
    syn_dls = DataLoaders(BatchLoader(batches, 1), BatchLoader([], 0), device=dev)
    syn_dls.c = n_classes

    # modes x levers, plain loop on the synthetic batches
    base = {m: mode_learner(syn_dls, arch, m, seed).model.to(dev) for m in modes}
    if "unfrozen" not in base:
        base["unfrozen"] = mode_learner(syn_dls, arch, "unfrozen", seed).model.to(dev)
    baseline_key = ("unfrozen", "fp32", "contiguous", False, cudnn_opts[0] if dev.type != "cuda" else False)
    cells = [baseline_key] + [(m, p, f, c, b) for m in modes for p in precisions for f in formats
                              for c in ([False, True] if compile else [False]) for b in cudnn_opts]
    cells = list(dict.fromkeys(cells))
    grid = []
    for i, (m, p, f, c, b) in enumerate(cells):
        row = measure_cell(base, m, batches, dev, p, f, c, b, max(warmup, 3) if c else warmup, steps, repeats,
                           bs, lr)
        row["baseline"] = i == 0
        grid.append(row)
        if log:
            what = (f"{row['images_per_s']:9.1f} images/s, {row['step_ms']['median']:8.2f} ms/step "
                    f"[{row['step_ms']['min']:.2f}-{row['step_ms']['max']:.2f}]") if row["status"] == "ok" \
                else row["status"]
            log(f"  {_cell_label(row):<48} {what}  load {load_average()[0] if load_average() else '?'}")
    del base
    free_device_memory(dev)
    base_row = grid[0]
    if base_row["status"] != "ok":
        raise RuntimeError(f"the unfrozen fp32 baseline did not run: {base_row['status']}")
    n_img, n_ep = cfg["epoch_images"], epochs_estimate
    for row in grid:
        if row["status"] != "ok":
            continue
        row["speedup_vs_baseline"] = row["images_per_s"] / base_row["images_per_s"]
        row["epoch_s"] = n_img / row["images_per_s"]
        row["estimate_s"] = n_ep * row["epoch_s"]
        if row["mode"] == "precomputed":
            row["cache_s"] = n_img / row["cache_images_per_s"]
            row["estimate_s"] += row["cache_s"]

    overhead_rows = bench_overhead(syn_dls, arch, overhead_modes, batches, dev, loop_precision, seed, warmup, steps,
                                   repeats, bs, lr, count_reads, log=log) if overhead_modes else []
    pipe = bench_pipeline(real_dls, syn_dls, arch, pipeline_modes, dev, loop_precision, seed, warmup, steps,
                          repeats, bs, size, lr, log=log) if pipeline_modes else None
    result = dict(config=config, env=env, device=str(dev), device_name=device_name(dev), arch=arch, size=size, bs=bs,
                  baseline=dict(mode="unfrozen", precision="fp32", memory_format="contiguous",
                                images_per_s=base_row["images_per_s"], step_ms=base_row["step_ms"]),
                  grid=grid, epoch_images=n_img, epochs_estimate=n_ep, overhead=overhead_rows, pipeline=pipe,
                  memory_note=None if dev.type == "cuda" else CPU_MEMORY_NOTE,
                  timing=("median of `repeats` groups of `steps` steps after `warmup` untimed steps; device "
                          "synchronised at group edges only; synthetic batches are the same seeded tensors for "
                          "every mode"),
                  mode_labels=MODE_LABELS, loop_labels=LOOP_LABELS, load_average_end=load_average(),
                  seconds=time.perf_counter() - t_start, run_dir=str(run))
    write_json(run / "bench.json", result)
    md = bench_markdown(result)
    (run / "bench.md").write_text(md)
    plot_bench(result, run / "bench.png")
    if log:
        log("\n" + md + f"\nrun folder: {run} ({result['seconds']:.0f}s)")
    return result


# --- outputs --------------------------------------------------------------------------------------------------

def _ms(s: Mapping[str, float]) -> str:
    return f"{s['median']:.4g} [{s['min']:.4g}-{s['max']:.4g}]"


def bench_markdown(result: Mapping[str, Any]) -> str:
    """The benchmark's Markdown report: header with device and versions, then one table per section."""
    cfg, env = result["config"], result["env"]
    dev_line = f"{result['device_name']} ({result['device']})"
    if env.get("cuda"):
        dev_line += (f", CUDA {env['cuda']}, cuDNN {env.get('cudnn')}, driver {env.get('driver') or '?'}, "
                     f"TF32 allowed {env.get('tf32')}")
    lines = [f"# Training modes: {result['arch']}, {result['size']} px, batch {result['bs']}", "",
             f"- command: `{cfg.get('command') or 'bench_training_modes(...)'}`",
             f"- device: {dev_line}; torch {env['torch']}, fastai {env['fastai']}, timm {env['timm']}, "
             f"{env.get('torch_threads')} torch threads",
             f"- load average (1/5/15 min) at start {cfg['load_average_start']}, at end "
             f"{result['load_average_end']}",
             f"- timing: {result['timing']}: warm-up {cfg['warmup']}, {cfg['steps']} steps x {cfg['repeats']} "
             "repeats; step ms shows median [min-max]",
             f"- peak memory: {result['memory_note'] or 'torch.cuda.max_memory_allocated per cell, MiB'}", "",
             "## Modes x speed levers (plain PyTorch loop, synthetic on-device batches)", "",
             f"Ratios are to the unfrozen fp32 contiguous baseline of this run "
             f"({result['baseline']['images_per_s']:.4g} images/s). Epoch and {result['epochs_estimate']}-epoch "
             f"estimates are for {result['epoch_images']:,} images; precomputed adds its one-off cache pass.", "",
             "| mode | precision | format | compile | cudnn.benchmark | images/s | step ms | peak MiB | x baseline "
             f"| cache pass s (one-off) | epoch s | {result['epochs_estimate']} epochs s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["grid"]:
        cudnn = "n/a" if r["cudnn_benchmark"] is None else ("on" if r["cudnn_benchmark"] else "off")
        head = f"| {r['mode']}{' (baseline)' if r.get('baseline') else ''} | {r['precision']} | " \
               f"{r['memory_format']} | {'on' if r['compile'] else 'off'} | {cudnn} | "
        if r["status"] != "ok":
            lines.append(head + f"{r['status']} | | | | | | | |")
            continue
        mem = "n/a" if r.get("peak_memory_mb") is None else f"{r['peak_memory_mb']:,.0f}"
        cache = f"{r['cache_s']:.4g} ({r['cache_images_per_s']:.4g} img/s)" if r["mode"] == "precomputed" else "-"
        lines.append(head + f"{r['images_per_s']:.4g} | {_ms(r['step_ms'])} | {mem} | "
                     f"{r['speedup_vs_baseline']:.3g} | {cache} | {r['epoch_s']:.4g} | {r['estimate_s']:.4g} |")
    lines += ["", "Modes: " + "; ".join(f"**{k}**: {v}" for k, v in result["mode_labels"].items()
                                        if any(r["mode"] == k for r in result["grid"])) + "."]
    if result["overhead"]:
        lines += ["", f"## fastai Learner vs plain PyTorch loop ({result['overhead'][0]['precision']}, "
                  "same model, initial weights, data and one-cycle schedule)", "",
                  "| mode | loop | step ms | images/s | x plain step time | overhead ms/step | host reads/step |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["overhead"]:
            reads = "-" if r["host_reads_per_step"] is None else f"{r['host_reads_per_step']:g}"
            lines.append(f"| {r['mode']} | {r['loop']}{'' if r['same_optimizer'] else ' (other optimiser)'} | "
                         f"{_ms(r['step_ms'])} | {r['images_per_s']:.4g} | {r['ratio_vs_plain']:.3f} | "
                         f"{r['overhead_ms_per_step']:+.3g} | {reads} |")
        lines += ["", "Loops: " + "; ".join(f"**{k}**: {v}" for k, v in result["loop_labels"].items()) + ". "
                  "Host reads (item/cpu/tolist/float/bool on tensors) are counted on whatever device ran; on CUDA "
                  "each is a synchronisation."]
    if result["pipeline"]:
        p = result["pipeline"]
        lines += ["", f"## Input pipeline: synthetic on-device batches vs real images ({p['data']})", "",
                  f"Loader alone ({p['loader']['workers']} workers, decode + item transforms + aug_transforms): "
                  f"{p['loader']['images_per_s']:.4g} images/s, {_ms(p['loader']['step_ms'])} ms/batch.", "",
                  "| mode | loop | data | images/s | step ms | x plain synthetic | x plain real |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['mode']} | {r['loop']} | {r['data']} | {r['images_per_s']:.4g} | {_ms(r['step_ms'])} | "
                         f"{r['ratio_vs_synthetic']:.3f} | {r['ratio_vs_plain_real']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_bench(result: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart: training throughput per mode and lever (log scale), and the loop / pipeline comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["grid"] if r["status"] == "ok"]
    extra = [(f"{r['mode']} | {r['loop']}", r["images_per_s"]) for r in result["overhead"]]
    if result["pipeline"]:
        extra += [(f"{r['mode']} | {r['loop']} | {r['data']}", r["images_per_s"]) for r in result["pipeline"]["rows"]]
        extra.append(("loader alone", result["pipeline"]["loader"]["images_per_s"]))
    n_panels = 2 if extra else 1
    height = max(3.0, 0.32 * max(len(ok), len(extra)) + 1.5)
    fig, axes = plt.subplots(1, n_panels, figsize=(7.5 * n_panels, height), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mode_colour = {m: colours[i % len(colours)] for i, m in enumerate(FREEZE_MODES)}
    ax = axes[0][0]
    labels = [_cell_label(r) for r in ok]
    values = [r["images_per_s"] for r in ok]
    ax.barh(range(len(ok)), values, color=[mode_colour[r["mode"]] for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("training images/s (log scale)")
    skipped = sorted({r["status"] for r in result["grid"] if r["status"] != "ok"})
    n_skipped = sum(r["status"] != "ok" for r in result["grid"])
    ax.set_title(f"{result['arch']}, {result['size']} px, batch {result['bs']} on {result['device_name']}"
                 + (f"\nnot shown: {n_skipped} cells ({'; '.join(skipped)})" if n_skipped else ""), fontsize=9)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    if extra:
        ax = axes[0][1]
        ax.barh(range(len(extra)), [v for _, v in extra], color="0.55")
        ax.set_yticks(range(len(extra)), [k for k, _ in extra], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("images/s (log scale)")
        ax.set_title("loops (fastai vs plain) and input pipeline", fontsize=9)
        for i, (_, v) in enumerate(extra):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
