"""The from-scratch MNIST models of the practical and their registry."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..core.checks import check_name


class MLP(nn.Module):
    """Perceptron: flatten, hidden Linear+ReLU+Dropout layers, a linear output (P60 is hidden=(50,))."""

    def __init__(self, hidden: Sequence[int] = (50,), n_in: int = 784, n_out: int = 10, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
            n_in = width
        layers.append(nn.Linear(n_in, n_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two 5x5 convolutions (1->10->10, padding 2) each with 2x2 max-pool and ReLU, then 490->50->10."""

    def __init__(self, n_out: int = 10, dropout: float = 0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5, padding=2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(10, 10, kernel_size=5, padding=2)
        self.pool2 = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(10 * 7 * 7, 50)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(50, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.pool1(self.conv1(x)))
        x = self.act(self.pool2(self.conv2(x)))
        x = self.dropout(self.act(self.fc1(self.flatten(x))))
        return self.fc2(x)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: MLP((50,)),
    "mlp-big": lambda: MLP((50, 200, 50)),
    "cnn": SmallCNN,
}


def create_model(name: str) -> nn.Module:
    """A fresh MNIST model by registry name ('mlp', 'mlp-big', 'cnn')."""
    check_name(name, list(MODELS), "MNIST architecture")
    return MODELS[name]()
