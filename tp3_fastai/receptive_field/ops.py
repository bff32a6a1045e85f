"""Which torch ops the tracer knows, how to read their arguments, and the new field after each one."""
from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence

import torch

from .geometry import Dim, State, Unsupported, clip, collapse, conv_dim, merge, shift, union
from .shape_ops import along_dim, getitem, norm_dim, permutation, reduce, reshape



class Traced(Protocol):
    """What the rules below read of the tracer (trace.Tracer): the input's spatial sizes, the nodes so far (each
    with its field `state`) and the node of a tensor."""
    sizes: tuple[int, ...]
    nodes: list[Any]

    def lookup(self, t: torch.Tensor) -> int | None: ...

CONV = {"conv1d", "conv2d", "conv3d"}
MAXPOOL = {f"max_pool{k}d{w}" for k in (1, 2, 3) for w in ("", "_with_indices")}
AVGPOOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}
LPPOOL = {"lp_pool1d", "lp_pool2d", "lp_pool3d"}
ADAPTIVE = {f"adaptive_{t}_pool{k}d{w}" for t in ("avg", "max") for k in (1, 2, 3) for w in ("", "_with_indices")}
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}
PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "nanmean",
          "nansum", "median", "std_mean", "var_mean"}
ALONG_DIM = {"softmax", "log_softmax", "softmin", "cumsum", "cumprod", "logcumsumexp", "flip", "roll", "normalize"}
MIX_ALL = {"matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "addbmm", "tensordot", "outer", "bilinear",
           "scaled_dot_product_attention", "multi_head_attention_forward"}
NO_MAP = {"interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "affine_grid",
          "pixel_shuffle", "pixel_unshuffle", "unfold", "fold", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "fractional_max_pool2d", "fractional_max_pool3d", "max_unpool1d", "max_unpool2d",
          "max_unpool3d", "upsample_nearest2d", "upsample_bilinear2d"}
UNTRACKED = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "size", "dim", "numel"}
NORMS = {"batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "rms_norm"}
ACTS = {"relu", "relu6", "hardtanh", "hardsigmoid", "hardswish", "gelu", "silu", "sigmoid", "tanh", "elu", "selu",
        "celu", "leaky_relu", "prelu", "rrelu", "softplus", "mish", "threshold", "logsigmoid", "softsign",
        "tanhshrink", "glu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
        "feature_alpha_dropout"}
_ARITH = {"add", "sub", "mul", "div", "truediv", "floordiv", "matmul", "pow", "mod", "and", "or", "xor"}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def op_name(func: Callable) -> str:
    """`torch.add`, `Tensor.__iadd__`, `Tensor.__radd__` -> 'add'; in-place names keep their '_' (see base_op)."""
    name = getattr(func, "__name__", None) or str(func)
    name = name.strip("_")
    if name[:1] in ("i", "r") and name[1:] in _ARITH:
        name = name[1:]
    return name


def base_op(name: str) -> str:
    """'relu_' -> 'relu': in-place ops map the field like their out-of-place twin."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def bind(args: Sequence, kwargs: dict, names: Sequence[str], defaults: dict) -> dict:
    """Positional and keyword arguments of a call by parameter name."""
    out = dict(defaults)
    out.update(zip(names, args))
    out.update({k: v for k, v in kwargs.items() if k in names})
    return out


def tup(v: Any, k: int, default: int | tuple | None = None) -> tuple:
    """An int or sequence argument as a k-tuple (`default` when missing or empty)."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple, torch.Size)):
        v = tuple(int(x) if x is not None else None for x in v)
        return v * k if len(v) == 1 else v
    return (int(v),) * k if v is not None else (None,) * k


def rank(op: str) -> int:
    """Number of spatial dims of a conv or pool op ('max_pool2d_with_indices' -> 2)."""
    return int(op.split("_pool")[-1][0]) if "pool" in op else int(op[-2])


def window(op: str, args: Sequence, kwargs: dict) -> tuple[dict, tuple, tuple, tuple, tuple]:
    """Bound arguments, kernel, stride, padding and dilation of a conv, max / avg / lp pool call."""
    k_sp = rank(op)
    if op in CONV:
        a = bind(args, kwargs, _CONV_ARGS, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        k = tuple(int(v) for v in a["weight"].shape[-k_sp:])
        s, dil = tup(a["stride"], k_sp), tup(a["dilation"], k_sp)
        if isinstance(a["padding"], str):   # 'same' pads d(k-1)//2 on the left, the rest on the right
            pad = (0,) * k_sp if a["padding"] == "valid" else tuple(di * (kk - 1) // 2 for kk, di in zip(k, dil))
        else:
            pad = tup(a["padding"], k_sp)
        return a, k, s, pad, dil
    if op in LPPOOL:
        names = ("input", "norm_type", "kernel_size", "stride", "ceil_mode")
    elif op in MAXPOOL:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    else:
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode")
    a = bind(args, kwargs, names, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False})
    k = tup(a["kernel_size"], k_sp)
    return a, k, tup(a["stride"], k_sp, k), tup(a["padding"], k_sp), tup(a["dilation"], k_sp)


def _describe(op: str, k: tuple, s: tuple, p: tuple, dil: tuple) -> str:
    text = f"{op} {'x'.join(map(str, k))}"
    if any(v != 1 for v in s):
        text += "/" + "x".join(map(str, s)) if len(set(s)) > 1 else f"/{s[0]}"
    if any(v != 0 for v in p):
        text += " p" + ("x".join(map(str, p)) if len(set(p)) > 1 else str(p[0]))
    if any(v != 1 for v in dil):
        text += " d" + ("x".join(map(str, dil)) if len(set(dil)) > 1 else str(dil[0]))
    return text


def propagate(op: str, args: Sequence, kwargs: dict, outs: list[torch.Tensor], tracked: list[int],
              tr: Traced) -> tuple[list[State], str, str]:
    """New state(s) for the output(s) of one op; returns (states, description, note)."""
    main_t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input", kwargs.get("self"))
    main_idx = tr.lookup(main_t) if isinstance(main_t, torch.Tensor) else None
    main = tr.nodes[main_idx].state if main_idx is not None else None
    if op in NO_MAP and main is not None and any(d is not None for d in main.dims):
        raise Unsupported("it resamples the spatial grid (upsampling, transposed conv, unfold, shuffle, "
                          "grid sampling); the recurrence R/J/start does not describe it")
    if op in NO_MAP or main is None:
        return elementwise(outs, tracked, tr)[0], op, ""
    x, out, n = main_t, outs[0], len(outs)
    if op in CONV | MAXPOOL | AVGPOOL | LPPOOL:
        _, k, s, pad, dil = window(op, args, kwargs)
        return [_window_state(op, main, x, out, k, s, pad, dil)] * n, \
            _describe(op.replace("_with_indices", ""), k, s, pad, dil), ""
    if op in ADAPTIVE:
        return _adaptive(op, main, x, args, kwargs, n)
    if op == "pad":
        a = bind(args, kwargs, ("input", "pad", "mode", "value"), {})
        p = list(a["pad"])
        fields = list(main.fields)
        for j in range(len(p) // 2):   # F.pad lists (left, right) pairs from the last dim backwards
            for ax, dd in enumerate(main.dims):
                if dd == x.ndim - 1 - j:
                    fields[ax] = shift(fields[ax], -p[2 * j])
        return [State(main.dims, tuple(fields))], "pad " + str(tuple(p)), ""
    if op == "getitem":
        return [getitem(main, x, args[1])], "getitem", ""
    if op == "narrow":
        a = bind(args, kwargs, ("input", "dim", "start", "length"), {})
        d = norm_dim(int(a["dim"]), x.ndim)
        st = int(a["start"]) + (x.shape[d] if int(a["start"]) < 0 else 0)
        fields = tuple(shift(f, st, 1, (st, st + out.shape[d] - 1)) if dd == d else f
                       for f, dd in zip(main.fields, main.dims))
        return [State(main.dims, fields)], "narrow", ""
    if op in RESHAPE:
        return [reshape(main, x, out)], op, ""
    if op in PERMUTE:
        perm = permutation(op, args, kwargs, x.ndim)
        return [State(tuple(None if d is None else perm.index(d) for d in main.dims), main.fields)], op, ""
    if op == "linear":
        return [_fold_axes(main, x, {x.ndim - 1})], "linear", ""
    if op in REDUCE and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
        return [reduce(op, main, x, args, kwargs, out)] * n, op, ""
    if op in ALONG_DIM:
        return [along_dim(op, main, x, args, kwargs)] * n, op, ""
    if op in MIX_ALL:
        return [_mix_all(tracked, tr)] * n, op, "mixes positions: every output sees the union of all inputs"
    if op in ("cat", "concat", "concatenate", "stack"):
        st, note = _cat(op, args, kwargs, tr)
        return [st], op, note
    states, note = elementwise(outs, tracked, tr)
    return states, op, note


def _fold_axes(main: State, x: torch.Tensor, dims: set[int]) -> State:
    """The axes at tensor dims `dims` get mixed entirely and stop being positional (linear, conv channels)."""
    new_dims, fields = list(main.dims), list(main.fields)
    for ax, d in enumerate(main.dims):
        if d in dims:
            fields[ax] = collapse(fields[ax], x.shape[d])
            new_dims[ax] = None
    return State(tuple(new_dims), tuple(fields))


def _window_state(op: str, main: State, x: torch.Tensor, out: torch.Tensor, k: tuple, s: tuple, pad: tuple,
                  dil: tuple) -> State:
    first = x.ndim - rank(op)
    if op in CONV:   # an axis folded into the channels gets mixed entirely by the convolution
        main = _fold_axes(main, x, {first - 1})
    fields = list(main.fields)
    for ax, d in enumerate(main.dims):
        if d is not None and d >= first:
            i = d - first
            fields[ax] = conv_dim(fields[ax], k[i], s[i], pad[i], dil[i], x.shape[d], out.shape[d])
    return State(main.dims, tuple(fields))


def _adaptive(op: str, main: State, x: torch.Tensor, args: Sequence, kwargs: dict,
              n: int) -> tuple[list[State], str, str]:
    k_sp = rank(op)
    osz = tup(bind(args, kwargs, ("input", "output_size"), {})["output_size"], k_sp)
    first = x.ndim - k_sp
    fields, notes = list(main.fields), []
    for ax, d in enumerate(main.dims):
        if d is None or d < first:
            continue
        n_in = x.shape[d]
        o = osz[d - first] if osz[d - first] is not None else n_in
        f = fields[ax]
        if o == 1:   # a global pool, even over a single position
            fields[ax] = collapse(f, n_in)
        elif o == n_in:
            continue
        elif n_in % o == 0:
            fields[ax] = conv_dim(f, n_in // o, n_in // o, 0, 1, n_in, o)
        elif not f.whole:
            fields[ax] = Dim(f.lo, f.hi + (math.ceil(n_in / o) - 1) * f.J, f.J * n_in / o, False, f.elo, f.ehi)
            notes.append(f"adaptive pool {n_in}->{o} has uneven windows: J is an average")
    desc = f"{op.replace('_with_indices', '')} ->{'x'.join(str(v) for v in osz)}"
    return [State(main.dims, tuple(fields))] * n, desc, "; ".join(notes)


def _mix_all(tracked: list[int], tr: Traced) -> State:
    fields = []
    for ax in range(len(tr.sizes)):
        f = None
        for i in tracked:
            st, shp = tr.nodes[i].state, tr.nodes[i].out_shape
            d = st.dims[ax]
            g = collapse(st.fields[ax], 1 if d is None else shp[d])
            f = g if f is None else union(f, g)[0]
        fields.append(f)
    return State((None,) * len(tr.sizes), tuple(fields))


def _cat(op: str, args: Sequence, kwargs: dict, tr: Traced) -> tuple[State, str]:
    a = bind(args, kwargs, ("tensors", "dim"), {"dim": 0})
    ts = list(a["tensors"])
    d = norm_dim(int(a["dim"]), ts[0].ndim + (1 if op == "stack" else 0))
    states = [tr.nodes[tr.lookup(t)].state for t in ts if tr.lookup(t) is not None]
    if op == "stack":
        return merge(states, [lambda dd: dd if dd < d else dd + 1] * len(states), len(tr.sizes))
    if any(d in st.dims for st in states):
        raise Unsupported(f"concatenation along spatial dim {d} joins different positions")
    return merge(states, [lambda dd: dd] * len(states), len(tr.sizes))


def elementwise(outs: list[torch.Tensor], tracked: list[int], tr: Traced) -> tuple[list[State], str]:
    """Elementwise / broadcasting ops: inputs align from the right, fields are united (note: the first output's)."""
    results = [_broadcast(out, tracked, tr) for out in outs]
    return [st for st, _ in results], results[0][1]


def _broadcast(out: torch.Tensor, tracked: list[int], tr: Traced) -> tuple[State, str]:
    states, to_out = [], []
    for i in tracked:
        node = tr.nodes[i]
        st, shape = node.state, node.out_shape
        off = out.ndim - len(shape)
        for ax, d in enumerate(st.dims):
            if d is None:
                continue
            od = d + off
            if od < 0 or od >= out.ndim or (out.shape[od] != shape[d] and shape[d] != 1):
                raise Unsupported(f"it changes spatial dim {d} from {tuple(shape)} to {tuple(out.shape)} "
                                  f"and the tool does not know how positions map")
            if shape[d] == 1 and out.shape[od] != 1 and not st.fields[ax].whole:
                # one position broadcast over many: every output unit sees that same field
                st = State(st.dims, tuple(clip(f) if a == ax else f for a, f in enumerate(st.fields)))
        states.append(st)
        to_out.append(lambda dd, off=off: dd + off)
    return merge(states, to_out, len(tr.sizes))
