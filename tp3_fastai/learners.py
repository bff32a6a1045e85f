"""fastai Learners for the practical: the MNIST learner and the set-up every learner shares."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import fastai.callback.fp16  # noqa: F401  (patches Learner.to_fp16 / to_bf16)
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle / fine_tune / lr_find)
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai import learner as fastai_learner
from fastai.callback.core import event
from fastai.metrics import accuracy
from fastai.optimizer import Adam
from fastcore.basics import noop
import torch
from torch import nn

from .curves import CurvesCallback
from .models import create_model


class CrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy with fastai's `activation` (softmax) and `decodes` (argmax), which `predict`,
    `get_preds` and interpretation apply. fastai's CrossEntropyLossFlat computes the same loss but wraps it in its
    TensorBase, whose per-op dispatch cost about 40x the loss itself here (measured, 64 x 10 logits)."""

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)


class Learner(fastai_learner.Learner):
    """fastai's Learner, dispatching each training-loop event only to the callbacks that handle it."""

    def _call_one(self, event_name: str) -> None:
        if not hasattr(event, event_name):
            raise ValueError(f"unknown training-loop event {event_name!r}")
        for cb in self.cbs.sorted("order"):
            # fastai calls every callback for every event, and a callback without that method misses through
            # fastcore's attribute forwarding to the Learner: about 1 ms a batch on MNIST (measured here)
            if event_name == "after_fit" or event_name in cb.__dict__ or hasattr(type(cb), event_name):
                cb(event_name)


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    return "ipykernel" in sys.modules


def setup_learner(learn: Learner, precision: str = "fp32", csv_path: str | Path | None = None,
                  name: str = "", progress: bool | None = None, log: Callable[[str], None] | None = print,
                  channels_last: bool = False) -> Learner:
    """Add learning curves, mixed precision and the right amount of output to a Learner.

    `precision` must already be resolved for the device (see device.resolve_precision); it is kept as
    `learn.precision` so that summaries state what ran. Progress bars show only on a TTY or in a notebook.
    """
    if progress is None:
        progress = sys.stdout.isatty() or in_notebook()
    if not progress:
        learn.remove_cb(ProgressCallback)
        learn.logger = noop  # the curves callback prints one readable line per epoch instead
    learn.add_cb(CurvesCallback(csv_path, log=None if progress else log, name=name))
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    elif precision != "fp32":
        raise ValueError(f"precision must be resolved to fp32, fp16 or bf16, got {precision!r}")
    if channels_last:
        from fastai.callback.channelslast import ChannelsLast

        learn.add_cb(ChannelsLast())
    learn.precision = precision
    return learn


def mnist_learner(dls: DataLoaders, arch: str | nn.Module = "cnn", lr: float = 1e-3, precision: str = "fp32",
                  csv_path: str | Path | None = None, opt_func: Callable = Adam, progress: bool | None = None,
                  log: Callable[[str], None] | None = print, path: str | Path = ".") -> Learner:
    """A Learner (cross-entropy, accuracy, fastai's Adam by default) for an MNIST model, recording curves."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    model = create_model(arch) if isinstance(arch, str) else arch
    learn = Learner(dls, model, loss_func=CrossEntropy(), opt_func=opt_func, lr=lr, metrics=accuracy, path=path)
    return setup_learner(learn, precision, csv_path, name=arch if isinstance(arch, str) else "",
                         progress=progress, log=log)
