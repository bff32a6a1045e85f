"""Loaders and training loops the benchmarks time: fixed or streamed batches, the plain PyTorch loop, the package's
fastai Learner timed the same way (its lean loop: tp3_fastai.train.loop, built into the package's Learner;
`stock=True` at construction gives fastai's own Learner and stock loop for comparison) and a counter of host waits
(reads and blocking copies) per step."""
from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.device import autocast, synchronize
from ..core.syncs import CopyLedger, follow_threads, is_staged
from ..train.loop import (DeviceSmoothLoss, HostLosses, LeanRecorder, PlainTensors,  # noqa: F401
                          QuietMixedPrecision)
from ..train.loop import Learner as PackageLearner
from ..train.optimizer import default_opt_func


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
                      channels_last: bool = False, n_in: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` seeded batches of normalised-looking random images (`n_in` channels) and labels, already on `device`
    (compute bound)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, n_in, size, size, generator=gen).to(device)
        y = torch.randint(0, n_classes, (bs,), generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, y))
    return out


def _group_times(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:])]


class PlainLoop:
    """The textbook PyTorch training step (autocast + GradScaler when fp16, OneCycleLR) on a given model, with the
    package's optimiser as a bare torch optimiser (AdamW, the same parameter groups and implementation as
    optimizer.default_opt_func); `run` times groups of `steps` steps after `warmup` untimed ones, synchronising
    only at group edges."""
    name = "plain"

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32", lr: float = 1e-3,
                 compiled: bool = False, bn_eval: bool = False):
        self.model, self.device, self.precision, self.lr = model.to(device), device, precision, lr
        self.bn_eval = bn_eval
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = default_opt_func(device)(self.params, lr=lr).opt
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


# --- the package's lean fastai loop (tp3_fastai.train.loop), re-exported for the benchmarks ------------------------

FastLearner = PackageLearner  # the package's Learner class: events only to the callbacks that handle them


class _InThread:
    """Enters a HostReadCounter's mode alone in another thread (the counter's own `__enter__` also opens its copy
    ledger and registers itself: once, in the thread that opened it)."""

    def __init__(self, mode: TorchFunctionMode):
        self.mode = mode

    def __enter__(self) -> None:
        TorchFunctionMode.__enter__(self.mode)

    def __exit__(self, *exc) -> None:
        TorchFunctionMode.__exit__(self.mode, *exc)


class HostReadCounter(TorchFunctionMode):
    """Counts, while open, what makes the host wait for the GPU: tensor reads back to the host (item, cpu, tolist,
    numpy, float, int, bool) and host-to-device copies that would block (core.syncs: a batch copied from memory that
    is not staged). Reads are counted in this thread and in every thread that prepares batches
    (core.syncs.follow_threads), copies in every thread.

    On a CUDA run only reads of device tensors count (exact). On a CPU run every tensor is a CPU tensor, so reads
    count unless they come from code whose tensors stay on the CPU on every device (torch.optim's step counters,
    fastai's schedule positions, GradScaler's bookkeeping, core.syncs' reads of host copies) or read a staged host
    buffer: a CPU run then shows where a GPU run would synchronise. Copies are counted as a CUDA run makes them on
    every device (see core.syncs.to_device)."""
    NAMES = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")
    CPU_RESIDENT = ("torch.optim", "fastai.callback.schedule", "torch.amp", "tp3_fastai.core.syncs")

    def __init__(self, device: torch.device):
        super().__init__()
        self.on_cpu = torch.device(device).type == "cpu"
        self.counts: dict[str, int] = {}
        self.where: dict[str, int] = {}  # reads by calling module and function, to find them
        self.copies = CopyLedger()
        self._lock = threading.Lock()
        self._follow = None

    def __enter__(self) -> "HostReadCounter":
        super().__enter__()
        self.copies.__enter__()
        self._follow = follow_threads(_InThread(self))
        self._follow.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._follow.__exit__(*exc)
        self.copies.__exit__(*exc)
        super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            frame = sys._getframe(1)
            caller = frame.f_globals.get("__name__", "")
            if t.device.type != "cpu":
                counted = True
            else:
                counted = self.on_cpu and not caller.startswith(self.CPU_RESIDENT) and not is_staged(t)
            if counted:
                with self._lock:
                    self.counts[name] = self.counts.get(name, 0) + 1
                    key = f"{caller}.{frame.f_code.co_name}"
                    self.where[key] = self.where.get(key, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Host reads counted."""
        return sum(self.counts.values())

    @property
    def blocking_copies(self) -> int:
        """Host-to-device copies that would block on CUDA."""
        return self.copies.blocking


def host_reads_per_step(loop, make_loader: Callable[[int], Any]) -> float:
    """Host reads per training step of `loop` (PlainLoop or LearnerLoop): runs of 1 and 2 timed steps after one
    warm-up step, differenced so that per-fit work cancels out."""
    counts = []
    for steps in (1, 2):
        with HostReadCounter(loop.device) as c:
            loop.run(make_loader(1 + steps), 1, steps, 1)
        counts.append(c.total)
    return float(counts[1] - counts[0])
