"""Image files as the loader hands them over: a file's identity (path, size, mtime), its encoded bytes when read
(with the JPEG header checked where it was read: size and whether the batched decoders take it), or its pixels when
PIL decoded it there; and a batch of them packed into a few tensors (one shared-memory transfer from a worker, one
staged copy to the device)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...core.syncs import stage, to_device

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


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(colour components, height, width) of a JPEG read from its frame header (components: 1 grey, 3 YCbCr,
    4 CMYK / YCCK); None if `data` is not a JPEG or its header cannot be found."""
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
            if i + 9 >= n:
                return None
            return data[i + 9], (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
        if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return None
        i += 2 + length
    return None


def jpeg_components(data: bytes | memoryview) -> int | None:
    """Colour components of a JPEG (1 grey, 3 YCbCr, 4 CMYK / YCCK) read from its frame header; None if `data`
    is not a JPEG or its header cannot be found."""
    header = jpeg_header(data)
    return None if header is None else header[0]


def fast_jpeg(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) of a grey or YCbCr JPEG, which the batched JPEG decoders take (nvJPEG on CUDA,
    libjpeg-turbo on a CPU); None for anything else (PNG, CMYK / YCCK JPEG, ...: decoded with PIL)."""
    header = jpeg_header(data) if len(data) > 3 else None
    return (header[2], header[1]) if header is not None and header[0] in (1, 3) and header[1] and header[2] else None


def decode_pil(data: bytes | torch.Tensor) -> torch.Tensor:
    """Encoded bytes decoded by PIL, through `to_rgb`: uint8 3 x H x W."""
    with open_bytes(data) as im:
        return torch.from_numpy(np.array(to_rgb(im))).permute(2, 0, 1).contiguous()


def resize_square(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images (N x 3 x H x W, one shape) resized to `side` x `side`: antialiased bilinear, uint8 out."""
    if tuple(images.shape[-2:]) == (side, side):
        return images
    if images.device.type == "cpu":  # PyTorch's CPU kernel resizes uint8 directly (and fast)
        return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    out = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class EncodedImage:
    """One image as the dataset hands it over: its file and signature, its encoded bytes when already read, or its
    pixels when it was given decoded (`predict` on a PIL image or a tensor) or decoded where it was read (a file
    that is not a fast JPEG, on a loader worker: `stored` size). `size`: the original (width, height) where known
    (a JPEG's header, a decoded image)."""
    path: str = ""
    signature: Signature | None = None
    data: bytes | None = None
    pixels: torch.Tensor | None = None  # uint8, 3 x H x W
    size: tuple[int, int] | None = None

    @classmethod
    def create(cls, x: "Path | str | bytes | Image.Image | torch.Tensor | np.ndarray | EncodedImage",
               read: bool = True, stored: int | None = None) -> "EncodedImage":
        """From a file path (its bytes read now when `read`, else later, by the batch step; with `stored`, a file
        that is not a grey or YCbCr JPEG is decoded now by PIL and resized to `stored` x `stored`), encoded bytes, a
        PIL image (any mode, through `to_rgb`) or a uint8 array / tensor (H x W x C, or C x H x W tensor)."""
        if isinstance(x, EncodedImage):
            return x
        if isinstance(x, (str, Path)):
            path = str(x)
            if not read:
                return cls(path, signature(path))
            with open(path, "rb") as f:
                sig = os.fstat(f.fileno())
                data = f.read()
            size = fast_jpeg(memoryview(data))
            if size is not None or stored is None:
                return cls(path, (sig.st_size, sig.st_mtime_ns), data, size=size)
            try:  # decoded here, on the worker: the batch step gets pixels (a bad file: left to the batch step)
                pixels = decode_pil(data)
            except Exception:  # PIL raises many types for damaged files; the batch step names the file
                return cls(path, (sig.st_size, sig.st_mtime_ns), data)
            h, w = pixels.shape[-2:]
            return cls(path, (sig.st_size, sig.st_mtime_ns), pixels=resize_square(pixels[None], stored)[0],
                       size=(w, h))
        if isinstance(x, (bytes, bytearray, memoryview)):
            return cls(data=bytes(x), size=fast_jpeg(memoryview(bytes(x))))
        if isinstance(x, Image.Image):

            return cls(pixels=torch.from_numpy(np.array(to_rgb(x))).permute(2, 0, 1).contiguous(), size=x.size)
        if isinstance(x, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x.as_subclass(torch.Tensor))
            if isinstance(x, np.ndarray) or t.shape[0] not in (1, 3):  # arrays are H x W (x C), as PIL makes them
                t = t[..., None] if t.ndim == 2 else t
                t = t.permute(2, 0, 1)
            if t.dtype != torch.uint8:
                raise ValueError(f"an image given as an array must be uint8, got {t.dtype}")
            t = t.expand(3, -1, -1).contiguous() if t.shape[0] == 1 else t.contiguous()
            return cls(pixels=t, size=(t.shape[-1], t.shape[-2]))
        raise TypeError(f"cannot make an image from {type(x).__name__}: give a file path, bytes, a PIL image or a "
                        "uint8 array")

    def __repr__(self) -> str:
        what = f"{len(self.data)} bytes" if self.data is not None else (
            f"pixels {tuple(self.pixels.shape)}" if self.pixels is not None else "not read")
        return f"EncodedImage({self.path or '<in memory>'}, {what})"


class ImageBatch:
    """A batch of EncodedImage packed for one transfer each: every encoded byte string concatenated into one uint8
    tensor (with offsets), the pixels of images decoded where they were read stacked by shape, and the known
    original sizes (B x 2: width, height; 0 where unknown). `index`: the images' positions in their dataset, when the
    loader gave them. `to(device)` moves what the device needs (pixels, sizes, index) from staged host memory
    without blocking; the encoded bytes stay on the host, where the JPEG decoders read them."""

    def __init__(self, images: Sequence[EncodedImage], index: Sequence[int] | None = None):
        self.paths = [im.path for im in images]
        self.signatures = [im.signature for im in images]
        datas = [im.data or b"" for im in images]
        self.offsets = np.cumsum([0] + [len(d) for d in datas]).tolist()
        self.has_data = [im.data is not None for im in images]
        self.fast = [im.data is not None and im.size is not None and im.pixels is None for im in images]
        joined = b"".join(datas)
        self.buffer = (torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined
                       else torch.empty(0, dtype=torch.uint8))
        self.sizes = torch.tensor([im.size or (0, 0) for im in images], dtype=torch.float32).reshape(-1, 2)
        shapes: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            if im.pixels is not None:
                shapes.setdefault(tuple(im.pixels.shape), []).append(i)
        self.groups = [(pos, torch.stack([images[i].pixels for i in pos])) for pos in shapes.values()]
        self.index = torch.tensor(list(index), dtype=torch.long) if index is not None else None
        self.slots: torch.Tensor | None = None  # cache slots on the device, set by the loader (see loader.send)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int]:
        """(batch size,): fastai's find_bs reads it."""
        return (len(self),)

    @property
    def pixels(self) -> list[torch.Tensor | None]:
        """Each image's pixels where it came decoded (None for the others)."""
        out: list[torch.Tensor | None] = [None] * len(self)
        for pos, t in self.groups:
            for k, i in enumerate(pos):
                out[i] = t[k]
        return out

    def to(self, device: torch.device | str) -> "ImageBatch":
        """Move the pixels, sizes and index to `device` (staged, without blocking; see core.syncs), in place."""
        self.groups = [(pos, to_device(stage(t), device)) for pos, t in self.groups]
        self.sizes = to_device(stage(self.sizes), device)
        if self.index is not None:
            self.index = to_device(stage(self.index), device)
        return self

    def pin_memory(self) -> "ImageBatch":
        """Stage the tensors that go to the device (torch's DataLoader calls this when it pins batches)."""
        self.groups = [(pos, stage(t)) for pos, t in self.groups]
        self.sizes = stage(self.sizes)
        if self.index is not None:
            self.index = stage(self.index)
        return self

    def encoded(self, i: int) -> torch.Tensor | None:
        """The encoded bytes of image `i` as a 1-D uint8 tensor (a view of the batch buffer), read from its file if
        the dataset did not read it; None for an image given decoded."""
        if self.has_data[i]:
            return self.buffer[self.offsets[i]:self.offsets[i + 1]]
        if any(i in pos for pos, _ in self.groups):
            return None
        return self.encoded_info(i)[0]

    def encoded_info(self, i: int) -> tuple[torch.Tensor, bool]:
        """The encoded bytes of image `i` (as `encoded`; read now if the dataset did not) and whether the batched
        JPEG decoders take them (from the header checked where they were read)."""
        if self.has_data[i]:
            return self.buffer[self.offsets[i]:self.offsets[i + 1]], self.fast[i]
        with open(self.paths[i], "rb") as f:
            data = bytearray(f.read())
        t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return t, fast_jpeg(memoryview(data)) is not None

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
