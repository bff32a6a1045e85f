"""Figures: the effective-field heat map and a unit's field drawn on an image."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .geometry import centre_unit
from .measure import ERFResult
from .tables import fmt_axes
from .trace import RFRow


def plot_erf(erf: ERFResult, path: str | Path) -> Path:
    """Save the effective-field map as a heat map with the theoretical field drawn as a box."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.add_subplot()
    m = erf.map
    fr = ", ".join(f"{q:.0%} of the mass in {v:.1%}" for q, v in erf.area_fraction.items())
    fr = f"{fr}\nof the theoretical field's pixels inside the image"
    if m.ndim == 1:
        ax.plot(m)
        ax.axvspan(erf.box[0][0], erf.box[0][1], alpha=0.15, color="tab:red", label="theoretical field")
        ax.set_xlabel("input position")
        ax.legend()
    else:
        img = m if m.ndim == 2 else m.max(axis=tuple(range(m.ndim - 2)))
        im = ax.imshow(img, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, label="mean |d unit / d input|")
        (r0, r1), (c0, c1) = erf.box[-2], erf.box[-1]
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, ec="tab:red",
                               lw=1.5, ls="--", label="theoretical field"))
        ax.set_xlim(min(-0.5, c0 - 1.5), max(img.shape[1] - 0.5, c1 + 1.5))
        ax.set_ylim(max(img.shape[0] - 0.5, r1 + 1.5), min(-0.5, r0 - 1.5))
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"effective field of {erf.name}\n{fr}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_rf_box(image: str | Path | np.ndarray | Any, row: RFRow, path: str | Path,
                unit: Sequence[int] | None = None, size: Sequence[int] | None = None) -> Path:
    """Draw the field of one unit of a 2-D node (default: the unit nearest the centre) on an image."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image
    if len(row.R) != 2:
        raise ValueError(f"node {row.name!r} has {len(row.R)} spatial axes; the box needs a 2-D node")
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((int(size[1]), int(size[0])))
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    if unit is None:
        unit = []
        for ax, n in enumerate((h, w)):
            j, d = row.J[ax], row.dims[ax] if row.dims else None
            m = row.out_shape[d] if d is not None else 1
            unit.append(0 if j is None else centre_unit(row.start[ax], j, n, m))
    (r0, r1), (c0, c1) = row.box(unit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, ec="red", lw=2))
    ax.plot([(c0 + c1) / 2], [(r0 + r1) / 2], "r+", ms=12)
    ax.set_xlim(min(-0.5, c0 - 1), max(w - 0.5, c1 + 1))
    ax.set_ylim(max(h - 0.5, r1 + 1), min(-0.5, r0 - 1))
    ax.set_title(f"{row.name}: unit {tuple(unit)}, R={fmt_axes(row.R)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
