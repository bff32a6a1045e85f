"""What a saved figure shows, read back from its pixels: the colours of its series, a colour map's area, images.

A test that only checks that a PNG exists (or its size) passes for an empty figure; these count the pixels that
only the plotted data can have put there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# matplotlib's default colour cycle (C0, C1, ...): one colour per plotted run
CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def pixels(path: str | Path) -> np.ndarray:
    """The RGB pixels (H x W x 3, int) of a PNG file."""
    with Image.open(path) as im:
        assert im.format == "PNG", f"{path} is {im.format}, not PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def rgb(colour: str | tuple[int, int, int]) -> np.ndarray:
    """'#rrggbb', a matplotlib colour name or (r, g, b) as an int array."""
    if isinstance(colour, str):
        from matplotlib.colors import to_rgb

        return (np.array(to_rgb(colour)) * 255).round().astype(int)
    return np.array(colour)


def count_colour(img: np.ndarray, colour: str | tuple[int, int, int], tol: int = 6) -> int:
    """Pixels within `tol` (per channel) of `colour`."""
    return int((np.abs(img - rgb(colour)).max(axis=-1) <= tol).sum())


def colormap_pixels(img: np.ndarray, cmap: str, tol: int = 3) -> tuple[int, int]:
    """(pixels, distinct colours) of `img` that lie on colour map `cmap` and are not near-white or grey: the area
    of a heat map drawn with it (axes, text and background are grey)."""
    import matplotlib

    lut = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(int)
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    near = (np.abs(colours[:, None, :] - lut[None]).max(axis=-1) <= tol).any(axis=1)
    coloured = colours.max(axis=1) - colours.min(axis=1) > 12  # not grey, white or black
    keep = near & coloured
    return int(counts[keep].sum()), int(keep.sum())


def image_area(img: np.ndarray) -> tuple[float, int]:
    """(fraction of pixels that are not white, distinct grey levels among them): photographs and digits drawn in
    grey fill much of a figure with many levels; an empty figure or bare axes do not."""
    grey = img.max(axis=-1) - img.min(axis=-1) <= 12
    inked = img.min(axis=-1) < 245
    levels = np.unique(img[grey & inked][:, 0]) if (grey & inked).any() else np.array([])
    return float(inked.mean()), len(levels)


def assert_series(path: str | Path, n: int, min_pixels: int = 40) -> np.ndarray:
    """The figure draws `n` series in matplotlib's first `n` cycle colours (at least `min_pixels` each)."""
    img = pixels(path)
    counts = [count_colour(img, c) for c in CYCLE[:n]]
    assert all(c >= min_pixels for c in counts), f"{path}: pixels of the series colours {counts}"
    return img


def drawn_box(img: np.ndarray, shape: tuple[int, int], colour: str, background: str) -> tuple[float, ...]:
    """(left, right, top, bottom) of the rectangle drawn in `colour` over an image of `shape` (rows, cols) shown in
    a uniform `background` colour, in the image's pixel coordinates (imshow's: pixel centres at integers)."""
    def extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
        counts = mask.sum(axis=axis)
        idx = np.flatnonzero(counts > 0.5 * counts.max())  # lines along the other axis (not text or tick marks)
        assert len(idx), f"nothing drawn in {colour}"
        return int(idx.min()), int(idx.max())

    shown = np.abs(img - rgb(background)).max(axis=-1) <= 6
    lines = np.abs(img - rgb(colour)).max(axis=-1) <= 6
    (c0, c1), (r0, r1) = extent(shown, 0), extent(shown, 1)  # the image: columns then rows
    sx, sy = (c1 + 1 - c0) / shape[1], (r1 + 1 - r0) / shape[0]
    (left, right), (top, bottom) = extent(lines, 0), extent(lines, 1)
    # a line's pixels straddle the edge: the edge is the middle of its first / last pixel columns
    return ((left + 0.5 - c0) / sx - 0.5, (right + 0.5 - c0) / sx - 0.5,
            (top + 0.5 - r0) / sy - 0.5, (bottom + 0.5 - r0) / sy - 0.5)


def count_tiles(img: np.ndarray, min_side: int = 20) -> int:
    """Image tiles of a grid figure (kernels, photographs): solid blocks of ink at least `min_side` pixels on each
    side, separated by white. Bands of rows mostly inked are the grid's rows; in each band, runs of columns inked
    somewhere in the band, at least `min_side` long, are its tiles (titles and tick labels are thinner; a tile's
    white pixels, its maximum in a grey colour map, do not split it unless a whole column of it is white)."""
    inked = img.min(axis=-1) < 245
    rows = inked.mean(axis=1) > 0.15

    def runs(line: np.ndarray) -> list[tuple[int, int]]:
        edges = np.diff(np.concatenate([[0], line.astype(int), [0]]))
        return [(a, b) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)) if b - a >= min_side]

    return sum(len(runs(inked[top:bottom].any(axis=0))) for top, bottom in runs(rows))
