"""Part 0: the course's layer examples, the output-size rule, weights with and without bias, activation memory,
and where the slides print another value than PyTorch computes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..receptive_field.layers import human_bytes

SIZE_RULE = "floor((L + 2p - d(k-1) - 1) / s) + 1"
WARN_BYTES = 512 * 2**20   # the threshold of receptive_field.layer_report's LargeActivationWarning


@dataclass(frozen=True)
class LayerExample:
    """One example of the course: the layer as PyTorch code, its input shape, and what the slide printed."""
    code: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    slide_shape: tuple[int, ...] | None = None   # the slide's output shape when it differs from PyTorch's
    slide_note: str = ""                         # what the slide got wrong, and why


@dataclass(frozen=True)
class LayerFacts:
    """What the package computes for one example, next to what PyTorch's module gives."""
    code: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]        # by the rules below (output-size rule, Linear, flatten ...)
    pytorch_shape: tuple[int, ...]       # the module run by PyTorch on the meta device (shapes only)
    rule: str                            # the output-size rule applied to this layer, or why none applies
    weights: int
    biases: int
    formula: str                         # weights and biases written out
    activations: int
    bytes: int                           # float32 activations of one forward
    slide_shape: tuple[int, ...] | None
    slide_note: str
    warning: str

    @property
    def params(self) -> int:
        """Weights plus biases."""
        return self.weights + self.biases


def output_size(length: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """The output-size rule of a convolution or pooling along one axis: floor((L + 2p - d(k-1) - 1) / s) + 1."""
    n = length + 2 * p - d * (k - 1) - 1
    if n < 0:
        raise ValueError(f"kernel {k} (dilation {d}) does not fit an input of {length} with padding {p}")
    return n // s + 1


def _tup(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _window(m: nn.Module, n: int) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) of a conv / pool, one value per spatial axis."""
    stride = m.stride if m.stride is not None else m.kernel_size   # pools: stride defaults to the kernel
    dil = getattr(m, "dilation", 1)
    if isinstance(m.padding, str):
        raise ValueError(f"{type(m).__name__} with padding={m.padding!r}: give the padding as numbers")
    return tuple(_tup(v, n) for v in (m.kernel_size, stride, m.padding, dil))


def adaptive_windows(length: int, out: int) -> list[int]:
    """Window sizes of an adaptive pooling from `length` to `out` (PyTorch: floor(i L/out) .. ceil((i+1) L/out))."""
    return [math.ceil((i + 1) * length / out) - (i * length) // out for i in range(out)]


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.Dropout,
               nn.Identity)


def rule_output_shape(m: nn.Module, shape: Sequence[int]) -> tuple[tuple[int, ...], str]:
    """The output shape of `m` on an input of `shape` by the course's rules, and the rule written out."""
    shape = tuple(shape)
    if isinstance(m, nn.Linear):
        if shape[-1] != m.in_features:
            raise ValueError(f"Linear({m.in_features}, {m.out_features}) needs a last dimension of "
                             f"{m.in_features}, got {shape}")
        return (*shape[:-1], m.out_features), f"last dimension {m.in_features} -> out_features {m.out_features}"
    if isinstance(m, CONVS + POOLS):
        n = len(m.kernel_size) if isinstance(m.kernel_size, tuple) else int(type(m).__name__[-2])
        if len(shape) < n + 1:
            raise ValueError(f"{type(m).__name__} needs {n} spatial dims, got input {shape}")
        ks, ss, ps, ds = _window(m, n)
        spatial = shape[-n:]
        out = tuple(output_size(L, k, s, p, d) for L, k, s, p, d in zip(spatial, ks, ss, ps, ds))
        texts = [f"floor(({L} + 2*{p} - {d}*({k}-1) - 1) / {s}) + 1 = {o}"
                 for L, k, s, p, d, o in zip(spatial, ks, ss, ps, ds, out)]
        rule = "; ".join(dict.fromkeys(texts))   # identical axes written once
        channels = (m.out_channels,) if isinstance(m, CONVS) else (shape[-n - 1],)
        return (*shape[:-n - 1], *channels, *out), rule
    if isinstance(m, ADAPTIVE):
        n = int(type(m).__name__[-2])
        out = tuple(L if o is None else o for L, o in zip(shape[-n:], _tup(m.output_size, n)))
        sizes = sorted({w for L, o in zip(shape[-n:], out) for w in adaptive_windows(L, o)})
        rule = (f"adaptive: the output size {'x'.join(map(str, out))} is given; PyTorch picks one window per output "
                f"unit, here {' or '.join(map(str, sizes))} pixels wide")
        return (*shape[:-n], *out), rule
    if isinstance(m, nn.Flatten):
        start, end = m.start_dim % len(shape), m.end_dim % len(shape)
        merged = math.prod(shape[start:end + 1])
        return (*shape[:start], merged, *shape[end + 1:]), \
            f"dims {start}..{end} multiplied: {' x '.join(map(str, shape[start:end + 1]))} = {merged:,}"
    if isinstance(m, ELEMENTWISE):
        extra = f" (sums to 1 along dim {m.dim})" if isinstance(m, nn.Softmax) else ""
        return shape, f"element-wise: the shape does not change{extra}"
    raise ValueError(f"no output-size rule for {type(m).__name__}")


def weight_counts(m: nn.Module) -> tuple[int, int, str]:
    """(weights, biases, formula) of a layer; the formula is the course's, e.g. out x (in x k^d) + out."""
    bias = getattr(m, "bias", None)
    b = bias.numel() if isinstance(bias, torch.Tensor) else 0
    if isinstance(m, nn.Linear):
        w = m.out_features * m.in_features
        return w, b, f"{m.out_features:,} x {m.in_features:,}" + (f" + {b:,}" if b else " (no bias)") + \
            f" = {w + b:,}"
    if isinstance(m, CONVS):
        n = len(m.kernel_size)
        k = "x".join(map(str, m.kernel_size)) if len(set(m.kernel_size)) > 1 else \
            f"{m.kernel_size[0]}" + (f"^{n}" if n > 1 else "")
        per = m.in_channels // m.groups * math.prod(m.kernel_size)
        w = m.out_channels * per
        grp = f"/{m.groups}" if m.groups > 1 else ""
        kd = f"k^{n}" if n > 1 else "k"
        return w, b, (f"out_channels x (in_channels{grp} x {kd}) + out_channels = {m.out_channels} x "
                      f"({m.in_channels}{grp} x {k}){f' + {b}' if b else ' (no bias)'} = {w + b:,}")
    n_params = sum(p.numel() for p in m.parameters())
    if n_params:
        raise ValueError(f"no weight formula for {type(m).__name__}, which has {n_params} parameters")
    return 0, 0, "no weights"


def pytorch_output_shape(build: Callable[[], nn.Module], shape: Sequence[int]) -> tuple[int, ...]:
    """The output shape PyTorch gives: the module built and run on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        m = build()
        return tuple(m(torch.empty(tuple(shape))).shape)


def layer_facts(example: LayerExample, warn_bytes: int = WARN_BYTES) -> LayerFacts:
    """Shapes, weights, activations and memory of one example, by the rules and by PyTorch."""
    m = example.build()
    out, rule = rule_output_shape(m, example.input_shape)
    weights, biases, formula = weight_counts(m)
    acts = math.prod(out)
    nbytes = acts * 4
    warning = ""
    if nbytes > warn_bytes:
        warning = (f"{acts:,} activations = {human_bytes(nbytes)} in float32 for one forward pass of this single layer, "
                   f"as much again for its gradient: 3D activations grow with depth x height x width, reduce the "
                   f"batch, the volume or the channels")
    return LayerFacts(example.code, tuple(example.input_shape), out, pytorch_output_shape(example.build,
                      example.input_shape), rule, weights, biases, formula, acts, nbytes, example.slide_shape,
                      example.slide_note, warning)


COURSE_EXAMPLES: tuple[LayerExample, ...] = (
    LayerExample("nn.Linear(1024, 512)", lambda: nn.Linear(1024, 512), (32, 1024), (32, 64),
                 "the slide prints (32, 64); a Linear maps the last dimension to out_features, here 512, and no "
                 "size of this layer is 64"),
    LayerExample("nn.Conv2d(3, 64, kernel_size=7, padding=3, stride=2)",
                 lambda: nn.Conv2d(3, 64, kernel_size=7, padding=3, stride=2), (32, 3, 256, 256)),
    LayerExample("nn.Conv1d(2, 16, kernel_size=5, padding=2, stride=4, bias=False)",
                 lambda: nn.Conv1d(2, 16, kernel_size=5, padding=2, stride=4, bias=False), (8, 2, 10201),
                 (8, 16, 2501),
                 "the slide prints 2501, which is the rule applied to a length of 10,001: "
                 "floor((10001 + 4 - 4 - 1) / 4) + 1 = 2501; the input has 10,201 samples, so 2551"),
    LayerExample("nn.Conv3d(1, 32, kernel_size=3, padding=1)", lambda: nn.Conv3d(1, 32, kernel_size=3, padding=1),
                 (32, 1, 60, 64, 64)),
    LayerExample("nn.Sigmoid()", nn.Sigmoid, (32, 1, 224, 224)),
    LayerExample("nn.Softmax(dim=1)", lambda: nn.Softmax(dim=1), (64, 3, 224, 224)),
    LayerExample("nn.MaxPool2d(2)", lambda: nn.MaxPool2d(2), (32, 16, 224, 224)),
    LayerExample("nn.AdaptiveAvgPool2d(64)", lambda: nn.AdaptiveAvgPool2d(64), (32, 16, 100, 100), None,
                 "the slide's line calls it maxpool2D; the layer is an adaptive average pooling "
                 "(nn.AdaptiveAvgPool2d): each output is the mean of its window, not the max"),
    LayerExample("nn.Flatten()", nn.Flatten, (32, 16, 64, 64)),
)


def course_layer_facts(examples: Sequence[LayerExample] = COURSE_EXAMPLES) -> list[LayerFacts]:
    """`layer_facts` of every example of the course, in the course's order."""
    return [layer_facts(e) for e in examples]


def _shape(s: Sequence[int] | None) -> str:
    return "-" if s is None else "(" + ", ".join(map(str, s)) + ")"


def layer_rows(facts: Sequence[LayerFacts]) -> list[dict]:
    """One plain dict per example, for Markdown / HTML tables and JSON."""
    return [dict(layer=f.code, input=_shape(f.input_shape), output=_shape(f.output_shape),
                 pytorch=_shape(f.pytorch_shape), slide=_shape(f.slide_shape) if f.slide_shape else "",
                 weights=f.weights, biases=f.biases, params=f.params, activations=f.activations,
                 memory=human_bytes(f.bytes)) for f in facts]


LAYER_COLUMNS = ("layer", "input", "output", "pytorch", "slide", "weights", "biases", "params", "activations",
                 "memory")


def layer_notes(facts: Sequence[LayerFacts]) -> list[str]:
    """One line per example: the rule applied, the weight formula, the slide's mistake and the memory warning."""
    lines = []
    for f in facts:
        weights = "no weights" if f.formula == "no weights" else f"weights {f.formula}"
        line = f"`{f.code}` on {_shape(f.input_shape)}: {f.rule}; {weights}"
        if f.slide_note:
            line += f". **Slide vs PyTorch:** {f.slide_note}"
        if f.warning:
            line += f". **Warning:** {f.warning}"
        lines.append(line + ".")
    return lines
