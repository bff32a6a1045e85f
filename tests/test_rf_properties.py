"""Property tests: on random conv / pool stacks, traced shapes and R / J / start match PyTorch and the recurrence."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tp3_fastai.receptive_field import layer_report, measure_receptive_field, receptive_fields

CHANNELS = 2
# per spatial rank: largest kernel, stride, dilation (3D smaller so that four layers still fit a small volume)
LIMITS = {1: (7, 3, 3), 2: (5, 3, 3), 3: (3, 2, 2)}
# no database: examples are not saved under the repository
FAST = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class Layer(NamedTuple):
    kind: str   # conv, max or avg
    k: tuple[int, ...]
    s: tuple[int, ...]
    p: tuple[int, ...]
    d: tuple[int, ...]
    ceil: bool


def k_eff(k: int, d: int) -> int:
    return d * (k - 1) + 1


@st.composite
def layers(draw, nd: int) -> Layer:
    k_max, s_max, d_max = LIMITS[nd]
    kind = draw(st.sampled_from(["conv", "max", "avg"]))
    k = tuple(draw(st.integers(1, k_max)) for _ in range(nd))
    s = tuple(draw(st.integers(1, s_max)) for _ in range(nd))
    p = tuple(draw(st.integers(0, kk // 2)) for kk in k)   # PyTorch's pools refuse padding > kernel / 2
    d = tuple(draw(st.integers(1, d_max)) if kind != "avg" else 1 for _ in range(nd))
    return Layer(kind, k, s, p, d, kind != "conv" and draw(st.booleans()))


@st.composite
def stacks(draw, max_layers: int = 4) -> tuple[list[Layer], tuple[int, ...]]:
    """1-4 layers of one spatial rank and an input shape (1, C, *sizes) that leaves >= 1 output position."""
    nd = draw(st.sampled_from([1, 2, 3]))
    stack = draw(st.lists(layers(nd), min_size=1, max_size=max_layers))
    need = [1] * nd   # smallest size that gives `need` outputs, walked back from the last layer
    for layer in reversed(stack):
        avg3d = (layer.kind, nd) == ("avg", 3)   # AvgPool3d also refuses an input smaller than its kernel
        need = [max(k if avg3d else 1, (m - 1) * s + k_eff(k, d) - 2 * p)
                for m, k, s, p, d in zip(need, layer.k, layer.s, layer.p, layer.d)]
    sizes = tuple(draw(st.integers(m, m + 12)) for m in need)
    return stack, (1, CHANNELS, *sizes)


def build(stack: list[Layer]) -> nn.Sequential:
    nd = len(stack[0].k)
    mods = []
    for L in stack:
        if L.kind == "conv":
            mods.append(getattr(nn, f"Conv{nd}d")(CHANNELS, CHANNELS, L.k, stride=L.s, padding=L.p, dilation=L.d))
        elif L.kind == "max":
            mods.append(getattr(nn, f"MaxPool{nd}d")(L.k, L.s, L.p, dilation=L.d, ceil_mode=L.ceil))
        else:
            mods.append(getattr(nn, f"AvgPool{nd}d")(L.k, L.s, L.p, ceil_mode=L.ceil))
    return nn.Sequential(*mods)


def out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Output length of one axis (PyTorch's documented formula; in ceil mode the last window must start inside)."""
    span = n + 2 * p - k_eff(k, d)
    out = (math.ceil(span / s) if ceil else span // s) + 1
    return out - 1 if ceil and (out - 1) * s >= n + p else out


def expected(stack: list[Layer], shape: tuple[int, ...]) -> list[tuple[tuple, tuple, tuple, tuple]]:
    """(output shape, R, J, start) after each layer, from the shape formula and the recurrence along each axis."""
    sizes, R, J, start = list(shape[2:]), [1] * len(shape[2:]), [1] * len(shape[2:]), [0.0] * len(shape[2:])
    out = []
    for L in stack:
        for a, (k, s, p, d) in enumerate(zip(L.k, L.s, L.p, L.d)):
            sizes[a] = out_size(sizes[a], k, s, p, d, L.ceil)
            grow = k_eff(k, d) - 1
            R[a], start[a], J[a] = R[a] + grow * J[a], start[a] + (grow / 2 - p) * J[a], J[a] * s
        out.append(((1, CHANNELS, *sizes), tuple(R), tuple(J), tuple(start)))
    return out


def real_shapes(net: nn.Sequential, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    x, shapes = torch.randn(shape), []
    with torch.no_grad():
        for m in net:
            x = m(x)
            shapes.append(tuple(x.shape))
    return shapes


@FAST
@given(stacks())
def test_shapes_and_fields_match_pytorch_and_the_recurrence(case):
    stack, shape = case
    net = build(stack)
    ref = expected(stack, shape)
    torch_shapes = real_shapes(net, shape)
    assert torch_shapes == [r[0] for r in ref]   # the test's own formula agrees with PyTorch
    rows = receptive_fields(net, shape)
    infos = layer_report(net, shape)
    assert [r.name for r in rows] == [i.name for i in infos] == ["input", *map(str, range(len(stack)))]
    for row, info, real, (_, R, J, start) in zip(rows[1:], infos[1:], torch_shapes, ref):
        assert row.out_shape == info.out_shape == real, row
        assert (row.R, row.J, row.start) == (R, J, start), (row, stack)
        assert not any(row.whole)


@FEW
@given(stacks(max_layers=3))
def test_measured_field_agrees_with_the_recurrence(case):
    stack, shape = case
    net = build(stack)
    _, R, J, start = expected(stack, shape)[-1]
    m = measure_receptive_field(net, str(len(stack) - 1), shape)
    assert m.agrees, (m, stack)
    assert m.R == R and m.start == start, (m, stack)
    assert all(j is None or j == jr for j, jr in zip(m.J, J)), (m, stack)
