"""Callbacks that record what training really did, so that a test fails when a feature is removed.

`installed(Probe)` adds a probe to every fastai Learner created inside the block (through fastai's
`defaults.callbacks`), so it reaches learners built deep inside an experiment function without test-only code in
the package; `launcher(...)` writes a script that installs one in a launched process (torchrun), saves what it
recorded to `<out>/rank<R>.pt` and runs another script.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import defaults
from fastai.torch_core import get_model

TESTS = Path(__file__).resolve().parent


def plain_copy(o: Any) -> Any:
    """A deep copy of nested dicts / lists of tensors and numbers, tensors cloned to the CPU, numpy to Python."""
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().clone()
    if isinstance(o, dict):
        return {k: plain_copy(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)) or type(o).__name__ == "L":
        return [plain_copy(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o


def assert_same_state(got: Any, want: Any, where: str = "") -> None:
    """Nested dicts / lists of tensors and numbers are equal, tensors exactly."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got.cpu(), want.cpu()), f"{where} differs"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: {len(got)} items != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


class Probe(Callback):
    """Base: `records` (a class attribute set by `installed`) collects one dict per learner."""
    records: list = []
    out: str | None = None

    def after_create(self) -> None:
        self.record: dict[str, Any] = {}
        type(self).records.append(self.record)

    def __reduce__(self):
        return Callback, ()  # `learn.export()` pickles a plain Callback in its place: model files stay loadable

    def after_fit(self) -> None:
        if self.out is not None:
            from tp3_fastai.train.distributed import rank

            torch.save(type(self).records, Path(self.out) / f"rank{rank()}.pt")


class FirstStepState(Probe):
    """The model's and optimiser's state at the first training batch of the learner, before any step: after a
    resume, what the checkpoint must have restored."""

    def before_batch(self) -> None:
        if self.training and "model" not in self.record:
            self.record.update(model=plain_copy(get_model(self.learn.model).state_dict()),
                               opt=plain_copy(self.learn.opt.state_dict()["state"]), epoch=self.learn.epoch)


class EpochSchedule(Probe):
    """At the first training batch of each epoch (after the scheduler set the rates): the weights that train and
    the learning rate of each parameter group, by the epoch's number within the fit."""
    order = 70  # after ParamScheduler (60)

    def before_batch(self) -> None:
        if self.training and self.iter == 0:
            trainable = sum(p.numel() for p in self.learn.model.parameters() if p.requires_grad)
            self.record.setdefault("epochs", {})[self.learn.epoch] = (
                trainable, [round(float(h["lr"]), 12) for h in self.learn.opt.hypers])


class FirstInputs(Probe):
    """The inputs the model got: the first training batch, and the first batch of the last evaluation pass."""

    def before_batch(self) -> None:
        x = self.learn.xb[0]
        if self.training:
            self.record.setdefault("train", plain_copy(x))
        elif self.iter == 0:
            self.record["evaluated"] = plain_copy(x)


class RankWork(Probe):
    """What this process trained on and with: per epoch the training images it saw (content hashes), the batch
    sizes, whether the model was wrapped in DistributedDataParallel during the fit, and at the first step the
    gradient the optimiser got next to the gradient of this process's own batch alone."""

    def before_train(self) -> None:
        self.record.setdefault("epochs", []).append([])

    def before_batch(self) -> None:
        if not self.training:
            return
        from torch.nn.parallel import DistributedDataParallel

        x = self.learn.xb[0]
        self.record["epochs"][-1] += [hashlib.sha1(r.cpu().numpy().tobytes()).hexdigest()[:16] for r in x]
        self.record.setdefault("batch_sizes", set()).add(len(x))
        self.record.setdefault("ddp", set()).add(isinstance(self.learn.model, DistributedDataParallel))

    def after_backward(self) -> None:
        if "grad" in self.record:
            return
        model = get_model(self.learn.model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
        out = torch.func.functional_call(model, params, tuple(self.learn.xb))  # the bare model: no all-reduce
        local = torch.autograd.grad(self.learn.loss_func(out, *self.learn.yb), [params[n] for n in names])
        self.record["grad"] = torch.cat([p.grad.detach().flatten() for p in model.parameters() if p.requires_grad])
        self.record["local_grad"] = torch.cat([g.detach().flatten() for g in local])


def body_batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers of a (body, head) model's body (fastai's vision_learner: `model[0]`)."""
    return [m for m in get_model(model)[0].modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def batchnorm_state(bns: list[torch.nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Copies of the layers' weights, biases, running means and variances."""
    return {k: [getattr(m, k).detach().cpu().clone() for m in bns]
            for k in ("weight", "bias", "running_mean", "running_var")}


class BatchNormWatch(Probe):
    """The body's BatchNorm layers around the learner's fits: their state before the first fit and after the last
    one, and whether they were in training mode at each training batch; `mode` is the learner's name (the
    training mode, as the package names its learners)."""

    def before_fit(self) -> None:
        curves = getattr(self.learn, "curves", None)
        self.record.setdefault("mode", getattr(curves, "label", None))
        self.record.setdefault("before", batchnorm_state(body_batchnorms(self.learn.model)))

    def before_batch(self) -> None:
        if self.training:
            self.record.setdefault("bn_training", set()).update(m.training for m in body_batchnorms(self.learn.model))

    def after_fit(self) -> None:
        self.record["after"] = batchnorm_state(body_batchnorms(self.learn.model))
        super().after_fit()


def install(probe: type[Probe], out: str | Path | None = None) -> type[Probe]:
    """From now on every Learner created gets a `probe` (saving its records to `out` after each fit, if given);
    returns the installed class, whose `records` lists what each learner's probe recorded."""
    cls = type(probe.__name__, (probe,), dict(records=[], out=None if out is None else str(out)))
    defaults.callbacks.append(cls)
    return cls


@contextmanager
def installed(probe: type[Probe], out: str | Path | None = None) -> Iterator[list[dict]]:
    """Every Learner created inside the block gets a `probe`; yields the list of their records."""
    cls = install(probe, out)
    try:
        yield cls.records
    finally:
        defaults.callbacks.remove(cls)


def launcher(path: Path, script: Path, probe: str, out: Path, before: str = "") -> Path:
    """Write at `path` a script that installs `probe` (saving to `out`), runs `before`, then runs `script` with
    the launcher's own arguments."""
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(f"import runpy, sys\nsys.path.insert(0, {str(TESTS)!r})\nimport probes\n"
                    f"probes.install(probes.{probe}, {str(out)!r})\n{before}\n"
                    f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    return path


def rank_records(out: Path, world: int) -> list[list[dict]]:
    """What each rank's probes saved, in rank order."""
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
