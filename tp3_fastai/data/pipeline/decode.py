"""Decoding a batch of encoded images to uint8 RGB tensors on the device: grey and YCbCr JPEGs through torchvision
(nvJPEG's batched decoder on CUDA, libjpeg-turbo on a CPU); PNG, 16-bit, palette, RGBA, CMYK JPEG and anything the
fast decoder refuses through PIL with `to_rgb` (on the loader's workers where it can: see files.EncodedImage); then
the images resized to the stored size that the batch crop and the decoded cache work from, one resize per shape."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ...core.syncs import stage, to_device
from .files import decode_pil, fast_jpeg, resize_square

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


def _is_fast(data: torch.Tensor) -> bool:
    return data.numel() > 3 and fast_jpeg(memoryview(data.numpy())) is not None


def _one(data: torch.Tensor, name: str, device: torch.device, fast: bool) -> torch.Tensor:
    """One image, trying the fast decoder first when `fast` (on `device`, then the CPU), then PIL; the result on
    `device` (a host image staged and copied without blocking)."""
    errors = []
    if fast:
        for dev in dict.fromkeys([device, torch.device("cpu")]):
            try:
                im = _decode_jpeg(data, dev)
                return im if dev == device else to_device(stage(im), device)  # the CPU's decode, copied over
            except RuntimeError as e:
                errors.append(f"{dev.type} JPEG decoder: {str(e).splitlines()[0][:160]}")
    try:
        return to_device(stage(decode_pil(bytes(memoryview(data.numpy())))), device)
    except Exception as e:  # PIL raises many types for damaged files
        errors.append(f"PIL: {type(e).__name__}: {e}")
    raise DecodeError(f"cannot decode image {name or '<bytes>'} ({'; '.join(errors)}): remove or replace it")


def decode_images(encoded: Sequence[torch.Tensor | None], pixels: Sequence[torch.Tensor | None],
                  names: Sequence[str], device: torch.device,
                  fast: Sequence[bool] | None = None) -> list[torch.Tensor]:
    """uint8 3 x H x W tensors on `device`, one per image: `pixels[i]` when given decoded, else `encoded[i]`
    (a 1-D uint8 CPU tensor of file bytes) decoded. `fast[i]`: whether image i is a grey / YCbCr JPEG (read from
    its header when not given). On CUDA those JPEGs go to nvJPEG in one batched call; if it refuses the batch, each
    image is retried alone (GPU, CPU, PIL)."""
    out: list[torch.Tensor | None] = [None] * len(names)
    fast = [px is None and _is_fast(d) for d, px in zip(encoded, pixels)] if fast is None else list(fast)
    todo = []
    for i, px in enumerate(pixels):
        if px is not None:
            out[i] = to_device(stage(px), device) if px.device.type == "cpu" else px.to(device)
        elif fast[i]:
            todo.append(i)
    if todo:
        try:
            decoded = _decode_jpeg([encoded[i] for i in todo], device)
            for i, im in zip(todo, decoded):
                out[i] = im
        except RuntimeError:  # one bad or unsupported file fails the batched call: find it image by image
            pass
    for i, im in enumerate(out):
        if im is None:
            out[i] = _one(encoded[i], names[i], device, fast[i])
    return out  # type: ignore[return-value]


def to_stored_batch(images: Sequence[torch.Tensor], stored: int) -> torch.Tensor:
    """uint8 images (3 x H x W each, any sizes, one device) resized to `stored` x `stored` and stacked in order:
    one antialiased resize per distinct shape (a batch of one-size JPEGs: a single call)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    if len(by_shape) == 1:
        return resize_square(torch.stack(list(images)), stored)
    out: list[torch.Tensor | None] = [None] * len(images)
    for pos in by_shape.values():
        for i, im in zip(pos, resize_square(torch.stack([images[i] for i in pos]), stored).unbind(0)):
            out[i] = im
    return torch.stack(out)  # type: ignore[arg-type]


def to_stored(image: torch.Tensor, stored: int) -> torch.Tensor:
    """`image` (uint8 3 x H x W) resized to `stored` x `stored` (antialiased bilinear; uint8 in, uint8 out)."""
    return resize_square(image[None], stored)[0]


def stored_size(size: int, scale: float = 1.15) -> int:
    """Side of the stored (cached) images: `scale` x the training size, so that crops are resampled near 1:1."""
    return max(int(size), int(round(size * scale)))
