"""fastai's batch augmentation without its host reads: the same transforms, distributions and parameters as
`aug_transforms` builds them, drawn and applied on the batch's device.

fastai's affine transforms read the GPU from the host every batch (`_grid_sample`'s `(mx-mn).item()`, and
`apply_perspective`'s `if (...).any()`; `torch.linalg.solve` adds an error-check wait on CUDA), and resample the
batch a second time after the crop. Here `read_free` takes the list fastai's `aug_transforms` returns (so its
interface and keywords stay) and splits it into:

- an `AffineSpec` (flips, dihedral flips, rotation, zoom, perspective warp, in fastai's order): drawn by
  `draw_affine` with fastai's RNG calls in fastai's order (the same numbers from the same seed), composed into one
  homography per image and applied in one `grid_sample` (`AffineWarp` after fastai's item crop in the 'pil'
  pipeline; folded into the batch crop's own resample in the 'device' and 'cached' pipelines, see crop.crop_resize);
- a `LightingSpec` (brightness, contrast), applied by `Lighting` as fastai does (in logit space), in one pass;
- anything else (another pad mode, `batch=True`, custom draws, extra transforms): kept as fastai's own transforms
  (their host reads included), and named by `read_free`'s caller in the pipeline's facts.

The random transforms here draw from a generator of their own on the batch's device, reseeded when an epoch starts
(`reseed_transforms`, called by the loader in the consuming thread), so that prepared-ahead batches do not depend on
thread timing.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from fastai.vision.augment import (AffineCoordTfm, LightingTfm, RandTransform, dihedral_mat, flip_mat, rotate_mat,
                                   zoom_mat)
from fastai.vision.core import TensorImage

PAD_MODES = ("reflection", "border")  # folded exactly; fastai's 'zeros' stays fastai's
_AFFINE = {flip_mat: "flip", dihedral_mat: "dihedral", rotate_mat: "rotate", zoom_mat: "zoom"}


@dataclass(frozen=True)
class AffineStep:
    """One of fastai's affine draws: kind (flip, dihedral, rotate, zoom), its probability, and its range (rotate:
    (max degrees,); zoom: (min, max))."""
    kind: str
    p: float
    args: tuple[float, ...] = ()


@dataclass
class AffineSpec:
    """fastai's merged affine transform: its matrix steps in fastai's product order, the perspective warp
    (magnitude, p) if any, and the pad mode."""
    steps: tuple[AffineStep, ...] = ()
    warp: tuple[float, float] | None = None
    pad_mode: str = "reflection"

    @property
    def flips_only(self) -> bool:
        """One left-right flip and nothing else: a flip of the sampling grid, no matrix to compose."""
        return self.warp is None and len(self.steps) == 1 and self.steps[0].kind == "flip"


@dataclass
class LightingSpec:
    """fastai's merged lighting transform: (kind, max_lighting, p) per step, kind brightness or contrast."""
    steps: tuple[tuple[str, float, float], ...] = ()


@dataclass
class Augment:
    """fastai's batch augmentation split by `read_free`: what runs without host reads and what stays fastai's."""
    affine: AffineSpec | None = None
    lighting: LightingSpec | None = None
    kept: list = field(default_factory=list)  # fastai transforms left as they are

    def describe(self) -> str:
        """One line for the pipeline's facts."""
        parts = []
        if self.affine:
            kinds = [s.kind for s in self.affine.steps] + ["warp"] * bool(self.affine.warp)
            parts.append("affine " + "+".join(kinds))
        if self.lighting:
            parts.append("lighting " + "+".join(k for k, _, _ in self.lighting.steps))
        kept = ", ".join(type(t).__name__ for t in self.kept)
        return (", ".join(parts) or "none") + (f"; fastai's own (with its host reads): {kept}" if kept else "")


def _plain_partial(f: Any) -> tuple[str, dict] | None:
    if not isinstance(f, partial) or f.func not in _AFFINE:
        return None
    kw = f.keywords
    if kw.get("batch") or any(kw.get(k) is not None for k in ("draw", "draw_x", "draw_y")):
        return None
    return _AFFINE[f.func], kw


def _affine_spec(t: AffineCoordTfm) -> AffineSpec | None:
    """The AffineSpec of fastai's (merged) affine transform, or None when it uses something not folded here."""
    pad = str(t.pad_mode)
    if t.size is not None or t.mode != "bilinear" or pad not in PAD_MODES or t.align_corners is not True:
        return None
    steps = []
    for f in t.aff_fs:
        parsed = _plain_partial(f)
        if parsed is None:
            return None
        kind, kw = parsed
        p = float(kw.get("p", 0.5))
        if kind == "rotate":
            steps.append(AffineStep(kind, p, (float(kw.get("max_deg", 10)),)))
        elif kind == "zoom":
            steps.append(AffineStep(kind, p, (float(kw.get("min_zoom", 1.0)), float(kw.get("max_zoom", 1.1)))))
        else:
            steps.append(AffineStep(kind, p))
    warp = None
    for c in t.coord_fs:
        if type(c).__name__ != "_WarpCoord" or c.batch or c.draw_x is not None or c.draw_y is not None or warp:
            return None
        warp = (float(c.magnitude), float(c.p))
    return AffineSpec(tuple(steps), warp, pad)


def _lighting_spec(t: LightingTfm) -> LightingSpec | None:
    kinds = {"_BrightnessLogit": "brightness", "_ContrastLogit": "contrast"}
    steps = []
    for f in t.fs:
        kind = kinds.get(type(f).__name__)
        if kind is None or f.batch or f.draw is not None:
            return None
        steps.append((kind, float(f.max_lighting), float(f.p)))
    return LightingSpec(tuple(steps))


def read_free(tfms: Sequence | None) -> Augment:
    """Split fastai batch transforms (what `aug_transforms` returns) into the affine and lighting parts the package
    runs without host reads, and the transforms it keeps as they are."""
    out = Augment()
    for t in list(tfms or []):
        spec = None
        if isinstance(t, AffineCoordTfm) and out.affine is None:
            spec = out.affine = _affine_spec(t)
        elif isinstance(t, LightingTfm) and out.lighting is None:
            spec = out.lighting = _lighting_spec(t)
        if spec is None:
            out.kept.append(t)
    return out


# --- draws: fastai's RNG calls, in fastai's order, on a generator of our own --------------------------------------

def _uniform(n: int, lo: float, hi: float, device: torch.device, g: torch.Generator | None) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi, generator=g)


def _mask(v: torch.Tensor, p: float, neutral: float, g: torch.Generator | None) -> torch.Tensor:
    """fastai's mask_tensor (batch=False): each value kept with probability `p`, else `neutral`."""
    if p == 1.0:
        return v
    if neutral:
        v = v - neutral
    v = v * torch.empty(v.shape, device=v.device).bernoulli_(p, generator=g).to(v.dtype)
    return v + neutral if neutral else v


def _rows(*rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.stack(list(r), dim=1) for r in rows], dim=1)


def _step_matrix(step: AffineStep, n: int, device: torch.device, g: torch.Generator | None) -> torch.Tensor:
    zero, one = torch.zeros(n, device=device), torch.ones(n, device=device)
    if step.kind == "flip":  # flip_mat: -1 with probability p
        s = one - 2 * _mask(one, step.p, 0.0, g)
        return _rows((s, zero, zero), (zero, one, zero), (zero, zero, one))
    if step.kind == "dihedral":  # dihedral_mat: one of the 8 dihedral maps with probability p
        idx = _mask(torch.randint(0, 8, (n,), device=device, generator=g), step.p, 0.0, g).long()

        def pick(values):
            return torch.tensor(values, device=device).gather(0, idx).float()

        xs, ys = pick([1, -1, 1, -1, -1, 1, 1, -1]), pick([1, 1, -1, 1, -1, -1, 1, -1])
        m0, m1 = pick([1, 1, 1, 0, 1, 0, 0, 0]), pick([0, 0, 0, 1, 0, 1, 1, 1])
        return _rows((xs * m0, xs * m1, zero), (ys * m1, ys * m0, zero), (zero, zero, one))
    if step.kind == "rotate":  # rotate_mat: uniform angle in [-max, max] degrees with probability p
        th = _mask(_uniform(n, -step.args[0], step.args[0], device, g), step.p, 0.0, g) * math.pi / 180
        return _rows((th.cos(), th.sin(), zero), (-th.sin(), th.cos(), zero), (zero, zero, one))
    if step.kind == "zoom":  # zoom_mat: scale 1/uniform(min, max) with probability p, uniform centre
        s = 1 / _mask(_uniform(n, step.args[0], step.args[1], device, g), step.p, 1.0, g)
        col, row = _uniform(n, 0, 1, device, g), _uniform(n, 0, 1, device, g)
        return _rows((s, zero, (1 - s) * (2 * col - 1)), (zero, s, (1 - s) * (2 * row - 1)), (zero, zero, one))
    raise ValueError(f"unknown affine step {step.kind!r}")


def _perspective(magnitude: float, p: float, n: int, device: torch.device,
                 g: torch.Generator | None) -> torch.Tensor:
    """fastai's _WarpCoord draw and find_coeffs: the 3 x 3 perspective map per image (solved without the error
    check that waits for the GPU)."""
    x_t = _mask(_uniform(n, -magnitude, magnitude, device, g), p, 0.0, g)
    y_t = _mask(_uniform(n, -magnitude, magnitude, device, g), p, 0.0, g)
    orig = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=torch.float32, device=device).expand(n, 4, 2)
    targ = torch.stack([torch.stack([-1 - y_t, -1 - x_t]), torch.stack([-1 + y_t, 1 + x_t]),
                        torch.stack([1 + y_t, -1 + x_t]), torch.stack([1 - y_t, 1 - x_t])]).permute(2, 0, 1)
    zero, one = torch.zeros(n, device=device), torch.ones(n, device=device)
    m = []
    for i in range(4):  # find_coeffs(orig, targ): the 8 equations, as fastai writes them
        m.append(torch.stack([targ[:, i, 0], targ[:, i, 1], one, zero, zero, zero, -orig[:, i, 0] * targ[:, i, 0],
                              -orig[:, i, 0] * targ[:, i, 1]]))
        m.append(torch.stack([zero, zero, zero, targ[:, i, 0], targ[:, i, 1], one, -orig[:, i, 1] * targ[:, i, 0],
                              -orig[:, i, 1] * targ[:, i, 1]]))
    a = torch.stack(m).permute(2, 0, 1)
    coeffs = torch.linalg.solve_ex(a, orig.reshape(n, 8, 1), check_errors=False)[0]
    return torch.cat([coeffs, torch.ones_like(coeffs[:, :1])], dim=1).view(n, 3, 3)


def draw_affine(spec: AffineSpec, n: int, size: tuple[int, int], device: torch.device,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image homographies (n x 3 x 3) mapping output coordinates (x, y in [-1, 1], fastai's align_corners=True
    grid of an image of `size` (height, width)) to the coordinates fastai samples: its affine matrix (the steps'
    product, then `_prepare_mat`'s aspect correction), then its perspective warp."""
    m = torch.eye(3, device=device).expand(n, 3, 3)
    for step in spec.steps:
        m = m @ _step_matrix(step, n, device, generator)
    h, w = size
    m = m.clone()
    m[:, 0, 1] *= h / w
    m[:, 1, 0] *= w / h
    m[:, 2] = torch.tensor([0.0, 0.0, 1.0], device=device)
    if spec.warp is None:
        return m
    return _perspective(*spec.warp, n, device, generator) @ m


def draw_flips(n: int, p: float = 0.5, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of `n` images to flip left-right: each with probability `p`, drawn as fastai's flip_mat draws it."""
    return _mask(torch.ones(n, device=device), p, 0.0, generator) > 0


def warp_grid(homography: torch.Tensor, size: tuple[int, int], perspective: bool = True) -> torch.Tensor:
    """The sampling grid (n x H x W x 2) of per-image homographies over an output of `size` (height, width):
    fastai's affine_grid (align_corners=True) followed by its perspective map (`perspective`: the third row is not
    (0, 0, 1)), evaluated by broadcasting a row and a column per image."""
    h, w = size
    dev = homography.device
    px, py = torch.linspace(-1, 1, w, device=dev), torch.linspace(-1, 1, h, device=dev)
    top = homography[:, :2]  # n x 2 x 3: the numerators of x and y
    grid = (px.view(1, 1, w, 1) * top[:, None, None, :, 0] + top[:, None, None, :, 2]) \
        + py.view(1, h, 1, 1) * top[:, None, None, :, 1]
    if not perspective:
        return grid
    last = homography[:, 2, :, None, None]  # n x 3 x 1 x 1
    den = (px.view(1, 1, w) * last[:, 0] + last[:, 2]) + py.view(1, h, 1) * last[:, 1]
    # fastai leaves the batch unwarped if a denominator is exactly 0 (an event of probability 0); here that point
    return grid.div_(torch.where(den == 0, torch.ones_like(den), den)[..., None])


def reflect(grid: torch.Tensor) -> torch.Tensor:
    """Coordinates reflected into [-1, 1] as grid_sample's 'reflection' padding does with align_corners=True (about
    the outer pixel centres), in place."""
    return grid.add_(1).abs_().remainder_(4).sub_(2).abs_().neg_().add_(1)


# --- the transforms --------------------------------------------------------------------------------------------

class Seeded:
    """A generator of its own on the transform's device, reseeded by `reseed` (see the module docstring)."""
    _gen: torch.Generator | None = None
    _seed: int | None = None

    def reseed(self, seed: int) -> None:
        """Start this transform's draws again from `seed`."""
        self._seed, self._gen = int(seed), None

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for `device`, made (and seeded) at first use."""
        device = torch.device(device)
        if self._gen is None or self._gen.device != device:
            if self._seed is None:
                self._seed = random.getrandbits(62)
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self._seed)
        return self._gen

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_gen", None)
        return state


def reseed_transforms(tfms: Sequence, seed: int) -> None:
    """Reseed every transform of `tfms` that draws from its own generator (seed, seed + 1, ...)."""
    for k, t in enumerate(tfms):
        if isinstance(t, Seeded):
            t.reseed(seed + k)


class BatchAugment(Seeded, RandTransform):
    """A batch augmentation of the training split drawn from its spec on the device: every batch goes through it
    (its per-image probabilities are drawn inside, as fastai's merged transforms draw them)."""
    split_idx = 0

    def __init__(self, spec: AffineSpec | LightingSpec):
        super().__init__()
        self.spec = spec

    def before_call(self, b, split_idx: int | None) -> None:
        self.do = True


class AffineWarp(BatchAugment):
    """fastai's merged affine transform (flips, rotation, zoom, perspective warp) on the training split, drawn as
    fastai draws it, in one grid_sample with fastai's padding, and no host read. For the 'pil' pipeline, whose crop
    happens per image on the loader; the device pipelines fold it into their crop."""
    order = 30

    def encodes(self, x: TensorImage) -> TensorImage:
        img = x.as_subclass(torch.Tensor)
        size = tuple(img.shape[-2:])
        if self.spec.flips_only:  # fastai resamples on the identity grid: the same pixels
            flips = draw_flips(len(img), self.spec.steps[0].p, img.device, self.generator(img.device))
            return TensorImage(torch.where(flips[:, None, None, None], img.flip(-1), img))
        hom = draw_affine(self.spec, len(img), size, img.device, self.generator(img.device))
        grid = warp_grid(hom, size, perspective=self.spec.warp is not None)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode=self.spec.pad_mode, align_corners=True)
        return TensorImage(out)


class Lighting(BatchAugment):
    """fastai's merged lighting transform (brightness, then contrast, in logit space: sigmoid(c * (logit(x) +
    logit(b)))) on the training split, drawn as fastai draws it, applied in one fused pass."""
    order = 40

    def encodes(self, x: TensorImage) -> TensorImage:
        img = x.as_subclass(torch.Tensor)
        n, dev = len(img), img.device
        g = self.generator(dev)
        scale, shift = torch.ones(n, device=dev), torch.zeros(n, device=dev)
        for kind, ml, p in self.spec.steps:
            if kind == "brightness":  # _BrightnessLogit: add logit(b), b uniform in 0.5 (1 -+ ml)
                b = _mask(_uniform(n, 0.5 * (1 - ml), 0.5 * (1 + ml), dev, g), p, 0.5, g).clamp(1e-7, 1 - 1e-7)
                shift = shift - (1 / b - 1).log()
            else:  # _ContrastLogit: multiply by exp(uniform(log(1 - ml), -log(1 - ml)))
                c = _mask(torch.exp(_uniform(n, math.log(1 - ml), -math.log(1 - ml), dev, g)), p, 1.0, g)
                scale, shift = scale * c, shift * c
        y = torch.logit(img, eps=1e-7)
        y = torch.addcmul(shift.view(n, 1, 1, 1), y, scale.view(n, 1, 1, 1))
        return TensorImage(y.sigmoid_())


def read_free_tfms(tfms: Sequence | None) -> tuple[list, Augment]:
    """fastai batch transforms with their affine and lighting parts replaced by AffineWarp and Lighting (the 'pil'
    pipeline's batch transforms), and how they were split."""
    aug = read_free(tfms)
    out = ([AffineWarp(aug.affine)] if aug.affine else []) + ([Lighting(aug.lighting)] if aug.lighting else [])
    return out + list(aug.kept), aug
