"""fastai's training loop without its avoidable per-batch costs, on by default in every Learner the package builds.

On a GPU each read of a device tensor from the host (`item`, `cpu`, `float`, ...) waits for the queued work, so the
CPU cannot prepare the next step while the GPU computes. fastai's stock loop reads the host every batch: the
Recorder's smoothed loss goes to the CPU (`to_detach(..., cpu=True)`) and fp16 mixed precision reads the loss scale
back (`scaler.get_scale()`); with GradScaler's own overflow check that made 3 reads a step on one H100 (the plain
PyTorch loop: 1), and the package's frozen ResNet50 step 1.21x the plain loop's. Here: the smoothed loss stays on
the device until the fit ends and validation loss and metrics until the epoch ends (`DeviceSmoothLoss`,
`DeviceAvgLoss`, `DeviceAvgMetric`, `LeanRecorder`, `HostLosses`), no loss-scale read-back
(`QuietMixedPrecision`), the loss stripped of fastai's tensor subclass (`PlainTensors`). The Recorder's values
(smoothed loss, metrics, `recorder.losses`) are the same numbers, read at epoch end. The rest is Python cost per
batch, which a GPU step of a few milliseconds (a head on precomputed features) cannot hide: the one-cycle schedule
evaluated without tensors (`LeanParamScheduler`) and events sent only to the callbacks that handle them
(`learners.Learner`).
"""
from __future__ import annotations

import weakref
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16 / to_bf16)
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle / fine_tune / lr_find)
from fastai import learner as fastai_learner
from fastai import losses as fastai_losses
from fastai.callback.core import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                                  CancelFitException, CancelStepException, CancelTrainException,
                                  CancelValidException, _inner_loop, event)
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import ParamScheduler, SchedNo, combine_scheds
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss, Recorder
from fastai.optimizer import OptimWrapper
from fastai.torch_core import find_bs, num_distrib
from fastcore.xtras import modify_exception

__all__ = ["DeviceSmoothLoss", "DeviceAvgLoss", "DeviceAvgMetric", "HostLosses", "CrossEntropyLossFlat",
           "PlainTensors", "LeanRecorder", "QuietMixedPrecision", "LeanParamScheduler", "fast_schedule", "tune_learner",
           "untune_learner", "is_tuned"]


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
    """fastai's CrossEntropyLossFlat (same options, `activation` and `decodes`) computing on plain tensors:
    fastai's wraps both inputs in its TensorBase, so the loss went through fastai's `__torch_function__` op by op
    (about ten times the cost of the loss itself per batch, measured here)."""

    def _contiguous(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.as_subclass(torch.Tensor).transpose(self.axis, -1).contiguous()


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
    """fastai's Recorder with the same records, read more cheaply: the learning rate from the optimiser's last
    parameter group directly (fastai's `opt.hypers` rebuilds every group's hyper-parameters each batch when the
    optimiser is an OptimWrapper) and the metrics to update without building fastcore lists each batch."""

    def after_batch(self) -> None:
        learn = self.learn
        if len(learn.yb) == 0:
            return
        if not learn.training:
            for met in self._valid_mets:
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


_COMBINED = combine_scheds([0.5, 0.5], [SchedNo(0, 0), SchedNo(0, 0)]).__code__


def fast_schedule(f: Callable[[float], object]) -> Callable[[float], object]:
    """A schedule of fastai's `combine_scheds` (what fit_one_cycle, fine_tune and fit_flat_cos build) evaluated in
    plain Python: fastai's locates the phase with tensor ops, about 0.3 ms per call here, two calls a batch. The
    position arithmetic is the same float32 arithmetic, so the values are identical; any other schedule is
    returned unchanged."""
    if getattr(f, "__code__", None) is not _COMBINED or not f.__closure__:
        return f
    cells = dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__)))
    pcts = [np.float32(p) for p in cells["pcts"].tolist()]  # fastai's float32 tensor of phase starts
    lim, scheds = cells["pct_lim"], cells["scheds"]

    def _inner(pos: float):
        p = np.float32(pos)
        idx = min(max(i for i, q in enumerate(pcts) if p >= q), lim)
        return scheds[idx](float((p - pcts[idx]) / (pcts[idx + 1] - pcts[idx])))
    return _inner


class LeanParamScheduler(ParamScheduler):
    """fastai's ParamScheduler with its schedules evaluated by `fast_schedule` and the hyper-parameters it
    records read once a batch. The package's Learner puts it in place of every plain ParamScheduler (the one
    fit_one_cycle and fine_tune add); the values set and recorded (`recorder.hps`) are fastai's."""

    def before_fit(self) -> None:
        super().before_fit()
        self.fast = {n: fast_schedule(f) for n, f in self.scheds.items()}

    def _update_val(self, pct: float) -> None:
        for n, f in getattr(self, "fast", self.scheds).items():
            self.opt.set_hyper(n, f(pct))

    def after_batch(self) -> None:
        h = self.opt.hypers[-1]
        for p in self.scheds.keys():
            self.hps[p].append(h[p])


def is_tuned(learn) -> bool:
    """Whether `tune_learner` has been applied to `learn`."""
    return bool(getattr(learn, "tuned", False))


def tune_learner(learn):
    """Remove the fastai loop's avoidable per-batch costs, in place (the package does it for every Learner it
    builds): the package's Learner class (events sent only to the callbacks that handle them, the one-cycle
    schedule evaluated without tensors: LeanParamScheduler); the smoothed loss, validation loss and metrics kept on
    the device until epoch end and the learning rate read directly (DeviceSmoothLoss, DeviceAvgLoss,
    DeviceAvgMetric, LeanRecorder, HostLosses); no loss-scale read-back in mixed precision (QuietMixedPrecision,
    also what the package Learner's `to_fp16` adds); fastai's CrossEntropyLossFlat computing on plain tensors and a
    plain loss tensor (CrossEntropyLossFlat, PlainTensors). Training maths and the Recorder's values are
    unchanged."""
    if type(learn) is fastai_learner.Learner:
        learn.__class__ = Learner  # vision_learner builds fastai's own Learner class
    rec = getattr(learn, "recorder", None)
    if rec is not None and not isinstance(rec.smooth_loss, DeviceSmoothLoss):
        rec.smooth_loss = DeviceSmoothLoss(beta=rec.smooth_loss.beta)
        if type(rec) is Recorder:
            object.__setattr__(rec, "__class__", LeanRecorder)  # Callback.__setattr__ warns about learner names
    if rec is not None and not any(isinstance(cb, HostLosses) for cb in learn.cbs):
        learn.add_cb(HostLosses())
    if rec is not None and type(rec.loss) is AvgLoss:
        rec.loss.__class__ = DeviceAvgLoss
    for m in learn.metrics:
        if type(m) is AvgMetric:
            m.__class__ = DeviceAvgMetric
    if type(learn.loss_func) is fastai_losses.CrossEntropyLossFlat:
        learn.loss_func.__class__ = CrossEntropyLossFlat
    _quiet_mixed_precision(learn)
    if not any(isinstance(cb, PlainTensors) for cb in learn.cbs):
        learn.add_cb(PlainTensors())
    learn.tuned = True
    return learn


def _quiet_mixed_precision(learn) -> None:
    for mp in [cb for cb in learn.cbs if type(cb) is MixedPrecision]:
        kwargs = {k: v for k, v in mp.kwargs.items() if k != "enabled"}
        learn.remove_cb(mp)
        learn.add_cb(QuietMixedPrecision(amp_mode=mp.amp_mode, **kwargs))


def untune_learner(learn):
    """The inverse of `tune_learner`: fastai's stock loop (fastai's Learner class, Recorder, AvgSmoothLoss,
    MixedPrecision, fastai's tensor subclasses), for comparisons."""
    learn.__class__ = fastai_learner.Learner
    rec = getattr(learn, "recorder", None)
    if rec is not None:
        if isinstance(rec.smooth_loss, DeviceSmoothLoss):
            rec.smooth_loss = AvgSmoothLoss(beta=rec.smooth_loss.beta)
        if type(rec) is LeanRecorder:
            object.__setattr__(rec, "__class__", Recorder)
        if type(rec.loss) is DeviceAvgLoss:
            rec.loss.__class__ = AvgLoss
    for m in learn.metrics:
        if type(m) is DeviceAvgMetric:
            m.__class__ = AvgMetric
    if type(learn.loss_func) is CrossEntropyLossFlat:
        learn.loss_func.__class__ = fastai_losses.CrossEntropyLossFlat
    for cb in [cb for cb in learn.cbs if isinstance(cb, (HostLosses, PlainTensors))]:
        learn.remove_cb(cb)
    for mp in [cb for cb in learn.cbs if type(cb) is QuietMixedPrecision]:
        learn.remove_cb(mp)
        learn.add_cb(MixedPrecision(amp_mode=mp.amp_mode, **{k: v for k, v in mp.kwargs.items() if k != "enabled"}))
    learn.tuned = False
    return learn


class Learner(fastai_learner.Learner):
    """fastai's Learner with a cheaper loop: the same events, in the same order, with the same values.

    fastai calls every callback for every event (eight or more events a batch), building a fastcore `L` and sorting
    the callbacks each time, and a callback without that method misses through fastcore's attribute forwarding to
    the Learner: about 1 ms a batch on MNIST (measured here). Here the handlers of each event are worked out once per
    set of callbacks, and run without fastai's per-callback lookup of `training` through the Learner. Batches of
    plain tensors already on the model's device are not walked again; the ParamScheduler of fit_one_cycle and
    fine_tune becomes a LeanParamScheduler; `to_fp16` / `to_bf16` add QuietMixedPrecision (see fastloop).
    """

    def __call__(self, event_name) -> None:
        if isinstance(event_name, str):
            self._call_one(event_name)
        else:
            for e in event_name:
                self._call_one(e)

    def _call_one(self, event_name: str) -> None:
        cbs = tuple(self.cbs)
        table = _HANDLERS.setdefault(self, {})
        hit = table.get(event_name)
        if hit is None or hit[0] != cbs:
            if not hasattr(event, event_name):
                raise ValueError(f"unknown training-loop event {event_name!r}")
            hit = table[event_name] = (cbs, [cb for cb in sorted(cbs, key=_cb_order) if event_name == "after_fit"
                                             or event_name in cb.__dict__ or hasattr(type(cb), event_name)])
        inner = event_name in _INNER_LOOP
        training = self.__dict__.get("training") if inner else None
        for cb in hit[1]:
            if training is None or type(cb).__call__ is not Callback.__call__ or "training" in cb.__dict__:
                cb(event_name)
            elif cb.run and ((cb.run_train and training) or (cb.run_valid and not training)):
                _run_handler(cb, event_name)  # Callback.__call__ without its lookups of `training` via the Learner

    def _set_device(self, b):
        dev = next(self.model.parameters()).device
        if isinstance(b, tuple) and all(type(t) is torch.Tensor and t.device == dev for t in b):
            return b  # fastai's to_device would return these same tensors, after walking the batch
        return super()._set_device(b)

    def add_cb(self, cb) -> "Learner":
        if type(cb) is ParamScheduler:  # the one fit_one_cycle / fine_tune add: same values, cheaper (fastloop)
            object.__setattr__(cb, "__class__", LeanParamScheduler)  # Callback.__setattr__ warns about it
        return super().add_cb(cb)

    def to_fp16(self, **kwargs) -> "Learner":
        """fp16 mixed precision without the per-step loss-scale read-back (fastloop.QuietMixedPrecision)."""
        return self.add_cb(QuietMixedPrecision(**kwargs))

    def to_bf16(self) -> "Learner":
        """bf16 mixed precision (no loss scaling, so no GradScaler and no host read)."""
        return self.add_cb(QuietMixedPrecision(amp_mode="bf16"))


_HANDLERS: "weakref.WeakKeyDictionary[Learner, dict]" = weakref.WeakKeyDictionary()  # per learner, not pickled


_INNER_LOOP = frozenset(_inner_loop)
_CANCELS = (CancelBatchException, CancelBackwardException, CancelEpochException, CancelFitException,
            CancelStepException, CancelTrainException, CancelValidException)


def _cb_order(cb) -> float:
    return cb.order


def _run_handler(cb: Callback, event_name: str) -> None:
    """What fastai's Callback.__call__ does once it has decided to run (an inner-loop event, not after_fit)."""
    try:
        getattr(cb, event_name)()
    except _CANCELS:
        raise
    except Exception as e:
        raise modify_exception(e, f"Exception occured in `{cb.__class__.__name__}` when calling event "
                                  f"`{event_name}`:\n\t{e.args[0]}", replace=True)
