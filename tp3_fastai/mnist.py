"""Part I of the practical: MLP vs CNN trained from scratch on MNIST, written to a run folder."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

from fastai.torch_core import set_seed

from .checkpoint import CheckpointCallback, load_checkpoint, truncate_csv
from .curves import plot_curves, read_curves
from .data import mnist_dls
from .device import env_info, pick_device, resolve_precision
from .distributed import (LaunchConfig, backend_for, broadcast_object, digest, distributed_context, gather_object,
                          join_launch, main_only, rank)
from .learners import mnist_learner
from .models import MODELS, check_name, count_params
from .optimizer import OPTIMIZER_NAME
from .runs import markdown_table, new_run_dir, read_json, write_json

SUMMARY_COLUMNS = ("model", "params", "epochs", "sec_per_epoch", "valid_accuracy", "test_accuracy")


def train_mnist(source: str | Path = "sample", archs: Sequence[str] = ("mlp", "cnn"), epochs: int = 10,
                bs: int = 64, lr: float = 3e-3, seed: int = 42, device: str = "auto", precision: str = "auto",
                out: str | Path = "runs/mnist", overwrite: bool = False, progress: bool | None = None,
                resume: str | Path | None = None, log: Callable[[str], None] = print,
                launch: LaunchConfig | None = None) -> dict:
    """Train each MNIST model with `fit_one_cycle`; write metrics CSVs, curves.png, config.json and summary.json.

    Checkpoints (last and best epoch) go to `<run>/checkpoints/<model>/`; `resume=RUN_DIR` continues an
    interrupted run with the arguments saved in its config.json, from each model's last completed epoch.

    Launched on several processes (`torchrun`, `accelerate launch`; `launch` defaults to what the launcher set
    in the environment) it trains data-parallel: `bs` stays the batch of one optimiser step, split evenly over
    the processes, so the schedule and the results match a single process; metrics are summed over all ranks;
    rank 0 alone creates the run folder, writes its files and prints.
    """
    if resume is not None:
        saved = read_json(Path(resume) / "config.json")
        source, archs, epochs, bs, lr, seed = (saved[k] for k in ("source", "archs", "epochs", "bs", "lr", "seed"))
    for a in archs:
        check_name(a, list(MODELS), "MNIST architecture")
    if epochs <= 0 or bs <= 0:
        raise ValueError(f"epochs and batch size must be positive, got epochs={epochs}, bs={bs}")
    dev, main, world = join_launch(bs, pick_device(device), launch)
    prec = resolve_precision(precision, dev)
    log = main_only(log)
    t0 = time.perf_counter()
    dls, test_dl = mnist_dls(source, seed=seed, bs=bs, device=dev)  # bad sources fail before any folder is made
    # rank 0 names the run folder (a new -2, -3, ... if it exists) and tells the others
    run = broadcast_object((Path(resume) if resume is not None else new_run_dir(out, overwrite)) if main else None)
    config = dict(source=str(source), archs=list(archs), epochs=epochs, bs=bs, lr=lr, seed=seed,
                  device=str(dev), precision=prec, optimizer=OPTIMIZER_NAME,
                  schedule="fit_one_cycle", world_size=world, env=env_info(dev))
    if world > 1:
        config.update(bs_per_process=bs // world, backend=backend_for(dev))
    if resume is None and main:
        write_json(run / "config.json", config)

    log(f"data: {dls.splits.source}; split sizes {dls.splits.sizes()} ({time.perf_counter() - t0:.1f}s)"
        + (f"; {world} processes ({backend_for(dev)}), {bs // world} images per process per step" if world > 1
           else ""))
    results, histories = [], {}
    for arch in archs:
        set_seed(seed, reproducible=True)  # every model starts from the same seed (on every rank)
        csv_path, ckpt = run / f"metrics_{arch}.csv", run / "checkpoints" / arch
        learn = mnist_learner(dls, arch, lr=lr, precision=prec, csv_path=csv_path if main else None,
                              progress=progress if main else False, log=log, path=run)
        if main:
            learn.add_cb(CheckpointCallback(ckpt))
        start = load_checkpoint(learn, ckpt / "last.pth") if (ckpt / "last.pth").is_file() else 0
        if broadcast_object(start) != start:
            raise ValueError(f"rank {rank()} cannot see {ckpt / 'last.pth'}: resuming on several machines needs "
                             "the run folder on a file system that every process sees")
        if main:
            truncate_csv(csv_path, start)  # rows of epochs after the checkpoint are re-run
        if start and main:
            learn.checkpoint.best = max(r["valid_accuracy"] for r in read_curves(csv_path))
        if start:
            log(f"{arch}: resuming after epoch {start}/{epochs}")
        with distributed_context(learn):  # no-op in a single process
            learn.fit_one_cycle(epochs, lr, start_epoch=start)
            train_batches = learn.train_iter
            # each rank evaluates its share of the test set; fastai gathers the metric over the ranks
            _, test_acc = learn.validate(dl=test_dl)
        history = read_curves(csv_path) if main else learn.curves.history
        trainable, total = count_params(learn.model)
        histories[arch] = history
        result = dict(model=arch, params=total, trainable_params=trainable, epochs=epochs,
                      sec_per_epoch=sum(r["seconds"] for r in history) / len(history),
                      valid_accuracy=history[-1]["valid_accuracy"], test_accuracy=float(test_acc),
                      metrics_csv=f"metrics_{arch}.csv")
        if world > 1:  # what each process did: same weights everywhere means the gradients were all-reduced
            result["ranks"] = gather_object(dict(rank=rank(), train_batches=train_batches,
                                                 test_accuracy=float(test_acc), weights=digest(learn.model)))
        results.append(result)
        log(f"{arch}: test accuracy {float(test_acc):.4f}")
    table = markdown_table(results, SUMMARY_COLUMNS)
    summary = dict(run_dir=str(run), data=dls.splits.source, split_sizes=dls.splits.sizes(), device=str(dev),
                   precision=prec, seed=seed, world_size=world, models=results, env=config["env"],
                   seconds=time.perf_counter() - t0)
    if world > 1:
        s = dls.splits
        summary["distributed"] = dict(
            backend=backend_for(dev), bs_per_process=bs // world,
            ranks=gather_object(dict(rank=rank(), host=socket.gethostname(), pid=os.getpid(), device=str(dev),
                                     split=digest(s.y_train, s.y_valid, s.y_test, s.x_train))))
    if main:
        plot_curves(histories, run / "curves.png", title=f"MNIST ({config['source']}), {epochs} epochs")
        (run / "summary.md").write_text(table + "\n")
        write_json(run / "summary.json", summary)
    log("\n" + table + f"\n\nrun folder: {run}")
    return summary
