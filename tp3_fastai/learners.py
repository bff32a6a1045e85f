"""fastai Learners for the practical: the MNIST learner and the set-up every learner shares."""
from __future__ import annotations

import sys
import weakref
from pathlib import Path
from typing import Callable

import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16 / to_bf16)
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle / fine_tune / lr_find)
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai import learner as fastai_learner
from fastai.callback.core import (Callback, CancelBackwardException, CancelBatchException, CancelEpochException,
                                  CancelFitException, CancelStepException, CancelTrainException,
                                  CancelValidException, _inner_loop, event)
from fastai.callback.schedule import ParamScheduler
from fastai.metrics import accuracy
from fastcore.basics import noop
from fastcore.xtras import modify_exception
import torch
from torch import nn

from .curves import CurvesCallback
from .device import resolve_channels_last
from .fastloop import LeanParamScheduler, QuietMixedPrecision, tune_learner
from .models import create_model
from .optimizer import default_opt_func


class CrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy with fastai's `activation` (softmax) and `decodes` (argmax), which `predict`,
    `get_preds` and interpretation apply. fastai's CrossEntropyLossFlat computes the same loss but wraps it in its
    TensorBase, whose per-op dispatch cost about 40x the loss itself here (measured, 64 x 10 logits)."""

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)


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


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    return "ipykernel" in sys.modules


def setup_learner(learn: Learner, precision: str = "fp32", csv_path: str | Path | None = None,
                  name: str = "", progress: bool | None = None, log: Callable[[str], None] | None = print,
                  channels_last: bool | None = None) -> Learner:
    """Add learning curves, mixed precision and the right amount of output to a Learner.

    `precision` must already be resolved for the device (see device.resolve_precision); it is kept as
    `learn.precision` so that summaries state what ran. `channels_last`: None decides by the DataLoaders' device
    (device.resolve_channels_last: on for CUDA), kept as `learn.memory_format`. The loop is the package's lean
    fastai loop (fastloop.tune_learner). Progress bars show only on a TTY or in a notebook.
    """
    if progress is None:
        progress = sys.stdout.isatty() or in_notebook()
    if not progress:
        learn.remove_cb(ProgressCallback)
        learn.logger = noop  # the curves callback prints one readable line per epoch instead
    learn.add_cb(CurvesCallback(csv_path, log=None if progress else log, name=name))
    tune_learner(learn)  # before to_fp16 / to_bf16, which the package's Learner class makes quiet
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    elif precision != "fp32":
        raise ValueError(f"precision must be resolved to fp32, fp16 or bf16, got {precision!r}")
    channels_last = resolve_channels_last(channels_last, getattr(learn.dls, "device", None))
    if channels_last:
        from fastai.callback.channelslast import ChannelsLast

        learn.add_cb(ChannelsLast())
    learn.precision = precision
    learn.memory_format = "channels_last" if channels_last else "contiguous"  # `channels_last` names fastai's callback
    return learn


def mnist_learner(dls: DataLoaders, arch: str | nn.Module = "cnn", lr: float = 1e-3, precision: str = "fp32",
                  csv_path: str | Path | None = None, opt_func: Callable | None = None, progress: bool | None = None,
                  log: Callable[[str], None] | None = print, path: str | Path = ".") -> Learner:
    """A Learner (cross-entropy, accuracy, the package's optimiser unless `opt_func`: see
    optimizer.default_opt_func) for an MNIST model, recording curves."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    model = create_model(arch) if isinstance(arch, str) else arch
    learn = Learner(dls, model, loss_func=CrossEntropy(), opt_func=opt_func or default_opt_func(dls.device),
                    lr=lr, metrics=accuracy, path=path)
    return setup_learner(learn, precision, csv_path, name=arch if isinstance(arch, str) else "",
                         progress=progress, log=log)
