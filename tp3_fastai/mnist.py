"""Part I of the practical: MLP vs CNN trained from scratch on MNIST, written to a run folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from fastai.torch_core import set_seed

from .curves import plot_curves
from .data import mnist_dls
from .device import env_info, pick_device, resolve_precision
from .learners import mnist_learner
from .models import MODELS, check_name, count_params
from .runs import markdown_table, new_run_dir, write_json

SUMMARY_COLUMNS = ("model", "params", "epochs", "sec_per_epoch", "valid_accuracy", "test_accuracy")


def train_mnist(source: str | Path = "sample", archs: Sequence[str] = ("mlp", "cnn"), epochs: int = 10,
                bs: int = 64, lr: float = 3e-3, seed: int = 42, device: str = "auto", precision: str = "auto",
                out: str | Path = "runs/mnist", overwrite: bool = False, progress: bool | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Train each MNIST model with `fit_one_cycle`; write metrics CSVs, curves.png, config.json and summary.json."""
    for a in archs:
        check_name(a, list(MODELS), "MNIST architecture")
    if epochs <= 0 or bs <= 0:
        raise ValueError(f"epochs and batch size must be positive, got epochs={epochs}, bs={bs}")
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    t0 = time.perf_counter()
    dls, test_dl = mnist_dls(source, seed=seed, bs=bs, device=dev)  # bad sources fail before any folder is made
    run = new_run_dir(out, overwrite)
    config = dict(source=str(source), archs=list(archs), epochs=epochs, bs=bs, lr=lr, seed=seed,
                  device=str(dev), precision=prec, optimizer="fastai Adam (wd 0.01 decoupled)",
                  schedule="fit_one_cycle", env=env_info(dev))
    write_json(run / "config.json", config)

    log(f"data: {dls.splits.source}; split sizes {dls.splits.sizes()} ({time.perf_counter() - t0:.1f}s)")
    results, histories = [], {}
    for arch in archs:
        set_seed(seed, reproducible=True)  # every model starts from the same seed
        learn = mnist_learner(dls, arch, lr=lr, precision=prec, csv_path=run / f"metrics_{arch}.csv",
                              progress=progress, log=log, path=run)
        learn.fit_one_cycle(epochs, lr)
        history = learn.curves.history
        _, test_acc = learn.validate(dl=test_dl)
        trainable, total = count_params(learn.model)
        histories[arch] = history
        results.append(dict(model=arch, params=total, trainable_params=trainable, epochs=epochs,
                            sec_per_epoch=sum(r["seconds"] for r in history) / len(history),
                            valid_accuracy=history[-1]["valid_accuracy"], test_accuracy=float(test_acc),
                            metrics_csv=f"metrics_{arch}.csv"))
        log(f"{arch}: test accuracy {float(test_acc):.4f}")
    plot_curves(histories, run / "curves.png", title=f"MNIST ({config['source']}), {epochs} epochs")
    table = markdown_table(results, SUMMARY_COLUMNS)
    (run / "summary.md").write_text(table + "\n")
    summary = dict(run_dir=str(run), data=dls.splits.source, split_sizes=dls.splits.sizes(), device=str(dev),
                   precision=prec, seed=seed, models=results, env=config["env"],
                   seconds=time.perf_counter() - t0)
    write_json(run / "summary.json", summary)
    log("\n" + table + f"\n\nrun folder: {run}")
    return summary
