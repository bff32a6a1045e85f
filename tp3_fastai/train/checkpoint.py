"""Checkpoints written atomically during training and resuming from them: `last.pth` (weights and optimiser state,
what resume needs) while a unit trains, `best.pth` (the best epoch's weights alone, what a model is judged and
exported by); `finish_unit` drops the optimiser state once a unit is done."""
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
from fastai.optimizer import OptimWrapper
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


def save_checkpoint(learn: Learner, path: str | Path, epoch: int, metric: float | None = None,
                    optimizer: bool = True) -> Path:
    """Model (and with `optimizer` the optimiser state) after `epoch` completed epochs (plain tensors and numbers
    only). The optimiser state (Adam: two moving averages per weight) makes a file about 3 times the weights'."""
    opt = _plain(learn.opt.state_dict()) if optimizer and learn.opt is not None else None
    model = get_model(learn.model)  # the bare model, also inside DistributedDataParallel (no `module.` prefix)
    return atomic_torch_save({"model": model.state_dict(), "opt": opt, "epoch": epoch, "metric": metric},
                             path)


def load_weights(learn: Learner, path: str | Path) -> int:
    """The model weights of a checkpoint into `learn` (weights_only; any optimiser state in the file is left
    out); returns its epoch count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    get_model(learn.model).load_state_dict(ck["model"])
    return int(ck["epoch"])


def load_checkpoint(learn: Learner, path: str | Path) -> int:
    """Restore model and optimizer from `path` (weights_only: no pickled code runs); returns its epoch count.

    The file is read onto the CPU; the model then goes to the device it trains on (the DataLoaders', where fastai's
    `fit` would put it) and the optimiser state to the device of the parameter it belongs to (see
    `place_optimizer_state`): fastai's own Optimizer does not move loaded state, so a resumed fit on a GPU failed
    at its first step.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = get_model(learn.model)
    model.load_state_dict(ck["model"])
    device = getattr(learn.dls, "device", None)
    if device is not None:
        model.to(device)
    if ck["opt"] is not None:
        if learn.opt is None:
            learn.create_opt()
        _check_optimizer_kind(learn.opt, ck["opt"], path)
        keep = _implementation_flags(learn.opt)
        learn.opt.load_state_dict(ck["opt"])
        _restore_implementation_flags(learn.opt, keep)
        place_optimizer_state(learn.opt)
    return int(ck["epoch"])


def _check_optimizer_kind(opt: Any, saved: dict, path: Path) -> None:
    """A clear error when the checkpoint's optimiser state is not of the learner's optimiser's kind."""
    saved_fastai = "hypers" in saved  # fastai's Optimizer.state_dict: {'state': [...], 'hypers': [...]}
    if saved_fastai == isinstance(opt, OptimWrapper):
        what = ("fastai's Optimizer (fastai's Adam: the package's optimiser before torch's AdamW)" if saved_fastai
                else "a torch optimiser (the package's AdamW)")
        raise ValueError(f"{path} holds the optimiser state of {what}, but this learner uses "
                         f"{type(getattr(opt, 'opt', opt)).__name__}: resume with the optimiser the run was "
                         "started with (opt_func), or start the run again (the checkpoint is left as it is)")


def _implementation_flags(opt: Any) -> list[dict[str, Any]]:
    """The device-dependent implementation flags (fused, foreach, capturable) of a torch optimiser's groups."""
    if not isinstance(opt, OptimWrapper):
        return []
    return [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in opt.opt.param_groups]


def _restore_implementation_flags(opt: Any, flags: list[dict[str, Any]]) -> None:
    """torch's load_state_dict takes these flags from the file: keep those chosen for this learner's device."""
    if isinstance(opt, OptimWrapper) and len(flags) == len(opt.opt.param_groups):
        for g, f in zip(opt.opt.param_groups, flags):
            g.update(f)


_IMPLEMENTATION = ("fused", "foreach", "capturable")


def place_optimizer_state(opt: Any) -> int:
    """Move every optimiser state tensor to the device of the parameter it belongs to (floating-point state in the
    parameter's dtype), whatever device it was loaded on; returns how many tensors moved.

    For fastai's Optimizer (whose `load_state_dict` keeps the state where it was read) and for a torch optimiser in
    an OptimWrapper. torch's step counters follow torch's rule: on the parameter's device for fused or capturable
    groups, on the CPU otherwise.
    """
    if opt is None:
        return 0
    moved = 0
    if isinstance(opt, OptimWrapper):
        torch_opt = opt.opt
        for group in torch_opt.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                step = (p.device, torch.float32) if on_device else (torch.device("cpu"), None)
                moved += _place(torch_opt.state.get(p), p, step)
    else:
        for p, state in opt.state.items():
            moved += _place(state, p)
    return moved


def _place(state: dict | None, p: torch.Tensor, step: tuple | None = None) -> int:
    """Move the tensors of one parameter's state in place; `step`: (device, dtype) for torch's 'step' counter."""
    moved = 0
    for k, v in (state or {}).items():
        if not isinstance(v, torch.Tensor):
            continue
        if k == "step" and step is not None:
            new = v.to(device=step[0], dtype=step[1] or v.dtype)
        else:
            new = v.to(device=p.device, dtype=p.dtype if v.is_floating_point() and p.is_floating_point() else v.dtype)
        if new is not v:
            state[k] = new
            moved += 1
    return moved


class CheckpointCallback(Callback):
    """After each training epoch save `last.pth` (weights and optimiser state, over the previous one), and
    `best.pth` (weights alone) when the monitored validation value improves on every earlier epoch (the first of
    equal epochs stays). `folder` None writes nothing and keeps the best epoch's weights in memory instead
    (`best_state`, on the CPU): a run without checkpoints can still export its best epoch, not resume."""
    order = 65  # after CurvesCallback (60), whose row for the epoch it reads

    def __init__(self, folder: str | Path | None, monitor: str = "valid_accuracy", higher_is_better: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.monitor, self.higher = monitor, higher_is_better
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def after_epoch(self) -> None:
        history = self.learn.curves.history
        if not self.learn.curves.recorded:  # no training in this epoch: skipped, predict, validate, ...
            return
        value, epoch = history[-1][self.monitor], self.learn.epoch + 1
        if self.folder is not None:
            save_checkpoint(self.learn, self.folder / LAST, epoch, value)
        if self.best is None or (value > self.best if self.higher else value < self.best):
            self.best = value
            if self.folder is not None:
                save_checkpoint(self.learn, self.folder / BEST, epoch, value, optimizer=False)
            else:
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in get_model(self.learn.model).state_dict().items()}


LAST, BEST = "last.pth", "best.pth"


def finish_unit(folder: str | Path) -> list[Path]:
    """Once a unit (a mode, a model) is done: remove what only resume needed (`last.pth`, with the optimiser
    state, and temporary files a kill left), keep `best.pth` (weights alone); returns what was removed."""
    folder = Path(folder)
    gone = [p for p in (folder / LAST, *folder.glob(".*.tmp")) if p.is_file()]
    for p in gone:
        p.unlink()
    return gone


def settle_best(folder: str | Path, start: int, best_epoch: int) -> bool:
    """After a kill, make `best.pth` hold epoch `best_epoch` (the resumed curves' best) when that is the resumed
    epoch `start` itself: a kill between writing `last.pth` and `best.pth` left the best epoch's weights in
    `last.pth` alone. Returns whether best.pth was written."""
    folder = Path(folder)
    if best_epoch != start or not (folder / LAST).is_file():
        return False
    best = folder / BEST
    if best.is_file() and int(torch.load(best, map_location="cpu", weights_only=True)["epoch"]) == start:
        return False
    ck = torch.load(folder / LAST, map_location="cpu", weights_only=True)
    atomic_torch_save(dict(ck, opt=None), best)
    return True


def load_best(learn: Learner, folder: str | Path | None) -> int | None:
    """The best epoch's weights into `learn`: from its CheckpointCallback's memory (a run without checkpoints) or
    `folder`/best.pth; returns that epoch (None when kept in memory)."""
    cb = getattr(learn, "checkpoint", None)
    if cb is not None and cb.best_state is not None:
        get_model(learn.model).load_state_dict(cb.best_state)
        return None
    if folder is None:
        raise ValueError("no best weights: the learner kept none in memory and no checkpoint folder was given")
    return load_weights(learn, Path(folder) / BEST)


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
