"""Precomputed body features: with a frozen body and no random augmentation the body's output never changes, so
compute it once and train only the head on the cached features (fastai 0.7's `precompute=True`).

A `vision_learner` model is `Sequential(body, head)`, and fastai's head starts with parameter-free layers (concat
pooling, flatten). Those are cached with the body (`feature_split`), so the cache holds one pooled vector per image
(4,096 floats for a ResNet50) rather than a feature map. The rest of the head (BatchNorm1d, Dropout, Linear, ...)
trains on the cache through a fastai Learner over in-memory tensors (data.TensorLoader), and since it *is* the
learner's head (the same modules, not a copy), the original learner predicts with the trained head afterwards.

Equivalence: the cached path computes exactly what the `frozen` mode (train.modes; fastai's `train_bn=False`)
computes (body parameters frozen, body BatchNorm in eval mode through BnFreeze: the body is a fixed function of the
image). It is *not* what `frozen_bn` (fastai's default `freeze()`, `train_bn=True`) computes: there the body's
BatchNorm layers stay in training mode, normalise with each batch's own statistics and learn their affine
parameters, so a body output depends on the other images in its batch and changes as training goes; no cache can
reproduce that.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from fastcore.meta import delegates
from fastai.data.core import DataLoaders
from fastai.learner import Learner as FastaiLearner
from torch import nn

from ..train.learner import setup_learner
from ..train.loop import learner_class
from ..data.mnist import TensorLoader
from ..core.device import autocast, synchronize

__all__ = ["feature_split", "precompute_features", "plain_batches", "unaugmented_loader", "feature_learner",
           "FeatureFit",
           "train_head_on_features"]


def _is_stateless(m: nn.Module) -> bool:
    """A layer whose output depends on its input alone: no parameters, no buffers, no randomness."""
    return (not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())
            and not isinstance(m, nn.modules.dropout._DropoutNd))


def feature_split(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """(extractor, head) of a `Sequential(body, head)` model: the extractor is the body plus the head's leading
    parameter-free layers (pooling, flatten); the head is the rest. Both share the model's modules.
    """
    if not isinstance(model, nn.Sequential) or len(model) != 2:
        raise ValueError("expected a vision_learner model, Sequential(body, head); got "
                         f"{type(model).__name__} with {len(model) if isinstance(model, nn.Sequential) else '?'} "
                         "children. Pass learn.model of a learner built by resnet_learner or vision_learner.")
    body, head = model[0], model[1]
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    k = 0
    while k < len(layers) and _is_stateless(layers[k]):
        k += 1
    if k == len(layers):
        raise ValueError("the head has no trainable layers: nothing to train on precomputed features")
    return nn.Sequential(body, *layers[:k]), nn.Sequential(*layers[k:])


def plain_batches(dl: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of `dl` as plain tensors (fastai's TensorImage / TensorCategory stripped)."""
    for b in dl:
        x, y = b[0], b[1]
        yield x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


@torch.no_grad()
def precompute_features(body: nn.Module, dl: Iterable, device: torch.device | str | None = None,
                        precision: str = "fp32", channels_last: bool = False, store: str = "device",
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels): `body` applied once, in eval mode and without gradients, to every batch of `dl`.

    `dl` yields `(x, y)` batches (a fastai DataLoader, a TensorLoader, a list). Give it a loader *without*
    random augmentation (see `unaugmented_loader`): a cached random crop would be the same crop every epoch.
    `precision` ('fp32', 'fp16', 'bf16', already resolved for the device) runs the body under autocast; the
    features are stored as float32, on the device (`store='device'`) or in CPU memory (`store='cpu'`).
    The body's train/eval state is restored afterwards.
    """
    if store not in ("device", "cpu"):
        raise ValueError(f"store must be 'device' or 'cpu', got {store!r}")
    dev = torch.device(device) if device is not None else next(body.parameters()).device
    was_training = body.training
    body.eval()
    feats, labels = [], []
    try:
        for x, y in plain_batches(dl):
            x = x.to(dev, non_blocking=True)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, precision):
                f = body(x)
            f = f.float().flatten(1) if f.ndim > 2 else f.float()
            feats.append(f if store == "device" else f.cpu())
            labels.append(y.to(dev) if store == "device" else y.cpu())
    finally:
        body.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches: nothing to precompute")
    return torch.cat(feats), torch.cat(labels)


def unaugmented_loader(dls: DataLoaders, split: str = "train"):
    """A loader over the `split` items ('train' or 'valid') in order, with validation transforms only.

    For fastai DataBlock loaders the training items go through `dls.test_dl(items, with_labels=True)`, which
    applies the validation transforms (centre crop, no `aug_transforms`); loaders without random transforms
    (TensorLoader) are reused unshuffled.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    dl = dls.train if split == "train" else dls.valid
    if split == "train" and hasattr(dls, "test_dl") and hasattr(getattr(dl, "dataset", None), "items"):
        return dls.test_dl(dl.dataset.items, with_labels=True, bs=dl.bs)
    return dl.new(shuffle=False, drop_last=False)


@delegates(setup_learner, but=["learn", "name"])
def feature_learner(head: nn.Module, dls: DataLoaders, loss_func: Callable, opt_func: Callable, lr: float,
                    wd: float | None = None, metrics: Any = None, path: str | Path = ".", stock: bool = False,
                    **kwargs: Any) -> FastaiLearner:
    """The package's Learner training `head` (every parameter trainable) on feature DataLoaders, set up by
    train.learner.setup_learner (`kwargs`: precision, curves CSV, output; quiet by default); with `stock` fastai's own
    Learner (its stock loop, for comparisons: train.loop.learner_class)."""
    for p in head.parameters():
        p.requires_grad_(True)
    learn = learner_class(stock)(dls, head, loss_func=loss_func, opt_func=opt_func, lr=lr, wd=wd, metrics=metrics,
                                 path=path)
    return setup_learner(learn, name="precomputed", **{"progress": False, "log": None, **kwargs})


@dataclass
class FeatureFit:
    """What `train_head_on_features` did: the head learner, cache sizes and the one-off and training costs."""
    head_learner: FastaiLearner
    n_train: int
    n_valid: int
    feature_dim: int
    cache_seconds: float
    fit_seconds: float
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The numbers, without the learner (for JSON)."""
        return dict(n_train=self.n_train, n_valid=self.n_valid, feature_dim=self.feature_dim,
                    cache_seconds=self.cache_seconds, fit_seconds=self.fit_seconds, epochs=self.epochs,
                    sec_per_epoch=self.fit_seconds / self.epochs, history=self.history)


def train_head_on_features(learn: FastaiLearner, epochs: int, lr: float = 2e-3, bs: int | None = None,
                           one_cycle: bool = True, store: str = "device", csv_path: str | Path | None = None,
                           progress: bool | None = False, log: Callable[[str], None] | None = None,
                           seed: int | None = None) -> FeatureFit:
    """Train the head of a `resnet_learner` / `vision_learner` on body features computed once.

    Train and valid images go through the body (plus the head's pooling) once, without augmentation and with the
    body in eval mode; then `fit_one_cycle(epochs, lr)` (or `fit` when `one_cycle` is False) trains the rest of
    the head on the cached vectors through the package's Learner over in-memory tensors, with the learner's loss,
    metrics, optimiser, weight decay and precision. The head modules are `learn.model[1]`'s own, so `learn`
    predicts with the trained head afterwards. Equivalent to training with `set_mode(learn, 'frozen')` and no
    augmentation; see the module docstring for why `frozen_bn` differs.
    """
    if epochs <= 0 or lr <= 0:
        raise ValueError(f"epochs and lr must be positive, got epochs={epochs}, lr={lr}")
    extractor, head = feature_split(learn.model)
    dev = next(learn.model.parameters()).device
    dls_dev = getattr(learn.dls, "device", None)
    if dls_dev is not None and torch.device(dls_dev) != dev:
        learn.model.to(dls_dev)
        dev = torch.device(dls_dev)
    precision = getattr(learn, "precision", "fp32")
    bs = bs or learn.dls.train.bs
    t0 = time.perf_counter()
    x_train, y_train = precompute_features(extractor, unaugmented_loader(learn.dls, "train"), dev, precision,
                                           store=store)
    x_valid, y_valid = precompute_features(extractor, unaugmented_loader(learn.dls, "valid"), dev, precision,
                                           store=store)
    synchronize(dev)
    cache_seconds = time.perf_counter() - t0
    seed = 0 if seed is None else seed
    home = dev if store == "device" else torch.device("cpu")  # fastai moves each batch to the model's device
    vocab = getattr(learn.dls, "vocab", None)
    train = TensorLoader(x_train, y_train, bs, shuffle=True, seed=seed, device=home, vocab=vocab)
    valid = TensorLoader(x_valid, y_valid, bs * 2, device=home, vocab=vocab)
    fdls = DataLoaders(train, valid, device=home)
    head_learn = feature_learner(head, fdls, learn.loss_func, learn.opt_func, lr, wd=learn.wd, metrics=learn.metrics,
                                 precision=precision, csv_path=csv_path, progress=progress, log=log, path=learn.path)
    t1 = time.perf_counter()
    if one_cycle:
        head_learn.fit_one_cycle(epochs, lr)
    else:
        head_learn.fit(epochs, lr)
    synchronize(dev)
    return FeatureFit(head_learn, len(y_train), len(y_valid), x_train.shape[1], cache_seconds,
                      time.perf_counter() - t1, epochs, list(head_learn.curves.history))
