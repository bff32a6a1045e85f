"""Part I of the practical: MLP vs CNN trained from scratch on MNIST, written to a run folder."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastai.data.core import DataLoaders
from fastai.torch_core import set_seed

from ..train.checkpoint import CheckpointCallback
from ..train.curves import plot_curves, read_curves
from ..core.config import DEFAULT_CACHE, build_config, config_dict
from ..data.mnist import TensorLoader, load_mnist, mnist_dls, mnist_source
from ..core.device import env_info, pick_device, resolve_precision
from ..train.distributed import LaunchConfig, digest, distributed_context, gather_object, join_launch, main_only, rank
from ..train.experiment import (RunContext, distributed_summary, launch_note, no_log, on_rank_zero, open_run,
                                resume_config, resume_unit)
from .learner import mnist_learner
from ..core.checks import check_names
from ..train.learner import count_params
from .models import MODELS
from ..train.optimizer import OPTIMIZER_NAME
from ..core.runs import markdown_table, write_json

SUMMARY_COLUMNS = ("model", "params", "epochs", "sec_per_epoch", "valid_accuracy", "test_accuracy")
RESUME_KEYS = ("source", "archs", "epochs", "bs", "lr", "seed")  # what a run folder's config.json fixes for resume


def check_mnist_plan(archs: Sequence[str], epochs: int, bs: int, lr: float) -> list[str]:
    """The models to train, each known, with a positive schedule; raises ValueError before any work otherwise."""
    if not archs:
        raise ValueError(f"no MNIST architecture given: choose from {', '.join(MODELS)}")
    archs = check_names(archs, list(MODELS), "MNIST architecture")
    if epochs <= 0 or bs <= 0 or lr <= 0:
        raise ValueError(f"epochs, batch size and lr must be positive, got epochs={epochs}, bs={bs}, lr={lr}")
    return archs


@dataclass
class MnistConfig:
    """Everything a Part I run is asked for (see train_mnist); config.json holds it as it ran."""
    source: str | Path = "sample"  # 'sample' (5,000 embedded digits), 'full' (download 70,000) or an MNIST folder
    archs: Sequence[str] = ("mlp", "cnn")
    epochs: int = 10
    bs: int = 64
    lr: float = 3e-3
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    out: str | Path = "runs/mnist"
    overwrite: bool = False
    progress: bool | None = None
    resume: str | Path | None = None
    cache_dir: str | Path = DEFAULT_CACHE
    mirror: str | None = None


def train_mnist(config: MnistConfig | None = None, *, log: Callable[[str], None] | None = print,
                launch: LaunchConfig | None = None, **options: Any) -> dict:
    """Train each MNIST model with `fit_one_cycle`; write metrics CSVs, curves.png, config.json and summary.json.

    `config`: an MnistConfig (or its fields as keywords in `options`). Every argument, the data and the device are
    checked before the run folder is made: bad input leaves nothing behind. `source='full'` downloads MNIST once
    into `cache_dir` (from `mirror`, a base address holding mnist_png.tgz, when given). Checkpoints (last and best
    epoch) go to `<run>/checkpoints/<model>/`; `resume=RUN_DIR` continues an interrupted run with the arguments
    saved in its config.json, from each model's last completed epoch.

    Launched on several processes (`torchrun`, `accelerate launch`; `launch` defaults to what the launcher set
    in the environment) it trains data-parallel: `bs` stays the batch of one optimiser step, split evenly over
    the processes, so the schedule and the results match a single process; metrics are summed over all ranks;
    rank 0 alone creates the run folder, writes its files and prints.
    """
    cfg = build_config(MnistConfig, config, options)
    if cfg.resume is not None:
        saved = resume_config(cfg.resume, RESUME_KEYS, "train_mnist")
        cfg = replace(cfg, **{k: saved[k] for k in RESUME_KEYS})
    cfg = replace(cfg, archs=check_mnist_plan(cfg.archs, cfg.epochs, cfg.bs, cfg.lr))
    dev, main, world = join_launch(cfg.bs, pick_device(cfg.device), launch)
    prec = resolve_precision(cfg.precision, dev)
    log = main_only(log or no_log)
    t0 = time.perf_counter()
    dls, test_dl = mnist_data(cfg, dev, main, log)
    ctx = RunContext(open_run(cfg.out, cfg.overwrite, cfg.resume, main), dev, prec, main, world, cfg.progress, log)
    config = dict(config_dict(cfg), source=str(cfg.source), device=str(dev), precision=prec,
                  optimizer=OPTIMIZER_NAME, schedule="fit_one_cycle", world_size=world, env=env_info(dev),
                  data=dls.splits.source)
    if world > 1:
        config.update(bs_per_process=cfg.bs // world)
    if cfg.resume is None and main:
        write_json(ctx.run / "config.json", config)
    log(f"data: {dls.splits.source}; split sizes {dls.splits.sizes()} ({time.perf_counter() - t0:.1f}s)"
        + launch_note(dev, cfg.bs, world))
    trained = [train_model(ctx, dls, test_dl, arch, cfg.epochs, cfg.lr, cfg.seed) for arch in cfg.archs]
    return write_mnist_summary(ctx, dls, config, trained, t0)


def mnist_data(cfg: MnistConfig, dev: torch.device, main: bool,
               log: Callable[[str], None] | None) -> tuple[DataLoaders, TensorLoader]:
    """The DataLoaders and test loader of `cfg.source`; rank 0 downloads 'full' first, the others then read it."""
    if str(cfg.source) == "full":
        on_rank_zero(lambda: mnist_source(cfg.source, cfg.cache_dir, cfg.mirror, log), main)
    splits = load_mnist(cfg.source, seed=cfg.seed, cache_dir=cfg.cache_dir, mirror=cfg.mirror)
    return mnist_dls(cfg.source, seed=cfg.seed, bs=cfg.bs, device=dev, splits=splits)


def train_model(ctx: RunContext, dls: DataLoaders, test_dl: TensorLoader, arch: str, epochs: int, lr: float,
                seed: int) -> tuple[dict, list[dict]]:
    """Train (or resume) one model with `fit_one_cycle` and test it; its result row and its per-epoch history."""
    set_seed(seed, reproducible=True)  # every model starts from the same seed (on every rank)
    csv_path, ckpt = ctx.run / f"metrics_{arch}.csv", ctx.run / "checkpoints" / arch
    learn = mnist_learner(dls, arch, lr=lr, precision=ctx.precision, csv_path=csv_path if ctx.main else None,
                          progress=ctx.progress if ctx.main else False, log=ctx.log, path=ctx.run)
    if ctx.main:
        learn.add_cb(CheckpointCallback(ckpt))
    start = resume_unit(learn, ckpt, csv_path, ctx.main)
    if start:
        ctx.log(f"{arch}: resuming after epoch {start}/{epochs}")
    with distributed_context(learn):  # no-op in a single process
        learn.fit_one_cycle(epochs, lr, start_epoch=start)
        train_batches = learn.train_iter
        # each rank evaluates its share of the test set; fastai gathers the metric over the ranks
        _, test_acc = learn.validate(dl=test_dl)
    history = read_curves(csv_path) if ctx.main else learn.curves.history
    trainable, total = count_params(learn.model)
    result = dict(model=arch, params=total, trainable_params=trainable, epochs=epochs,
                  sec_per_epoch=sum(r["seconds"] for r in history) / len(history),
                  valid_accuracy=history[-1]["valid_accuracy"], test_accuracy=float(test_acc),
                  metrics_csv=f"metrics_{arch}.csv")
    if ctx.world > 1:  # what each process did: same weights everywhere means the gradients were all-reduced
        result["ranks"] = gather_object(dict(rank=rank(), train_batches=train_batches,
                                             test_accuracy=float(test_acc), weights=digest(learn.model)))
    ctx.log(f"{arch}: test accuracy {float(test_acc):.4f}")
    return result, history


def write_mnist_summary(ctx: RunContext, dls: DataLoaders, config: dict, trained: list[tuple[dict, list[dict]]],
                        t0: float) -> dict:
    """curves.png, summary.md and summary.json (rank 0); the summary on every rank."""
    results = [r for r, _ in trained]
    table = markdown_table(results, SUMMARY_COLUMNS)
    summary = dict(run_dir=str(ctx.run), data=dls.splits.source, split_sizes=dls.splits.sizes(), device=str(ctx.dev),
                   precision=ctx.precision, seed=config["seed"], world_size=ctx.world, models=results,
                   env=config["env"], seconds=time.perf_counter() - t0)
    if ctx.world > 1:
        s = dls.splits
        summary["distributed"] = distributed_summary(ctx.dev, config["bs"], ctx.world,
                                                     digest(s.y_train, s.y_valid, s.y_test, s.x_train))
    if ctx.main:
        plot_curves({r["model"]: h for r, h in trained}, ctx.run / "curves.png",
                    title=f"MNIST ({config['source']}), {config['epochs']} epochs")
        (ctx.run / "summary.md").write_text(table + "\n")
        write_json(ctx.run / "summary.json", summary)
    ctx.log("\n" + table + f"\n\nrun folder: {ctx.run}")
    return summary
