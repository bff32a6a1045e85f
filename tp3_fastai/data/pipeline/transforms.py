"""The fastai transforms of the device pipeline: `ReadImage` (the dataset's type transform: a file's bytes with its
JPEG header checked, its pixels when PIL had to decode it, or just its identity when the cache serves it) and
`DecodeCropResize` (the first batch transform: decode or fetch from the cache, then crop, flip or warp and resize
the batch on its device in one resample). After them come fastai's IntToFloatTensor, the lighting part of
`aug_transforms` (augment.Lighting) and Normalize."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastai.vision.augment import DisplayedTransform, RandTransform
from fastai.vision.core import TensorImage
from PIL import Image

from ...core.syncs import stage, to_device
from .augment import AffineSpec, Seeded, draw_affine, draw_flips
from .cache import DecodedCache
from .crop import RATIO, centre_boxes, crop_resize, random_resized_boxes
from .decode import decode_images, stored_size, to_stored_batch
from .files import EncodedImage, ImageBatch


class ReadImage(DisplayedTransform):
    """Type transform: an EncodedImage from a file path (bytes read now when `read`: on the loader's workers, where a
    file that is not a grey or YCbCr JPEG is also decoded, at `stored` x `stored`), bytes, a PIL image or a uint8
    array (see EncodedImage.create)."""
    # fastai's test_dl / predict keep this transform for inputs of these types (TfmdLists.infer_idx)
    input_types = (Path, str, bytes, Image.Image, torch.Tensor, np.ndarray, EncodedImage)

    def __init__(self, read: bool = True, stored: int | None = None):
        super().__init__()
        self.read, self.stored = read, stored

    def encodes(self, x) -> EncodedImage:
        return EncodedImage.create(x, read=self.read, stored=getattr(self, "stored", None))


class DecodeCropResize(Seeded, RandTransform):
    """Batch transform (first of `after_batch`): the batch's images decoded on the loader's device (or taken from
    `cache`), at the stored size, then cut and resized to `size` in one batched resample. On the training split:
    with `min_scale`, fastai's random resized crop distribution; with `affine` (augment.AffineSpec), fastai's
    flips, rotation, zoom and perspective warp, drawn as fastai draws them and applied in the same resample;
    elsewhere: pil.CropResize's centre crop. Every draw happens on the device, from this transform's generator.
    Out: TensorImage, float32 values 0-255."""
    split_idx, order = None, 1  # every split (the crop differs), before IntToFloatTensor (order 10)

    def __init__(self, size: int, min_scale: float | None = None, stored: int | None = None,
                 cache: DecodedCache | None = None, ratio: tuple[float, float] = RATIO,
                 affine: AffineSpec | None = None):
        super().__init__()
        self.size, self.min_scale, self.ratio, self.affine = size, min_scale, ratio, affine
        self.stored = stored or stored_size(size)
        self.cache, self.device, self.train = cache, torch.device("cpu"), False

    @property
    def flip(self) -> bool:
        """Whether training images are flipped left-right (with probability 0.5, fastai's Flip)."""
        return getattr(self, "affine", None) is not None and any(s.kind == "flip" for s in self.affine.steps)

    def to(self, device) -> None:
        """Called by fastai's DataLoader whenever its device is set: decode and crop there."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.cache is not None and len(self.cache) and self.cache.device != self.device:
            self.cache.to(self.device)

    def before_call(self, b, split_idx: int | None) -> None:
        self.do, self.train = True, split_idx == 0

    def encodes(self, x: ImageBatch) -> TensorImage:
        stored, sizes = self.stored_batch(x)
        if not self.train:
            return TensorImage(crop_resize(stored, centre_boxes(sizes, self.size), self.size))
        dev, n = stored.device, len(x)
        g = self.generator(dev)
        boxes = (random_resized_boxes(sizes, self.min_scale, self.ratio, generator=g) if self.min_scale is not None
                 else centre_boxes(sizes, self.size))
        spec = getattr(self, "affine", None)
        if spec is None or not (spec.steps or spec.warp):
            return TensorImage(crop_resize(stored, boxes, self.size))
        if spec.flips_only:
            return TensorImage(crop_resize(stored, boxes, self.size, flips=draw_flips(n, spec.steps[0].p, dev, g)))
        hom = draw_affine(spec, n, (self.size, self.size), dev, g)
        return TensorImage(crop_resize(stored, boxes, self.size, homography=hom, pad_mode=spec.pad_mode,
                                       perspective=spec.warp is not None))

    def stored_batch(self, x: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the stored size (uint8 B x 3 x S x S on the device) and the original sizes (B x 2: w, h, on
        the device), from the cache where it holds the current file (a whole batch of hits: one gather by slots
        looked up on the device), decoded otherwise (JPEGs in one batched call, one resize per shape; then cached
        if the file has a slot)."""
        s, dev, cache = self.stored, self.device, self.cache
        n = len(x)
        slots = [cache.lookup(p, sig) if cache is not None and p else None for p, sig in zip(x.paths, x.signatures)]
        if cache is not None and n and all(sl is not None for sl in slots):
            idx = x.slots if x.slots is not None else to_device(stage(torch.tensor(slots)), cache.device)
            return cache.images[idx], cache.sizes[idx]
        sizes = x.sizes if x.sizes.device == dev else to_device(stage(x.sizes), dev)
        images: list[torch.Tensor | None] = [None] * n
        given = x.pixels
        for i, sl in enumerate(slots):
            if sl is not None:
                images[i] = cache.images[sl]
                sizes[i] = cache.sizes[sl]
            elif given[i] is not None:
                px = given[i] if given[i].device == dev else to_device(stage(given[i]), dev)
                images[i] = px if tuple(px.shape[-2:]) == (s, s) else to_stored_batch([px], s)[0]
        todo = [i for i in range(n) if images[i] is None]
        if todo:
            encoded, fast = zip(*(x.encoded_info(i) for i in todo))
            decoded = decode_images(encoded, [None] * len(todo), [x.paths[i] for i in todo], dev, fast)
            for i, im in zip(todo, decoded):
                sizes[i, 0], sizes[i, 1] = im.shape[-1], im.shape[-2]
            for i, im in zip(todo, to_stored_batch(decoded, s).unbind(0)):
                images[i] = im
        out = torch.stack(images)  # type: ignore[arg-type]
        if cache is not None:
            for i, im in enumerate(decoded if todo else []):
                j = todo[i]
                if x.paths[j]:
                    cache.store(x.paths[j], x.signatures[j], out[j], im.shape[-1], im.shape[-2])
        return out, sizes
