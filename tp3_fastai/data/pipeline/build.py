"""Choosing and building an image-folder pipeline: 'pil' (fastai's item pipeline: PIL decode and crop per image on
the loader's workers), 'device' (workers only read bytes; decode, crop and augment on the training device),
'cached' (the device pipeline, decoding once into a resident uint8 cache), 'auto' (picked by device and size)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .augment import Augment, Lighting, read_free
from .cache import DecodedCache, cache_budget, image_bytes
from .decode import DecodeError, decode_images, stored_size, to_stored_batch
from .files import EncodedImage, ImageBatch, collate_images
from .loader import ImageFolderDL
from .transforms import DecodeCropResize, ReadImage

PIPELINES = ("pil", "device", "cached", "auto")
PIPELINE_LABELS = {
    "pil": "fastai item pipeline: PIL decode + crop per image (loader workers), aug_transforms on the device",
    "device": "workers read bytes; decode (nvJPEG on CUDA), crop, flip, aug_transforms on the device",
    "cached": "device pipeline decoding once into a resident uint8 cache (within a memory budget; beyond: streamed)",
}
FILL_BATCH = 64  # images per decode call while filling the cache


def check_pipeline(pipeline: str) -> str:
    """`pipeline` if it names one, else a ValueError listing them."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}: choose from {', '.join(PIPELINES)}")
    return pipeline


JPEG_EXTS = (".jpg", ".jpeg")


def jpeg_share(files: Sequence[str | Path]) -> float:
    """The share of `files` that are JPEGs by their extension (the batched JPEG decoders' files)."""
    return sum(Path(f).suffix.lower() in JPEG_EXTS for f in files) / max(len(files), 1)


def choose_pipeline(pipeline: str, device: torch.device, n_images: int, size: int,
                    budget: float | int | None = None, jpegs: float = 1.0) -> tuple[str, str]:
    """(pipeline that runs, why) for `pipeline` ('auto' decides) on `device` with `n_images` images of `size` px,
    a share `jpegs` of them JPEG files.

    'auto' takes the decoded cache whenever every image fits the budget (each file is decoded once, whatever its
    type; later epochs only gather), else streams through the device pipeline: JPEGs decoded by the batched decoder
    (nvJPEG on CUDA, libjpeg-turbo on a CPU), other files by PIL on the loader's workers, as the 'pil' pipeline
    decodes them but without fastai's per-image crop and dispatch. Measured on this CPU (docs/benchmarks.md, one
    thread, loader alone): on JPEGs and on LFW's PNGs alike, device and cached are faster than pil, cached the
    fastest from its second epoch; on CUDA the same order is expected (not measured yet)."""
    check_pipeline(pipeline)
    if pipeline != "auto":
        return pipeline, "asked for"
    need, have = n_images * image_bytes(stored_size(size)), cache_budget(device, budget)
    kinds = f"{round(jpegs * n_images)} JPEG, {n_images - round(jpegs * n_images)} other"
    what = f"{n_images} images ({kinds}) need {need / 2**20:,.0f} MiB decoded at {stored_size(size)} px"
    if need <= have:
        return "cached", f"{what}, within the {device.type} budget ({have / 2**20:,.0f} MiB): decoded once"
    decoders = "nvJPEG" if device.type == "cuda" else "libjpeg-turbo"
    return "device", (f"{what}, over the {device.type} budget ({have / 2**20:,.0f} MiB): streamed, JPEGs by "
                      f"{decoders} in batches, other files by PIL on the loader")


def default_workers(pipeline: str, device: torch.device, jpegs: float = 1.0) -> int:
    """Loader worker processes: none on a CPU (training uses every core; a background thread prepares batches)
    or for the cache (it lives in the main process); on CUDA min(8, cores) for PIL decoding ('pil', or a folder
    mostly of other files than JPEGs), min(4, cores) for reading JPEG bytes."""
    if device.type == "cpu" or pipeline == "cached":
        return 0
    return min(8 if pipeline == "pil" or jpegs < 0.5 else 4, os.cpu_count() or 1)


def fill_cache(cache: DecodedCache, paths: Sequence[str], device: torch.device,
               log: Callable[[str], None] | None = None) -> tuple[float, list[str]]:
    """Decode every file of `paths` that has a cache slot into the cache; (seconds, "path (reason)" of each file
    that cannot be decoded)."""
    t = time.perf_counter()
    todo = [str(p) for p in paths if str(p) in cache.slots]
    bad: list[str] = []
    for k in range(0, len(todo), FILL_BATCH):
        chunk = [EncodedImage.create(p) for p in todo[k:k + FILL_BATCH]]
        batch = ImageBatch(chunk)
        enc, fast = zip(*(batch.encoded_info(i) for i in range(len(chunk))))
        try:
            images = decode_images(enc, [None] * len(chunk), batch.paths, device, fast)
        except DecodeError:  # name every bad file of the chunk, keep the good ones
            images = []
            for i in range(len(chunk)):
                try:
                    images += decode_images(enc[i:i + 1], [None], batch.paths[i:i + 1], device, fast[i:i + 1])
                except DecodeError as e:
                    images.append(None)
                    bad.append(str(e))
        good = [(im, item) for im, item in zip(images, chunk) if im is not None]
        if good:
            for stored, (im, item) in zip(to_stored_batch([im for im, _ in good], cache.stored).unbind(0), good):
                cache.store(item.path, item.signature, stored, im.shape[-1], im.shape[-2])
    if log:
        log(f"decoded cache: {cache.filled} images at {cache.stored} px in {time.perf_counter() - t:.1f}s")
    return time.perf_counter() - t, bad


def device_dls(files: Sequence[Path], valid_idx: Sequence[int], labeller: Callable, path: str | Path, size: int,
               bs: int, min_scale: float | None, batch_aug: dict[str, Any] | None, device: torch.device,
               pipeline: str = "device", num_workers: int | None = None, budget: float | int | None = None,
               stored: int | None = None, stats: tuple[Sequence[float], Sequence[float]] | None = None):
    """fastai DataLoaders of the 'device' or 'cached' pipeline (see the module docstring) over `files`; returns
    (dls, facts about the pipeline for the run folder).

    Training split: random resized crop (`min_scale`; None: centre crop) and fastai's affine augmentation of
    `aug_transforms(**batch_aug)` (flips, rotation, zoom, warp: augment.read_free) drawn per image on the device
    and applied in the crop's own resample; then its lighting (augment.Lighting) and whatever else it holds (kept as
    fastai's), then Normalize by `stats` (default ImageNet's); validation and test_dl / predict: the centre crop,
    then Normalize. Files that are not JPEGs are decoded by PIL on the loader's workers (the device pipeline)."""
    from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
    from fastai.data.transforms import IndexSplitter, IntToFloatTensor, Normalize
    from fastai.vision.augment import aug_transforms
    from fastai.vision.core import imagenet_stats

    if pipeline not in ("device", "cached"):
        raise ValueError(f"device_dls builds the 'device' or 'cached' pipeline, not {pipeline!r}")
    stored = stored or stored_size(size)
    cache, facts = None, dict(pipeline=pipeline, stored_px=stored)
    if pipeline == "cached":
        cache = DecodedCache([str(f) for f in files], stored, device, cache_budget(device, budget))
        fill_s, bad = fill_cache(cache, cache.slots, device)
        if bad:
            raise ValueError(f"{len(bad)} image(s) cannot be decoded: {'; '.join(bad[:20])}"
                             + (f" ... ({len(bad) - 20} more)" if len(bad) > 20 else ""))
        facts.update(fill_s=round(fill_s, 3), cached=len(cache), streamed=len(files) - len(cache))
    aug = read_free(aug_transforms(**batch_aug)) if batch_aug is not None else Augment()
    decoder = DecodeCropResize(size, min_scale=min_scale, stored=stored, cache=cache, affine=aug.affine)
    jpegs = jpeg_share(files)
    workers = default_workers(pipeline, device, jpegs) if num_workers is None else num_workers
    if pipeline == "cached":
        workers = 0  # the cache lives in this process; the item step is a stat()
    lighting = [Lighting(aug.lighting)] if aug.lighting else []
    dblock = DataBlock(blocks=(TransformBlock(type_tfms=ReadImage(read=pipeline == "device", stored=stored)),
                               CategoryBlock),
                       get_y=labeller, splitter=IndexSplitter(valid_idx),
                       batch_tfms=[decoder, IntToFloatTensor(), *lighting, *aug.kept,
                                   Normalize.from_stats(*(stats or imagenet_stats))])
    dls = dblock.dataloaders(list(files), path=Path(path), bs=bs, device=device, num_workers=workers,
                             dl_type=ImageFolderDL, create_batch=collate_images, persistent_workers=workers > 0)
    facts.update(workers=workers, persistent_workers=workers > 0, flip_in_crop=decoder.flip,
                 augmentation=aug.describe(), jpeg_share=round(jpegs, 3),
                 prefetch=dls.train.prefetch_depth)
    return dls, facts


def find_decoder(dls) -> DecodeCropResize | None:
    """The DecodeCropResize transform of a device or cached pipeline's DataLoaders (None for the PIL one)."""
    return next((t for t in dls.train.after_batch.fs if isinstance(t, DecodeCropResize)), None)
