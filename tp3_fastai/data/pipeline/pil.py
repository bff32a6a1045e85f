"""The 'pil' pipeline: fastai's own item pipeline, PIL decoding and cropping image by image on the loader's
workers, then the batch transforms on the device."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import IndexSplitter
from fastai.vision.augment import RandomResizedCrop
from fastai.vision.core import PILImage, load_image
from fastai.vision.data import ImageBlock
from PIL import Image

from ...core.fastai_internals import get_sz
from .files import to_rgb
from .loader import ImageFolderDL

DEFAULT_MIN_SCALE = 0.35  # random resized crop keeps at least 35% of the image area (fastai's usual choice)


class CropResize(RandomResizedCrop):
    """Random resized crop on the training set when `augment`; a centre crop resized to `size` everywhere else.

    fastai's RandomResizedCrop squashes validation images to a square; cropping the centre keeps the aspect
    ratio, like torchvision's Resize + CenterCrop.
    """

    def __init__(self, size: int | tuple[int, int], min_scale: float = DEFAULT_MIN_SCALE, augment: bool = True,
                 **kwargs):
        super().__init__(size, min_scale=min_scale, **kwargs)
        self.augment = augment

    def before_call(self, b, split_idx: int) -> None:
        if self.augment and not split_idx:
            return super().before_call(b, split_idx)
        w, h = self.orig_sz = get_sz(b)
        tw, th = self.size
        m = min(w / tw, h / th)
        self.cp_size = (max(1, round(m * tw)), max(1, round(m * th)))
        self.tl = ((w - self.cp_size[0]) // 2, (h - self.cp_size[1]) // 2)
        self.final_size = self.size


class RGBImage(PILImage):
    """fastai's PILImage opened through `to_rgb`, so that a folder of mixed modes gives 3-channel 8-bit batches."""

    # fastai dispatches on this annotation: it must name every type fastai's own PILImage.create takes
    @classmethod
    def create(cls, fn: Path | str | torch.Tensor | np.ndarray | bytes | Image.Image, **kwargs) -> "RGBImage":
        if isinstance(fn, Image.Image):
            return cls(to_rgb(fn))
        if isinstance(fn, (str, Path, bytes)):
            return cls(to_rgb(load_image(io.BytesIO(fn) if isinstance(fn, bytes) else fn)))
        return super().create(fn, **kwargs)  # tensors and arrays, as fastai makes them


def pil_dls(files: Sequence[Path], valid_idx: Sequence[int], labeller: Callable, path: Path, size: int, bs: int,
            min_scale: float | None, batch_tfms: list, device: torch.device,
            num_workers: int) -> tuple[Any, dict[str, Any]]:
    """fastai DataLoaders of the 'pil' pipeline over `files` (random resized crop with `min_scale` for training,
    None: centre crop; centre crop for validation) and facts about it for the run folder."""
    item = CropResize(size, min_scale=min_scale or 1.0, augment=min_scale is not None)
    dblock = DataBlock(blocks=(ImageBlock(RGBImage), CategoryBlock), get_y=labeller,
                       splitter=IndexSplitter(valid_idx), item_tfms=item, batch_tfms=batch_tfms)
    dls = dblock.dataloaders(list(files), path=path, bs=bs, device=device, num_workers=num_workers,
                             dl_type=ImageFolderDL, persistent_workers=num_workers > 0)
    return dls, dict(pipeline="pil", workers=num_workers, persistent_workers=num_workers > 0)
