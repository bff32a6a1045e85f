"""Part II of the practical: a timm model with a fastai head as fastai's vision_learner builds it (`resnet_learner`),
its parameters grouped by stage (transfer.stages), trained in one of the modes of train.modes' table (`set_mode`,
`train_mode`): from scratch, fine-tuned, with a frozen body whose BatchNorm is frozen too (`frozen`) or trains
(`frozen_bn`), frozen to a depth, one stage alone (surgical), at discriminative rates or gradually unfrozen."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle / fine_tune)
import numpy as np
import timm
import torch
from fastai.callback.core import Callback, CancelEpochException
from fastai.data.core import DataLoaders
from fastai.data.transforms import get_c
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat as FastaiCrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.learner import create_timm_model, default_split
from fastcore.meta import delegates
from torch import nn

from ..core.checks import check_name
from ..train.learner import count_params, setup_learner
from ..train.loop import CrossEntropyLossFlat, learner_class
from ..train.modes import check_modes, set_mode, training_mode  # noqa: F401 (set_mode: part of this module's API)
from ..train.optimizer import default_opt_func
from .weights import RANDOM_INIT, WeightsArg, hub_state_dict, describe_weights, load_body_weights, weights_path
from .weights import check_normalization
from .stages import check_stage_modes, describe_trainable, group_names, has_stages, stage_split

MAX_IMAGE_SIZE = 4096  # the search for the smallest image a body accepts stops here


def check_arch(arch: str) -> None:
    """Raise a ValueError with close matches when `arch` is not a timm model name."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a timm model name such as 'resnet50', got {arch!r}")
    if not timm.is_model(arch):
        check_name(arch, timm.list_models(), "timm architecture",
                   hint="timm.list_models('resnet*') lists the names that match a pattern.")


def _feature_error(features: Callable[[torch.Tensor], torch.Tensor], size: int, n_in: int) -> str | None:
    """None when a blank 1 x n_in x size x size image gives a non-empty feature map, else what went wrong."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, n_in, size, size))
    except Exception as e:  # conv/pool "output size is too small", timm's fixed-size assertions, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None if out.numel() else f"empty feature map of shape {tuple(out.shape)}"


def check_plan(modes: Sequence[str], command: str, arch: str, epochs: int, bs: int, lr: float,
               freeze_epochs: int) -> list[str]:
    """The modes to run (repeats dropped), each one of the table's modes for `command`, with a trainable
    architecture (that has the stage groups the modes name) and a positive schedule in which fine_tune has both
    phases; raises ValueError before any work."""
    modes = check_modes(modes, command)
    check_arch(arch)
    if any(":" in m for m in modes):  # a stage mode: the architecture must have the groups it names
        check_stage_modes(arch, modes)
    if epochs <= 0 or bs <= 0 or lr <= 0:
        raise ValueError(f"epochs, batch size and lr must be positive, got epochs={epochs}, bs={bs}, lr={lr}")
    if any(training_mode(m).schedule == "fine_tune" for m in modes) and not 0 < freeze_epochs < epochs:
        raise ValueError(f"finetune needs 0 < freeze_epochs < epochs, got freeze_epochs={freeze_epochs}, "
                         f"epochs={epochs}: raise --epochs")
    return modes


def check_image_size(model: nn.Module | str, size: int, n_in: int = 3) -> None:
    """Raise a ValueError when `size` px images are too small for `model` (a timm name, a timm model or a body).

    A dry forward of one blank image (eval mode, no gradient) decides; when it fails, the smallest size that
    passes is searched (doubling, then bisection) and named. Measured with timm 1.0: ResNets and EfficientNets
    pass at any size (padding keeps a 1x1 map), VGG needs 32 px, Inception v3 75 px, ViTs their fixed size.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"image size must be a positive number of pixels, got {size!r}")
    name = model if isinstance(model, str) else type(getattr(model, "model", model)).__name__
    if isinstance(model, str):
        check_arch(model)
        model = timm.create_model(model, pretrained=False, num_classes=0, in_chans=n_in)
    features = getattr(model, "forward_features", model)  # a timm model; a fastai TimmBody calls it itself
    was_training = model.training
    model.eval()
    try:
        why = _feature_error(features, size, n_in)
        if why is None:
            return
        hi = size * 2
        while hi <= MAX_IMAGE_SIZE and _feature_error(features, hi, n_in) is not None:
            hi *= 2
        if hi <= MAX_IMAGE_SIZE:
            lo = size
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if _feature_error(features, mid, n_in) is None else (mid, hi)
            need = f"needs images of at least {hi} px"
        else:
            cfg = getattr(getattr(model, "model", model), "pretrained_cfg", None) or {}
            fixed = (cfg.get("input_size") or [None])[-1]
            if not fixed or _feature_error(features, fixed, n_in) is not None:
                raise ValueError(f"{name} fails on images of {size} px and on every size up to {MAX_IMAGE_SIZE} px "
                                 f"({why}): choose another architecture")
            hi, need = fixed, f"takes images of {fixed} px only"
    finally:
        model.train(was_training)
    raise ValueError(f"image size {size} px is too small for {name}: its body {need} ({why}). Pass size={hi} "
                     f"(--size {hi}) or larger, or choose an architecture that downsamples less")


def input_size(dls: DataLoaders) -> int | None:
    """The side of the images `dls` gives (the smaller side of non-square ones): from the tensors of an in-memory
    loader, else from one batch (validation first), drawn with every global random state put back as it was (a
    check must not change the run); None when no loader shows an image batch without being consumed (a stream)."""
    for dl in reversed(list(getattr(dls, "loaders", [])[:2])):
        x = getattr(dl, "x", None)
        if not isinstance(x, torch.Tensor) and callable(getattr(dl, "one_batch", None)):
            own = getattr(dl, "rng", None)  # a fastai loader's shuffling generator, drawn from at every iteration
            own = own if isinstance(own, random.Random) else None
            state = random.getstate(), np.random.get_state(), own.getstate() if own is not None else None
            try:
                with torch.random.fork_rng(devices=[]):
                    x = dl.one_batch()[0]
            except (StopIteration, IndexError):  # an empty split
                continue
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])
                if own is not None:
                    dl.rng = own
                    own.setstate(state[2])
        if isinstance(x, torch.Tensor) and x.dim() >= 4:
            return int(min(x.shape[-2:]))
    return None


@delegates(setup_learner, but=["learn"])
def resnet_learner(dls: DataLoaders, arch: str = "resnet50", pretrained: WeightsArg = False, n_in: int = 3,
                   train_bn: bool = True, path: str | Path = ".", lr: float = 2e-3, size: int | None = None,
                   stock: bool = False, **kwargs: Any) -> Learner:
    """A timm model (body + a new fastai head sized to the classes), with every layer trainable, in the package's
    Learner (fastai's own with `stock`: its stock loop, for comparisons).

    Built from fastai's public pieces as fastai's `vision_learner(dls, arch, normalize=False, pretrained=False)`
    builds it: `create_timm_model` (fastai's head, its initialisation), the same attributes (`arch`, `n_out`,
    `n_in`, `normalize`); the learner's class is the package's from the start, with the package's
    CrossEntropyLossFlat (fastai's with `stock`). Its splitter cuts the parameters by stage
    (transfer.stages.stage_split: stem, layer1..layer4, head for a ResNet; one group per entry of the body's timm
    `feature_info`), so fastai's `freeze_to(k)` freezes the first k stages and `slice(lo, hi)` spreads rates over
    them; a body without `feature_info` gets fastai's `default_split` (body, head).

    `pretrained`: True (ImageNet weights from the timm / Hugging Face hub), False (random init) or the path of a
    .safetensors / .pth state dict of the same architecture (classifier keys ignored, loaded with
    weights_only). Normalisation is left to the DataLoaders (see image_data.folder_dls); with hub weights, a fastai
    Normalize in them must use the pretrained configuration's statistics (weights.normalization). The learner records
    `learn.weights` (where the weights came from) and `learn.weights_info` (the file's JSON sidecar). The body is
    checked to accept the DataLoaders' images (check_image_size, as the command line does; their side is `size` or
    read from the DataLoaders, see input_size): images too small for `arch` raise a ValueError naming the smallest
    size, before anything trains.
    Optimiser: optimizer.default_opt_func. `kwargs` go to train.learner.setup_learner (precision, curves CSV, name,
    progress, log, channels_last: None on CUDA only).
    """
    check_arch(arch)
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    check_normalization(dls, pretrained, arch, n_in)  # hub weights expect their pretrained config's mean and std
    file = weights_path(pretrained)
    weights, weights_info = describe_weights(pretrained, arch)
    hub_sd = None
    if pretrained is True:  # download before building, so an offline error comes first and fast
        hub_sd, hub_id = hub_state_dict(arch, n_in)
        weights = f"timm hub: {hub_id}"
    n_out = get_c(dls)
    if not n_out:
        raise ValueError("the number of classes is unknown: the DataLoaders have no `c` (set dls.c)")
    model, _ = create_timm_model(arch, n_out, pretrained=False, n_in=n_in)  # hub weights are loaded below
    loss_func = FastaiCrossEntropyLossFlat() if stock else CrossEntropyLossFlat()
    splitter = stage_split if has_stages(model) else default_split
    learn = learner_class(stock)(dls, model, loss_func=loss_func, metrics=accuracy, lr=lr, path=path,
                                 splitter=splitter, train_bn=train_bn, opt_func=default_opt_func(dls.device))
    learn.arch, learn.n_out, learn.n_in, learn.normalize = arch, n_out, n_in, False  # as vision_learner records
    size = input_size(dls) if size is None else size
    if size is not None:
        check_image_size(learn.model[0], size, n_in)
    body = learn.model[0].model
    if hub_sd is not None:
        body.load_state_dict(hub_sd, strict=True)
    elif file is not None:
        learn.weights_load = load_body_weights(body, file, n_in)
    learn.weights, learn.weights_info = weights, weights_info
    learn.pretrained = weights != RANDOM_INIT
    return setup_learner(learn, **{**kwargs, "name": kwargs.get("name") or arch})


def trainable_summary(learn: Learner) -> tuple[int, int]:
    """(trainable, total) parameters of the learner's model as it stands."""
    return count_params(learn.model)


def _phase(learn: Learner, epochs: int, lr: Any) -> dict[str, Any]:
    trainable, total = trainable_summary(learn)
    return dict(trains=describe_trainable(learn), epochs=epochs, lr=_lr_text(lr), trainable_params=trainable,
                total_params=total)


def _lr_text(lr: Any) -> str:
    return f"slice({lr.start:.3g}, {lr.stop:.3g})" if isinstance(lr, slice) else str(lr)


def _gradual_phases(learn: Learner, mode: Any, epochs: int, lr: Any) -> list[dict[str, Any]]:
    """The phases of a gradual mode (one more group each epoch until every group trains), worked out on the
    learner's groups without training: what trains and how many weights, epoch by epoch."""
    groups = learn.opt.param_lists
    names = group_names(learn.model, len(groups))
    total = sum(p.numel() for p in learn.model.parameters())
    phases: list[dict[str, Any]] = []
    for epoch in range(epochs):
        frozen = mode.frozen_groups(len(groups), epoch)
        trains = [n for n, f in zip(names, frozen) if not f]
        what = ("all layers" if not any(frozen) else "head only (BatchNorm frozen too)" if trains == ["head"]
                else ", ".join(trains))
        if phases and phases[-1]["trains"] == what:
            phases[-1]["epochs"] += 1
            continue
        trainable = sum(p.numel() for g, f in zip(groups, frozen) if not f for p in g)
        phases.append(dict(trains=what, epochs=1, lr=_lr_text(lr), trainable_params=trainable, total_params=total))
    return phases


class PhaseEpochs(Callback):
    """Epochs numbered across the fits of one mode (fine_tune runs two) and skipped up to `done` (a checkpoint's).

    CurvesCallback and CheckpointCallback number their rows `learn.epoch + 1`, which restarts with every fit;
    during `after_epoch` this callback shows them the mode's epoch and epoch count, and its partner `restore`
    (order 66) gives fastai back its own values, which the one-cycle schedule reads. Skipped epochs keep their
    place in the schedule, like fastai's `start_epoch`. Also counts this process's training batches.
    """
    order = 59  # before CurvesCallback (60) and CheckpointCallback (65)

    def __init__(self, phase_epochs: Sequence[int], done: int = 0, opt_state: dict | None = None):
        self.starts = [sum(phase_epochs[:i]) for i in range(len(phase_epochs))]
        self.total, self.done, self.fits, self.offset, self.batches = sum(phase_epochs), done, 0, 0, 0
        self.restore = _RestoreEpoch(self)
        # a resumed run's optimizer state: fastai's freeze() / unfreeze() clear it, so it is put back when the
        # first epoch trains, unless that epoch starts a phase (an uninterrupted run clears it there too)
        self.opt_state = None if done in self.starts else opt_state

    def before_train(self) -> None:
        if self.opt_state is not None:
            self.learn.opt.load_state_dict(self.opt_state)
            self.opt_state = None

    def before_fit(self) -> None:
        self.offset = self.starts[min(self.fits, len(self.starts) - 1)]
        self.fits += 1

    def after_batch(self) -> None:
        if self.training:
            self.batches += 1

    def after_epoch(self) -> None:
        self.saved = self.learn.epoch, self.learn.n_epoch
        self.learn.epoch, self.learn.n_epoch = self.offset + self.learn.epoch, self.total


class _RestoreEpoch(Callback):
    """PhaseEpochs' second half: skips the epochs already done and gives fastai back its epoch counters."""
    order = 66  # after CheckpointCallback (65)

    def __init__(self, shift: PhaseEpochs):
        self.shift = shift

    def before_epoch(self) -> None:
        if self.shift.offset + self.learn.epoch < self.shift.done:  # after CurvesCallback (60) reset its sums
            raise CancelEpochException

    def after_epoch(self) -> None:
        self.learn.epoch, self.learn.n_epoch = self.shift.saved


def _tag_phases(learn: Learner, first_row: int, phases: list[dict]) -> None:
    """Tag each new row of the learner's curves with the phase (what trained) of its epoch."""
    labels = [p["trains"] for p in phases for _ in range(p["epochs"])]
    for row in getattr(getattr(learn, "curves", None), "history", [])[first_row:]:
        row["phase"] = labels[min(row["epoch"], len(labels)) - 1]


def train_mode(learn: Learner, mode: str, epochs: int, lr: float = 2e-3, freeze_epochs: int = 1, start: int = 0,
               lr_mult: float = 100) -> dict[str, Any]:
    """Train in one of the table's modes (train.modes); `epochs` counts every pass, so all modes get the same budget.

    scratch, unfrozen: `fit_one_cycle(epochs, lr)` on everything. finetune: `fine_tune(epochs - freeze_epochs, lr,
    freeze_epochs, lr_mult=lr_mult)`: the head (and the body's BatchNorm) first, then everything with
    discriminative rates spread over the stage groups (stem lr/2/lr_mult up to head lr/2; fastai's default
    lr_mult=100 leaves the body almost frozen on a few dozen steps). frozen: `freeze()` then
    `fit_one_cycle(epochs, lr)`: the head alone learns, the body's BatchNorm stays in eval mode with its statistics;
    frozen_bn: the same with the body's BatchNorm training. frozen_to:K, frozen_bn_to:K, surgical:K: `set_mode`'s
    groups, then `fit_one_cycle(epochs, lr)`; discriminative:R: `fit_one_cycle(epochs, slice(lr / R, lr))`;
    gradual: `fit_one_cycle(epochs, lr)` with one more group thawed each epoch (GradualUnfreezing).
    Every mode trains the weights the learner holds: build a scratch learner with pretrained=False.
    `start`: epochs already done (a resumed run, weights and optimizer loaded): the schedule skips them, in
    whichever of fine_tune's phases they end. Epochs are numbered 1..`epochs` across fine_tune's two fits.
    """
    m = training_mode(mode)
    if m.schedule == "features":
        raise ValueError(f"mode {m.name!r} trains the head on precomputed features: use "
                         "transfer.features.train_head_on_features")
    fine_tune = m.schedule == "fine_tune"
    if epochs <= 0 or lr <= 0:
        raise ValueError(f"epochs and lr must be positive, got epochs={epochs}, lr={lr}")
    if fine_tune and not 0 < freeze_epochs < epochs:
        raise ValueError(f"finetune needs 0 < freeze_epochs < epochs (head first, then everything), got "
                         f"freeze_epochs={freeze_epochs}, epochs={epochs}")
    if not 0 <= start <= epochs:
        raise ValueError(f"start must lie in [0, epochs={epochs}], got {start}")
    if lr_mult <= 0:
        raise ValueError(f"lr_mult must be positive, got {lr_mult}")
    first_row = len(learn.curves.history) if hasattr(learn, "curves") else 0
    loaded = learn.opt.state_dict() if start and learn.opt is not None else None  # before freeze() clears it
    set_mode(learn, m)
    shift = PhaseEpochs([freeze_epochs, epochs - freeze_epochs] if fine_tune else [epochs], start, loaded)
    cbs = [shift, shift.restore]
    t0 = time.perf_counter()
    if fine_tune:
        phases = [_phase(learn, freeze_epochs, lr)]
        learn.fine_tune(epochs - freeze_epochs, base_lr=lr, freeze_epochs=freeze_epochs, lr_mult=lr_mult, cbs=cbs)
        phases.append(_phase(learn, epochs - freeze_epochs, slice(lr / 2 / lr_mult, lr / 2)))
    else:
        lr_max = m.lr_max(lr)
        phases = _gradual_phases(learn, m, epochs, lr_max) if m.schedule == "gradual" else [
            _phase(learn, epochs, lr_max)]
        learn.fit_one_cycle(epochs, lr_max, cbs=cbs)
    _tag_phases(learn, first_row, phases)
    return dict(mode=m.name, epochs=epochs, phases=phases, seconds=time.perf_counter() - t0, start=start,
                train_batches=shift.batches)
