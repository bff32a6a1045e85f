"""Ops that move, select or remove tensor dims: indexing, views, permutations, reductions along a dim."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .geometry import State, Unsupported, collapse, shift


def norm_dim(d: int, ndim: int) -> int:
    """A possibly negative dim index as a non-negative one."""
    return d + ndim if d < 0 else d


def _dim_list(dim_arg: Any, ndim: int) -> list[int]:
    return [norm_dim(int(v), ndim) for v in (dim_arg if isinstance(dim_arg, (list, tuple)) else [dim_arg])]


def getitem(main: State, x: torch.Tensor, idx: Any) -> State:
    """`x[idx]`: slices shift and stride an axis, integers remove it, tensor indices over an axis are refused."""
    items = list(idx) if isinstance(idx, tuple) else [idx]

    def is_mask(it):
        return isinstance(it, torch.Tensor) and it.dtype == torch.bool

    consumed = sum(it.ndim if is_mask(it) else 1 for it in items if it is not None and it is not Ellipsis)
    expanded = []
    for it in items:
        expanded += [slice(None)] * (x.ndim - consumed) if it is Ellipsis else [it]
    expanded += [slice(None)] * (x.ndim - sum(it.ndim if is_mask(it) else 1 for it in expanded if it is not None))
    mapping: dict[int, tuple] = {}   # in dim -> (out dim, offset, step, units kept)
    i_in = i_out = 0
    for it in expanded:
        if it is None:
            i_out += 1
        elif isinstance(it, slice):
            start, stop, step = it.indices(x.shape[i_in])
            count = len(range(start, stop, step))
            mapping[i_in] = (i_out, start, step, (start, start + (count - 1) * step) if count else None)
            i_in += 1
            i_out += 1
        elif isinstance(it, (int, np.integer)) or (isinstance(it, torch.Tensor) and it.ndim == 0
                                                     and not it.dtype.is_floating_point and it.dtype != torch.bool):
            v = int(it)
            v = v + x.shape[i_in] if v < 0 else v
            mapping[i_in] = (None, v, 1, (v, v))
            i_in += 1
        else:
            span = it.ndim if is_mask(it) else 1
            if any(i_in + j in main.dims for j in range(span)):
                raise Unsupported("advanced (tensor) indexing over a spatial dim picks arbitrary positions")
            i_in += span
            i_out += 1 if span > 1 else (it.ndim if isinstance(it, torch.Tensor) else np.ndim(it))
    dims, fields = [], []
    for d, f in zip(main.dims, main.fields):
        if d is None:
            dims.append(None)
            fields.append(f)
            continue
        od, offset, step, used = mapping.get(d, (d - i_in + i_out, 0, 1, None))
        dims.append(od)
        fields.append(shift(f, offset, step, used))
    return State(tuple(dims), tuple(fields))


def reshape(main: State, x: torch.Tensor, out: torch.Tensor) -> State:
    """A dim survives a view iff its boundaries (prefix products) exist in the new shape with the same size."""
    a, b = list(x.shape), list(out.shape)
    pre_b = [1]
    for v in b:
        pre_b.append(pre_b[-1] * v)
    dims, fields = [], []
    for d, f in zip(main.dims, main.fields):
        if d is None:
            dims.append(None)
            fields.append(f)
            continue
        before = math.prod(a[:d])
        hit = None
        for m in range(len(b)):
            if pre_b[m] == before and b[m] == a[d]:
                hit = m
                if a[d] != 1:
                    break
        if hit is None:
            dims.append(None)
            fields.append(collapse(f, a[d]))
        else:
            dims.append(hit)
            fields.append(f)
    return State(tuple(dims), tuple(fields))


def permutation(op: str, args: Sequence, kwargs: dict, ndim: int) -> list[int]:
    """The input dim that each output dim of a permute / transpose / movedim comes from."""
    rest = list(args[1:])
    if op == "permute":
        p = kwargs.get("dims", rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)
        return [norm_dim(int(v), ndim) for v in p]
    if op == "t":
        return [1, 0][:ndim] if ndim == 2 else list(range(ndim))
    if op in ("movedim", "moveaxis"):
        src = _dim_list(kwargs.get("source", rest[0] if rest else None), ndim)
        dst = _dim_list(kwargs.get("destination", rest[1] if len(rest) > 1 else None), ndim)
        order = [d for d in range(ndim) if d not in src]
        perm: list[int | None] = [None] * ndim
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(order)
        return [p if p is not None else next(it) for p in perm]
    d0 = norm_dim(int(kwargs.get("dim0", rest[0])), ndim)
    d1 = norm_dim(int(kwargs.get("dim1", rest[1])), ndim)
    perm = list(range(ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def reduce(op: str, main: State, x: torch.Tensor, args: Sequence, kwargs: dict, out: torch.Tensor) -> State:
    """`mean` / `sum` / `amax` ... over some dims: those axes collapse (and leave the tensor unless keepdim)."""
    dim = kwargs.get("dim", kwargs.get("axis"))
    if dim is None and "dim" not in kwargs:
        pos = 2 if op == "norm" else 1
        if len(args) > pos and isinstance(args[pos], (int, list, tuple)) and not isinstance(args[pos], bool):
            dim = args[pos]
    red = set(range(x.ndim)) if dim is None else set(_dim_list(dim, x.ndim))
    keep = out.ndim == x.ndim
    dims, fields = [], []
    for d, f in zip(main.dims, main.fields):
        if d is None:
            dims.append(None)
            fields.append(f)
        elif d in red:
            fields.append(collapse(f, x.shape[d]))
            dims.append(d if keep else None)
        else:
            dims.append(d if keep else d - sum(1 for r in red if r < d))
            fields.append(f)
    return State(tuple(dims), tuple(fields))


def along_dim(op: str, main: State, x: torch.Tensor, args: Sequence, kwargs: dict) -> State:
    """`softmax`, `cumsum`, `flip`, `roll` ... along some dims: every output there depends on the whole dim."""
    dim_arg = kwargs.get("dims", kwargs.get("dim", args[1] if len(args) > 1 else None))
    if op == "normalize":
        dim_arg = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    if op == "roll":
        dim_arg = kwargs.get("dims", args[2] if len(args) > 2 else None)
    dset = set(range(x.ndim)) if dim_arg is None else set(_dim_list(dim_arg, x.ndim))
    return State(main.dims, tuple(collapse(f, x.shape[d]) if d in dset else f for f, d in zip(main.fields, main.dims)))
