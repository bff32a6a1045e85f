"""Part 0: the two families to know, VGG and ResNet (torchvision definitions, no weights): parameters, weighted
depth, multiply-adds, and at the end of each stage the output shape, receptive field R and jump J; the ResNet50
stem recurrence with the slides' max-pool kernel (2) and the real one (3), next to the measured field."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..receptive_field import measure_receptive_field, receptive_fields
from ..receptive_field.ops import CONV
from ..receptive_field.trace import Node, RFRow, find_node, traced
from ..receptive_field.trace import rf_row as row_of
from ..core.runs import pyplot, save_figure

ARCHITECTURES = ("vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
WEIGHTED_OPS = CONV | {"linear"}


@dataclass(frozen=True)
class Stage:
    """The end of one stage: its node, output shape (channels x height x width), field R and jump J (pixels)."""
    label: str
    node: str
    out_shape: tuple[int, ...]
    R: int | float
    J: int | float | None


@dataclass(frozen=True)
class ArchSummary:
    """One architecture at one input size: parameters, weighted depth, multiply-adds and its stages."""
    name: str
    input_size: int
    params: int
    depth: int
    macs: int
    stages: tuple[Stage, ...]


def build_architecture(name: str, device: str | torch.device = "meta") -> nn.Module:
    """torchvision's definition of `name`, random init, no weights downloaded; on 'meta' it holds no memory."""
    import torchvision

    if name not in torchvision.models.list_models():
        from ..core.checks import check_name

        check_name(name, torchvision.models.list_models(), "torchvision architecture")
    with torch.device(device):
        return torchvision.models.get_model(name, weights=None)


def stage_nodes(model: nn.Module) -> list[tuple[str, str]]:
    """(label, module) of each stage end: a ResNet's stem max-pool and layer1..4, a VGG's five max-pools."""
    if all(hasattr(model, a) for a in ("maxpool", "layer1", "layer2", "layer3", "layer4")):
        return [("stem", "maxpool")] + [(f"layer{i}", f"layer{i}") for i in range(1, 5)]
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    if not pools:
        raise ValueError(f"{type(model).__name__}: no stem max-pool + layer1..4 (ResNet) and no max-pools (VGG)")
    return [(f"block{i}", n) for i, n in enumerate(pools, 1)]


def _nodes(model_or_nodes: nn.Module | Sequence[Node], input_shape: Sequence[int] | None) -> Sequence[Node]:
    if isinstance(model_or_nodes, nn.Module):
        return traced(model_or_nodes, input_shape)[1].nodes
    return model_or_nodes


def multiply_adds(model: nn.Module | Sequence[Node], input_shape: Sequence[int] | None = None) -> int:
    """Multiply-adds of the convolutions and linear layers for one input (the usual 'FLOPs' of papers / 2), from
    the traced graph of `model` on `input_shape` (or from nodes already traced)."""
    total = 0
    for n in _nodes(model, input_shape):
        if n.op in WEIGHTED_OPS and n.weights:
            out_features = n.out_shape[1] if n.op in CONV else n.out_shape[-1]
            total += n.weights // out_features * math.prod(n.out_shape)
    return total


def weighted_depth(model: nn.Module | Sequence[Node], input_shape: Sequence[int] | None = None) -> int:
    """Convolutions and linear layers on the longest path from input to output (ResNet50: 50; shortcuts are
    shorter paths, so their 1x1 convolutions do not count)."""
    nodes = _nodes(model, input_shape)
    depth: dict[int, int] = {}
    for n in nodes:
        below = max((depth[i] for i in n.inputs), default=0)
        depth[n.index] = below + (1 if n.op in WEIGHTED_OPS and n.weights else 0)
    return depth[nodes[-1].index]


def stages(model: nn.Module, input_size: int = 224, rows: Sequence[RFRow] | None = None) -> tuple[Stage, ...]:
    """Output shape, R and J at the end of every stage, from the receptive-field module's traced graph."""
    rows = rows if rows is not None else receptive_fields(model, (1, 3, input_size, input_size))
    out = []
    for label, node in stage_nodes(model):
        r = find_node(rows, node)
        if len(set(r.R)) != 1 or len(set(r.J)) != 1:
            raise ValueError(f"{node}: a non-square field {r.R} / {r.J} needs one column per axis")
        out.append(Stage(label, r.name, tuple(r.out_shape[1:]), r.R[0], r.J[0]))
    return tuple(out)


def summarize_architecture(name: str, input_size: int = 224) -> ArchSummary:
    """Parameters, weighted depth, multiply-adds and stages of a torchvision architecture at `input_size` px
    (one trace of the graph, shapes only)."""
    model = build_architecture(name)
    _, tr = traced(model, (1, 3, input_size, input_size))
    rows = [row_of(n, tr.nodes) for n in tr.nodes]
    return ArchSummary(name, input_size, sum(p.numel() for p in model.parameters()), weighted_depth(tr.nodes),
                       multiply_adds(tr.nodes), stages(model, input_size, rows))


def architecture_table(names: Sequence[str] = ARCHITECTURES, input_size: int = 224) -> list[ArchSummary]:
    """`summarize_architecture` of each name (shapes only: a few seconds on a CPU for all seven)."""
    return [summarize_architecture(n, input_size) for n in names]


def _stage_cell(s: Stage) -> str:
    return f"{'x'.join(map(str, s.out_shape))}, R {s.R}, J {s.J}"


def architecture_rows(summaries: Sequence[ArchSummary]) -> list[dict]:
    """One dict per architecture: parameters, depth, GMACs and one 'CxHxW, R, J' cell per stage."""
    n_stages = max(len(s.stages) for s in summaries)
    rows = []
    for s in summaries:
        row = dict(arch=s.name, params=s.params, depth=s.depth, gmacs=round(s.macs / 1e9, 2))
        for i in range(n_stages):
            row[f"stage {i + 1}"] = _stage_cell(s.stages[i]) if i < len(s.stages) else ""
        rows.append(row)
    return rows


def plot_architectures(summaries: Sequence[ArchSummary], path: str | Path) -> Path:
    """Left: parameters against multiply-adds; right: the receptive field at the end of each stage."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, s in enumerate(summaries):
        colour = "tab:red" if s.name.startswith("vgg") else "tab:blue"
        a.scatter(s.macs / 1e9, s.params / 1e6, color=colour, s=40)
        a.annotate(f"{s.name} ({s.depth})", (s.macs / 1e9, s.params / 1e6), textcoords="offset points",
                   xytext=(5, 4 if i % 2 else -11), fontsize=8)   # alternate sides: close points stay readable
        b.plot(range(1, len(s.stages) + 1), [st.R for st in s.stages], marker="o",
               ls="--" if s.name.startswith("vgg") else "-", label=s.name)
    a.set_xlabel(f"multiply-adds per {summaries[0].input_size} px image (G)")
    a.set_ylabel("parameters (M)")
    a.set_title("size and cost (weighted depth in brackets)\nVGG red, ResNet blue", fontsize=9)
    a.grid(alpha=0.3)
    b.axhline(summaries[0].input_size, color="0.5", lw=1, ls=":", label=f"image ({summaries[0].input_size} px)")
    b.set_yscale("log")
    b.set_xticks(range(1, 6))
    b.set_xlabel("end of stage (ResNet: stem, layer1..4; VGG: pool1..5)")
    b.set_ylabel("receptive field R (pixels, log scale)")
    b.set_title("receptive field at the end of each stage", fontsize=9)
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    return save_figure(fig, path)


# --- the ResNet50 stem: the slides' max-pool kernel against the real one ---------------------------------------

def recurrence(steps: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(name, R, J) after each (name, kernel, stride): R_n = R_{n-1} + (k_n - 1) J_{n-1}, J_n = J_{n-1} s_n."""
    R, J, out = 1, 1, []
    for name, k, s in steps:
        R, J = R + (k - 1) * J, J * s
        out.append((name, R, J))
    return out


def _k(v: int | Sequence[int]) -> int:
    return v if isinstance(v, int) else v[0]


def resnet50_stem_steps(model: nn.Module, pool_kernel: int | None = None) -> list[tuple[str, int, int]]:
    """(layer, kernel, stride) of a ResNet's conv1, max-pool and first block's 3x3 convolution, read from the
    model; `pool_kernel` replaces the max-pool's kernel (the slides use 2)."""
    pool = model.maxpool
    conv = model.layer1[0].conv2   # the only kernel > 1 of the first bottleneck (1x1, 3x3, 1x1)
    return [("conv1", _k(model.conv1.kernel_size), _k(model.conv1.stride)),
            ("maxpool", pool_kernel or _k(pool.kernel_size), _k(pool.stride)),
            ("layer1.0", _k(conv.kernel_size), _k(conv.stride))]


def maxpool_kernel_rows(model: nn.Module | None = None, slide_kernel: int = 2,
                        measure_size: int = 64) -> list[dict]:
    """The stem's field by the recurrence with the slides' max-pool kernel and with the model's own, and measured
    by back-propagation (receptive_field.measure_receptive_field) on a real copy of the model."""
    if model is None:
        torch.manual_seed(0)
        model = build_architecture("resnet50", "cpu")
    slides = recurrence(resnet50_stem_steps(model, slide_kernel))
    real_steps = resnet50_stem_steps(model)
    real = recurrence(real_steps)
    rows = []
    for (name, k, s), (_, r2, j2), (_, r3, j3) in zip(real_steps, slides, real):
        m = measure_receptive_field(model, name, (1, 3, measure_size, measure_size))
        rows.append({"layer": f"{name} ({k}x{k}/{s})", f"slides (max-pool k={slide_kernel})": f"R {r2}, J {j2}",
                     f"recurrence (max-pool k={_k(model.maxpool.kernel_size)})": f"R {r3}, J {j3}",
                     "measured": f"R {m.R[0]}, J {m.J[0]}", "R_slides": r2, "R_recurrence": r3,
                     "R_measured": m.R[0], "J_measured": m.J[0]})
    return rows
