"""Checkpoints written atomically during training (last and best epoch) and resuming from them."""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import get_model


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(o: Any) -> Any:
    """fastai's L, dicts and numpy scalars -> lists, dicts and numbers, so that `weights_only=True` can read them back."""
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)) or type(o).__name__ == "L":
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):  # fit_one_cycle leaves numpy floats in the hyper-parameters
        return o.item()
    return o


def save_checkpoint(learn: Learner, path: str | Path, epoch: int, metric: float | None = None) -> Path:
    """Model and optimizer state after `epoch` completed epochs (plain tensors and numbers only)."""
    opt = _plain(learn.opt.state_dict()) if learn.opt is not None else None
    model = get_model(learn.model)  # the bare model, also inside DistributedDataParallel (no `module.` prefix)
    return atomic_torch_save({"model": model.state_dict(), "opt": opt, "epoch": epoch, "metric": metric},
                             path)


def load_checkpoint(learn: Learner, path: str | Path) -> int:
    """Restore model and optimizer from `path` (weights_only: no pickled code runs); returns its epoch count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    get_model(learn.model).load_state_dict(ck["model"])
    if ck["opt"] is not None:
        if learn.opt is None:
            learn.create_opt()
        learn.opt.load_state_dict(ck["opt"])
    return int(ck["epoch"])


class CheckpointCallback(Callback):
    """After each training epoch save `last.pth`, and `best.pth` when the monitored validation value improves."""
    order = 65  # after CurvesCallback (60), whose row for the epoch it reads

    def __init__(self, folder: str | Path, monitor: str = "valid_accuracy", higher_is_better: bool = True):
        self.folder, self.monitor, self.higher = Path(folder), monitor, higher_is_better
        self.best: float | None = None

    def after_epoch(self) -> None:
        history = self.learn.curves.history
        if not self.learn.curves.recorded:  # no training in this epoch: skipped, predict, validate, ...
            return
        value = history[-1][self.monitor]
        save_checkpoint(self.learn, self.folder / "last.pth", self.learn.epoch + 1, value)
        if self.best is None or (value > self.best if self.higher else value < self.best):
            self.best = value
            save_checkpoint(self.learn, self.folder / "best.pth", self.learn.epoch + 1, value)


def truncate_csv(path: str | Path, epochs: int) -> None:
    """Keep the header and the rows of the first `epochs` epochs (a resumed run rewrites the rest)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epochs]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(keep)
