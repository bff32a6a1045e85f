"""Learning curves: a callback recording train/valid loss and accuracy and time per epoch, and their plots."""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder
from torch.nn.parallel import DistributedDataParallel
from ..core.runs import pyplot, save_figure

COLUMNS = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "seconds")


class CurvesCallback(Callback):
    """Epoch-mean train and valid loss/accuracy, and wall time, appended to a CSV as each epoch ends.

    Unlike fastai's Recorder (whose train_loss is an exponential moving average), every value here is the
    exact mean over the epoch's batches. Sums stay on the device and sync once per epoch. In data-parallel
    training (the model wrapped in DistributedDataParallel, each process seeing its shard of the data) the
    sums are added up across processes first, so every rank holds the metrics of the whole epoch.

    It acts only in training fits: an epoch counts once its training phase has begun (fastai's `before_train`),
    so `predict`, `get_preds` (with or without targets, `with_loss=True`), `validate`, `tta`, `summary` and
    interpretation, which fire batch and epoch events without training, leave it silent; so does `lr_find`.
    `recorded` is True right after an epoch's row was added (CheckpointCallback saves only then).
    """
    order = 60  # after Recorder (50), before ProgressCallback's epoch output

    def __init__(self, csv_path: str | Path | None = None, log: Callable[[str], None] | None = print,
                 name: str = ""):
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.printer, self.label = log, name
        self.history: list[dict[str, float]] = []
        self.counting = self.recorded = False

    def before_epoch(self) -> None:
        # every fastai idiom (fit, predict, get_preds, validate, tta, summary) starts an epoch: nothing left over
        # from an interrupted fit is counted then
        self.counting = self.recorded = False

    def before_train(self) -> None:
        if any(isinstance(cb, LRFinder) for cb in self.learn.cbs):
            return  # lr_find trains on growing learning rates and never validates: not an epoch to record
        self.start = time.perf_counter()
        self.sums = {k: torch.zeros((), dtype=torch.float64) for k in ("tl", "tc", "tn", "vl", "vc", "vn")}
        self.moved = False
        self.counting = True

    def after_batch(self) -> None:
        if not self.counting:
            return
        if not self.moved:  # keep the running sums on the batch's device
            self.sums = {k: v.to(self.learn.pred.device) for k, v in self.sums.items()}
            self.moved = True
        y = self.learn.yb[0]
        bs = y.shape[0]
        correct = (self.learn.pred.detach().argmax(dim=-1) == y).sum()
        p = "t" if self.training else "v"
        self.sums[p + "l"] += self.learn.loss.detach().double() * bs
        self.sums[p + "c"] += correct
        self.sums[p + "n"] += bs

    def _all_reduce(self) -> None:
        """Sum the epoch's sums over the processes of a data-parallel run (one collective per epoch)."""
        if not (isinstance(self.learn.model, DistributedDataParallel) and dist.is_initialized()):
            return
        keys = list(self.sums)
        total = torch.stack([self.sums[k] for k in keys])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.sums = dict(zip(keys, total.unbind()))

    def after_epoch(self) -> None:
        if not self.counting:  # no training in this epoch: skipped, or fired by predict, validate, ...
            return
        self.counting = False
        self._all_reduce()
        s = {k: float(v) for k, v in self.sums.items()}
        if s["tn"] == 0:  # training cancelled before its first batch
            return
        row = {
            "epoch": self.learn.epoch + 1,
            "train_loss": s["tl"] / s["tn"],
            "train_accuracy": s["tc"] / s["tn"],
            "valid_loss": s["vl"] / s["vn"] if s["vn"] else math.nan,
            "valid_accuracy": s["vc"] / s["vn"] if s["vn"] else math.nan,
            "seconds": time.perf_counter() - self.start,
        }
        self.history.append(row)
        self.recorded = True
        if self.csv_path is not None:
            self._write(row)
        if self.printer is not None:
            self.printer(f"{self.label + ' ' if self.label else ''}epoch {row['epoch']}/{self.learn.n_epoch}  "
                     f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                     f"valid loss {row['valid_loss']:.4f} acc {row['valid_accuracy']:.4f}  "
                     f"{row['seconds']:.1f}s")

    def after_fit(self) -> None:
        self.counting = False

    def _write(self, row: dict[str, float]) -> None:
        """Append `row` to the CSV, writing the header first into a new or empty file."""
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            if new:
                csv.writer(f).writerow(COLUMNS)
            csv.writer(f).writerow([f"{row[c]:.6g}" if c != "epoch" else row[c] for c in COLUMNS])


def read_curves(csv_path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV written by CurvesCallback."""
    with open(csv_path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                title: str = "", accuracy_only: bool = False):
    """Loss and accuracy per epoch for several runs (train dashed, valid solid, one colour per run), saved as PNG."""
    plt = pyplot()

    metrics = ["accuracy"] if accuracy_only else ["loss", "accuracy"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        for i, (name, rows) in enumerate(runs.items()):
            epochs = [r["epoch"] for r in rows]
            c = colours[i % len(colours)]
            if not accuracy_only:
                ax.plot(epochs, [r[f"train_{metric}"] for r in rows], "--", color=c, label=f"{name} train")
            ax.plot(epochs, [r[f"valid_{metric}"] for r in rows], "-o", color=c, ms=3, label=f"{name} valid")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=110)
