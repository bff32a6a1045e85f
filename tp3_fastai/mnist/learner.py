"""The MNIST Learner: a from-scratch model with cross-entropy, accuracy and the package's optimiser."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from fastai.data.core import DataLoaders
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch import nn

from ..train.learner import CrossEntropy, setup_learner
from ..train.loop import Learner, learner_class
from ..train.optimizer import default_opt_func
from .models import create_model


def seed_training(dls: DataLoaders, seed: int) -> None:
    """Seed everything a training run draws from: the initialisation, dropout and augmentation (torch, numpy and
    Python's generators, fastai's `set_seed`) and the batch order of in-memory loaders (their own generator)."""
    set_seed(seed, reproducible=True)
    for dl in dls.loaders:
        if isinstance(getattr(dl, "gen", None), torch.Generator):
            dl.gen.manual_seed(seed)


def mnist_learner(dls: DataLoaders, arch: str | nn.Module = "cnn", lr: float = 1e-3, precision: str = "fp32",
                  csv_path: str | Path | None = None, opt_func: Callable | None = None, progress: bool | None = None,
                  log: Callable[[str], None] | None = print, path: str | Path = ".", stock: bool = False,
                  seed: int | None = None) -> Learner:
    """A Learner (cross-entropy, accuracy, the package's optimiser unless `opt_func`: see
    optimizer.default_opt_func) for an MNIST model, recording curves. The package's lean Learner, or with `stock`
    fastai's own (its stock loop, for comparisons: train.loop.learner_class). `seed`: the run is reproducible from
    here (see seed_training; the model is built after it), so the same seeds give the same accuracy again."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if seed is not None:
        seed_training(dls, seed)
    model = create_model(arch) if isinstance(arch, str) else arch
    learn = learner_class(stock)(dls, model, loss_func=CrossEntropy(), lr=lr, metrics=accuracy, path=path,
                                 opt_func=opt_func or default_opt_func(dls.device))
    return setup_learner(learn, precision, csv_path, name=arch if isinstance(arch, str) else "",
                         progress=progress, log=log)
