"""Crops as batch operations: the random resized crop of fastai's RandomResizedCrop (same distribution of area,
aspect ratio and position) and pil.CropResize's centre crop, drawn for a whole batch at once on the batch's device,
then cut out of the stored images, flipped or warped by fastai's affine augmentation (augment.draw_affine) and
resized in one `grid_sample` on their device: one resampling for crop and augmentation together."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augment import warp_grid

RATIO = (3 / 4, 4 / 3)  # fastai's RandomResizedCrop aspect-ratio range
ATTEMPTS = 10  # fastai draws up to 10 boxes and falls back to a centre crop


def random_resized_boxes(sizes: torch.Tensor, min_scale: float, ratio: tuple[float, float] = RATIO,
                         max_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop boxes (x0, y0, x1, y1 as fractions of each image) for images of `sizes` (B x 2: width, height in
    pixels), drawn like fastai's RandomResizedCrop: area uniform in [min_scale, max_scale] of the image, aspect ratio
    log-uniform in `ratio`, sides rounded to pixels, the first of 10 draws that fits, a uniform integer position;
    if none fits, the largest centred box within `ratio`. Drawn on `sizes`' device (from `generator`, else torch's
    default one): no value goes to the host."""
    w, h = sizes[:, :1].double(), sizes[:, 1:].double()
    b, dev = len(sizes), sizes.device
    u = torch.rand(b, ATTEMPTS, generator=generator, dtype=torch.float64, device=dev)
    area = (min_scale + (max_scale - min_scale) * u) * w * h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(b, ATTEMPTS, generator=generator, dtype=torch.float64, device=dev))
    nw, nh = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))
    fits = (nw <= w) & (nh <= h)
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    nw, nh = nw.gather(1, first), nh.gather(1, first)
    u = torch.rand(b, 2, generator=generator, dtype=torch.float64, device=dev)
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


def crop_resize(stored: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int],
                flips: torch.Tensor | None = None, homography: torch.Tensor | None = None,
                pad_mode: str = "reflection", perspective: bool = True) -> torch.Tensor:
    """Cut `boxes` (B x 4 fractions) out of `stored` (B x C x H x W, any dtype) and resize each to `size`, in one
    bilinear `grid_sample` for the batch; float32 out, on stored's device, in the input's value range (0-255 for
    uint8). Either flip the images marked in `flips`, or apply fastai's affine augmentation given as per-image
    `homography` (augment.draw_affine, over the crop's output grid) as fastai would apply it to the cropped image:
    coordinates mapped by the homography, reflected into the crop (`pad_mode` 'reflection') or clamped to it
    ('border'), then into the box."""
    th, tw = (size, size) if isinstance(size, int) else (size[1], size[0])
    dev = stored.device
    boxes = boxes.float()
    x0, y0, x1, y1 = boxes[:, :1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:]
    if homography is not None:
        # fastai samples the th x tw crop at c (align_corners=True); its pixel j is our box coordinate
        # u = (2j + 1) / n - 1, so u = c (n - 1) / n: one map from output pixels into the stored image
        k = torch.tensor([(tw - 1) / tw, (th - 1) / th], device=dev)
        centre = torch.cat([x0 + x1 - 1, y0 + y1 - 1], 1)[:, None, None, :]
        half = (torch.cat([x1 - x0, y1 - y0], 1) * k)[:, None, None, :]
        if pad_mode == "reflection":  # reflect(c) = 1 - t with t = ||c + 1| mod 4 - 2|: fold "1 -" into the map
            shifted = homography.clone()
            shifted[:, :2] += homography[:, 2:]  # its grid is c + 1: (x + den) / den
            t = warp_grid(shifted, (th, tw), perspective).abs_().remainder_(4).sub_(2).abs_()
            grid = torch.addcmul(centre + half, t, half, value=-1)
        else:
            grid = torch.addcmul(centre, warp_grid(homography, (th, tw), perspective).clamp_(-1, 1), half)
        return F.grid_sample(stored.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    # output pixel centres in [-1, 1] (align_corners=False), mapped into each box; the map is axis-aligned, so
    # the grid is built from one row and one column per image (cheaper than affine_grid's matrix product)
    u = (torch.arange(tw, device=dev, dtype=torch.float32) * 2 + 1) / tw - 1
    v = (torch.arange(th, device=dev, dtype=torch.float32) * 2 + 1) / th - 1
    if flips is not None:
        u = torch.where(flips[:, None], -u, u)
    gx = (x0 + x1 - 1) + (x1 - x0) * u  # B x tw
    gy = (y0 + y1 - 1) + (y1 - y0) * v  # B x th
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(stored.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
