"""Part I of the practical: MLP vs CNN trained from scratch on MNIST, written to a run folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from fastai.torch_core import set_seed

from .checkpoint import CheckpointCallback, load_checkpoint, truncate_csv
from .curves import plot_curves, read_curves
from .data import mnist_dls
from .device import env_info, pick_device, resolve_precision
from .learners import mnist_learner
from .models import MODELS, check_name, count_params
from .runs import markdown_table, new_run_dir, read_json, write_json

SUMMARY_COLUMNS = ("model", "params", "epochs", "sec_per_epoch", "valid_accuracy", "test_accuracy")


def train_mnist(source: str | Path = "sample", archs: Sequence[str] = ("mlp", "cnn"), epochs: int = 10,
                bs: int = 64, lr: float = 3e-3, seed: int = 42, device: str = "auto", precision: str = "auto",
                out: str | Path = "runs/mnist", overwrite: bool = False, progress: bool | None = None,
                resume: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Train each MNIST model with `fit_one_cycle`; write metrics CSVs, curves.png, config.json and summary.json.

    Checkpoints (last and best epoch) go to `<run>/checkpoints/<model>/`; `resume=RUN_DIR` continues an
    interrupted run with the arguments saved in its config.json, from each model's last completed epoch.
    """
    if resume is not None:
        saved = read_json(Path(resume) / "config.json")
        source, archs, epochs, bs, lr, seed = (saved[k] for k in ("source", "archs", "epochs", "bs", "lr", "seed"))
    for a in archs:
        check_name(a, list(MODELS), "MNIST architecture")
    if epochs <= 0 or bs <= 0:
        raise ValueError(f"epochs and batch size must be positive, got epochs={epochs}, bs={bs}")
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    t0 = time.perf_counter()
    dls, test_dl = mnist_dls(source, seed=seed, bs=bs, device=dev)  # bad sources fail before any folder is made
    run = Path(resume) if resume is not None else new_run_dir(out, overwrite)
    config = dict(source=str(source), archs=list(archs), epochs=epochs, bs=bs, lr=lr, seed=seed,
                  device=str(dev), precision=prec, optimizer="fastai Adam (wd 0.01 decoupled)",
                  schedule="fit_one_cycle", env=env_info(dev))
    if resume is None:
        write_json(run / "config.json", config)

    log(f"data: {dls.splits.source}; split sizes {dls.splits.sizes()} ({time.perf_counter() - t0:.1f}s)")
    results, histories = [], {}
    for arch in archs:
        set_seed(seed, reproducible=True)  # every model starts from the same seed
        csv_path, ckpt = run / f"metrics_{arch}.csv", run / "checkpoints" / arch
        learn = mnist_learner(dls, arch, lr=lr, precision=prec, csv_path=csv_path, progress=progress, log=log,
                              path=run)
        learn.add_cb(CheckpointCallback(ckpt))
        start = load_checkpoint(learn, ckpt / "last.pth") if (ckpt / "last.pth").is_file() else 0
        truncate_csv(csv_path, start)  # rows of epochs after the checkpoint are re-run
        if start:
            learn.checkpoint.best = max(r["valid_accuracy"] for r in read_curves(csv_path))
            log(f"{arch}: resuming after epoch {start}/{epochs}")
        learn.fit_one_cycle(epochs, lr, start_epoch=start)
        history = read_curves(csv_path)
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
