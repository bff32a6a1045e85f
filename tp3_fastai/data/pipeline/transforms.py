"""The fastai transforms of the device pipeline: `ReadImage` (the dataset's type transform: a file's bytes, or just
its identity when the cache serves it) and `DecodeCropResize` (the first batch transform: decode or fetch from the
cache, then crop, flip and resize the batch on its device). After them come fastai's own IntToFloatTensor,
aug_transforms and Normalize."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastai.vision.augment import DisplayedTransform, RandTransform
from fastai.vision.core import TensorImage
from PIL import Image

from .cache import DecodedCache
from .crop import RATIO, centre_boxes, crop_resize, draw_flips, random_resized_boxes
from .decode import decode_images, stored_size, to_stored
from .files import EncodedImage, ImageBatch


class ReadImage(DisplayedTransform):
    """Type transform: an EncodedImage from a file path (bytes read now when `read`: on the loader's workers), bytes,
    a PIL image or a uint8 array (see EncodedImage.create)."""
    # fastai's test_dl / predict keep this transform for inputs of these types (TfmdLists.infer_idx)
    input_types = (Path, str, bytes, Image.Image, torch.Tensor, np.ndarray, EncodedImage)

    def __init__(self, read: bool = True):
        super().__init__()
        self.read = read

    def encodes(self, x) -> EncodedImage:
        return EncodedImage.create(x, read=self.read)


class DecodeCropResize(RandTransform):
    """Batch transform (first of `after_batch`): the batch's images decoded on the loader's device (or taken from
    `cache`), resized to the stored size, then cut and resized to `size` in one batched resample. On the training
    split with `min_scale`: fastai's random resized crop distribution, and a left-right flip with probability 0.5
    when `flip`; elsewhere: image_data.CropResize's centre crop. Out: TensorImage, float32 values 0-255."""
    split_idx, order = None, 1  # every split (the crop differs), before IntToFloatTensor (order 10)

    def __init__(self, size: int, min_scale: float | None = None, flip: bool = False, stored: int | None = None,
                 cache: DecodedCache | None = None, ratio: tuple[float, float] = RATIO):
        super().__init__()
        self.size, self.min_scale, self.flip, self.ratio = size, min_scale, flip, ratio
        self.stored = stored or stored_size(size)
        self.cache, self.device, self.train = cache, torch.device("cpu"), False

    def to(self, device) -> None:
        """Called by fastai's DataLoader whenever its device is set: decode and crop there."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.cache is not None and len(self.cache) and self.cache.device != self.device:
            self.cache.to(self.device)

    def before_call(self, b, split_idx: int | None) -> None:
        self.do, self.train = True, split_idx == 0

    def encodes(self, x: ImageBatch) -> TensorImage:
        stored, sizes = self.stored_batch(x)
        if self.train and self.min_scale is not None:
            boxes = random_resized_boxes(sizes, self.min_scale, self.ratio)
        else:
            boxes = centre_boxes(sizes, self.size)
        flips = draw_flips(len(x)) if self.train and self.flip else None
        return TensorImage(crop_resize(stored, boxes, self.size, flips))

    def stored_batch(self, x: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the stored size (uint8 B x 3 x S x S on the device) and the original sizes (B x 2: w, h),
        from the cache where it holds the current file, decoded otherwise (and then cached if it has a slot)."""
        s, dev, cache = self.stored, self.device, self.cache
        sizes = torch.empty(len(x), 2)
        hit_pos, hit_slots, todo = [], [], []
        for i, (path, sig) in enumerate(zip(x.paths, x.signatures)):
            slot = cache.lookup(path, sig) if cache is not None and path else None
            if slot is None:
                todo.append(i)
            else:
                hit_pos.append(i)
                hit_slots.append(slot)
        if hit_pos:
            pos, slots = torch.tensor(hit_pos), torch.tensor(hit_slots)
            sizes[pos] = cache.sizes[slots]
            cached = cache.images[slots.to(cache.device)].to(dev)
            if not todo:  # the whole batch is cached: one gather
                return cached, sizes
        out = torch.empty((len(x), 3, s, s), dtype=torch.uint8, device=dev)
        if hit_pos:
            out[pos.to(dev)] = cached
        if todo:
            images = decode_images([x.encoded(i) for i in todo], [x.pixels[i] for i in todo],
                                   [x.paths[i] for i in todo], dev)
            for i, im in zip(todo, images):
                h, w = im.shape[-2:]
                out[i] = to_stored(im, s)
                sizes[i, 0], sizes[i, 1] = w, h
                if cache is not None and x.paths[i]:
                    cache.store(x.paths[i], x.signatures[i], out[i], w, h)
        return out, sizes
