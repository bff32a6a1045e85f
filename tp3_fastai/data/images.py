"""Image-folder DataLoaders for transfer learning: folder layouts, augmentation, named sources, the embedded LFW set."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.transforms import Normalize, RegexLabeller, parent_label
from fastai.vision.augment import aug_transforms
from fastai.vision.core import imagenet_stats
from fastcore.basics import using_attr
from PIL import Image

from .mnist import IMAGE_EXTS, stratified_split
from .download import DEFAULT_CACHE, download
from ..core.runs import pyplot, save_figure
from .pipeline.pil import DEFAULT_MIN_SCALE

LFW_VALID_PCT, LFW_SEED = 0.25, 0  # part of the embedded set's definition: every run sees the same split
LFW_CLASSES = ("face", "non_face")
VALID_NAMES = ("valid", "val")  # fastai's name, then PyTorch's (hymenoptera, imagenette)
PETS_LABEL_RE = r"^(.*)_\d+\.jpg$"
SOURCES: dict[str, str] = {
    "lfw": "embedded: skimage.data.lfw_subset() (200 real 25x25 images, 100 faces + 100 non-faces)",
    "hymenoptera": "https://download.pytorch.org/tutorial/hymenoptera_data.zip",  # train/ + val/, 2 classes
    "pets": "https://s3.amazonaws.com/fast-ai-imageclas/oxford-iiit-pet.tgz",  # fastai URLs.PETS: images/*.jpg
    "imagenette": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",  # fastai URLs.IMAGENETTE_160
}
SOURCE_SUBDIR: dict[str, str] = {"pets": "images"}  # where a named source's images lie in its archive's folder
# Named sources whose labels are in the file names rather than in class folders.
SOURCE_LABEL_RE: dict[str, str] = {"pets": PETS_LABEL_RE}
AUG_KEYS = {"flip": "do_flip", "vflip": "flip_vert", "rot": "max_rotate", "zoom": "max_zoom",
            "light": "max_lighting", "warp": "max_warp"}
LAYOUT_HELP = ("expected an image folder in one of these layouts: <path>/train/<class>/*.jpg with "
               "<path>/valid/<class>/*.jpg or <path>/val/<class>/*.jpg; or <path>/<class>/*.jpg (split by valid_pct); "
               "or a flat folder of images whose class is in the file name (pass label_re)")


@dataclass
class Augmentation:
    """What augmentation a run used: the random crop (None: centre crop only) and `aug_transforms` keywords."""
    name: str
    min_scale: float | None = DEFAULT_MIN_SCALE
    batch: dict[str, Any] | None = field(default_factory=dict)

    def batch_tfms(self) -> list:
        """The batch augmentation transforms (empty when off): fastai's `aug_transforms(**batch)`, its affine and
        lighting parts run without host reads (pipeline.augment.read_free_tfms: the same draws)."""
        from .pipeline.augment import read_free_tfms

        return [] if self.batch is None else read_free_tfms(aug_transforms(**self.batch))[0]


def parse_aug(aug: str | Augmentation = "default") -> Augmentation:
    """'none', 'default' (aug_transforms()), 'noflip', or a comma list like 'flip=0,rot=10,zoom=1.1,light=0.2'.

    Keys of the list: flip, vflip (0/1), rot (degrees), zoom (max zoom), light, warp (0 turns one off),
    crop (minimum area of the random crop; 0 or 1 turns the random crop off). Unnamed keys keep fastai's defaults.
    """
    if isinstance(aug, Augmentation):
        return aug
    aug = str(aug).strip()
    if aug == "none":
        return Augmentation("none", None, None)
    if aug == "default":
        return Augmentation("default")
    if aug == "noflip":
        return Augmentation("noflip", batch={"do_flip": False})
    if "=" not in aug:
        raise ValueError(f"unknown augmentation {aug!r}: use none, default, noflip or a list like "
                         "'flip=0,rot=10,zoom=1.1,light=0.2' (keys: crop, " + ", ".join(AUG_KEYS) + ")")
    out = Augmentation(aug)
    for part in filter(None, (p.strip() for p in aug.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        try:
            v = float(value)
        except ValueError:
            v = None
        if not sep or v is None:
            raise ValueError(f"augmentation item {part!r} is not key=number (e.g. rot=10)")
        if key == "crop":
            if not 0 <= v <= 1:
                raise ValueError(f"crop={value} must lie in [0, 1] (minimum area of the random crop)")
            out.min_scale = None if v in (0, 1) else v
        elif key in AUG_KEYS:
            if v < 0 or (key == "zoom" and v < 1):
                raise ValueError(f"{key}={value} is out of range (zoom >= 1, the others >= 0)")
            out.batch[AUG_KEYS[key]] = bool(v) if key in ("flip", "vflip") else v
        else:
            raise ValueError(f"unknown augmentation key {key!r}: use crop, " + ", ".join(AUG_KEYS))
    if out.batch.get("flip_vert"):
        out.batch["do_flip"] = True  # fastai only flips vertically as part of its dihedral flips
    return out


@dataclass
class FolderInfo:
    """Where a folder dataset came from, its layout, classes and split sizes."""
    path: str
    layout: str
    classes: list[str]
    n_train: int
    n_valid: int
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    pipeline: str = ""  # the input pipeline that runs: pil, device or cached (see tp3_fastai.data.pipeline)
    pipeline_info: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of images in each split."""
        return {"train": self.n_train, "valid": self.n_valid}


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                  and not f.name.startswith("."))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_files(folder: Path) -> list[Path]:
    """Images of `folder/<class>/`, refusing empty class folders."""
    dirs = _class_dirs(folder)
    if not dirs:
        raise ValueError(f"{folder} has no class sub-folders; {LAYOUT_HELP}")
    files = []
    for d in dirs:
        found = _image_files(d)
        if not found:
            raise ValueError(f"class folder {d} holds no images ({', '.join(IMAGE_EXTS)}): add images or remove it")
        files += found
    return files


def skipped_files(files: Sequence[Path]) -> list[Path]:
    """Files beside `files` (in the same folders) that are skipped because their extension is not an image's."""
    return sorted(f for d in {f.parent for f in files} for f in d.iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.suffix.lower() not in IMAGE_EXTS)


def check_images(files: Sequence[Path], memory: str | Path | None = None) -> None:
    """Open every image (decoding a reduced draft) and raise one ValueError naming all that cannot be read.

    With `memory` (a JSON file, see pipeline.check.memory_file), files whose path, size and mtime passed before are
    not opened again, and the files that pass now are remembered: a large folder costs a full check once."""
    from .pipeline.check import read_memory, remember, unchecked

    memory = Path(memory) if memory is not None else None
    known = read_memory(memory)
    todo, now = unchecked(files, known)
    bad, failed = [], set()
    for f in todo:
        try:
            with Image.open(f) as im:
                im.draft(im.mode, (32, 32))
                im.load()
        except Exception as e:  # PIL raises many types for damaged files
            bad.append(f"{f} ({type(e).__name__}: {e})")
            failed.add(str(f))
    if memory is not None and (todo or set(known) != set(now)):
        remember(memory, {k: v for k, v in now.items() if k not in failed})
    if bad:
        raise ValueError(f"{len(bad)} image(s) cannot be read: {'; '.join(bad[:20])}"
                         + (f" ... ({len(bad) - 20} more)" if len(bad) > 20 else "") + ". Remove or replace them.")


def scan_folder(path: str | Path, valid_pct: float = 0.2, seed: int = 42, label_re: str | None = None,
                ) -> tuple[list[Path], list[int], Callable[[Path], str], str]:
    """Image files, validation indices, labelling function and layout name of an image folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist; {LAYOUT_HELP}")
    labeller: Callable[[Path], str] = parent_label
    valid_dir = next((path / n for n in VALID_NAMES if (path / "train").is_dir() and (path / n).is_dir()), None)
    if label_re is not None:
        labeller = using_attr(RegexLabeller(label_re), "name")  # match the file name, not the path
    if valid_dir is not None:
        layout = f"train/ + {valid_dir.name}/"
        if label_re is None:
            train, valid = _class_files(path / "train"), _class_files(valid_dir)
        else:
            train, valid = _image_files(path / "train"), _image_files(valid_dir)
        files, valid_idx = train + valid, list(range(len(train), len(train) + len(valid)))
    else:
        root = path / "train" if (path / "train").is_dir() else path
        if label_re is None and not _class_dirs(root) and _image_files(root):
            raise ValueError(f"{root} holds images but no class sub-folders: pass label_re (a regular expression "
                             f"whose first group is the label, e.g. {PETS_LABEL_RE!r}) or sort the images into "
                             f"{root}/<class>/")
        files = _class_files(root) if label_re is None else _image_files(root)
        layout = f"{'train/ ' if root != path else ''}<class>/ split by valid_pct={valid_pct}"
        if label_re is not None:
            layout = f"flat folder, label from file name ({label_re})"
        if not 0 < valid_pct < 1:
            raise ValueError(f"{path} has no valid/ or val/ folder, so valid_pct must lie in (0, 1), got {valid_pct}")
        valid_idx = []
    if not files:
        raise ValueError(f"no images found in {path}; {LAYOUT_HELP}")
    try:
        labels = [labeller(f) for f in files]
    except Exception as e:  # RegexLabeller raises a bare Exception when a name does not match
        raise ValueError(f"cannot label the images of {path} with {label_re!r}: {e}") from e
    if len(set(labels)) < 2:
        raise ValueError(f"{path} holds a single class ({labels[0]!r}): a classifier needs at least two classes")
    if valid_dir is None:
        codes = np.unique(np.asarray(labels), return_inverse=True)[1]
        valid_idx = sorted(stratified_split(codes, [valid_pct], seed)[0].tolist())
    else:
        n_train = len(files) - len(valid_idx)
        unseen = sorted(set(labels[n_train:]) - set(labels[:n_train]))
        if unseen:
            raise ValueError(f"{valid_dir} has classes that {path / 'train'} lacks: {', '.join(unseen)}")
    if not valid_idx or len(valid_idx) == len(files):
        raise ValueError(f"{path}: the split leaves no training or no validation images; add images or change "
                         f"valid_pct ({valid_pct})")
    return files, valid_idx, labeller, layout


def folder_dls(path: str | Path, size: int = 224, bs: int = 64, valid_pct: float = 0.2, seed: int = 42,
               aug: str | Augmentation = "default", label_re: str | None = None, device: torch.device | str | None = None,
               num_workers: int | None = None, verify: bool = True, source: str = "", pipeline: str = "auto",
               cache_budget: float | int | None = None, cache_dir: str | Path | None = None,
               stats: tuple[Sequence[float], Sequence[float]] = imagenet_stats) -> DataLoaders:
    """fastai DataLoaders from an image folder (train/ + valid/ or val/, one folder split by seeded, stratified
    `valid_pct`, or a flat folder labelled by `label_re`).

    `pipeline` (see tp3_fastai.data.pipeline): 'pil' runs fastai's item transforms per image on the CPU (random
    resized crop for training, centre crop for validation) and the batch transforms on `device`; 'device' reads
    file bytes on the loader (workers, which also decode files that are not JPEGs) and decodes, crops and
    augments the batch on `device` (nvJPEG on CUDA) in one resample; 'cached' does the same from images decoded
    once into a uint8 cache on `device` within `cache_budget` (a fraction of free memory, or bytes; images beyond it
    are streamed); 'auto' takes 'cached' when the whole set fits, else 'device' (pipeline.choose_pipeline). Every
    pipeline gives the same classes, labels, shapes and normalisation; batch augmentation `aug_transforms` (see
    parse_aug: fastai's transforms and draws, run without host reads) and normalisation by `stats` (ImageNet's by
    default; hub weights bring their own, see weights.normalization), which every mode then shares. No pipeline
    makes the host wait for the device per batch (see tp3_fastai.data.pipeline).
    `dls.info` (a FolderInfo) records the layout, classes, split sizes, the pipeline that runs and why. Loader
    workers, where there are any, persist from epoch to epoch.

    Bad data is dealt with before any training, always the same way: files whose extension is not an image's
    (notes.txt, labels.csv) are skipped and listed in `dls.info.skipped`; an image file that cannot be decoded
    (corrupt, truncated, not really an image) stops here with one ValueError listing every such file (`verify`;
    with `cache_dir`, as image_dls gives, files that passed before with the same size and mtime are remembered
    there and not opened again);
    an empty class folder, a single class or an empty split stop with a ValueError naming the folder. Images
    of any mode (grayscale, palette, RGBA, 16-bit grayscale) load as 8-bit RGB (see `to_rgb`).
    """
    from .pipeline import check_pipeline, choose_pipeline, default_workers, device_dls, jpeg_share, read_free_tfms
    from .pipeline.pil import pil_dls
    from .pipeline.check import memory_file

    if size <= 0 or bs <= 0:
        raise ValueError(f"size and batch size must be positive, got size={size}, bs={bs}")
    augmentation = parse_aug(aug)
    check_pipeline(pipeline)
    files, valid_idx, labeller, layout = scan_folder(path, valid_pct, seed, label_re)
    root = Path(path).expanduser()
    if verify:
        check_images(files, memory_file(cache_dir, root) if cache_dir is not None else None)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    jpegs = jpeg_share(files)
    running, why = choose_pipeline(pipeline, dev, len(files), size, cache_budget, jpegs)
    if running == "pil":
        augment, split = ([], None) if augmentation.batch is None else \
            read_free_tfms(aug_transforms(**augmentation.batch))
        # On a CPU the training itself uses every core; worker processes only compete with it.
        num_workers = default_workers("pil", dev) if num_workers is None else num_workers
        dls, facts = pil_dls(files, valid_idx, labeller, root, size, bs, augmentation.min_scale,
                             [*augment, Normalize.from_stats(*stats)], dev, num_workers)
        facts.update(augmentation=split.describe() if split else "none", jpeg_share=round(jpegs, 3))
    else:
        dls, facts = device_dls(files, valid_idx, labeller, root, size, bs, augmentation.min_scale,
                                augmentation.batch, dev, running, num_workers, cache_budget, stats=stats)
    facts.update(asked=pipeline, reason=why)
    dls.info = FolderInfo(str(root), layout, list(dls.vocab), len(dls.train_ds), len(dls.valid_ds),
                          source or str(path), [str(f) for f in skipped_files(files)], running, facts)
    dls.augmentation = augmentation
    return dls


def reseed(dls: DataLoaders, seed: int) -> DataLoaders:
    """Give every loader a fresh `seed`-ed shuffling generator, so that runs (and modes) see the same batch order.

    fastai seeds each DataLoader's generator from the global `random` state once, when the loader is built.
    """
    for dl in dls.loaders:
        dl.rng = random.Random(seed)
    return dls


def lfw_folder(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The 200 images of `skimage.data.lfw_subset()` as `<cache_dir>/lfw/{train,valid}/{face,non_face}/*.png`.

    Written once (into a temporary folder renamed into place, so a crash never leaves half a dataset) with a
    fixed stratified split: 150 train, 50 valid, both classes balanced.
    """
    cache = Path(cache_dir).expanduser()
    final = cache / "lfw"
    if (final / "info.json").is_file():
        return final
    from skimage.data import lfw_subset

    images = lfw_subset()  # 200 x 25 x 25 floats in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat(np.arange(2), 100)
    valid, train = stratified_split(labels, [LFW_VALID_PCT], LFW_SEED)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".lfw-"))
    try:
        for split, idx in (("train", train), ("valid", valid)):
            for c in LFW_CLASSES:
                (tmp / split / c).mkdir(parents=True)
            for i in sorted(idx.tolist()):
                c = LFW_CLASSES[labels[i]]
                Image.fromarray((images[i] * 255).round().astype(np.uint8), mode="L").save(
                    tmp / split / c / f"{c}_{i:03d}.png")
        info = dict(source="skimage.data.lfw_subset()", n_images=200, image_size=[25, 25], classes=list(LFW_CLASSES),
                    split_seed=LFW_SEED, valid_pct=LFW_VALID_PCT, n_train=len(train), n_valid=len(valid))
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():  # a folder without info.json is an interrupted copy of ours
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "info.json").is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def image_source(source: str | Path = "lfw", cache_dir: str | Path = DEFAULT_CACHE, mirror: str | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """The folder of a named source ('lfw' embedded; 'hymenoptera', 'pets', 'imagenette' downloaded once into
    `cache_dir` from SOURCES or from the same file name under `mirror`) or a local path."""
    name = str(source)
    if name == "lfw":
        return lfw_folder(cache_dir)
    if name in SOURCES:
        alt = (f"use data='lfw' (200 embedded images, works offline), or download {SOURCES[name]} yourself, "
               "unpack it and pass its folder path")
        root = download(name, SOURCES[name], alt, cache_dir, mirror, log)
        return root / SOURCE_SUBDIR[name] if name in SOURCE_SUBDIR else root
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data {name!r} is neither a named source ({', '.join(SOURCES)}) nor an existing "
                                f"folder; {LAYOUT_HELP}")
    return path


def image_dls(source: str | Path = "lfw", size: int = 224, bs: int = 64, valid_pct: float = 0.2, seed: int = 42,
              aug: str | Augmentation = "default", device: torch.device | str | None = None,
              cache_dir: str | Path = DEFAULT_CACHE, label_re: str | None = None, **kwargs) -> DataLoaders:
    """`folder_dls` on a named source or a local path (pets gets its file-name labels)."""
    path = image_source(source, cache_dir)
    label_re = label_re or SOURCE_LABEL_RE.get(str(source))
    desc = SOURCES.get(str(source), f"folder {path}")
    return folder_dls(path, size=size, bs=bs, valid_pct=valid_pct, seed=seed, aug=aug, label_re=label_re,
                      device=device, source=f"{source}: {desc}" if str(source) in SOURCES else desc,
                      cache_dir=cache_dir, **kwargs)


def show_batch_png(dls: DataLoaders, path: str | Path, n: int = 16, valid: bool = False, title: str = "") -> Path:
    """A grid of `n` images of one batch (augmented, denormalised) with their labels, saved as PNG."""
    dl = dls.valid if valid else dls.train
    samples = dl.decode_batch(dl.one_batch(), max_n=n)
    images = [s[0] for s in samples]
    labels = [str(s[1]) for s in samples]
    return plot_image_grid(images, labels, path, title=title or f"{'valid' if valid else 'train'} batch")


def to_display(image: torch.Tensor) -> np.ndarray:
    """A decoded image tensor (C x H x W, 0-255 or 0-1) as an H x W x C float array in [0, 1] for imshow."""
    x = image.detach().cpu().float()
    if x.max() > 1.0:
        x = x / 255
    return x.clamp(0, 1).permute(1, 2, 0).numpy().squeeze()


def plot_image_grid(images: Sequence[torch.Tensor], titles: Sequence[str], path: str | Path, title: str = "",
                    colours: Sequence[str] | None = None, ncols: int | None = None) -> Path:
    """Images in a grid, each with a title (optionally coloured), saved as PNG."""
    plt = pyplot()

    n = len(images)
    if n == 0:
        raise ValueError("no images to plot")
    ncols = ncols or min(n, 8)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.7 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = to_display(images[i])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_title(titles[i], fontsize=8, color=colours[i] if colours else "black")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=100)


def info_dict(dls: DataLoaders) -> dict[str, Any]:
    """The FolderInfo of `folder_dls` as a plain dict (for JSON)."""
    return asdict(dls.info)
