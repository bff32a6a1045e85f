"""Receptive fields of any model: traced R / J / start per node, gradient measurement, effective field, layer report.

Conventions (used everywhere below):

* Input pixels are indexed 0..n-1 along each spatial axis and pixel ``i`` is centred at ``i``; the input itself
  has ``R = 1``, ``J = 1``, ``start = 0`` (if you picture pixel ``i`` as the interval ``[i, i+1]``, add 0.5).
* A node's field is the field of its *first* unit (index 0 along every spatial axis); unit ``u`` has the same
  field shifted by ``u * J``. It covers input pixels ``start - (R-1)/2 .. start + (R-1)/2``; with padding,
  ``start`` can be negative or fractional and the field can stick out of the image.
* conv / pool with kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` (``k_eff = d(k-1)+1``):
  ``R_n = R_{n-1} + (k_eff-1) J_{n-1}``, ``J_n = J_{n-1} s``, ``start_n = start_{n-1} + ((k_eff-1)/2 - p) J_{n-1}``.
* At a merge (``x + identity``, ``torch.cat``, ``x * gate``) the field is the union of the inputs' fields.
* "whole" axes: after a global/adaptive-to-1 pool, a reduction, a flatten or a linear layer over a spatial axis,
  the node no longer has positions along that axis; its field there is the union over all positions that fed it,
  clipped to the image (``R`` = image size when everything is covered) and ``J`` is undefined.

The graph is followed with module forward hooks (for names) plus a ``TorchFunctionMode`` that sees every torch
function and tensor method the forward calls (``F.conv2d``, ``F.max_pool2d``, ``x + identity``, ``torch.cat``,
``view`` / ``flatten`` ...), so models that ``torch.fx`` cannot trace (data-dependent control flow) work too.
The forward runs on the ``meta`` device (shapes only, no memory) and falls back to a real CPU forward.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import fnmatch
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "RFRow", "RFMeasurement", "ERFResult", "LayerInfo", "LargeActivationWarning",
    "receptive_fields", "select_rows", "rf_table_markdown", "write_rf_table",
    "measure_receptive_field", "effective_receptive_field", "plot_erf", "plot_rf_box",
    "layer_report", "layer_report_markdown", "model_from_name", "default_input_shape",
    "parse_input_shape", "receptive_field_run",
]


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RFRow:
    """One node of the traced graph with its receptive field per spatial axis."""
    name: str
    op: str
    out_shape: tuple[int, ...]
    params: int
    R: tuple[float, ...]
    J: tuple[float | None, ...]
    start: tuple[float, ...]
    whole: tuple[bool, ...] = ()
    inputs: tuple[str, ...] = ()
    ends: tuple[str, ...] = ()
    note: str = ""
    dims: tuple[int | None, ...] = ()

    def box(self, unit: Sequence[int] | None = None) -> tuple[tuple[float, float], ...]:
        """First and last input pixel of the field of `unit` (default: the first unit) along each axis."""
        unit = tuple(unit) if unit is not None else (0,) * len(self.R)
        out = []
        for r, j, s, u in zip(self.R, self.J, self.start, unit):
            shift = 0 if j is None else u * j
            out.append((_num(s - (r - 1) / 2 + shift), _num(s + (r - 1) / 2 + shift)))
        return tuple(out)


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


@dataclass(frozen=True)
class LayerInfo:
    """Output shape, weight counts and activation memory of one node."""
    name: str
    op: str
    out_shape: tuple[int, ...]
    params: int
    weights: int
    biases: int
    activations: int
    bytes: int


class LargeActivationWarning(UserWarning):
    """An activation tensor is larger than the warning threshold of `layer_report`."""


# ------------------------------------------------------------------------------------- per-axis geometry
@dataclass(frozen=True)
class _Dim:
    lo: float          # first input pixel of unit 0's field
    hi: float          # last input pixel of unit 0's field
    J: float | None    # jump; None once the axis is "whole"
    whole: bool = False
    elo: float = 0.0   # first and last input pixel that any unit of the tensor depends on: positions that
    ehi: float = 0.0   # only padding or skipped units reach must not count when the axis collapses

    @property
    def R(self) -> float:
        return self.hi - self.lo + 1

    @property
    def start(self) -> float:
        return (self.lo + self.hi) / 2


@dataclass(frozen=True)
class _State:
    dims: tuple[int | None, ...]   # tensor dim that carries each input axis (None: no longer a tensor dim)
    fields: tuple[_Dim, ...]


class _Unsupported(ValueError):
    pass


class _Stop(BaseException):
    # BaseException so that a model's own `except Exception` cannot swallow the early stop
    def __init__(self, value: Any):
        super().__init__("stop")
        self.value = value


def _num(v: float | None) -> float | int | None:
    if v is None:
        return None
    v = float(v)
    return int(round(v)) if abs(v - round(v)) < 1e-9 else round(v, 6)


def _whole(lo: float, hi: float, elo: float, ehi: float) -> _Dim:
    lo, hi = max(lo, elo), min(hi, ehi)
    return _Dim(lo, hi, None, True, lo, hi)


def _clip(d: _Dim) -> _Dim:
    """One position seen by every unit: the axis becomes whole with that position's (real) field."""
    return d if d.whole else _whole(d.lo, d.hi, d.elo, d.ehi)


def _collapse(d: _Dim, m: int) -> _Dim:
    """Union over the m positions of an axis that stops being positional."""
    if d.whole:
        return d
    return _whole(d.lo, d.hi + (m - 1) * d.J, d.elo, d.ehi)


def _used(m_in: int, m_out: int, k: int, s: int, p: int, dil: int) -> tuple[int, int] | None:
    """First and last input unit that any of the m_out output units reads (the rest is padding or skipped)."""
    def taps(u):
        return [i for i in (u * s - p + dil * t for t in range(k)) if 0 <= i < m_in]
    first = next((min(t) for u in range(m_out) if (t := taps(u))), None)
    last = next((max(t) for u in reversed(range(m_out)) if (t := taps(u))), None)
    return None if first is None else (first, last)


def _narrow(d: _Dim, used: tuple[int, int] | None) -> tuple[float, float]:
    if used is None:
        return d.elo, d.ehi
    return max(d.elo, d.lo + used[0] * d.J), min(d.ehi, d.hi + used[1] * d.J)


def _conv_dim(d: _Dim, k: int, s: int, p: int, dil: int, m_in: int, m_out: int) -> _Dim:
    if d.whole:
        return d
    elo, ehi = _narrow(d, _used(m_in, m_out, k, s, p, dil))
    return _Dim(d.lo - p * d.J, d.hi + (dil * (k - 1) - p) * d.J, d.J * s, False, elo, ehi)


def _shift(d: _Dim, offset: float, step: int = 1, used: tuple[int, int] | None = None) -> _Dim:
    """Unit 0 becomes old unit `offset` (slicing, padding); `used` = old units still present."""
    if d.whole:
        return d
    elo, ehi = _narrow(d, used)
    return _Dim(d.lo + offset * d.J, d.hi + offset * d.J, d.J * step, False, elo, ehi)


# ---------------------------------------------------------------------------------------- op catalogue
_CONV = {"conv1d", "conv2d", "conv3d"}
_MAXPOOL = {f"max_pool{k}d{w}" for k in (1, 2, 3) for w in ("", "_with_indices")}
_AVGPOOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}
_LPPOOL = {"lp_pool1d", "lp_pool2d", "lp_pool3d"}
_ADAPTIVE = {f"adaptive_{t}_pool{k}d{w}" for t in ("avg", "max") for k in (1, 2, 3) for w in ("", "_with_indices")}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nanmean",
           "nansum", "median", "std_mean", "var_mean"}
_ALONG_DIM = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod", "logcumsumexp", "flip", "roll", "normalize"}
_MIX_ALL = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "addbmm", "tensordot", "outer", "bilinear",
            "scaled_dot_product_attention", "multi_head_attention_forward"}
_NO_MAP = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "affine_grid",
           "pixel_shuffle", "pixel_unshuffle", "unfold", "fold", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "fractional_max_pool2d", "fractional_max_pool3d", "max_unpool1d", "max_unpool2d",
           "max_unpool3d", "upsample_nearest2d", "upsample_bilinear2d"}
_UNTRACKED = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "size", "dim", "numel"}
_NORMS = {"batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "rms_norm"}
_ACTS = {"relu", "relu6", "hardtanh", "hardsigmoid", "hardswish", "gelu", "silu", "sigmoid", "tanh", "elu", "selu",
         "celu", "leaky_relu", "prelu", "rrelu", "softplus", "mish", "threshold", "logsigmoid", "softsign",
         "tanhshrink", "glu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
         "feature_alpha_dropout"}
_ARITH = {"add", "sub", "mul", "div", "truediv", "floordiv", "matmul", "pow", "mod", "and", "or", "xor"}


def _op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or str(func)
    name = name.strip("_")
    if name[:1] in ("i", "r") and name[1:] in _ARITH:
        name = name[1:]
    return name


def _base_op(name: str) -> str:
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _bind(args: Sequence, kwargs: dict, names: Sequence[str], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update({k: v for k, v in kwargs.items() if k in names})
    return out


def _tup(v: Any, k: int, default: int | None = None) -> tuple:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple, torch.Size)):
        v = tuple(int(x) if x is not None else None for x in v)
        return v * k if len(v) == 1 else v
    return (int(v),) * k if v is not None else (None,) * k


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _describe(op: str, k=None, s=None, p=None, dil=None) -> str:
    if k is None:
        return op
    text = f"{op} {'x'.join(map(str, k))}"
    if s is not None and any(v != 1 for v in s):
        text += "/" + "x".join(map(str, s)) if len(set(s)) > 1 else f"/{s[0]}"
    if p is not None and any(v != 0 for v in p):
        text += " p" + ("x".join(map(str, p)) if len(set(p)) > 1 else str(p[0]))
    if dil is not None and any(v != 1 for v in dil):
        text += " d" + ("x".join(map(str, dil)) if len(set(dil)) > 1 else str(dil[0]))
    return text


# -------------------------------------------------------------------------------------------- the tracer
@dataclass
class _Node:
    index: int
    key: tuple
    module: str
    op: str
    desc: str
    out_shape: tuple[int, ...]
    itemsize: int
    state: _State
    inputs: list[int]
    weights: int
    biases: int
    leaf: bool
    ends: list[str] = field(default_factory=list)
    note: str = ""
    name: str = ""


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    return []


class _Tracer(TorchFunctionMode):
    """Records every torch op that consumes a tracked tensor and propagates the field through it."""

    def __init__(self, sizes: Sequence[int], param_names: dict[int, str], *, substitute: bool = False,
                 stop_key: tuple | None = None):
        super().__init__()
        self.sizes = tuple(sizes)
        self.param_names = param_names
        self.substitute = substitute
        self.stop_key = stop_key
        self.nodes: list[_Node] = []
        self.live: dict[int, tuple[torch.Tensor, int]] = {}
        self.stack: list[tuple[str, bool, int, list[int]]] = [("", False, 0, [0])]
        self.calls: dict[str, int] = {}

    # -- module hooks give the names
    def pre_hook(self, path: str, leaf: bool) -> Callable:
        def hook(module, args):
            self.calls[path] = self.calls.get(path, 0) + 1
            self.stack.append((path, leaf, self.calls[path], [0]))
        return hook

    def post_hook(self, path: str) -> Callable:
        def hook(module, args, output):
            if self.stack and self.stack[-1][0] == path:
                self.stack.pop()
            if any(t is o for t in _tensors_in(list(args)) for o in _tensors_in(output)[:1]):
                return   # a pass-through (nn.Identity) ends nothing of interest
            for t in _tensors_in(output)[:1]:
                idx = self._lookup(t)
                if idx is not None and path:
                    self.nodes[idx].ends.append(path)
        return hook

    def _lookup(self, t: torch.Tensor) -> int | None:
        hit = self.live.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def add_input(self, x: torch.Tensor) -> None:
        n = len(self.sizes)
        fields = tuple(_Dim(0, 0, 1, False, 0, m - 1) for m in x.shape[x.ndim - n:])
        state = _State(tuple(range(x.ndim - n, x.ndim)), fields)
        self._add_node(("input",), "", "input", "input", x, state, [], 0, 0, False)

    def _add_node(self, key, module, op, desc, out, state, inputs, weights, biases, leaf, note="") -> _Node:
        node = _Node(len(self.nodes), key, module, op, desc, tuple(out.shape), out.element_size(), state,
                     inputs, weights, biases, leaf, note=note)
        self.nodes.append(node)
        self.live[id(out)] = (out, node.index)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _op_name(func)
        tracked = []
        for t in _tensors_in(list(args)) + _tensors_in(list(kwargs.values())):
            idx = self._lookup(t)
            if idx is not None and idx not in tracked:
                tracked.append(idx)
        if self.substitute and tracked:
            out = _substitute(_base_op(op), func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if not tracked or op in _UNTRACKED:
            return out
        outs = [t for t in _tensors_in(out) if t.is_floating_point() or t.is_complex()]
        if not outs:
            return out
        path, leaf, call, counter = self.stack[-1]
        key = (path, call, counter[0])
        counter[0] += 1
        weights = biases = 0
        seen = set()
        for t in _tensors_in(list(args)) + _tensors_in(list(kwargs.values())):
            if isinstance(t, nn.Parameter) and id(t) not in seen:
                seen.add(id(t))
                if self.param_names.get(id(t), "").rsplit(".", 1)[-1] == "bias":
                    biases += t.numel()
                else:
                    weights += t.numel()
        base = _base_op(op)
        try:
            states, desc, note = _propagate(base, args, kwargs, outs, tracked, self)
        except _Unsupported as e:
            where = f"node in module '{path}'" if path else "node at the model's top level"
            raise _Unsupported(f"cannot map the receptive field through op '{op}' ({where}): {e}") from None
        for o, st in zip(outs, states):
            self._add_node(key, path, base, desc, o, st, list(tracked), weights, biases, leaf, note)
        if self.stop_key is not None and key == self.stop_key:
            raise _Stop(outs[0])
        return out


def _propagate(op: str, args, kwargs, outs: list[torch.Tensor], tracked: list[int], tr: _Tracer):
    """New state(s) for the output(s) of one op; returns (states, description, note)."""
    nodes, sizes = tr.nodes, tr.sizes
    main_t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input", kwargs.get("self"))
    main_idx = tr._lookup(main_t) if isinstance(main_t, torch.Tensor) else None
    main = nodes[main_idx].state if main_idx is not None else None
    out = outs[0]

    if op in _NO_MAP:
        if main is not None and any(d is not None for d in main.dims):
            raise _Unsupported("it resamples the spatial grid (upsampling, transposed conv, unfold, shuffle, "
                               "grid sampling); the recurrence R/J/start does not describe it")
        return [_default(op, outs[i], tracked, tr)[0] for i in range(len(outs))], op, ""

    if main is None:
        return [_default(op, o, tracked, tr)[0] for o in outs], op, ""

    x = main_t
    ndim = x.ndim

    if op in _CONV | _MAXPOOL | _AVGPOOL | _LPPOOL:
        k_sp = int(op.split("_pool")[-1][0]) if "pool" in op else int(op[-2])
        if op in _CONV:
            a = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                      {"stride": 1, "padding": 0, "dilation": 1})
            w = a["weight"]
            k = tuple(int(v) for v in w.shape[-k_sp:])
            s, dil = _tup(a["stride"], k_sp), _tup(a["dilation"], k_sp)
            if isinstance(a["padding"], str):   # 'same' pads d(k-1)//2 on the left, the rest on the right
                pad = (0,) * k_sp if a["padding"] == "valid" else tuple(di * (kk - 1) // 2 for kk, di in zip(k, dil))
            else:
                pad = _tup(a["padding"], k_sp)
            desc = _describe(op, k, s, pad, dil)
        elif op in _LPPOOL:
            a = _bind(args, kwargs, ("input", "norm_type", "kernel_size", "stride", "ceil_mode"), {"stride": None})
            k = _tup(a["kernel_size"], k_sp)
            s, pad, dil = _tup(a["stride"], k_sp, k[0]) if a["stride"] is not None else k, (0,) * k_sp, (1,) * k_sp
            desc = _describe(op, k, s, pad)
        else:
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices") \
                if op in _MAXPOOL else ("input", "kernel_size", "stride", "padding", "ceil_mode")
            a = _bind(args, kwargs, names, {"stride": None, "padding": 0, "dilation": 1})
            k = _tup(a["kernel_size"], k_sp)
            s = k if a["stride"] is None or (isinstance(a["stride"], (list, tuple)) and not a["stride"]) \
                else _tup(a["stride"], k_sp)
            pad, dil = _tup(a["padding"], k_sp), _tup(a.get("dilation", 1), k_sp)
            desc = _describe(op.replace("_with_indices", ""), k, s, pad, dil)
        first = ndim - k_sp
        dims, fields = list(main.dims), list(main.fields)
        for ax, d in enumerate(main.dims):
            if d is None:
                continue
            if d >= first:
                i = d - first
                fields[ax] = _conv_dim(fields[ax], k[i], s[i], pad[i], dil[i], x.shape[d], out.shape[d])
            elif op in _CONV and d == first - 1:
                # an axis folded into the channels gets mixed entirely by the convolution
                fields[ax] = _collapse(fields[ax], x.shape[d])
                dims[ax] = None
        return [_State(tuple(dims), tuple(fields))] * len(outs), desc, ""

    if op in _ADAPTIVE:
        k_sp = int(op.split("_pool")[-1][0])
        a = _bind(args, kwargs, ("input", "output_size"), {})
        osz = _tup(a["output_size"], k_sp)
        first = ndim - k_sp
        dims, fields, notes = list(main.dims), list(main.fields), []
        for ax, d in enumerate(main.dims):
            if d is None or d < first:
                continue
            n_in = x.shape[d]
            o = osz[d - first] if osz[d - first] is not None else n_in
            f = fields[ax]
            if o == 1:   # a global pool, even over a single position
                fields[ax] = _collapse(f, n_in)
            elif o == n_in:
                continue
            elif n_in % o == 0:
                fields[ax] = _conv_dim(f, n_in // o, n_in // o, 0, 1, n_in, o)
            elif not f.whole:
                fields[ax] = _Dim(f.lo, f.hi + (math.ceil(n_in / o) - 1) * f.J, f.J * n_in / o, False, f.elo, f.ehi)
                notes.append(f"adaptive pool {n_in}->{o} has uneven windows: J is an average")
        desc = f"{op.replace('_with_indices', '')} ->{'x'.join(str(v) for v in osz)}"
        return [_State(tuple(dims), tuple(fields))] * len(outs), desc, "; ".join(notes)

    if op == "pad":
        a = _bind(args, kwargs, ("input", "pad", "mode", "value"), {})
        p = list(a["pad"])
        fields = list(main.fields)
        for j in range(len(p) // 2):
            d = ndim - 1 - j
            for ax, dd in enumerate(main.dims):
                if dd == d:
                    fields[ax] = _shift(fields[ax], -p[2 * j])
        return [_State(main.dims, tuple(fields))], "pad " + str(tuple(p)), ""

    if op == "getitem":
        return [_getitem(main, x, args[1])], "getitem", ""

    if op == "narrow":
        a = _bind(args, kwargs, ("input", "dim", "start", "length"), {})
        d = _norm_dim(int(a["dim"]), ndim)
        st = int(a["start"]) + (x.shape[d] if int(a["start"]) < 0 else 0)
        fields = tuple(_shift(f, st, 1, (st, st + out.shape[d] - 1)) if dd == d else f
                       for f, dd in zip(main.fields, main.dims))
        return [_State(main.dims, fields)], "narrow", ""

    if op in _RESHAPE:
        return [_reshape(main, x, out)], op, ""

    if op in ("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"):
        perm = _permutation(op, args, kwargs, ndim)
        dims = tuple(None if d is None else perm.index(d) for d in main.dims)
        return [_State(dims, main.fields)], op, ""

    if op == "linear":
        dims, fields = list(main.dims), list(main.fields)
        for ax, d in enumerate(main.dims):
            if d == ndim - 1:
                fields[ax] = _collapse(fields[ax], x.shape[d])
                dims[ax] = None
        return [_State(tuple(dims), tuple(fields))], "linear", ""

    if op in _REDUCE and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
        return _reduce(op, main, x, args, kwargs, outs), op, ""

    if op in _ALONG_DIM:
        a = _bind(args, kwargs, ("input", "dim"), {})
        dim_arg = kwargs.get("dims", kwargs.get("dim", a.get("dim")))
        if op == "normalize":
            dim_arg = kwargs.get("dim", args[2] if len(args) > 2 else 1)
        if op == "roll":
            dim_arg = kwargs.get("dims", args[2] if len(args) > 2 else None)
        dset = set(range(ndim)) if dim_arg is None else \
            {_norm_dim(int(v), ndim) for v in (dim_arg if isinstance(dim_arg, (list, tuple)) else [dim_arg])}
        fields = tuple(_collapse(f, x.shape[d]) if d in dset else f for f, d in zip(main.fields, main.dims))
        return [_State(main.dims, fields)] * len(outs), op, ""

    if op in _MIX_ALL:
        fields = []
        for ax in range(len(sizes)):
            f = None
            for i in tracked:
                st, shp = nodes[i].state, nodes[i].out_shape
                d = st.dims[ax]
                g = _collapse(st.fields[ax], 1 if d is None else shp[d])
                f = g if f is None else _union(f, g)[0]
            fields.append(f)
        return [_State((None,) * len(sizes), tuple(fields))] * len(outs), op, \
            "mixes positions: every output sees the union of all inputs"

    if op in ("cat", "concat", "concatenate", "stack"):
        a = _bind(args, kwargs, ("tensors", "dim"), {"dim": 0})
        ts = [t for t in a["tensors"]]
        in_nd = ts[0].ndim
        d = _norm_dim(int(a["dim"]), in_nd + (1 if op == "stack" else 0))
        st_list = [nodes[tr._lookup(t)].state for t in ts if tr._lookup(t) is not None]
        if op != "stack":
            for st in st_list:
                if d in st.dims:
                    raise _Unsupported(f"concatenation along spatial dim {d} joins different positions")
        st, note = _merge(st_list, [0] * len(st_list) if op != "stack" else None, len(sizes),
                          remap=(lambda dd: dd if dd < d else dd + 1) if op == "stack" else None)
        return [st], op, note

    st, note = _default(op, out, tracked, tr)
    return [st] + [_default(op, o, tracked, tr)[0] for o in outs[1:]], op, note


def _union(a: _Dim, b: _Dim) -> tuple[_Dim, str]:
    if a.whole or b.whole:
        note = "" if a.whole and b.whole else \
            "a global branch (e.g. a squeeze-excitation gate) joins a local one: every unit sees the whole input"
        return _whole(min(a.lo, b.lo), max(a.hi, b.hi), min(a.elo, b.elo), max(a.ehi, b.ehi)), note
    note = ""
    if a.J != b.J:
        note = f"merged branches have different jumps ({_num(a.J)}, {_num(b.J)}): exact for the first unit only"
    return _Dim(min(a.lo, b.lo), max(a.hi, b.hi), min(a.J, b.J), False, min(a.elo, b.elo), max(a.ehi, b.ehi)), note


def _merge(states: list[_State], offsets: list[int] | None, n_ax: int, remap=None) -> tuple[_State, str]:
    """Union of the fields of several inputs whose axes sit at the same output dims."""
    dims: list[int | None] = [None] * n_ax
    fields: list[_Dim | None] = [None] * n_ax
    notes = []
    for i, st in enumerate(states):
        for ax in range(n_ax):
            d = st.dims[ax]
            od = None if d is None else (remap(d) if remap else d + (offsets[i] if offsets else 0))
            if od is not None:
                if dims[ax] is not None and dims[ax] != od:
                    raise _Unsupported(f"inputs carry spatial axis {ax} at different dims ({dims[ax]}, {od})")
                dims[ax] = od
            f = st.fields[ax]
            if fields[ax] is None:
                fields[ax] = f
            else:
                fields[ax], note = _union(fields[ax], f)
                if note:
                    notes.append(note)
    return _State(tuple(dims), tuple(fields)), "; ".join(dict.fromkeys(notes))


def _default(op: str, out: torch.Tensor, tracked: list[int], tr: _Tracer) -> tuple[_State, str]:
    """Elementwise / broadcasting ops: inputs align from the right, fields are united."""
    states, offsets = [], []
    for i in tracked:
        node = tr.nodes[i]
        st, shape = node.state, node.out_shape
        off = out.ndim - len(shape)
        for ax, d in enumerate(st.dims):
            if d is None:
                continue
            od = d + off
            if od < 0 or od >= out.ndim or (out.shape[od] != shape[d] and shape[d] != 1):
                raise _Unsupported(f"it changes spatial dim {d} from {tuple(shape)} to {tuple(out.shape)} "
                                   f"and the tool does not know how positions map")
            if shape[d] == 1 and out.shape[od] != 1 and not st.fields[ax].whole:
                # one position broadcast over many: every output unit sees that same field
                st = _State(st.dims, tuple(_clip(f) if a == ax else f
                                           for a, f in enumerate(st.fields)))
        states.append(st)
        offsets.append(off)
    return _merge(states, offsets, len(tr.sizes))


def _getitem(main: _State, x: torch.Tensor, idx: Any) -> _State:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 if not isinstance(it, torch.Tensor) or it.dtype != torch.bool else it.ndim
                   for it in items if it is not None and it is not Ellipsis)
    expanded = []
    for it in items:
        if it is Ellipsis:
            expanded += [slice(None)] * (x.ndim - consumed)
        else:
            expanded.append(it)
    expanded += [slice(None)] * (x.ndim - sum(1 for it in expanded if it is not None and not (
        isinstance(it, torch.Tensor) and it.dtype == torch.bool)) - sum(
        it.ndim for it in expanded if isinstance(it, torch.Tensor) and it.dtype == torch.bool))
    mapping: dict[int, tuple] = {}   # in dim -> (out dim, offset, step, units kept)
    i_in = i_out = 0
    for it in expanded:
        if it is None:
            i_out += 1
        elif isinstance(it, slice):
            n = x.shape[i_in]
            start, stop, step = it.indices(n)
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
            span = it.ndim if isinstance(it, torch.Tensor) and it.dtype == torch.bool else 1
            for j in range(span):
                if i_in + j in main.dims:
                    raise _Unsupported("advanced (tensor) indexing over a spatial dim picks arbitrary positions")
            i_in += span
            i_out += 1 if span > 1 else (it.ndim if isinstance(it, torch.Tensor) else np.ndim(it))
    dims, fields = [], []
    for d, f in zip(main.dims, main.fields):
        if d is None:
            dims.append(None)
            fields.append(f)
            continue
        od, offset, step, used = mapping.get(d, (d - i_in + i_out, 0, 1, None))
        f = _shift(f, offset, step, used)
        dims.append(od)
        fields.append(f)
    return _State(tuple(dims), tuple(fields))


def _reshape(main: _State, x: torch.Tensor, out: torch.Tensor) -> _State:
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
            fields.append(_collapse(f, a[d]))
        else:
            dims.append(hit)
            fields.append(f)
    return _State(tuple(dims), tuple(fields))


def _permutation(op: str, args, kwargs, ndim: int) -> list[int]:
    rest = list(args[1:])
    if op == "permute":
        p = kwargs.get("dims", rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest)
        return [_norm_dim(int(v), ndim) for v in p]
    if op == "t":
        return [1, 0][:ndim] if ndim == 2 else list(range(ndim))
    if op in ("movedim", "moveaxis"):
        src = kwargs.get("source", rest[0] if rest else None)
        dst = kwargs.get("destination", rest[1] if len(rest) > 1 else None)
        src = [_norm_dim(int(v), ndim) for v in (src if isinstance(src, (list, tuple)) else [src])]
        dst = [_norm_dim(int(v), ndim) for v in (dst if isinstance(dst, (list, tuple)) else [dst])]
        order = [d for d in range(ndim) if d not in src]
        perm: list[int | None] = [None] * ndim
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(order)
        return [p if p is not None else next(it) for p in perm]
    d0 = _norm_dim(int(kwargs.get("dim0", rest[0])), ndim)
    d1 = _norm_dim(int(kwargs.get("dim1", rest[1])), ndim)
    perm = list(range(ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _reduce(op: str, main: _State, x: torch.Tensor, args, kwargs, outs) -> list[_State]:
    ndim = x.ndim
    dim = kwargs.get("dim", kwargs.get("axis"))
    if dim is None and "dim" not in kwargs:
        pos = 2 if op == "norm" else 1
        if len(args) > pos and isinstance(args[pos], (int, list, tuple)) and not isinstance(args[pos], bool):
            dim = args[pos]
    if dim is None:
        red = set(range(ndim))
    else:
        red = {_norm_dim(int(v), ndim) for v in (dim if isinstance(dim, (list, tuple)) else [dim])}
    keep = outs[0].ndim == ndim
    dims, fields = [], []
    for d, f in zip(main.dims, main.fields):
        if d is None:
            dims.append(None)
            fields.append(f)
        elif d in red:
            fields.append(_collapse(f, x.shape[d]))
            dims.append(d if keep else None)
        else:
            dims.append(d if keep else d - sum(1 for r in red if r < d))
            fields.append(f)
    return [_State(tuple(dims), tuple(fields))] * len(outs)


# ------------------------------------------------------------------ substitutions for the gradient check
def _substitute(op: str, func: Callable, args, kwargs):
    """Run `op` with positive constant weights, identity norms/activations and max-pool as average-pool."""
    if op in _CONV:
        a = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        x, w = a["input"], a["weight"]
        w = torch.full(w.shape, 1.0 / w[0].numel(), dtype=x.dtype, device=x.device)
        return func(x, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    if op == "linear":
        x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        return func(x, torch.full(w.shape, 1.0 / w.shape[1], dtype=x.dtype, device=x.device), None)
    if op in _NORMS:
        x = args[0] if args else kwargs["input"]
        return x.clone()
    if op in _ACTS:
        x = args[0] if args else kwargs["input"]
        return x if kwargs.get("inplace") else x.clone()
    if op in _MAXPOOL:
        k_sp = int(op.split("_pool")[-1][0])
        a = _bind(args, kwargs, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                 "return_indices"), {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
        x = a["input"]
        k = _tup(a["kernel_size"], k_sp)
        s = k if a["stride"] is None or (isinstance(a["stride"], (list, tuple)) and not a["stride"]) \
            else _tup(a["stride"], k_sp)
        pad, dil = _tup(a["padding"], k_sp), _tup(a["dilation"], k_sp)
        if all(v == 1 for v in dil):
            avg = getattr(F, f"avg_pool{k_sp}d")
            y = avg(x, k, s, pad, bool(a["ceil_mode"]), True)
        else:
            c = x.shape[-k_sp - 1]
            w = torch.full((c, 1, *k), 1.0 / math.prod(k), dtype=x.dtype, device=x.device)
            y = getattr(F, f"conv{k_sp}d")(x, w, None, s, pad, dil, c)
        if op.endswith("_with_indices") or a.get("return_indices"):
            return y, torch.zeros(y.shape, dtype=torch.long, device=y.device)
        return y
    if op in _ADAPTIVE and "max" in op:
        k_sp = int(op.split("_pool")[-1][0])
        x = args[0] if args else kwargs["input"]
        osz = args[1] if len(args) > 1 else kwargs["output_size"]
        y = getattr(F, f"adaptive_avg_pool{k_sp}d")(x, osz)
        return (y, torch.zeros(y.shape, dtype=torch.long, device=y.device)) if op.endswith("_with_indices") \
            or kwargs.get("return_indices") else y
    return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------- running a trace
def _unwrap(model: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)   # a fastai Learner
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch.nn.Module or a fastai Learner, got {type(model).__name__}")


def parse_input_shape(shape: str | Sequence[int]) -> tuple[int, ...]:
    """Check an input shape (batch, channels, *spatial) given as a sequence or as text like '1,3,224,224'."""
    if isinstance(shape, str):
        parts = [p for p in shape.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            shape = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"input shape {shape!r} is not a list of integers; write e.g. '1,3,224,224'") from None
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or any(v < 1 for v in shape):
        raise ValueError(f"input shape {shape} must be (batch, channels, *spatial) with positive sizes, "
                         f"e.g. (1, 3, 224, 224)")
    return shape


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def _run(model: nn.Module, x: torch.Tensor, *, substitute: bool = False, stop_key: tuple | None = None,
         meta: bool = False) -> tuple[_Tracer, Any]:
    """Forward `x` through `model` under the tracer; returns the tracer and the stopped-at tensor (if any)."""
    named = dict(model.named_parameters())
    swap = None
    if meta:
        swap = {n: nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for n, p in named.items()}
        swap.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
        param_names = {id(p): n for n, p in swap.items() if isinstance(p, nn.Parameter)}
    else:
        param_names = {id(p): n for n, p in named.items()}
    tr = _Tracer(x.shape[2:], param_names, substitute=substitute, stop_key=stop_key)
    handles = []
    for path, mod in model.named_modules():
        leaf = next(iter(mod.children()), None) is None
        handles.append(mod.register_forward_pre_hook(tr.pre_hook(path, leaf)))
        handles.append(mod.register_forward_hook(tr.post_hook(path)))
    stopped = None
    try:
        with _eval_mode(model):
            tr.add_input(x)
            with tr:
                try:
                    if meta:
                        torch.func.functional_call(model, swap, (x,), strict=False)
                    else:
                        model(x)
                except _Stop as s:
                    stopped = s.value
    finally:
        for h in handles:
            h.remove()
    return tr, stopped


def _trace(model: nn.Module, shape: Sequence[int], *, stop_key: tuple | None = None,
           real_forward: bool = False) -> _Tracer:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    err: Exception | None = None
    if not real_forward:
        try:
            return _run(model, torch.zeros(shape, dtype=dtype, device="meta"), stop_key=stop_key, meta=True)[0]
        except _Unsupported:
            raise
        except Exception as e:   # data-dependent code cannot run on shapes alone: run it for real
            err = e
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    try:
        with torch.no_grad():
            return _run(model, x, stop_key=stop_key)[0]
    except _Unsupported:
        raise
    except Exception as e:
        extra = f" (shape-only run failed first: {err})" if err is not None else ""
        raise ValueError(f"the model's forward failed on an input of shape {tuple(shape)}: "
                         f"{type(e).__name__}: {e}{extra}") from e


def _name_nodes(nodes: list[_Node]) -> None:
    per_call: dict[tuple, int] = {}
    for n in nodes:
        per_call[n.key[:2]] = per_call.get(n.key[:2], 0) + 1
    used: dict[str, int] = {}
    for n in nodes:
        if n.key == ("input",):
            base = "input"
        elif n.leaf and n.module and per_call[n.key[:2]] == 1:
            base = n.module
        else:
            base = f"{n.module}.{n.op}" if n.module else n.op
        k = used.get(base, 0)
        used[base] = k + 1
        n.name = base if k == 0 else f"{base}@{k}"


def _row(n: _Node, nodes: list[_Node]) -> RFRow:
    f = n.state.fields
    ends = tuple(e for e in dict.fromkeys(n.ends) if e != n.name and not (n.leaf and e == n.module))
    return RFRow(
        name=n.name, op=n.desc, out_shape=n.out_shape, params=n.weights + n.biases,
        R=tuple(_num(d.R) for d in f), J=tuple(_num(d.J) for d in f), start=tuple(_num(d.start) for d in f),
        whole=tuple(d.whole for d in f), inputs=tuple(nodes[i].name for i in n.inputs), ends=ends, note=n.note,
        dims=n.state.dims)


def _traced(model: Any, input_shape: Sequence[int], *, stop_key=None, real_forward=False) -> tuple[nn.Module, _Tracer]:
    model = _unwrap(model)
    shape = parse_input_shape(input_shape)
    tr = _trace(model, shape, stop_key=stop_key, real_forward=real_forward)
    _name_nodes(tr.nodes)
    return model, tr


def receptive_fields(model: nn.Module, input_shape: Sequence[int], *, real_forward: bool = False) -> list[RFRow]:
    """Trace `model` on an input of `input_shape` (batch, channels, *spatial) and give every node's field."""
    _, tr = _traced(model, input_shape, real_forward=real_forward)
    return [_row(n, tr.nodes) for n in tr.nodes]


def select_rows(rows: Sequence[RFRow], layers: str | Sequence[str] | None) -> list[RFRow]:
    """Rows whose name, or a module they end, matches one of the comma-separated names or glob patterns."""
    if not layers:
        return list(rows)
    pats = [p.strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if p.strip()]
    keep = [r for r in rows if any(fnmatch.fnmatchcase(c, p) for p in pats for c in (r.name, *r.ends))]
    if not keep:
        names = [c for r in rows for c in (r.name, *r.ends)]
        close = sorted({m for p in pats for m in difflib.get_close_matches(p, names, n=5)})
        raise ValueError(f"no node matches {pats}; close names: {close or names[:10]}")
    return keep


# ------------------------------------------------------------------------------------------- table output
def _fmt_axes(vals: Sequence) -> str:
    return "x".join("-" if v is None else str(v) for v in vals) if vals else "-"


def _fmt_start(vals: Sequence) -> str:
    return "(" + ", ".join(str(v) for v in vals) + ")" if vals else "-"


def _fmt_R(r: RFRow) -> str:
    if r.whole and all(r.whole):
        return _fmt_axes(r.R) + " (whole)"
    if any(r.whole):
        return _fmt_axes(r.R) + f" (whole along axis {', '.join(str(a) for a, w in enumerate(r.whole) if w)})"
    return _fmt_axes(r.R)


def rf_table_markdown(rows: Sequence[RFRow], measurements: Sequence[RFMeasurement] | None = None) -> str:
    """A Markdown table: layer, op, output shape, params, R, J, start (and the measured values when given)."""
    meas = {m.name: m for m in measurements or []}
    notes = any(r.note for r in rows)
    head = ["layer", "op", "output shape", "params", "R", "J", "start"]
    head += ["measured R", "measured J", "measured start", "agrees"] if meas else []
    head += ["note"] if notes else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        name = f"`{r.name}`" + (f" (end of {', '.join(f'`{e}`' for e in r.ends)})" if r.ends else "")
        cells = [name, r.op, "x".join(map(str, r.out_shape)), f"{r.params:,}", _fmt_R(r), _fmt_axes(r.J),
                 _fmt_start(r.start)]
        if meas:
            m = meas.get(r.name)
            cells += [_fmt_axes(m.R), _fmt_axes(m.J), _fmt_start(m.start), "yes" if m.agrees else "**NO**"] \
                if m else ["", "", "", ""]
        if notes:
            cells.append(r.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_rf_table(rows: Sequence[RFRow], folder: str | Path,
                   measurements: Sequence[RFMeasurement] | None = None) -> dict[str, Path]:
    """Write `receptive_field.csv` (one column per axis) and `receptive_field.md` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_ax = max((len(r.R) for r in rows), default=0)
    meas = {m.name: m for m in measurements or []}
    csv_path, md_path = folder / "receptive_field.csv", folder / "receptive_field.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        head = ["name", "op", "out_shape", "params"] + [f"{k}{a}" for k in ("R", "J", "start") for a in range(n_ax)]
        head += ["whole", "ends", "inputs", "note"] + (["measured_R", "measured_J", "agrees"] if meas else [])
        w.writerow(head)
        for r in rows:
            row = [r.name, r.op, "x".join(map(str, r.out_shape)), r.params]
            for vals in (r.R, r.J, r.start):
                row += ["" if v is None else v for v in vals] + [""] * (n_ax - len(vals))
            row += ["x".join("1" if b else "0" for b in r.whole), ";".join(r.ends), ";".join(r.inputs), r.note]
            if meas:
                m = meas.get(r.name)
                row += [_fmt_axes(m.R), _fmt_axes(m.J), m.agrees] if m else ["", "", ""]
            w.writerow(row)
    md_path.write_text(rf_table_markdown(rows, measurements))
    return {"csv": csv_path, "md": md_path}


# -------------------------------------------------------------------------------------- node resolution
def _find(tr: _Tracer, node: str | int | RFRow) -> _Node:
    if isinstance(node, RFRow):
        node = node.name
    if isinstance(node, int):
        if not -len(tr.nodes) <= node < len(tr.nodes):
            raise ValueError(f"node index {node} out of range (0..{len(tr.nodes) - 1})")
        return tr.nodes[node]
    for n in tr.nodes:
        if n.name == node:
            return n
    for n in tr.nodes:   # a module name stands for the node it outputs
        if node in n.ends:
            return n
    names = [n.name for n in tr.nodes] + [e for n in tr.nodes for e in n.ends]
    close = difflib.get_close_matches(str(node), names, n=5)
    raise ValueError(f"no node named {node!r}; close names: {close or names[-5:]}")


def _unit_for(f: _Dim, m: int, n: int, need_pair: bool) -> int | None:
    """Unit nearest the centre whose field (and a neighbour's, if wanted) lies inside 0..n-1."""
    best = None
    for u in range(m):
        ok = f.lo + u * f.J >= 0 and f.hi + u * f.J <= n - 1
        if need_pair and m > 1:
            v = u + 1 if u + 1 < m else u - 1
            ok = ok and f.lo + v * f.J >= 0 and f.hi + v * f.J <= n - 1
        if ok:
            dist = abs(f.start + u * f.J - (n - 1) / 2)
            if best is None or dist < best[0]:
                best = (dist, u)
    return None if best is None else best[1]


def _positional(n: _Node) -> list[int]:
    return [ax for ax, (d, f) in enumerate(zip(n.state.dims, n.state.fields)) if d is not None and not f.whole]


# --------------------------------------------------------------------------------------- the measurement
def measure_receptive_field(model: nn.Module, node: str | int | RFRow, input_shape: Sequence[int], *,
                            max_size: int = 4096) -> RFMeasurement:
    """Measure a node's field from the non-zero input gradient of one unit near the centre (and its neighbour)."""
    t0 = time.perf_counter()
    model, tr = _traced(model, input_shape)
    target = _find(tr, node)
    key, name = target.key, target.name
    if key == ("input",):
        raise ValueError("node 'input' is the image itself (R = 1, J = 1, start = 0); pick a layer to measure")
    shape = [1, *parse_input_shape(input_shape)[1:]]
    units: dict[int, int] = {}
    for _ in range(12):
        tr = _trace(model, shape, stop_key=key)
        _name_nodes(tr.nodes)
        n = tr.nodes[-1]
        if n.key != key:
            raise ValueError(f"node {name!r} was not reached at input shape {tuple(shape)}")
        grow = False
        units = {}
        for ax in _positional(n):
            f, m, size = n.state.fields[ax], n.out_shape[n.state.dims[ax]], shape[2 + ax]
            u = _unit_for(f, m, size, need_pair=True)
            if u is None:
                u0 = math.ceil(max(0.0, -f.lo) / f.J)
                shape[2 + ax] = max(size + 1, math.ceil(f.hi + (u0 + 2) * f.J + 1 + f.J))
                grow = True
            else:
                units[ax] = u
        if not grow:
            break
        if max(shape[2:]) > max_size:
            raise ValueError(f"node {name!r} needs an input larger than max_size={max_size} to hold its field")
    else:
        raise ValueError(f"could not find an input size where node {name!r} has a unit with an unclipped field")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.ones(shape, dtype=torch.float64, device=device, requires_grad=True)
    _, out = _run(model, x, substitute=True, stop_key=key)
    if out is None:
        raise ValueError(f"node {name!r} was not reached in the measurement run")
    n_ax = len(shape) - 2
    dims = n.state.dims

    def box_for(unit_of: dict[int, int]) -> list[tuple[int, int] | None]:
        idx: list[Any] = [slice(None)] * out.ndim
        for ax, u in unit_of.items():
            idx[dims[ax]] = u
        g, = torch.autograd.grad(out[tuple(idx)].sum(), x, retain_graph=True)
        mask = (g[0] != 0).any(dim=0) if g.ndim > 2 else (g[0] != 0)
        boxes: list[tuple[int, int] | None] = []
        for ax in range(n_ax):
            other = tuple(a for a in range(n_ax) if a != ax)
            line = mask.any(dim=other) if other else mask
            nz = torch.nonzero(line).flatten()
            boxes.append((int(nz.min()), int(nz.max())) if nz.numel() else None)
        return boxes

    b1 = box_for(units)
    # the neighbour along every axis that has one: the shift of its field is the jump
    units2 = {ax: (u + 1 if u + 1 < n.out_shape[dims[ax]] else u - 1) if n.out_shape[dims[ax]] > 1 else u
              for ax, u in units.items()}
    b2 = box_for(units2) if units2 != units else None
    R, J, start = [], [], []
    for ax in range(n_ax):
        if b1[ax] is None:
            R.append(0)
            J.append(None)
            start.append(float("nan"))
            continue
        lo, hi = b1[ax]
        R.append(hi - lo + 1)
        if ax in units and b2 is not None and b2[ax] is not None and units2[ax] != units[ax]:
            j = (b2[ax][0] - lo) / (units2[ax] - units[ax])
            J.append(_num(j))
            start.append(_num((lo + hi) / 2 - units[ax] * j))
        elif ax in units:   # a single position: no neighbour to measure the jump with
            J.append(None)
            start.append(_num((lo + hi) / 2 - units[ax] * n.state.fields[ax].J))
        else:
            J.append(None)
            start.append(_num((lo + hi) / 2))
    fa = n.state.fields
    Ra, Ja, Sa = tuple(_num(f.R) for f in fa), tuple(_num(f.J) for f in fa), tuple(_num(f.start) for f in fa)
    # J is compared where a neighbour could be measured (None on whole axes and single-position axes)
    agrees = all(abs(r - ra) < 1e-6 for r, ra in zip(R, Ra)) and \
        all(abs(s - sa) < 1e-6 for s, sa in zip(start, Sa)) and \
        all(j is None or (ja is not None and abs(j - ja) < 1e-6) for j, ja in zip(J, Ja))
    return RFMeasurement(name=name, input_shape=tuple(shape),
                         unit=tuple(units.get(ax) for ax in range(n_ax)),
                         R=tuple(_num(v) for v in R), J=tuple(J), start=tuple(start),
                         R_analytic=Ra, J_analytic=Ja, start_analytic=Sa, agrees=bool(agrees),
                         seconds=round(time.perf_counter() - t0, 3))


# ----------------------------------------------------------------------------------- effective field
def effective_receptive_field(model: nn.Module, node: str | int | RFRow, input_shape: Sequence[int], *,
                              n_samples: int = 8, seed: int = 0, inputs: torch.Tensor | None = None,
                              masses: Sequence[float] = (0.5, 0.9)) -> ERFResult:
    """Mean |gradient| of the centre unit of `node` w.r.t. the input, for the model as it is (Luo et al., 2016)."""
    model, tr = _traced(model, input_shape)
    target = _find(tr, node)
    shape = parse_input_shape(input_shape)
    n_ax = len(shape) - 2
    if n_ax == 0:
        raise ValueError("the input has no spatial dims; an effective receptive field needs at least one")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if inputs is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn((n_samples, *shape[1:]), generator=gen, dtype=dtype)
    else:
        x = inputs.detach().to(dtype)
        if tuple(x.shape[1:]) != tuple(shape[1:]):
            raise ValueError(f"inputs have shape {tuple(x.shape)}, expected (N, {', '.join(map(str, shape[1:]))})")
    x = x.to(device).requires_grad_(True)
    _, out = _run(model, x, stop_key=target.key)
    if out is None:
        raise ValueError(f"node {target.name!r} was not reached")
    dims, fields = target.state.dims, target.state.fields
    unit: dict[int, int] = {}
    idx: list[Any] = [slice(None)] * out.ndim
    for ax in _positional(target):
        f, m = fields[ax], out.shape[dims[ax]]
        u = int(min(max(round(((shape[2 + ax] - 1) / 2 - f.start) / f.J), 0), m - 1))
        unit[ax] = u
        idx[dims[ax]] = u
    g, = torch.autograd.grad(out[tuple(idx)].sum(), x)
    gmap = g.detach().abs().double().sum(dim=1).mean(dim=0).cpu().numpy()
    box = []
    inside = np.ones_like(gmap, dtype=bool)
    for ax in range(n_ax):
        f = fields[ax]
        shift = unit.get(ax, 0) * (f.J or 0)
        lo, hi = max(0, math.ceil(f.lo + shift)), min(shape[2 + ax] - 1, math.floor(f.hi + shift))
        box.append((_num(f.lo + shift), _num(f.hi + shift)))
        keep = np.zeros(shape[2 + ax], dtype=bool)
        keep[lo:hi + 1] = True
        inside &= keep.reshape([-1 if a == ax else 1 for a in range(n_ax)])
    total = float(gmap.sum())
    n_inside = int(inside.sum())
    if total <= 0:
        return ERFResult(target.name, tuple(shape), tuple(unit.get(a) for a in range(n_ax)), gmap, tuple(box),
                         n_inside, 0.0, {q: float("nan") for q in masses})
    flat = np.sort(gmap.ravel())[::-1]
    cum = np.cumsum(flat) / total
    fractions = {q: float((np.searchsorted(cum, q) + 1) / max(n_inside, 1)) for q in masses}
    return ERFResult(target.name, tuple(shape), tuple(unit.get(a) for a in range(n_ax)), gmap, tuple(box),
                     n_inside, float(gmap[inside].sum() / total), fractions)


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
    else:
        arr = np.asarray(img)
    h, w = arr.shape[:2]
    if unit is None:
        unit = []
        for ax, n in enumerate((h, w)):
            j, d = row.J[ax], row.dims[ax] if row.dims else None
            m = row.out_shape[d] if d is not None else 1
            unit.append(0 if j is None else int(min(max(round(((n - 1) / 2 - row.start[ax]) / j), 0), m - 1)))
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
    ax.set_title(f"{row.name}: unit {tuple(unit)}, R={_fmt_axes(row.R)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------ layer report
def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def layer_report(module_or_model: nn.Module, input_shape: Sequence[int], *,
                 warn_bytes: int = 512 * 2**20) -> list[LayerInfo]:
    """Per node: output shape, weights with / without bias, activation count and bytes (shapes only, no memory)."""
    _, tr = _traced(module_or_model, input_shape)
    infos = []
    for n in tr.nodes:
        acts = math.prod(n.out_shape)
        info = LayerInfo(n.name, n.desc, n.out_shape, n.weights + n.biases, n.weights, n.biases, acts,
                         acts * n.itemsize)
        infos.append(info)
        if info.bytes > warn_bytes:
            warnings.warn(f"{n.name}: activation {'x'.join(map(str, n.out_shape))} holds {acts:,} values "
                          f"= {_human(info.bytes)} for one forward (more again for its gradient); "
                          f"reduce the batch, the volume size or the channels", LargeActivationWarning, stacklevel=2)
    return infos


def layer_report_markdown(infos: Sequence[LayerInfo]) -> str:
    """A Markdown table of a `layer_report`, with totals."""
    lines = ["| layer | op | output shape | weights (no bias) | params (with bias) | activations | memory |",
             "|---|---|---|---|---|---|---|"]
    for i in infos:
        lines.append(f"| `{i.name}` | {i.op} | {'x'.join(map(str, i.out_shape))} | {i.weights:,} | {i.params:,} | "
                     f"{i.activations:,} | {_human(i.bytes)} |")
    lines.append(f"| **total** | | | {sum(i.weights for i in infos):,} | {sum(i.params for i in infos):,} | "
                 f"{sum(i.activations for i in infos):,} | {_human(sum(i.bytes for i in infos))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- models by name, the run
def model_from_name(arch: str) -> nn.Module:
    """Build an untrained model by name: package model, then torchvision, then timm (never downloads weights).

    A prefix picks the registry when a name exists in several: 'timm:resnet50', 'torchvision:resnet50'.
    """
    import timm
    import torchvision

    from .models import MODELS, check_name, create_model

    source, _, name = arch.rpartition(":")
    if source not in ("", "package", "torchvision", "timm"):
        raise ValueError(f"unknown registry prefix {source!r} in {arch!r}: use package:, torchvision: or timm:")
    if source in ("", "package") and name in MODELS:
        return create_model(name)
    tv_names = torchvision.models.list_models()
    if source in ("", "torchvision") and name in tv_names:
        return torchvision.models.get_model(name, weights=None)
    timm_names = timm.list_models()
    if source in ("", "timm") and name in timm_names:
        return timm.create_model(name, pretrained=False)
    known = {"": [*MODELS, *tv_names, *timm_names], "package": list(MODELS), "torchvision": tv_names,
             "timm": timm_names}[source]
    check_name(name, sorted(set(known)), f"{source or 'package, torchvision or timm'} architecture")
    raise AssertionError("unreachable")


def default_input_shape(arch: str, model: nn.Module | None = None) -> tuple[int, ...]:
    """A sensible input shape for `arch`: MNIST size for package models, the timm default or 3x224x224."""
    from .models import MODELS

    if arch.removeprefix("package:") in MODELS:
        return (1, 1, 28, 28)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return (1, *size) if size else (1, 3, 224, 224)


def _load_weights(model: nn.Module, weights: str | Path) -> None:
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{weights} does not hold a state dict")
    result = model.load_state_dict(state, strict=False)
    if len(result.missing_keys) == len(model.state_dict()):
        raise ValueError(f"no tensor of {weights} matches the model's parameter names")


def receptive_field_run(arch: str | nn.Module, input_shape: str | Sequence[int] | None = None, *,
                        layers: str | None = None, verify: bool = False, erf: bool = False,
                        image: str | Path | None = None, node: str | None = None, weights: str | Path | None = None,
                        out: str | Path | None = None, overwrite: bool = False, seed: int = 42,
                        log: Callable[[str], None] = print) -> dict:
    """Trace a model, optionally measure / map / draw; write table, figures, config.json and summary.json."""
    from .device import env_info
    from .runs import new_run_dir, write_json

    t0 = time.perf_counter()
    torch.manual_seed(seed)   # the random initialisation (and so the effective field) is reproducible
    if isinstance(arch, nn.Module):
        model, arch_name = arch, type(arch).__name__
    else:
        model, arch_name = model_from_name(arch), arch
    if weights:
        _load_weights(model, weights)
    if image and not Path(image).is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    shape = parse_input_shape(input_shape) if input_shape else default_input_shape(arch_name, model)
    rows = receptive_fields(model, shape)
    shown = select_rows(rows, layers)
    if node is not None:
        focus = next((r for r in rows if r.name == node or node in r.ends), None)
        if focus is None:
            select_rows(rows, [node])   # raises with close names
            raise ValueError(f"no node named {node!r}")
    else:
        spatial = [r for r in shown if r.R and not all(r.whole)]
        focus = spatial[-1] if spatial else shown[-1]
    run = new_run_dir(out or Path("runs") / f"receptive_field-{arch_name.replace(':', '-')}", overwrite)
    config = dict(arch=arch_name, input_shape=list(shape), layers=layers, verify=verify, erf=erf, seed=seed,
                  image=str(image) if image else None, node=focus.name, weights=str(weights) if weights else None,
                  env=env_info(torch.device("cpu")))
    write_json(run / "config.json", config)
    measurements: list[RFMeasurement] = []
    if verify:
        for r in shown:
            if r.name != "input" and r.R:
                measurements.append(measure_receptive_field(model, r.name, shape))
                m = measurements[-1]
                log(f"measured {m.name}: R {_fmt_axes(m.R)} (analytic {_fmt_axes(m.R_analytic)}), "
                    f"J {_fmt_axes(m.J)}, start {_fmt_start(m.start)} at input {_fmt_axes(m.input_shape[2:])}"
                    f"{'' if m.agrees else '  << DISAGREES'} ({m.seconds:.1f}s)")
    files = {k: str(v) for k, v in write_rf_table(shown, run, measurements).items()}
    summary: dict[str, Any] = dict(
        run_dir=str(run), arch=arch_name, input_shape=list(shape), nodes=len(rows), shown=len(shown),
        output=dict(name=rows[-1].name, R=list(rows[-1].R), whole=list(rows[-1].whole)),
        device=config["env"]["device_name"], files=files)
    if verify:
        summary["measurements"] = [asdict(m) for m in measurements]
        summary["all_agree"] = all(m.agrees for m in measurements)
    if erf:
        e = effective_receptive_field(model, focus.name, shape)
        summary["erf"] = e.summary()
        files["erf"] = str(plot_erf(e, run / "erf.png"))
        log(f"effective field of {e.name}: {e.mass_inside:.1%} of the gradient mass inside the theoretical field; "
            + ", ".join(f"{q:.0%} of the mass in {v:.1%} of its area" for q, v in e.area_fraction.items()))
    if image:
        files["rf_box"] = str(plot_rf_box(image, focus, run / "rf_box.png", size=shape[2:]))
        summary["rf_box_node"] = focus.name
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(run / "summary.json", summary)
    log("\n" + rf_table_markdown(shown, measurements) + f"\nrun folder: {run}")
    return summary
