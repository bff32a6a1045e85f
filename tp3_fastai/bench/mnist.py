"""The MNIST loop benchmark: seconds per epoch of the package's fastai Learner against a plain PyTorch loop."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import set_seed
from torch import nn

from ..data.mnist import mnist_dls
from ..core.device import device_name, pick_device
from ..mnist.learner import mnist_learner
from ..mnist.models import create_model
from .timing import spread, timed


def plain_epoch(model: nn.Module, opt: torch.optim.Optimizer, train: tuple[torch.Tensor, torch.Tensor],
                valid: tuple[torch.Tensor, torch.Tensor], bs: int, gen: torch.Generator) -> dict[str, float]:
    """One epoch of the textbook PyTorch loop: train on shuffled slices, then validate; mean loss and accuracy."""
    loss_func = nn.CrossEntropyLoss()
    sums = torch.zeros(6, dtype=torch.float64, device=train[0].device)  # loss, correct, count: train, valid
    model.train()
    x, y = train
    idx = torch.randperm(len(y), generator=gen).to(x.device)
    for i in range(0, len(y), bs):
        b = idx[i:i + bs]
        out = model(x[b])
        loss = loss_func(out, y[b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sums[:3] += torch.stack([loss.detach() * len(b), (out.argmax(-1) == y[b]).sum(), torch.tensor(len(b))])
    model.eval()
    x, y = valid
    with torch.no_grad():
        for i in range(0, len(y), bs * 2):
            out = model(x[i:i + bs * 2])
            n = len(out)
            sums[3:] += torch.stack([loss_func(out, y[i:i + n]) * n, (out.argmax(-1) == y[i:i + n]).sum(),
                                     torch.tensor(n)])
    s = sums.tolist()
    return {"train_loss": s[0] / s[2], "train_accuracy": s[1] / s[2], "valid_loss": s[3] / s[5],
            "valid_accuracy": s[4] / s[5]}


def bench_mnist_loop(arch: str = "cnn", epochs: int = 3, repeats: int = 3, bs: int = 64, lr: float = 1e-3,
                     device: str = "auto", seed: int = 42, log: Callable[[str], None] = print) -> dict:
    """Seconds per epoch (train + validate, loss and accuracy of both): the package's fastai Learner vs a plain
    PyTorch loop on the same tensors, model and optimizer.

    Both use torch.optim.Adam at a constant learning rate; timings alternate between the two loops so that
    machine noise hits both alike. The first epoch of each is a warm-up and is not counted.
    """
    dev = pick_device(device)
    dls, _ = mnist_dls(bs=bs, device=dev, seed=seed)
    train, valid = (dls.train.x, dls.train.y), (dls.valid.x, dls.valid.y)
    adam = partial(OptimWrapper, opt=torch.optim.Adam)
    fastai_times, plain_times, plain_last = [], [], {}
    for r in range(repeats):
        set_seed(seed + r)
        learn = mnist_learner(dls, arch, lr=lr, opt_func=adam, progress=False, log=None)
        learn.fit(1, lr)  # warm-up, and builds the optimizer
        fastai_times += [timed(lambda: learn.fit(1, lr), dev) for _ in range(epochs)]
        set_seed(seed + r)
        model = create_model(arch).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        plain_epoch(model, opt, train, valid, bs, gen)  # warm-up
        plain_times += [timed(lambda: plain_last.update(plain_epoch(model, opt, train, valid, bs, gen)), dev)
                        for _ in range(epochs)]
    f, p = spread(fastai_times), spread(plain_times)
    # both loops learn alike (same model, optimizer and data), or the ratio would compare different work
    accuracy = dict(fastai=learn.curves.history[-1]["valid_accuracy"], plain=plain_last["valid_accuracy"])
    result = dict(arch=arch, bs=bs, train_images=len(train[1]), valid_images=len(valid[1]), device=str(dev), device_name=device_name(dev),
                  optimizer="torch.optim.Adam", fastai_epoch_s=f, plain_epoch_s=p,
                  ratio=f["median"] / p["median"], final_valid_accuracy=accuracy)
    log(f"{arch} on {result['device_name']}, {len(train[1])}+{len(valid[1])} images, bs {bs}: fastai Learner {f['median']:.3f}s/epoch "
        f"(min {f['min']:.3f}, max {f['max']:.3f}); plain PyTorch {p['median']:.3f}s/epoch "
        f"(min {p['min']:.3f}, max {p['max']:.3f}); ratio {result['ratio']:.3f}x; final valid accuracy "
        f"{accuracy['fastai']:.4f} and {accuracy['plain']:.4f}")
    return result
