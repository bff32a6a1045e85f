"""The layer report: output shape, weights with and without bias, activation count and memory per node."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .trace import traced


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


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def layer_report(module_or_model: nn.Module, input_shape: Sequence[int], *,
                 warn_bytes: int = 512 * 2**20) -> list[LayerInfo]:
    """Per node: output shape, weights with / without bias, activation count and bytes (shapes only, no memory)."""
    _, tr = traced(module_or_model, input_shape)
    infos = []
    for n in tr.nodes:
        acts = math.prod(n.out_shape)
        info = LayerInfo(n.name, n.desc, n.out_shape, n.weights + n.biases, n.weights, n.biases, acts,
                         acts * n.itemsize)
        infos.append(info)
        if info.bytes > warn_bytes:
            warnings.warn(f"{n.name}: activation {'x'.join(map(str, n.out_shape))} holds {acts:,} values "
                          f"= {human_bytes(info.bytes)} for one forward (more again for its gradient); "
                          f"reduce the batch, the volume size or the channels", LargeActivationWarning, stacklevel=2)
    return infos


def layer_report_markdown(infos: Sequence[LayerInfo]) -> str:
    """A Markdown table of a `layer_report`, with totals."""
    lines = ["| layer | op | output shape | weights (no bias) | params (with bias) | activations | memory |",
             "|---|---|---|---|---|---|---|"]
    for i in infos:
        lines.append(f"| `{i.name}` | {i.op} | {'x'.join(map(str, i.out_shape))} | {i.weights:,} | {i.params:,} | "
                     f"{i.activations:,} | {human_bytes(i.bytes)} |")
    lines.append(f"| **total** | | | {sum(i.weights for i in infos):,} | {sum(i.params for i in infos):,} | "
                 f"{sum(i.activations for i in infos):,} | {human_bytes(sum(i.bytes for i in infos))} |")
    return "\n".join(lines) + "\n"
