"""Decoding a batch of encoded images to uint8 RGB tensors on the device: JPEGs through torchvision (nvJPEG's
batched decoder on CUDA, libjpeg-turbo on a CPU); PNG, 16-bit, palette, RGBA, CMYK JPEG and anything the fast
decoder refuses through PIL with image_data.to_rgb (today's conversions); then each image resized to the stored
size that the batch crop and the decoded cache work from."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .files import jpeg_components, open_bytes, to_rgb

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they remain the documented batched nvJPEG path
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


def _decode_jpeg(data, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """torchvision's decode_jpeg (one tensor or a list: nvJPEG's batched decoder on CUDA) to RGB, quietly."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class DecodeError(ValueError):
    """An image that no decoder can read, named with the reason."""


def _pil_decode(data: torch.Tensor) -> torch.Tensor:

    with open_bytes(data) as im:
        return torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).contiguous()


def _fast_jpeg(data: torch.Tensor) -> bool:
    """A grey or YCbCr JPEG (CMYK / YCCK ones go through PIL, as today)."""
    return data.numel() > 3 and jpeg_components(memoryview(data.numpy())) in (1, 3)


def _one(data: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """One image, trying the fast decoder first (on `device`, then the CPU), then PIL."""
    errors = []
    if _fast_jpeg(data):
        for dev in dict.fromkeys([device, torch.device("cpu")]):
            try:
                return _decode_jpeg(data, dev).to(device)
            except RuntimeError as e:
                errors.append(f"{dev.type} JPEG decoder: {str(e).splitlines()[0][:160]}")
    try:
        return _pil_decode(data).to(device)
    except Exception as e:  # PIL raises many types for damaged files
        errors.append(f"PIL: {type(e).__name__}: {e}")
    raise DecodeError(f"cannot decode image {name or '<bytes>'} ({'; '.join(errors)}): remove or replace it")


def decode_images(encoded: Sequence[torch.Tensor | None], pixels: Sequence[torch.Tensor | None],
                  names: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """uint8 3 x H x W tensors on `device`, one per image: `pixels[i]` when given decoded, else `encoded[i]`
    (a 1-D uint8 CPU tensor of file bytes) decoded. On CUDA the grey / YCbCr JPEGs of the batch go to nvJPEG in
    one batched call; if it refuses the batch, each image is retried alone (GPU, CPU, PIL)."""
    out: list[torch.Tensor | None] = [None] * len(names)
    fast = []
    for i, (data, px) in enumerate(zip(encoded, pixels)):
        if px is not None:
            out[i] = px.to(device)
        elif _fast_jpeg(data):
            fast.append(i)
    if fast:
        try:
            decoded = _decode_jpeg([encoded[i] for i in fast], device)
            for i, im in zip(fast, decoded):
                out[i] = im
        except RuntimeError:  # one bad or unsupported file fails the batched call: find it image by image
            pass
    for i, im in enumerate(out):
        if im is None:
            out[i] = _one(encoded[i], names[i], device)
    return out  # type: ignore[return-value]


def to_stored(image: torch.Tensor, stored: int) -> torch.Tensor:
    """`image` (uint8 3 x H x W) resized to `stored` x `stored` (antialiased bilinear; uint8 in, uint8 out)."""
    if tuple(image.shape[-2:]) == (stored, stored):
        return image
    if image.device.type == "cpu":  # PyTorch's CPU kernel resizes uint8 directly (and fast)
        return F.interpolate(image[None], size=(stored, stored), mode="bilinear", antialias=True,
                             align_corners=False)[0]
    out = F.interpolate(image[None].float(), size=(stored, stored), mode="bilinear", antialias=True,
                        align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def stored_size(size: int, scale: float = 1.15) -> int:
    """Side of the stored (cached) images: `scale` x the training size, so that crops are resampled near 1:1."""
    return max(int(size), int(round(size * scale)))
