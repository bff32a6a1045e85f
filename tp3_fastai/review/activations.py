"""Part 0: the usual activation functions and their derivatives (by autograd) in one figure, and softmax."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..core.runs import pyplot, save_figure

ACTIVATIONS: dict[str, nn.Module] = {
    "ReLU": nn.ReLU(),
    "Leaky ReLU (0.1)": nn.LeakyReLU(0.1),
    "ELU (1)": nn.ELU(1.0),
    "Softplus": nn.Softplus(),
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
}


def activation_curves(x: torch.Tensor | None = None,
                      activations: dict[str, nn.Module] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (f(x), f'(x))} with the derivative from autograd (ReLU's at 0 is PyTorch's choice: 0)."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64) if x is None else x.detach().double()
    out = {}
    for name, f in (activations or ACTIVATIONS).items():
        xi = x.clone().requires_grad_(True)
        y = f(xi)
        dy, = torch.autograd.grad(y.sum(), xi)   # element-wise: the gradient of the sum is f'(x) at each x
        out[name] = (y.detach(), dy.detach())
    return out


def plot_activations(path: str | Path, x: torch.Tensor | None = None) -> Path:
    """The activations (left) and their derivatives (right) on one figure."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64) if x is None else x
    curves = activation_curves(x)
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for name, (y, dy) in curves.items():
        a.plot(x, y, label=name)
        b.plot(x, dy, label=name)
    a.set_title("activation f(x)", fontsize=10)
    b.set_title("derivative f'(x) (autograd)", fontsize=10)
    for ax in (a, b):
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    a.set_ylim(-1.5, 4)
    b.set_ylim(-0.1, 1.15)
    a.legend(fontsize=8)
    return save_figure(fig, path)


def softmax_steps(logits: Sequence[float]) -> list[dict]:
    """Softmax written out for one vector: each logit z, exp(z), exp(z) / sum, and PyTorch's torch.softmax."""
    z = torch.tensor(list(logits), dtype=torch.float64)
    e = torch.exp(z - z.max())   # the same ratios as exp(z), without overflow for large logits
    by_hand = e / e.sum()
    torch_p = torch.softmax(z, dim=0)
    return [dict(z=float(zi), exp_z=float(torch.exp(zi)), probability=float(p), torch_softmax=float(q))
            for zi, p, q in zip(z, by_hand, torch_p)]
