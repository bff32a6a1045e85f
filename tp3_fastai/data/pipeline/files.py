"""Image files as the loader hands them over: a file's identity (path, size, mtime), its encoded bytes when read,
and a batch of them packed into one tensor (one shared-memory transfer from a worker, not one per image)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit grayscale scaled to 8 bits, palette and grayscale expanded, alpha dropped."""
    if im.mode in SIXTEEN_BIT_MODES:  # Pillow's own conversion clips 16-bit values to 255: a white image
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) // 257).astype(np.uint8))
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow warns when a palette's transparency goes straight to RGB
    return im if im.mode == "RGB" else im.convert("RGB")


Signature = tuple[int, int]  # (size in bytes, mtime in ns): a file that changes changes its signature
JPEG_MAGIC = b"\xff\xd8\xff"
# start-of-frame markers (C0-CF except DHT C4, JPG C8, DAC CC) carry the image size and component count
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def signature(path: str | Path) -> Signature:
    """(size, mtime_ns) of a file."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def jpeg_components(data: bytes | memoryview) -> int | None:
    """Colour components of a JPEG (1 grey, 3 YCbCr, 4 CMYK / YCCK) read from its frame header; None if `data`
    is not a JPEG or its header cannot be found."""
    if bytes(data[:3]) != JPEG_MAGIC:
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            return data[i + 9] if i + 9 < n else None
        if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return None
        i += 2 + length
    return None


@dataclass
class EncodedImage:
    """One image as the dataset hands it over: its file and signature, its encoded bytes when already read, or its
    pixels when it was given decoded (`predict` on a PIL image or a tensor)."""
    path: str = ""
    signature: Signature | None = None
    data: bytes | None = None
    pixels: torch.Tensor | None = None  # uint8, 3 x H x W

    @classmethod
    def create(cls, x: "Path | str | bytes | Image.Image | torch.Tensor | np.ndarray | EncodedImage",
               read: bool = True) -> "EncodedImage":
        """From a file path (its bytes read now when `read`, else later, by the batch step), encoded bytes, a PIL
        image (any mode, through image_data.to_rgb) or a uint8 array / tensor (H x W x C, or C x H x W tensor)."""
        if isinstance(x, EncodedImage):
            return x
        if isinstance(x, (str, Path)):
            path = str(x)
            if not read:
                return cls(path, signature(path))
            with open(path, "rb") as f:
                sig = os.fstat(f.fileno())
                return cls(path, (sig.st_size, sig.st_mtime_ns), f.read())
        if isinstance(x, (bytes, bytearray, memoryview)):
            return cls(data=bytes(x))
        if isinstance(x, Image.Image):

            return cls(pixels=torch.from_numpy(np.array(to_rgb(x))).permute(2, 0, 1).contiguous())
        if isinstance(x, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x.as_subclass(torch.Tensor))
            if isinstance(x, np.ndarray) or t.shape[0] not in (1, 3):  # arrays are H x W (x C), as PIL makes them
                t = t[..., None] if t.ndim == 2 else t
                t = t.permute(2, 0, 1)
            if t.dtype != torch.uint8:
                raise ValueError(f"an image given as an array must be uint8, got {t.dtype}")
            return cls(pixels=t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous())
        raise TypeError(f"cannot make an image from {type(x).__name__}: give a file path, bytes, a PIL image or a "
                        "uint8 array")

    def __repr__(self) -> str:
        what = f"{len(self.data)} bytes" if self.data is not None else (
            f"pixels {tuple(self.pixels.shape)}" if self.pixels is not None else "not read")
        return f"EncodedImage({self.path or '<in memory>'}, {what})"


class ImageBatch:
    """A batch of EncodedImage: every encoded byte string concatenated into one uint8 tensor (with offsets), so
    that a loader worker hands the batch over in one shared-memory transfer."""

    def __init__(self, images: Sequence[EncodedImage]):
        self.paths = [im.path for im in images]
        self.signatures = [im.signature for im in images]
        self.pixels = [im.pixels for im in images]
        datas = [im.data or b"" for im in images]
        self.offsets = np.cumsum([0] + [len(d) for d in datas]).tolist()
        self.has_data = [im.data is not None for im in images]
        joined = b"".join(datas)
        self.buffer = (torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined
                       else torch.empty(0, dtype=torch.uint8))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int]:
        """(batch size,): fastai's find_bs reads it."""
        return (len(self),)

    def encoded(self, i: int) -> torch.Tensor | None:
        """The encoded bytes of image `i` as a 1-D uint8 tensor (a view of the batch buffer), read from its file if
        the dataset did not read it; None for an image given decoded."""
        if self.has_data[i]:
            return self.buffer[self.offsets[i]:self.offsets[i + 1]]
        if self.pixels[i] is not None:
            return None
        with open(self.paths[i], "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

    def __repr__(self) -> str:
        return f"ImageBatch({len(self)} images, {self.buffer.numel():,} encoded bytes)"


def collate_images(samples: Sequence[tuple]) -> tuple:
    """fastai `create_batch` for samples whose first element is an EncodedImage: an ImageBatch, then the other
    elements (labels) collated as fastai does."""
    from fastai.data.load import fa_collate

    images = ImageBatch([s[0] for s in samples])
    rest = fa_collate([tuple(s[1:]) for s in samples]) if len(samples[0]) > 1 else ()
    return (images, *rest)


def open_bytes(data: torch.Tensor | bytes) -> Image.Image:
    """A PIL image from encoded bytes (a 1-D uint8 tensor or bytes)."""
    raw = data.numpy().tobytes() if isinstance(data, torch.Tensor) else data
    return Image.open(io.BytesIO(raw))
