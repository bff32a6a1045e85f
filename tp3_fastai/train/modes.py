"""The one table of training modes: for each mode, what is frozen, whether the body's BatchNorm trains, how it is
scheduled, where its weights start, its label (plot legends, reports) and the commands that accept it.

Every command (`tp3 finetune`, `tp3 label-efficiency`, `tp3 bench`, `tp3 run`), function, report and figure reads
its modes here, so a word means one thing everywhere: `frozen` is the body frozen *with* its BatchNorm (fastai's
`train_bn=False`: BatchNorm layers in eval mode, their weights and running statistics unchanged); `frozen_bn` is
the body frozen while its BatchNorm trains (fastai's default `freeze()`).

A model here is fastai's (body, head): `freeze_to(n)` is fastai's, on the learner's parameter groups (the body's,
then the head's). Modes that take a parameter (`family:argument`, e.g. a freeze depth) are made by the functions in
`FAMILIES`; `training_mode` looks a name up in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fastai.callback.training import BnFreeze
from fastai.learner import Learner

from ..core.checks import check_name, check_names

COMMANDS = ("finetune", "label-efficiency", "bench", "run")
TRANSFER = ("finetune", "label-efficiency", "run")  # the commands that train a target task
SCHEDULES = ("one_cycle", "fine_tune", "features")


@dataclass(frozen=True)
class TrainingMode:
    """One way to train a (body, head) model.

    `freeze_to`: fastai's `freeze_to(n)` before training (0: every layer trains; -1: the head alone, plus the
    body's BatchNorm when `train_bn`). `train_bn`: while the body is frozen its BatchNorm layers train (weights,
    batch statistics); False keeps them in eval mode with their weights and running statistics (fastai's
    BnFreeze). `schedule`: 'one_cycle' (fit_one_cycle), 'fine_tune' (frozen for `freeze_epochs`, then every layer
    at discriminative rates) or 'features' (the head trained on body features computed once). `pretrained`: starts
    from the command's pretrained weights (False: a random init). `commands`: where the mode applies.
    """
    name: str
    label: str
    freeze_to: int
    train_bn: bool
    schedule: str
    pretrained: bool
    commands: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"mode {self.name!r}: schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.schedule!r}")
        unknown = set(self.commands) - set(COMMANDS)
        if unknown:
            raise ValueError(f"mode {self.name!r}: unknown command(s) {', '.join(sorted(unknown))}")

    @property
    def body_frozen(self) -> bool:
        """Whether the body starts frozen (finetune unfreezes it after its head-only phase)."""
        return self.freeze_to != 0

    @property
    def bn_frozen(self) -> bool:
        """Whether the body's BatchNorm stays frozen while the body is: eval mode, weights and statistics kept."""
        return self.body_frozen and not self.train_bn

    def settings(self) -> dict[str, Any]:
        """What the mode does, for config.json and reports."""
        return dict(label=self.label, freeze_to=self.freeze_to, train_bn=self.train_bn, schedule=self.schedule,
                    pretrained=self.pretrained)


MODES: dict[str, TrainingMode] = {m.name: m for m in (
    TrainingMode("scratch", "scratch (random init, every layer trains)", 0, True, "one_cycle", False, TRANSFER),
    TrainingMode("finetune", "finetune (head first, then every layer at discriminative rates)", -1, True,
                 "fine_tune", True, TRANSFER),
    TrainingMode("frozen", "frozen (body and its BatchNorm frozen: the head alone trains)", -1, False, "one_cycle",
                 True, TRANSFER + ("bench",)),
    TrainingMode("frozen_bn", "frozen_bn (body frozen, its BatchNorm trains with the head)", -1, True, "one_cycle",
                 True, TRANSFER + ("bench",)),
    TrainingMode("unfrozen", "unfrozen (every layer trains)", 0, True, "one_cycle", True, ("bench",)),
    TrainingMode("precomputed", "precomputed (body frozen as in frozen; its features computed once, the head "
                 "trains on them)", -1, False, "features", True, ("bench",)),
)}

# the modes each command runs when none are given
DEFAULT_MODES: dict[str, tuple[str, ...]] = {
    "finetune": ("scratch", "finetune", "frozen"),
    "label-efficiency": ("scratch", "frozen", "frozen_bn", "finetune"),
    "bench": ("unfrozen", "frozen_bn", "frozen", "precomputed"),
}

# old spellings, refused with the new one
RENAMED = {"frozen_train_bn": "frozen_bn"}

# parametrised modes: 'family:argument' -> a TrainingMode (make(argument) raises ValueError on a bad argument)
FAMILIES: dict[str, Callable[[str], TrainingMode]] = {}


def register_family(family: str, make: Callable[[str], TrainingMode]) -> None:
    """Add a family of parametrised modes, named '`family`:argument' (e.g. a freeze depth)."""
    if family in MODES or ":" in family:
        raise ValueError(f"a mode family cannot be named {family!r}")
    FAMILIES[family] = make


def training_mode(name: str | TrainingMode) -> TrainingMode:
    """The mode called `name` (a row of MODES or 'family:argument'); an unknown or old name is refused in one line
    that names the right one."""
    if isinstance(name, TrainingMode):
        return name
    if name in MODES:
        return MODES[name]
    if name in RENAMED:
        new = MODES[RENAMED[name]]
        raise ValueError(f"training mode {name!r} is now called {new.name!r}: {new.label}")
    family, sep, argument = str(name).partition(":")
    if sep and family in FAMILIES:
        return FAMILIES[family](argument)
    check_name(name, list(MODES) + [f"{f}:..." for f in FAMILIES], "training mode")
    raise AssertionError  # check_name raised


def modes_for(command: str) -> tuple[str, ...]:
    """The table's modes that `command` accepts, in table order."""
    check_name(command, COMMANDS, "command")
    return tuple(n for n, m in MODES.items() if command in m.commands)


def check_modes(modes: str | Iterable[str], command: str) -> list[str]:
    """The modes (a list or 'a,b'), repeats dropped, each known and accepted by `command`; else a ValueError."""
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",")]
    names = [m for m in dict.fromkeys(str(m) for m in modes) if m]
    if not names:
        raise ValueError(f"no training mode given: tp3 {command} takes {', '.join(modes_for(command))}")
    unknown = [n for n in names if n not in MODES and n not in RENAMED and n.partition(":")[0] not in FAMILIES]
    if unknown:  # every unknown one at once, each with its close names among this command's modes
        check_names(unknown, modes_for(command), "training mode")
    for name in names:
        mode = training_mode(name)
        if command not in mode.commands:
            raise ValueError(f"training mode {name!r} does not apply to tp3 {command} (it applies to tp3 "
                             f"{', '.join(mode.commands)}): choose from {', '.join(modes_for(command))}")
    return names


def mode_label(name: str) -> str:
    """The mode's label, as plot legends and reports show it."""
    return training_mode(name).label


def set_mode(learn: Learner, mode: str | TrainingMode) -> Learner:
    """Prepare a learner's trainable layers for `mode`: fastai's `freeze_to(mode.freeze_to)`, with the body's
    BatchNorm training (`train_bn`) or frozen in eval mode with its statistics (fastai's BnFreeze). A 'features'
    mode (precomputed) leaves the learner as its frozen body requires; its head trains elsewhere."""
    m = training_mode(mode)
    if m.train_bn != learn.train_bn:
        learn.train_bn = m.train_bn
        learn.opt = None  # BatchNorm's 'force_train' flags are set when the optimizer is created
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, BnFreeze)])
    if m.body_frozen:
        if not m.train_bn:
            learn.add_cb(BnFreeze())  # only touches BatchNorm layers whose parameters are frozen
        learn.freeze_to(m.freeze_to)
    else:
        learn.unfreeze()
    return learn

