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
from torch.nn.parallel import DistributedDataParallel
from .runs import pyplot, save_figure

COLUMNS = ("epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "seconds")


class CurvesCallback(Callback):
    """Epoch-mean train and valid loss/accuracy, and wall time, appended to a CSV as each epoch ends.

    Unlike fastai's Recorder (whose train_loss is an exponential moving average), every value here is the
    exact mean over the epoch's batches. Sums stay on the device and sync once per epoch. In data-parallel
    training (the model wrapped in DistributedDataParallel, each process seeing its shard of the data) the
    sums are added up across processes first, so every rank holds the metrics of the whole epoch.
    """
    order = 60  # after Recorder (50), before ProgressCallback's epoch output

    def __init__(self, csv_path: str | Path | None = None, log: Callable[[str], None] | None = print,
                 name: str = ""):
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.printer, self.label = log, name
        self.history: list[dict[str, float]] = []

    def before_fit(self) -> None:
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            if not self.csv_path.exists() or self.csv_path.stat().st_size == 0:
                with open(self.csv_path, "w", newline="") as f:
                    csv.writer(f).writerow(COLUMNS)

    def before_epoch(self) -> None:
        self.start = time.perf_counter()
        self.sums = {k: torch.zeros((), dtype=torch.float64) for k in ("tl", "tc", "tn", "vl", "vc", "vn")}
        self.moved = False

    def after_batch(self) -> None:
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
        self._all_reduce()
        s = {k: float(v) for k, v in self.sums.items()}
        if s["tn"] == 0:  # `learn.validate()` fires epoch events too: not a training epoch
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
        if self.csv_path is not None:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerow([f"{row[c]:.6g}" if c != "epoch" else row[c] for c in COLUMNS])
        if self.printer is not None:
            self.printer(f"{self.label + ' ' if self.label else ''}epoch {row['epoch']}/{self.learn.n_epoch}  "
                     f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                     f"valid loss {row['valid_loss']:.4f} acc {row['valid_accuracy']:.4f}  "
                     f"{row['seconds']:.1f}s")


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
