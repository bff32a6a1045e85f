"""fastai's training loop without its avoidable per-batch costs, built into every Learner the package makes.

On a GPU each read of a device tensor from the host (`item`, `cpu`, `float`, ...) waits for the queued work, so the
CPU cannot prepare the next step while the GPU computes. fastai's stock loop reads the host every batch: the
Recorder's smoothed loss goes to the CPU (`to_detach(..., cpu=True)`) and fp16 mixed precision reads the loss scale
back (`scaler.get_scale()`); with GradScaler's own overflow check that made 3 reads a step on one H100 (the plain
PyTorch loop: 1), and the package's frozen ResNet50 step 1.21x the plain loop's. Here: the smoothed loss stays on
the device until the fit ends and validation loss and metrics until the epoch ends (`DeviceSmoothLoss`,
`DeviceAvgLoss`, `DeviceAvgMetric`, `LeanRecorder`, `HostLosses`), no loss-scale read-back
(`QuietMixedPrecision`), the loss computed on plain tensors (`CrossEntropyLossFlat`, `PlainTensors`). The
Recorder's values (smoothed loss, metrics, `recorder.losses`) are the same numbers, read at epoch end. The rest is
Python cost per batch, which a GPU step of a few milliseconds (a head on precomputed features) cannot hide: the
one-cycle schedule evaluated without tensors (`CombinedSchedule`, `LeanParamScheduler`) and events sent only to the
callbacks that handle them.

All of it is fastai extended the way fastai is extended: subclasses of fastai's callbacks, metrics and loss, put in
place when the package's `Learner` is constructed (its default callbacks, its metrics setter, its fit_one_cycle);
no class of a live object is changed and no fastai closure is read. The one private fastai name this module needs
comes from core.fastai_internals.
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16 / to_bf16)
import fastai.callback.schedule  # noqa: F401  (patches Learner.fine_tune / lr_find)
from fastai import learner as fastai_learner
from fastai import losses as fastai_losses
from fastai.callback.core import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                                  CancelFitException, CancelStepException, CancelTrainException,
                                  CancelValidException, event)
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import ParamScheduler, SchedCos
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss, Metric, Recorder
from fastai.optimizer import OptimWrapper
from fastai.torch_core import find_bs, num_distrib
from fastcore.basics import defaults
from fastcore.foundation import L
from fastcore.xtras import modify_exception

from ..core.fastai_internals import INNER_LOOP_EVENTS

__all__ = ["DeviceSmoothLoss", "DeviceAvgLoss", "DeviceAvgMetric", "HostLosses", "CrossEntropyLossFlat",
           "PlainTensors", "LeanRecorder", "QuietMixedPrecision", "CombinedSchedule", "cosine_cycle",
           "LeanParamScheduler", "device_metric", "Learner", "learner_class"]


def _data_parallel() -> bool:
    """True in a data-parallel run, where fastai gathers losses and metrics over the processes."""
    return dist.is_available() and dist.is_initialized() and num_distrib() > 1


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss kept on the loss's device: fastai's AvgSmoothLoss moves every batch's loss
    to the CPU (`to_detach(..., cpu=True)`), a host synchronisation per batch on a GPU. In a data-parallel run it
    keeps fastai's behaviour (the loss gathered over the processes)."""

    def accumulate(self, learn) -> None:
        if _data_parallel():
            return super().accumulate(learn)
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


class DeviceAvgLoss(AvgLoss):
    """fastai's validation loss average kept on the device (fastai's AvgLoss reads every batch's loss back to the
    CPU); read once, at epoch end. In a data-parallel run it keeps fastai's behaviour (gathered over processes)."""

    def accumulate(self, learn) -> None:
        if _data_parallel():
            return super().accumulate(learn)
        bs = find_bs(learn.yb)
        self.total = self.total + learn.loss.detach().mean() * bs
        self.count += bs


class DeviceAvgMetric(AvgMetric):
    """fastai's AvgMetric (how `metrics=accuracy` is averaged) kept on the device until epoch end, like
    DeviceAvgLoss."""

    def accumulate(self, learn) -> None:
        if _data_parallel():
            return super().accumulate(learn)
        bs = find_bs(learn.yb)
        value = self.func(learn.pred, *learn.yb)
        self.total = self.total + (value.detach() if isinstance(value, torch.Tensor) else value) * bs
        self.count += bs


class CrossEntropyLossFlat(fastai_losses.CrossEntropyLossFlat):
    """fastai's CrossEntropyLossFlat (same options, `activation` and `decodes`, the same arithmetic as fastai's
    BaseLoss.__call__) computing on plain tensors: fastai's wraps both inputs in its TensorBase, so the loss went
    through fastai's `__torch_function__` op by op (about ten times the cost of the loss itself per batch, measured
    here)."""

    def __call__(self, inp, targ, **kwargs):
        inp, targ = (x.as_subclass(torch.Tensor).transpose(self.axis, -1).contiguous()
                     if isinstance(x, torch.Tensor) else x for x in (inp, targ))
        if self.floatify and targ.dtype != torch.float16:
            targ = targ.float()
        if targ.dtype in (torch.int8, torch.int16, torch.int32):
            targ = targ.long()
        if self.flatten:
            inp = inp.view(-1, inp.shape[-1]) if self.is_2d else inp.view(-1)
        return self.func(inp, targ.view(-1) if self.flatten else targ, **kwargs)


class PlainTensors(Callback):
    """Strip fastai's tensor subclass from the loss (fastai's loss wrappers return a TensorBase, so the backward
    pass would go through fastai's `__torch_function__`; fastai's own CastToTensor already strips the batch).
    Left alone in `get_preds` (and so in `predict`, `show_results`, interpretation)."""
    order = -5

    def after_loss(self) -> None:
        if hasattr(self.learn, "gather_preds") or not isinstance(self.learn.loss_grad, torch.Tensor):
            return
        self.learn.loss_grad = self.learn.loss_grad.as_subclass(torch.Tensor)
        self.learn.loss = self.learn.loss.as_subclass(torch.Tensor)


class LeanRecorder(Recorder):
    """fastai's Recorder with the same records, kept on the device and read more cheaply: the smoothed training
    loss and the validation loss averaged on the device (DeviceSmoothLoss, DeviceAvgLoss), the learning rate read
    from the optimiser's last parameter group directly (fastai's `opt.hypers` rebuilds every group's
    hyper-parameters each batch when the optimiser is an OptimWrapper) and the metrics updated without building
    fastcore lists each batch. The package's Learner has it in place of fastai's Recorder from construction; it is
    still `learn.recorder`."""

    def __init__(self, add_time: bool = True, train_metrics: bool = False, valid_metrics: bool = True,
                 beta: float = 0.98):
        super().__init__(add_time=add_time, train_metrics=train_metrics, valid_metrics=valid_metrics, beta=beta)
        self.loss, self.smooth_loss = DeviceAvgLoss(), DeviceSmoothLoss(beta=beta)

    @property
    def name(self) -> str:
        return "recorder"  # the attribute fastai and its callbacks read (`learn.recorder`)

    def after_batch(self) -> None:
        learn = self.learn
        if len(learn.yb) == 0:
            return
        if not learn.training:
            if self.valid_metrics and not getattr(self, "cancel_valid", False):  # fastai's validation metrics
                self.loss.accumulate(learn)
                for met in learn.metrics:
                    met.accumulate(learn)
            return
        if not getattr(self, "cancel_train", False):
            self.smooth_loss.accumulate(learn)
            if self.train_metrics:
                for met in learn.metrics:
                    met.accumulate(learn)
        opt = learn.opt
        self.lrs.append(opt.opt.param_groups[-1]["lr"] if isinstance(opt, OptimWrapper) else opt.hypers[-1]["lr"])
        value = self.smooth_loss.value
        self.losses.append(value)
        learn.smooth_loss = value


class QuietMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision without `scaler.get_scale()` each step (one more host sync per step on CUDA than
    the plain AMP loop, where GradScaler.step's own overflow check is the only one). bf16 has no GradScaler."""

    def before_step(self) -> None:
        self.skipped = True
        self.scaler.step(self)
        if self.skipped:
            raise CancelStepException()


class CombinedSchedule:
    """fastai's `combine_scheds(pcts, scheds)` (the schedules of fit_one_cycle and fine_tune) evaluated in plain
    Python: fastai's locates the phase with tensor ops, about 0.3 ms a call here, two calls a batch. The phase
    starts are the same float32 cumulative sums and the position arithmetic the same float32 arithmetic, so the
    values are fastai's exactly (tests/test_fastloop.py compares them)."""

    def __init__(self, pcts: Sequence[float], scheds: Sequence[Callable[[float], object]]):
        if abs(sum(pcts) - 1) > 1e-6 or any(p < 0 for p in pcts) or len(pcts) != len(scheds):
            raise ValueError(f"one non-negative fraction per schedule, summing to 1: got {list(pcts)} for "
                             f"{len(scheds)} schedules")
        self.starts = [np.float32(p) for p in np.cumsum(np.array([0, *pcts], dtype=np.float32), dtype=np.float32)]
        self.scheds, self.last = list(scheds), len(scheds) - 1

    def __call__(self, pos: float):
        p, starts = np.float32(pos), self.starts
        idx = min(max(i for i, q in enumerate(starts) if p >= q), self.last)
        return self.scheds[idx](float((p - starts[idx]) / (starts[idx + 1] - starts[idx])))


def cosine_cycle(pct: float, start, middle, end) -> CombinedSchedule:
    """fastai's `combined_cos`: cosine from `start` to `middle` over the first `pct` of training, then to `end`."""
    return CombinedSchedule([pct, 1 - pct], [SchedCos(start, middle), SchedCos(middle, end)])


class LeanParamScheduler(ParamScheduler):
    """fastai's ParamScheduler reading the hyper-parameters it records once a batch (fastai's reads the
    optimiser's `hypers` once per scheduled name). The package Learner's `fit_one_cycle` (and so `fine_tune`) gives
    it fastai's one-cycle values as CombinedSchedules; the values set and recorded (`recorder.hps`) are fastai's."""

    def after_batch(self) -> None:
        h = self.opt.hypers[-1]
        for p in self.scheds.keys():
            self.hps[p].append(h[p])


def device_metric(m) -> Metric:
    """A metric as the package Learner averages it: a function becomes a DeviceAvgMetric (fastai makes it an
    AvgMetric), a fastai Metric stays as it is."""
    return m if isinstance(m, Metric) else DeviceAvgMetric(m)


class Learner(fastai_learner.Learner):
    """fastai's Learner with a cheaper loop: the same events, in the same order, with the same values.

    Built with the lean pieces from the start: a LeanRecorder in place of fastai's Recorder (its smoothed loss,
    validation loss and metrics kept on the device until the epoch ends, HostLosses bringing the smoothed losses
    back after the fit), metric functions averaged by DeviceAvgMetric, the loss stripped of fastai's tensor
    subclass (PlainTensors), fit_one_cycle / fine_tune scheduled by a LeanParamScheduler, `to_fp16` / `to_bf16`
    without the loss-scale read-back (QuietMixedPrecision). Give it the package's CrossEntropyLossFlat or
    train.learner.CrossEntropy as the loss (fastai's CrossEntropyLossFlat computes on its tensor subclass).

    Events: fastai calls every callback for every event (eight or more events a batch), building a fastcore `L` and
    sorting the callbacks each time, and a callback without that method misses through fastcore's attribute
    forwarding to the Learner: about 1 ms a batch on MNIST (measured here). Here the handlers of each event are
    worked out once per set of callbacks, and run without fastai's per-callback lookup of `training` through the
    Learner. Batches of plain tensors already on the model's device are not walked again (fastai's `_set_device`
    evaluates `default_device()` and walks the batch every time: about 60 us a batch on the CPU here, MNIST MLP
    epochs of 57.6 against 53.9 ms CPU time). fastai's own Learner
    (train.loop.learner_class(stock=True)) runs fastai's stock loop, for comparisons.
    """

    def __init__(self, dls, model, *args, cbs=None, default_cbs: bool = True, **kwargs):
        lean = [LeanRecorder if c is Recorder else c for c in defaults.callbacks] + [HostLosses] if default_cbs else []
        super().__init__(dls, model, *args, cbs=L(lean) + L(cbs) + L(PlainTensors()), default_cbs=False, **kwargs)
        self.default_cbs = default_cbs

    @fastai_learner.Learner.metrics.setter
    def metrics(self, v) -> None:
        fastai_learner.Learner.metrics.fset(self, L(v).map(device_metric))

    def __call__(self, event_name) -> None:
        if isinstance(event_name, str):
            _dispatch(self, event_name)
        else:
            for e in event_name:
                _dispatch(self, e)

    def _set_device(self, b):  # fastai's private per-batch hook: listed in core.fastai_internals
        dev = next(self.model.parameters()).device
        if isinstance(b, tuple) and all(type(t) is torch.Tensor and t.device == dev for t in b):
            return b  # fastai's to_device would return these same tensors, after walking the batch
        return super()._set_device(b)

    def fit_one_cycle(self, n_epoch: int, lr_max=None, div: float = 25., div_final: float = 1e5,
                      pct_start: float = 0.25, wd: float | None = None, moms: tuple | None = None, cbs=None,
                      reset_opt: bool = False, start_epoch: int = 0) -> None:
        """fastai's fit_one_cycle (same arguments, same scheduled values) with the package's LeanParamScheduler."""
        if self.opt is None:
            self.create_opt()
        self.opt.set_hyper("lr", self.lr if lr_max is None else lr_max)
        lr_max = np.array([h["lr"] for h in self.opt.hypers])
        scheds = {"lr": cosine_cycle(pct_start, lr_max / div, lr_max, lr_max / div_final),
                  "mom": cosine_cycle(pct_start, *(self.moms if moms is None else moms))}
        self.fit(n_epoch, cbs=L(LeanParamScheduler(scheds)) + L(cbs), reset_opt=reset_opt, wd=wd,
                 start_epoch=start_epoch)

    def to_fp16(self, **kwargs) -> "Learner":
        """fp16 mixed precision without the per-step loss-scale read-back (QuietMixedPrecision)."""
        return self.add_cb(QuietMixedPrecision(**kwargs))

    def to_bf16(self) -> "Learner":
        """bf16 mixed precision (no loss scaling, so no GradScaler and no host read)."""
        return self.add_cb(QuietMixedPrecision(amp_mode="bf16"))


def learner_class(stock: bool = False) -> type:
    """The Learner class the package builds: its lean Learner, or with `stock` fastai's own (fastai's stock loop,
    Recorder, metrics and mixed precision), which the benchmarks and the equivalence tests compare it with."""
    return fastai_learner.Learner if stock else Learner


_HANDLERS: "weakref.WeakKeyDictionary[Learner, dict]" = weakref.WeakKeyDictionary()  # per learner, not pickled
_CANCELS = (CancelBatchException, CancelBackwardException, CancelEpochException, CancelFitException,
            CancelStepException, CancelTrainException, CancelValidException)


def _cb_order(cb) -> float:
    return cb.order


def _dispatch(learn: Learner, event_name: str) -> None:
    """Send one event to the callbacks of `learn` that handle it, in fastai's order and with fastai's rules."""
    cbs = tuple(learn.cbs)
    table = _HANDLERS.setdefault(learn, {})
    hit = table.get(event_name)
    if hit is None or hit[0] != cbs:
        if not hasattr(event, event_name):
            raise ValueError(f"unknown training-loop event {event_name!r}")
        hit = table[event_name] = (cbs, [cb for cb in sorted(cbs, key=_cb_order) if event_name == "after_fit"
                                         or event_name in cb.__dict__ or hasattr(type(cb), event_name)])
    inner = event_name in INNER_LOOP_EVENTS
    training = learn.__dict__.get("training") if inner else None
    for cb in hit[1]:
        if training is None or type(cb).__call__ is not Callback.__call__ or "training" in cb.__dict__:
            cb(event_name)
        elif cb.run and ((cb.run_train and training) or (cb.run_valid and not training)):
            _run_handler(cb, event_name)  # Callback.__call__ without its lookups of `training` via the Learner


def _run_handler(cb: Callback, event_name: str) -> None:
    """What fastai's Callback.__call__ does once it has decided to run (an inner-loop event, not after_fit)."""
    try:
        getattr(cb, event_name)()
    except _CANCELS:
        raise
    except Exception as e:
        raise modify_exception(e, f"Exception occured in `{cb.__class__.__name__}` when calling event "
                                  f"`{event_name}`:\n\t{e.args[0]}", replace=True)
