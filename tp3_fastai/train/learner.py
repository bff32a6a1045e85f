"""The set-up every Learner of the package shares (curves, mixed precision, memory format, output), and the loss."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from fastai.callback.progress import ProgressCallback
from fastcore.basics import noop
import torch
from torch import nn

from .curves import CurvesCallback
from ..core.device import resolve_channels_last
from .loop import Learner
from .progress import lean_progress


class CrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy with fastai's `activation` (softmax) and `decodes` (argmax), which `predict`,
    `get_preds` and interpretation apply. fastai's CrossEntropyLossFlat computes the same loss but wraps it in its
    TensorBase, whose per-op dispatch cost about 40x the loss itself here (measured, 64 x 10 logits)."""

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(dim=-1)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (its IPython shell runs; ipykernel merely imported, as by a tool, is not one)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def setup_learner(learn: Learner, precision: str = "fp32", csv_path: str | Path | None = None,
                  name: str = "", progress: bool | None = None, log: Callable[[str], None] | None = print,
                  channels_last: bool | None = None) -> Learner:
    """Add learning curves, mixed precision and the right amount of output to a Learner.

    `precision` must already be resolved for the device (see device.resolve_precision); it is kept as
    `learn.precision` so that summaries state what ran. `channels_last`: None decides by the DataLoaders' device
    (device.resolve_channels_last: on for CUDA), kept as `learn.memory_format`. Mixed precision is what the
    learner's class adds: QuietMixedPrecision for the package's Learner (train.loop), fastai's MixedPrecision for
    fastai's own. Progress bars show only on a TTY or in a notebook, reading the loss without waiting for the GPU
    (progress.LeanProgress).
    """
    if progress is None:
        progress = sys.stdout.isatty() or in_notebook()
    if not progress:
        learn.remove_cb(ProgressCallback)
        learn.logger = noop  # the curves callback prints one readable line per epoch instead
    else:
        lean_progress(learn)  # fastai's bar reads the loss back every batch: a GPU wait per step
    learn.add_cb(CurvesCallback(csv_path, log=None if progress else log, name=name))
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


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
