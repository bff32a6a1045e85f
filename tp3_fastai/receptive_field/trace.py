"""Following a model's forward: module hooks for names, a TorchFunctionMode for every op, one RFRow per node."""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.checks import check_names
from .geometry import Dim, State, Unsupported, num
from .ops import UNTRACKED, base_op, op_name, propagate


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
            offset = 0 if j is None else u * j
            out.append((num(s - (r - 1) / 2 + offset), num(s + (r - 1) / 2 + offset)))
        return tuple(out)


@dataclass
class Node:
    """One recorded op output: where it ran, what it is, its field state, inputs and weights."""
    index: int
    key: tuple
    module: str
    op: str
    desc: str
    out_shape: tuple[int, ...]
    itemsize: int
    state: State
    inputs: list[int]
    weights: int
    biases: int
    leaf: bool
    ends: list[str] = field(default_factory=list)
    note: str = ""
    name: str = ""


class _Stop(BaseException):
    # BaseException so that a model's own `except Exception` cannot swallow the early stop
    def __init__(self, value: Any):
        super().__init__("stop")
        self.value = value


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    return []


class Tracer(TorchFunctionMode):
    """Records every torch op that consumes a tracked tensor and propagates the field through it."""

    def __init__(self, sizes: Sequence[int], param_names: dict[int, str], *, replace: Callable | None = None,
                 stop_key: tuple | None = None):
        super().__init__()
        self.sizes = tuple(sizes)
        self.param_names = param_names
        self.replace = replace   # replace(op, func, args, kwargs) runs an op in place of func (the measurement)
        self.stop_key = stop_key
        self.nodes: list[Node] = []
        self.live: dict[int, tuple[torch.Tensor, int]] = {}
        self.stack: list[tuple[str, bool, int, list[int]]] = [("", False, 0, [0])]
        self.calls: dict[str, int] = {}

    def pre_hook(self, path: str, leaf: bool) -> Callable:
        """Forward pre-hook that names the ops run inside module `path`."""
        def hook(module, args):
            self.calls[path] = self.calls.get(path, 0) + 1
            self.stack.append((path, leaf, self.calls[path], [0]))
        return hook

    def post_hook(self, path: str) -> Callable:
        """Forward hook that marks the node a module returns as the end of that module."""
        def hook(module, args, output):
            if self.stack and self.stack[-1][0] == path:
                self.stack.pop()
            first = _tensors_in(output)[:1]
            if any(t is o for t in _tensors_in(list(args)) for o in first):
                return   # a pass-through (nn.Identity) ends nothing of interest
            for t in first:
                idx = self.lookup(t)
                if idx is not None and path:
                    self.nodes[idx].ends.append(path)
        return hook

    def lookup(self, t: torch.Tensor) -> int | None:
        """Index of the node that produced `t` (None for an untracked tensor)."""
        hit = self.live.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def add_input(self, x: torch.Tensor) -> None:
        """The input node: R = 1, J = 1, start = 0 along every spatial axis."""
        n = len(self.sizes)
        fields = tuple(Dim(0, 0, 1, False, 0, m - 1) for m in x.shape[x.ndim - n:])
        state = State(tuple(range(x.ndim - n, x.ndim)), fields)
        self._add_node(("input",), "", "input", "input", x, state, [], 0, 0, False)

    def _add_node(self, key, module, op, desc, out, state, inputs, weights, biases, leaf, note="") -> Node:
        node = Node(len(self.nodes), key, module, op, desc, tuple(out.shape), out.element_size(), state,
                    inputs, weights, biases, leaf, note=note)
        self.nodes.append(node)
        self.live[id(out)] = (out, node.index)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = op_name(func)
        base = base_op(op)
        in_tensors = _tensors_in(list(args)) + _tensors_in(list(kwargs.values()))
        tracked = list(dict.fromkeys(i for i in map(self.lookup, in_tensors) if i is not None))
        if self.replace is not None and tracked:
            out = self.replace(base, func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if not tracked or op in UNTRACKED:
            return out
        outs = [t for t in _tensors_in(out) if t.is_floating_point() or t.is_complex()]
        if not outs:
            return out
        path, leaf, call, counter = self.stack[-1]
        key = (path, call, counter[0])
        counter[0] += 1
        weights = biases = 0
        seen = set()
        for t in in_tensors:
            if not isinstance(t, nn.Parameter) or id(t) in seen:
                continue
            seen.add(id(t))
            if self.param_names.get(id(t), "").rsplit(".", 1)[-1] == "bias":
                biases += t.numel()
            else:
                weights += t.numel()
        try:
            states, desc, note = propagate(base, args, kwargs, outs, tracked, self)
        except Unsupported as e:
            where = f"node in module '{path}'" if path else "node at the model's top level"
            raise Unsupported(f"cannot map the receptive field through op '{op}' ({where}): {e}") from None
        for o, st in zip(outs, states):
            self._add_node(key, path, base, desc, o, st, tracked, weights, biases, leaf, note)
        if self.stop_key is not None and key == self.stop_key:
            raise _Stop(outs[0])
        return out


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


def dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and the device of a model's parameters (float32 / CPU when it has none)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return dtype, next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def run_model(model: nn.Module, x: torch.Tensor, *, replace: Callable | None = None, stop_key: tuple | None = None,
              meta: bool = False) -> tuple[Tracer, Any]:
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
    tr = Tracer(x.shape[2:], param_names, replace=replace, stop_key=stop_key)
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


def _trace(model: nn.Module, shape: tuple[int, ...], stop_key: tuple | None, real_forward: bool) -> Tracer:
    dtype, device = dtype_device(model)
    err: Exception | None = None
    if not real_forward:
        try:
            return run_model(model, torch.zeros(shape, dtype=dtype, device="meta"), stop_key=stop_key, meta=True)[0]
        except Unsupported:
            raise
        except Exception as e:   # data-dependent code cannot run on shapes alone: run it for real
            err = e
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    try:
        with torch.no_grad():
            return run_model(model, x, stop_key=stop_key)[0]
    except Unsupported:
        raise
    except Exception as e:
        extra = f" (shape-only run failed first: {err})" if err is not None else ""
        raise ValueError(f"the model's forward failed on an input of shape {tuple(shape)}: "
                         f"{type(e).__name__}: {e}{extra}") from e


def _name_nodes(nodes: list[Node]) -> None:
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


def traced(model: Any, input_shape: Sequence[int], *, stop_key: tuple | None = None,
           real_forward: bool = False) -> tuple[nn.Module, Tracer]:
    """The model (unwrapped from a Learner) and its named trace on an input of `input_shape`."""
    model = _unwrap(model)
    tr = _trace(model, parse_input_shape(input_shape), stop_key, real_forward)
    _name_nodes(tr.nodes)
    return model, tr


def rf_row(n: Node, nodes: list[Node]) -> RFRow:
    f = n.state.fields
    ends = tuple(e for e in dict.fromkeys(n.ends) if e != n.name and not (n.leaf and e == n.module))
    return RFRow(
        name=n.name, op=n.desc, out_shape=n.out_shape, params=n.weights + n.biases,
        R=tuple(num(d.R) for d in f), J=tuple(num(d.J) for d in f), start=tuple(num(d.start) for d in f),
        whole=tuple(d.whole for d in f), inputs=tuple(nodes[i].name for i in n.inputs), ends=ends, note=n.note,
        dims=n.state.dims)


def receptive_fields(model: nn.Module, input_shape: Sequence[int], *, real_forward: bool = False) -> list[RFRow]:
    """Trace `model` on an input of `input_shape` (batch, channels, *spatial) and give every node's field."""
    _, tr = traced(model, input_shape, real_forward=real_forward)
    return [rf_row(n, tr.nodes) for n in tr.nodes]


def select_rows(rows: Sequence[RFRow], layers: str | Sequence[str] | None) -> list[RFRow]:
    """Rows whose name, or a module they end, matches one of the comma-separated names or glob patterns."""
    if not layers:
        return list(rows)
    pats = [p.strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if p.strip()]
    names = list(dict.fromkeys(c for r in rows for c in (r.name, *r.ends)))
    unmatched = [p for p in pats if not any(fnmatch.fnmatchcase(c, p) for c in names)]
    if unmatched:  # every name or pattern must show something: none is dropped silently
        check_names(unmatched, names, "node or module name",
                    hint=f"{len(names)} names: leave out --layers (layers=None) to see every node.")
    return [r for r in rows if any(fnmatch.fnmatchcase(c, p) for p in pats for c in (r.name, *r.ends))]


def find_node(nodes: Sequence[Any], node: str | int | RFRow) -> Any:
    """The node (or row) named `node`, else the one that ends the module `node`; an int is an index."""
    if isinstance(node, RFRow):
        node = node.name
    if isinstance(node, int):
        if not -len(nodes) <= node < len(nodes):
            raise ValueError(f"node index {node} out of range (0..{len(nodes) - 1})")
        return nodes[node]
    for n in nodes:
        if n.name == node:
            return n
    for n in nodes:
        if node in n.ends:
            return n
    names = [n.name for n in nodes] + [e for n in nodes for e in n.ends]
    close = difflib.get_close_matches(str(node), names, n=5)
    raise ValueError(f"no node named {node!r}; close names: {close or names[-5:]}")
