"""Checking the analytic field without the recurrence: input gradients of one unit, and the effective field."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Dim, centre_unit, num
from .ops import ACTS, ADAPTIVE, CONV, MAXPOOL, NORMS, rank, window
from .trace import Node, RFRow, dtype_device, find_node, parse_input_shape, run_model, traced


@dataclass(frozen=True)
class RFMeasurement:
    """Gradient-measured field of one node next to the analytic values at the same input size."""
    name: str
    input_shape: tuple[int, ...]
    unit: tuple[int | None, ...]
    R: tuple[float, ...]
    J: tuple[float | None, ...]
    start: tuple[float, ...]
    R_analytic: tuple[float, ...]
    J_analytic: tuple[float | None, ...]
    start_analytic: tuple[float, ...]
    agrees: bool
    seconds: float = 0.0


@dataclass
class ERFResult:
    """Effective receptive field (Luo et al., 2016) of one unit: mean |d unit / d input| map and its spread."""
    name: str
    input_shape: tuple[int, ...]
    unit: tuple[int | None, ...]
    map: np.ndarray
    box: tuple[tuple[float, float], ...]
    theoretical_pixels: int
    mass_inside: float
    area_fraction: dict[float, float]

    def summary(self) -> dict:
        """Plain-JSON digest of the result (no map)."""
        return {"name": self.name, "input_shape": list(self.input_shape), "unit": list(self.unit),
                "theoretical_box": [list(b) for b in self.box], "theoretical_pixels": self.theoretical_pixels,
                "mass_inside_theoretical": round(self.mass_inside, 6),
                "area_fraction": {f"{q:.0%}": round(v, 6) for q, v in self.area_fraction.items()}}


def _with_indices(y: torch.Tensor, wanted: bool) -> Any:
    return (y, torch.zeros(y.shape, dtype=torch.long, device=y.device)) if wanted else y


def _substitute(op: str, func: Callable, args: Sequence, kwargs: dict) -> Any:
    """Run `op` with positive constant weights, identity norms/activations and max-pool as average-pool."""
    if op in CONV:
        a, *_ = window(op, args, kwargs)
        x, w = a["input"], a["weight"]
        w = torch.full(w.shape, 1.0 / w[0].numel(), dtype=x.dtype, device=x.device)
        return func(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    if op == "linear":
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        return func(x, torch.full(w.shape, 1.0 / w.shape[1], dtype=x.dtype, device=x.device), None)
    if op in NORMS or op in ACTS:
        x = args[0] if args else kwargs["input"]
        return x if op in ACTS and kwargs.get("inplace") else x.clone()
    if op in MAXPOOL:   # max-pool sends its gradient to one input only: average over the same window instead
        a, k, s, pad, dil = window(op, args, kwargs)
        x, k_sp = a["input"], rank(op)
        if all(v == 1 for v in dil):
            y = getattr(F, f"avg_pool{k_sp}d")(x, k, s, pad, bool(a["ceil_mode"]), True)
        else:
            c = x.shape[-k_sp - 1]
            w = torch.full((c, 1, *k), 1.0 / math.prod(k), dtype=x.dtype, device=x.device)
            y = getattr(F, f"conv{k_sp}d")(x, w, None, s, pad, dil, c)
        return _with_indices(y, op.endswith("_with_indices") or bool(a.get("return_indices")))
    if op in ADAPTIVE and "max" in op:
        x = args[0] if args else kwargs["input"]
        osz = args[1] if len(args) > 1 else kwargs["output_size"]
        y = getattr(F, f"adaptive_avg_pool{rank(op)}d")(x, osz)
        return _with_indices(y, op.endswith("_with_indices") or bool(kwargs.get("return_indices")))
    return func(*args, **kwargs)


def _unit_for(f: Dim, m: int, n: int) -> int | None:
    """Unit nearest the centre whose field and a neighbour's lie inside 0..n-1."""
    best = None
    for u in range(m):
        ok = f.lo + u * f.J >= 0 and f.hi + u * f.J <= n - 1
        if m > 1:
            v = u + 1 if u + 1 < m else u - 1
            ok = ok and f.lo + v * f.J >= 0 and f.hi + v * f.J <= n - 1
        if ok:
            dist = abs(f.start + u * f.J - (n - 1) / 2)
            if best is None or dist < best[0]:
                best = (dist, u)
    return None if best is None else best[1]


def _positional(n: Node) -> list[int]:
    return [ax for ax, (d, f) in enumerate(zip(n.state.dims, n.state.fields)) if d is not None and not f.whole]


def _fitting_input(model: nn.Module, key: tuple, name: str, shape: list[int],
                   max_size: int) -> tuple[Node, list[int], dict[int, int]]:
    """Grow the input until a unit near the centre (and its neighbour) has its whole field inside the image."""
    for _ in range(12):
        n = traced(model, shape, stop_key=key)[1].nodes[-1]
        if n.key != key:
            raise ValueError(f"node {name!r} was not reached at input shape {tuple(shape)}")
        grow = False
        units = {}
        for ax in _positional(n):
            f, m, size = n.state.fields[ax], n.out_shape[n.state.dims[ax]], shape[2 + ax]
            u = _unit_for(f, m, size)
            if u is None:
                u0 = math.ceil(max(0.0, -f.lo) / f.J)
                shape[2 + ax] = max(size + 1, math.ceil(f.hi + (u0 + 2) * f.J + 1 + f.J))
                grow = True
            else:
                units[ax] = u
        if not grow:
            return n, shape, units
        if max(shape[2:]) > max_size:
            raise ValueError(f"node {name!r} needs an input larger than max_size={max_size} to hold its field")
    raise ValueError(f"could not find an input size where node {name!r} has a unit with an unclipped field")


def _gradient_box(out: torch.Tensor, x: torch.Tensor, dims: Sequence[int | None],
                  unit_of: dict[int, int]) -> list[tuple[int, int] | None]:
    """Per input axis, first and last pixel with a non-zero gradient of the chosen unit (summed over channels)."""
    idx: list[Any] = [slice(None)] * out.ndim
    for ax, u in unit_of.items():
        idx[dims[ax]] = u
    g, = torch.autograd.grad(out[tuple(idx)].sum(), x, retain_graph=True)
    mask = (g[0] != 0).any(dim=0) if g.ndim > 2 else (g[0] != 0)
    n_ax = x.ndim - 2
    boxes: list[tuple[int, int] | None] = []
    for ax in range(n_ax):
        other = tuple(a for a in range(n_ax) if a != ax)
        nz = torch.nonzero(mask.any(dim=other) if other else mask).flatten()
        boxes.append((int(nz.min()), int(nz.max())) if nz.numel() else None)
    return boxes


def measure_receptive_field(model: nn.Module, node: str | int | RFRow, input_shape: Sequence[int], *,
                            max_size: int = 4096) -> RFMeasurement:
    """Measure a node's field from the non-zero input gradient of one unit near the centre (and its neighbour)."""
    t0 = time.perf_counter()
    model, tr = traced(model, input_shape)
    target = find_node(tr.nodes, node)
    key, name = target.key, target.name
    if key == ("input",):
        raise ValueError("node 'input' is the image itself (R = 1, J = 1, start = 0); pick a layer to measure")
    n, shape, units = _fitting_input(model, key, name, [1, *parse_input_shape(input_shape)[1:]], max_size)
    x = torch.ones(shape, dtype=torch.float64, device=dtype_device(model)[1], requires_grad=True)
    _, out = run_model(model, x, replace=_substitute, stop_key=key)
    if out is None:
        raise ValueError(f"node {name!r} was not reached in the measurement run")
    dims, sizes = n.state.dims, n.out_shape
    b1 = _gradient_box(out, x, dims, units)
    # the neighbour along every axis that has one: the shift of its field is the jump
    units2 = {ax: (u + 1 if u + 1 < sizes[dims[ax]] else u - 1) if sizes[dims[ax]] > 1 else u
              for ax, u in units.items()}
    b2 = _gradient_box(out, x, dims, units2) if units2 != units else None
    R, J, start = [], [], []
    for ax in range(len(shape) - 2):
        if b1[ax] is None:
            R.append(0)
            J.append(None)
            start.append(float("nan"))
            continue
        lo, hi = b1[ax]
        R.append(hi - lo + 1)
        if ax in units and b2 is not None and b2[ax] is not None and units2[ax] != units[ax]:
            j = (b2[ax][0] - lo) / (units2[ax] - units[ax])
            J.append(num(j))
            start.append(num((lo + hi) / 2 - units[ax] * j))
        elif ax in units:   # a single position: no neighbour to measure the jump with
            J.append(None)
            start.append(num((lo + hi) / 2 - units[ax] * n.state.fields[ax].J))
        else:
            J.append(None)
            start.append(num((lo + hi) / 2))
    fa = n.state.fields
    Ra, Ja, Sa = tuple(num(f.R) for f in fa), tuple(num(f.J) for f in fa), tuple(num(f.start) for f in fa)
    # J is compared where a neighbour could be measured (None on whole axes and single-position axes)
    agrees = all(abs(r - ra) < 1e-6 for r, ra in zip(R, Ra)) and \
        all(abs(s - sa) < 1e-6 for s, sa in zip(start, Sa)) and \
        all(j is None or (ja is not None and abs(j - ja) < 1e-6) for j, ja in zip(J, Ja))
    return RFMeasurement(name=name, input_shape=tuple(shape), unit=tuple(units.get(ax) for ax in range(len(R))),
                         R=tuple(num(v) for v in R), J=tuple(J), start=tuple(start),
                         R_analytic=Ra, J_analytic=Ja, start_analytic=Sa, agrees=bool(agrees),
                         seconds=round(time.perf_counter() - t0, 3))


def effective_receptive_field(model: nn.Module, node: str | int | RFRow, input_shape: Sequence[int], *,
                              n_samples: int = 8, seed: int = 0, inputs: torch.Tensor | None = None,
                              masses: Sequence[float] = (0.5, 0.9)) -> ERFResult:
    """Mean |gradient| of the centre unit of `node` w.r.t. the input, for the model as it is (Luo et al., 2016)."""
    model, tr = traced(model, input_shape)
    target = find_node(tr.nodes, node)
    shape = parse_input_shape(input_shape)
    n_ax = len(shape) - 2
    if n_ax == 0:
        raise ValueError("the input has no spatial dims; an effective receptive field needs at least one")
    dtype, device = dtype_device(model)
    if inputs is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn((n_samples, *shape[1:]), generator=gen, dtype=dtype)
    else:
        x = inputs.detach().to(dtype)
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"inputs have shape {tuple(x.shape)}, expected (N, {', '.join(map(str, shape[1:]))})")
    x = x.to(device).requires_grad_(True)
    _, out = run_model(model, x, stop_key=target.key)
    if out is None:
        raise ValueError(f"node {target.name!r} was not reached")
    dims, fields = target.state.dims, target.state.fields
    unit = {ax: centre_unit(fields[ax].start, fields[ax].J, shape[2 + ax], out.shape[dims[ax]])
            for ax in _positional(target)}
    idx: list[Any] = [slice(None)] * out.ndim
    for ax, u in unit.items():
        idx[dims[ax]] = u
    g, = torch.autograd.grad(out[tuple(idx)].sum(), x)
    gmap = g.detach().abs().double().sum(dim=1).mean(dim=0).cpu().numpy()
    box = []
    inside = np.ones_like(gmap, dtype=bool)
    for ax in range(n_ax):
        f = fields[ax]
        offset = unit.get(ax, 0) * (f.J or 0)
        lo, hi = max(0, math.ceil(f.lo + offset)), min(shape[2 + ax] - 1, math.floor(f.hi + offset))
        box.append((num(f.lo + offset), num(f.hi + offset)))
        keep = np.zeros(shape[2 + ax], dtype=bool)
        keep[lo:hi + 1] = True
        inside &= keep.reshape([-1 if a == ax else 1 for a in range(n_ax)])
    total = float(gmap.sum())
    n_inside = int(inside.sum())
    units = tuple(unit.get(a) for a in range(n_ax))
    if total <= 0:
        return ERFResult(target.name, tuple(shape), units, gmap, tuple(box), n_inside, 0.0,
                         {q: float("nan") for q in masses})
    cum = np.cumsum(np.sort(gmap.ravel())[::-1]) / total
    fractions = {q: float((np.searchsorted(cum, q) + 1) / max(n_inside, 1)) for q in masses}
    return ERFResult(target.name, tuple(shape), units, gmap, tuple(box), n_inside,
                     float(gmap[inside].sum() / total), fractions)
