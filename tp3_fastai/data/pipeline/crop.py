"""Crops as batch operations: the random resized crop of fastai's RandomResizedCrop (same distribution of area,
aspect ratio and position) and image_data.CropResize's centre crop, drawn for a whole batch at once, then cut out
of the stored images, flipped and resized in one `grid_sample` on their device."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)  # fastai's RandomResizedCrop aspect-ratio range
ATTEMPTS = 10  # fastai draws up to 10 boxes and falls back to a centre crop


def random_resized_boxes(sizes: torch.Tensor, min_scale: float, ratio: tuple[float, float] = RATIO,
                         max_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop boxes (x0, y0, x1, y1 as fractions of each image) for images of `sizes` (B x 2: width, height in
    pixels), drawn like fastai's RandomResizedCrop: area uniform in [min_scale, max_scale] of the image, aspect ratio
    log-uniform in `ratio`, sides rounded to pixels, the first of 10 draws that fits, a uniform integer position;
    if none fits, the largest centred box within `ratio`."""
    w, h = sizes[:, :1].double(), sizes[:, 1:].double()
    b = len(sizes)
    u = torch.rand(b, ATTEMPTS, generator=generator, dtype=torch.float64)
    area = (min_scale + (max_scale - min_scale) * u) * w * h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(b, ATTEMPTS, generator=generator, dtype=torch.float64))
    nw, nh = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    fits = (nw <= w) & (nh <= h)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    nw, nh = nw.gather(1, first), nh.gather(1, first)
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64)
    x0, y0 = torch.floor(u[:, :1] * (w - nw + 1)), torch.floor(u[:, 1:] * (h - nh + 1))
    # fastai's fallback (int() truncates): the widest box within the ratio range, centred
    aspect = w / h
    fw = torch.where(aspect > ratio[1], torch.floor(h * ratio[1]), w)
    fh = torch.where(aspect < ratio[0], torch.floor(w / ratio[0]), h)
    ok = fits.any(1, keepdim=True)
    nw, nh = torch.where(ok, nw, fw), torch.where(ok, nh, fh)
    x0 = torch.where(ok, x0, torch.div(w - fw, 2, rounding_mode="floor"))
    y0 = torch.where(ok, y0, torch.div(h - fh, 2, rounding_mode="floor"))
    return torch.cat([x0 / w, y0 / h, (x0 + nw) / w, (y0 + nh) / h], 1).float()


def centre_boxes(sizes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The boxes of image_data.CropResize's validation crop: the largest centred box with the output's aspect ratio
    (rounded to pixels), as fractions of each image."""
    tw, th = (size, size) if isinstance(size, int) else size
    w, h = sizes[:, :1].double(), sizes[:, 1:].double()
    m = torch.minimum(w / tw, h / th)
    cw, ch = torch.round(m * tw).clamp(min=1), torch.round(m * th).clamp(min=1)
    x0 = torch.div(w - cw, 2, rounding_mode="floor")
    y0 = torch.div(h - ch, 2, rounding_mode="floor")
    return torch.cat([x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h], 1).float()


def draw_flips(n: int, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of `n` images to flip left-right (each with probability `p`, as fastai's Flip)."""
    return torch.rand(n, generator=generator) < p


def crop_resize(stored: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int],
                flips: torch.Tensor | None = None) -> torch.Tensor:
    """Cut `boxes` (B x 4 fractions) out of `stored` (B x C x H x W, any dtype), flip the images marked in
    `flips`, and resize each to `size`: one bilinear `grid_sample` for the batch. Float32 out, on stored's
    device, in the input's value range (0-255 for uint8)."""
    th, tw = (size, size) if isinstance(size, int) else (size[1], size[0])
    dev = stored.device
    boxes = boxes.to(dev, torch.float32)
    x0, y0, x1, y1 = boxes[:, :1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:]
    # output pixel centres in [-1, 1] (align_corners=False), mapped into each box; the map is axis-aligned, so
    # the grid is built from one row and one column per image (cheaper than affine_grid's matrix product)
    u = (torch.arange(tw, device=dev, dtype=torch.float32) * 2 + 1) / tw - 1
    v = (torch.arange(th, device=dev, dtype=torch.float32) * 2 + 1) / th - 1
    if flips is not None:
        u = torch.where(flips.to(dev)[:, None], -u, u)
    gx = (x0 + x1 - 1) + (x1 - x0) * u  # B x tw
    gy = (y0 + y1 - 1) + (y1 - y0) * v  # B x th
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(stored.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
