"""Parameter groups by stage: a timm model with `feature_info` (a ResNet: stem, layer1..layer4) and fastai's head
cut into one group per stage plus the head, as a fastai splitter, so that fastai's own `freeze_to(n)`,
`unfreeze()` and `slice(lo, hi)` learning rates work stage by stage; and what a training step keeps for its
backward pass, counted by group."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from fastai.torch_core import get_model
from torch import nn

from ..train.modes import check_groups, training_mode

__all__ = ["StageGroup", "check_stage_modes", "has_stages", "stage_groups", "stage_split", "group_names",
           "trainable_groups", "describe_trainable", "saved_for_backward"]


@dataclass
class StageGroup:
    """One parameter group: its name, the names of its parameters (as in `model.named_parameters()`) and the
    parameters themselves, in the model's order."""
    name: str
    param_names: list[str]
    params: list[nn.Parameter]


def _timm_model(model: nn.Module) -> nn.Module | None:
    """The timm model inside fastai's (TimmBody, head), when it lists its stages (`feature_info`)."""
    try:
        body = model[0]
    except (TypeError, IndexError, KeyError):
        return None
    inner = getattr(body, "model", None)
    return inner if isinstance(inner, nn.Module) and getattr(inner, "feature_info", None) else None


def has_stages(model: nn.Module) -> bool:
    """Whether `model` is fastai's (timm body, head) with a body that lists its stages (`feature_info`)."""
    return _timm_model(model) is not None and len(model) >= 2


def check_stage_modes(arch: str, modes: Sequence[str], n_in: int = 3) -> list[str]:
    """The names of the stage groups of `arch` (built once, no weights); a ValueError before any work when a mode
    names groups it lacks (e.g. frozen_to:5 on a ConvNeXt: 4 stages and the head) or it lists no stages."""
    from fastai.vision.learner import create_timm_model

    model, _ = create_timm_model(arch, 2, pretrained=False, n_in=n_in)
    if not has_stages(model):
        raise ValueError(f"{arch} does not list its stages (timm's feature_info), so it has no stage groups: choose "
                         "a timm CNN such as resnet18 for the stage modes")
    names = [g.name for g in stage_groups(model)]
    for mode in modes:
        check_groups(training_mode(mode), len(names), names)
    return names


def _locate(model: nn.Module) -> tuple[nn.Module, str, list[str]]:
    """(the timm model, its name inside `model`, its feature modules); a ValueError when there is none."""
    timm_model = _timm_model(model)
    if timm_model is None or len(model) < 2:
        raise ValueError(f"{type(model).__name__} is not fastai's (timm body, head) with a body that lists its "
                         "stages (timm's feature_info): build the learner with resnet_learner from a timm CNN such "
                         "as resnet18")
    features = [f["module"] for f in timm_model.feature_info]
    prefix = next(n for n, m in model.named_modules() if m is timm_model)
    return timm_model, prefix, features


def _group_index(module: str, prefix: str, features: list[str], order: dict[str, int]) -> int:
    """The group of a module named `module` inside the fastai model: its stage (the first feature module that holds
    it or comes after it in the body's order; after the last one: the last stage), or the head (len(features))."""
    if not (module == prefix or module.startswith(prefix + ".")):
        return len(features)  # fastai's head
    inner = module[len(prefix) + 1:]
    pos = order.get(inner, 0)
    return next((i for i, f in enumerate(features) if inner == f or inner.startswith(f + ".") or pos < order[f]),
                len(features) - 1)


def stage_groups(model: nn.Module) -> list[StageGroup]:
    """The body's parameters by stage, then the head's: one group per entry of timm's `feature_info` (a ResNet:
    stem up to `act1`, layer1, layer2, layer3, layer4), then fastai's head (`model[1:]`).

    A stage holds the parameters from the end of the previous stage up to and including its feature module, in
    the order the model registers them (its forward order); parameters after the last feature module (e.g. an
    EfficientNet's conv_head) join the last stage. Every parameter is in exactly one group (checked)."""
    timm_model, prefix, features = _locate(model)
    order = {name: i for i, (name, _) in enumerate(timm_model.named_modules())}
    missing = [f for f in features if f not in order]
    if missing:
        raise ValueError(f"{type(timm_model).__name__}'s feature_info names modules it does not have: {missing}")
    groups = [StageGroup(f, [], []) for f in features] + [StageGroup("head", [], [])]
    for name, p in model.named_parameters():
        i = _group_index(name.rsplit(".", 1)[0], prefix, features, order)
        groups[i].param_names.append(name)
        groups[i].params.append(p)
    if not any(n.startswith(f"{prefix}.{features[0]}.") for n in groups[0].param_names):
        groups[0].name = "stem"  # a ResNet: conv1, bn1 up to act1
    else:
        groups[0].name = f"stem+{features[0]}"
    seen = [id(p) for g in groups for p in g.params]
    every = {id(p) for p in model.parameters()}
    if len(seen) != len(set(seen)) or set(seen) != every or any(not g.params for g in groups):
        raise AssertionError(f"stage groups of {type(timm_model).__name__} do not hold every parameter once, each "
                             f"group some: {len(seen)} placed, {len(set(seen))} distinct, {len(every)} in the model, "
                             f"group sizes {[len(g.params) for g in groups]}")
    return groups


def stage_split(model: nn.Module) -> list[list[nn.Parameter]]:
    """fastai splitter: the parameters by stage (stage_groups), so that `freeze_to(k)` freezes the first k groups
    (a ResNet: 0 = nothing, 1 = the stem, ..., 5 = the whole body) and `slice(lo, hi)` spreads rates over them."""
    return [g.params for g in stage_groups(model)]


def group_names(model: nn.Module, n_groups: int | None = None) -> list[str]:
    """The names of the learner's parameter groups: the stages and 'head' (stage_split), or 'body' and 'head'
    (fastai's default_split) when the model's body lists no stages or the optimiser has `n_groups` != that."""
    names = [g.name for g in stage_groups(model)] if has_stages(model) else ["body", "head"]
    if n_groups is not None and n_groups != len(names):
        names = ["body", "head"] if n_groups == 2 else [f"group {i}" for i in range(n_groups)]
    return names


def trainable_groups(learn: Any) -> list[bool]:
    """For each of the learner's parameter groups, whether any of its weights trains (BatchNorm alone does not
    count: it trains in a frozen group when `train_bn`)."""
    if learn.opt is None:
        learn.create_opt()
    out = []
    for ps in learn.opt.param_lists:
        weights = [p for p in ps if p.ndim > 1] or list(ps)
        out.append(any(p.requires_grad for p in weights))
    return out


def describe_trainable(learn: Any) -> str:
    """What trains, in words: 'all layers', 'head only (BatchNorm frozen too)', 'head + body BatchNorm', or the
    names of the groups that train (e.g. 'layer3, layer4, head'), with the frozen groups' BatchNorm."""
    model = get_model(learn.model)  # the bare model, also inside DistributedDataParallel
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == sum(p.numel() for p in model.parameters()):
        return "all layers"
    flags = trainable_groups(learn)
    names = group_names(model, len(flags))
    if flags == [False] * (len(flags) - 1) + [True]:
        return "head + body BatchNorm" if learn.train_bn else "head only (BatchNorm frozen too)"
    groups = ", ".join(n for n, f in zip(names, flags) if f)
    return groups + (" (+ BatchNorm of the frozen groups)" if learn.train_bn else "")


@contextmanager
def _current_group(model: nn.Module, groups: list[StageGroup]) -> Iterator[list[str]]:
    """While active, `state[0]` names the group whose module is running its forward (every leaf module announces
    its group before it runs)."""
    timm_model, prefix, features = _locate(model)
    order = {name: i for i, (name, _) in enumerate(timm_model.named_modules())}
    state, hooks = [groups[0].name], []
    for name, m in model.named_modules():
        if any(True for _ in m.children()):
            continue  # leaves only: a container's hook would fire before its children's
        g = groups[_group_index(name, prefix, features, order)].name
        hooks.append(m.register_forward_pre_hook(lambda _m, _x, g=g: state.__setitem__(0, g)))
    try:
        yield state
    finally:
        for h in hooks:
            h.remove()


def saved_for_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, int]:
    """Bytes of activations that autograd keeps for the backward pass in one training forward of `model` on `x`
    (and cross-entropy with `y`), by parameter group (stage_groups; 'loss' for the loss), each storage counted
    once and the parameters themselves not counted. A frozen prefix whose BatchNorm is frozen too keeps none:
    no input of its operations requires a gradient, so autograd records nothing there."""
    groups = stage_groups(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    with _current_group(model, groups) as state:
        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights and ptr not in seen:
                seen[ptr] = (state[0], t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
            if y is not None:
                state[0] = "loss"
                torch.nn.functional.cross_entropy(out, y)
    counts = {g.name: 0 for g in groups} | {"loss": 0}
    for name, nbytes in seen.values():
        counts[name] += nbytes
    return counts

