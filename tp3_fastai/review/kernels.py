"""Part 0: what a first layer learns. The first convolution's kernels as an image grid, one tile per filter, each
grid saying where its weights came from (Part I's MNIST CNN, the body pretrained offline, ImageNet weights)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.images import plot_image_grid
from ..core.runs import read_json

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class KernelGrid:
    """The first convolution of one model: its kernels as display tiles and where the weights came from."""
    title: str
    layer: str
    shape: tuple[int, ...]
    source: str
    tiles: list[torch.Tensor]


def first_conv(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the first convolution in the model's module order (its input layer in a CNN)."""
    for name, m in model.named_modules():
        if isinstance(m, CONV_TYPES):
            return name, m
    raise ValueError(f"{type(model).__name__} has no convolution")


def kernel_tiles(weight: torch.Tensor) -> list[torch.Tensor]:
    """One display tile per filter of a 2-D conv weight (out, in, kh, kw), scaled to [0, 1] by its own min and max:
    RGB for 3 input channels, grey otherwise (the mean over input channels when there are not 1 or 3)."""
    if weight.ndim != 4:
        raise ValueError(f"expected a 2-D convolution's weight (out, in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().float().cpu()
    if w.shape[1] not in (1, 3):
        w = w.mean(dim=1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    span = w.amax(dim=(1, 2, 3), keepdim=True) - lo
    return list((w - lo) / span.clamp_min(1e-12))


def kernel_grid(model: nn.Module, title: str, source: str) -> KernelGrid:
    """The kernels of `model`'s first convolution, with where its weights came from."""
    name, conv = first_conv(model)
    return KernelGrid(title, name, tuple(conv.weight.shape), source, kernel_tiles(conv.weight))


def plot_kernel_grid(grid: KernelGrid, path: str | Path) -> Path:
    """The grid as a PNG: one tile per filter, numbered, titled with the layer and the weights' origin."""
    n = len(grid.tiles)
    shape = "x".join(map(str, grid.shape))
    title = f"{grid.title}: {grid.layer} ({shape}), {n} filters, each scaled to its own min-max"
    ncols = math.ceil(math.sqrt(2 * n))   # about twice as wide as high
    return plot_image_grid(grid.tiles, [str(i) for i in range(n)], path, title=title, ncols=ncols)


# --- where the first layers come from ---------------------------------------------------------------------------

def mnist_cnn_grid(run_dir: str | Path, where: str = "in Part I") -> KernelGrid:
    """Part I's CNN (conv1: 10 filters 5x5) as its last checkpoint in a `train_mnist` run folder left it; `where`
    says which run trained it."""
    from ..mnist.models import create_model

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / "cnn" / "last.pth"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no CNN checkpoint at {ckpt}: train it first (tp3 mnist --archs cnn)")
    model = create_model("cnn")
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    summary = read_json(run_dir / "summary.json")
    cnn = next(m for m in summary["models"] if m["model"] == "cnn")
    epochs = f"{cnn['epochs']} epoch" + ("s" if cnn["epochs"] != 1 else "")
    source = (f"SmallCNN trained from scratch {where}: {epochs} on {summary['data']}, test "
              f"accuracy {cnn['test_accuracy']:.3f}; checkpoint {ckpt}")
    return kernel_grid(model, "MNIST CNN", source)


def cached_body(cache_dir: str | Path | None = None, arch: str | None = None) -> Path | None:
    """The body file that Part II's offline study would use with its default recipe, if it is already in the cache
    (nothing is trained here)."""
    from ..transfer.pretrain import BODY_CACHE, DEFAULT_ARCH, body_config, body_key, read_body_info
    from ..data.tasks import load_tasks

    source = load_tasks("mnist", size=32)[0]
    config = body_config(source, arch or DEFAULT_ARCH)
    path = Path(cache_dir or BODY_CACHE).expanduser() / f"{body_key(config)}.safetensors"
    if not path.is_file():
        return None
    try:
        return path if read_body_info(path).get("config") == config else None
    except (ValueError, FileNotFoundError):
        return None


def body_grid(path: str | Path) -> KernelGrid:
    """The first layer of a body pretrained by `pretrain.pretrained_body` (safetensors + sidecar)."""
    import timm

    from ..transfer.pretrain import describe_body, read_body_info
    from ..transfer.weights import load_body_weights

    path = Path(path)
    info = dict(read_body_info(path), path=str(path))
    body = timm.create_model(info["arch"], pretrained=False, num_classes=0, in_chans=info["n_in"])
    load_body_weights(body, path, n_in=info["n_in"])
    return kernel_grid(body, f"{info['arch']} body pretrained offline (Part II)", describe_body(info))


def imagenet_grid(weights: bool | str | Path, arch: str = "resnet50") -> KernelGrid:
    """The first layer of `arch` with ImageNet weights: from the timm hub (`weights=True`, needs internet; raises
    DownloadError offline) or from a weights file (state dict or safetensors)."""
    import timm

    from ..transfer.weights import describe_weights, hub_state_dict, load_body_weights

    body = timm.create_model(arch, pretrained=False, num_classes=0)
    if weights is True:
        state, origin = hub_state_dict(arch, 3)
        body.load_state_dict(state)
        title, source = f"{arch}, ImageNet weights", f"timm hub: {origin} (as downloaded, before any fine-tuning)"
    else:
        load_body_weights(body, weights, n_in=3)
        title = f"{arch}, weights file {Path(weights).name}"
        source = describe_weights(weights, arch)[0] + " (as loaded, before any fine-tuning)"
    return kernel_grid(body, title, source)


def grid_summary(grid: KernelGrid, path: str | Path) -> dict[str, Any]:
    """Plain-JSON digest of a grid and its figure."""
    return dict(title=grid.title, layer=grid.layer, shape=list(grid.shape), filters=len(grid.tiles),
                source=grid.source, figure=str(path))

