"""The one table of training modes: for each mode, what is frozen, whether the body's BatchNorm trains, how it is
scheduled, where its weights start, its label (plot legends, reports) and the commands that accept it.

Every command (`tp3 finetune`, `tp3 label-efficiency`, `tp3 bench`, `tp3 run`), function, report and figure reads
its modes here, so a word means one thing everywhere: `frozen` is the body frozen *with* its BatchNorm (fastai's
`train_bn=False`: BatchNorm layers in eval mode, their weights and running statistics unchanged); `frozen_bn` is
the body frozen while its BatchNorm trains (fastai's default `freeze()`).

A model here is fastai's (body, head): `freeze_to(n)` is fastai's, on the learner's parameter groups. A timm body
that lists its stages (a ResNet) has six, by stage (transfer.stages: stem, layer1..layer4, head), so a freeze
depth K (`frozen_to:K`) freezes the first K groups: 0 nothing, 5 the whole body (= `frozen`). Modes that take a
parameter (`family:argument`: `frozen_to:K`, `frozen_bn_to:K`, `surgical:K`, `discriminative:R`) are made by the
functions in `FAMILIES`; `training_mode` looks a name up in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from dataclasses import replace

from fastai.callback.core import Callback
from fastai.callback.training import BnFreeze
from fastai.learner import Learner

from ..core.checks import check_name, check_names

COMMANDS = ("finetune", "label-efficiency", "bench", "run")
TRANSFER = ("finetune", "label-efficiency", "run")  # the commands that train a target task
SCHEDULES = ("one_cycle", "fine_tune", "features", "gradual")
STAGE_GROUPS = 6  # a ResNet's parameter groups by stage: stem, layer1..layer4, head (transfer.stages)


@dataclass(frozen=True)
class TrainingMode:
    """One way to train a (body, head) model.

    `freeze_to`: fastai's `freeze_to(n)` before training: the first n parameter groups frozen (0: every layer
    trains; -1: the head alone, plus the body's BatchNorm when `train_bn`). `train_bn`: the BatchNorm layers of
    frozen groups train (weights, batch statistics); False keeps them in eval mode with their weights and running
    statistics (fastai's BnFreeze), and the frozen prefix then keeps no activations for the backward pass.
    `schedule`: 'one_cycle' (fit_one_cycle), 'fine_tune' (frozen for `freeze_epochs`, then every layer at
    discriminative rates), 'features' (the head trained on body features computed once) or 'gradual' (the head
    alone in the first epoch, then one more group each epoch from the head down, ULMFiT's gradual unfreezing).
    `pretrained`: starts from the command's pretrained weights (False: a random init). `commands`: where the mode
    applies. `train_groups`: groups that train although `freeze_to` freezes them (surgical fine-tuning: one stage
    with the head). `lr_mult`: discriminative rates, `slice(lr / lr_mult, lr)` spread geometrically over the
    groups from the first to the head (None: one rate; fine_tune's second phase takes the command's lr_mult).
    """
    name: str
    label: str
    freeze_to: int
    train_bn: bool
    schedule: str
    pretrained: bool
    commands: tuple[str, ...]
    train_groups: tuple[int, ...] = ()
    lr_mult: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"mode {self.name!r}: schedule must be one of {', '.join(SCHEDULES)}, got "
                             f"{self.schedule!r}")
        unknown = set(self.commands) - set(COMMANDS)
        if unknown:
            raise ValueError(f"mode {self.name!r}: unknown command(s) {', '.join(sorted(unknown))}")
        if self.lr_mult is not None and not self.lr_mult > 0:
            raise ValueError(f"mode {self.name!r}: lr_mult must be positive, got {self.lr_mult}")

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
                    pretrained=self.pretrained, train_groups=list(self.train_groups), lr_mult=self.lr_mult)

    def lr_max(self, lr: float) -> float | slice:
        """The learning rate fit_one_cycle gets: `lr`, or `slice(lr / lr_mult, lr)` for discriminative rates."""
        return slice(lr / self.lr_mult, lr) if self.lr_mult is not None else lr

    def frozen_groups(self, n_groups: int, epoch: int = 0) -> list[bool]:
        """For each of `n_groups` parameter groups, whether it is frozen in the mode's `epoch` (0-based; gradual
        unfreezing thaws one more group each epoch, from the head down)."""
        k = self.freeze_to if self.freeze_to >= 0 else n_groups + self.freeze_to
        if self.schedule == "gradual":
            k = max(k - epoch, 0)
        return [i < k and i not in self.train_groups for i in range(n_groups)]


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
    TrainingMode("gradual", "gradual (the head first, then one more stage each epoch, from the top: ULMFiT)", -1,
                 False, "gradual", True, TRANSFER + ("bench",)),
)}

# the modes each command runs when none are given
DEFAULT_MODES: dict[str, tuple[str, ...]] = {
    "finetune": ("scratch", "finetune", "frozen"),
    "label-efficiency": ("scratch", "frozen", "frozen_bn", "finetune"),
    "bench": ("unfrozen", "frozen_bn", "frozen", "precomputed"),
}

# old spellings, refused with the new one
RENAMED = {"frozen_train_bn": "frozen_bn"}

@dataclass(frozen=True)
class Family:
    """A family of parametrised modes, '`name`:argument': `make(argument)` builds the mode (a ValueError for a bad
    argument); `argument` is how lists of modes write it ('K'), `example` an argument `make` accepts."""
    name: str
    make: Callable[[str], TrainingMode]
    argument: str = "..."
    example: str | None = None

    def __call__(self, argument: str) -> TrainingMode:
        return self.make(argument)

    def commands(self) -> tuple[str, ...]:
        """The commands its modes apply to (those of its example; every command when it has none)."""
        return self.make(self.example).commands if self.example is not None else COMMANDS


# parametrised modes: 'family:argument' -> a TrainingMode
FAMILIES: dict[str, Family] = {}


def register_family(family: str, make: Callable[[str], TrainingMode], argument: str = "...",
                    example: str | None = None) -> None:
    """Add a family of parametrised modes, named '`family`:argument' (e.g. a freeze depth); `argument` says how
    the argument is written in lists of modes ('K'), `example` is one that `make` accepts."""
    if family in MODES or ":" in family:
        raise ValueError(f"a mode family cannot be named {family!r}")
    FAMILIES[family] = Family(family, make, argument, example)


def _depth(family: str, argument: str, what: str, high: int = STAGE_GROUPS - 1) -> int:
    """The integer argument of a stage family, written plainly (no sign, no leading zero), in [0, high]."""
    if not argument.isdigit() or str(int(argument)) != argument or not int(argument) <= high:
        raise ValueError(f"training mode '{family}:{argument}': {family} takes {what}, 0-{high} (a ResNet's stage "
                         f"groups: 0 stem, 1-4 layer1-layer4, 5 head), e.g. {family}:{min(high, 3)}")
    return int(argument)


def frozen_to(argument: str) -> TrainingMode:
    """`frozen_to:K`: the first K parameter groups frozen with their BatchNorm (eval mode, statistics kept), the
    rest trains; K = 0 every layer, 5 = frozen (the head alone)."""
    k = _depth("frozen_to", argument, "the number of stage groups frozen")
    what = {0: "nothing frozen", STAGE_GROUPS - 1: "the whole body frozen, BatchNorm too"}
    label = what.get(k, f"the first {k} stage groups frozen, BatchNorm too")
    return TrainingMode(f"frozen_to:{k}", f"frozen_to:{k} ({label})", k, False, "one_cycle", True,
                        TRANSFER + ("bench",))


def frozen_bn_to(argument: str) -> TrainingMode:
    """`frozen_bn_to:K`: as frozen_to:K, the BatchNorm layers of the frozen groups training (5 = frozen_bn)."""
    k = _depth("frozen_bn_to", argument, "the number of stage groups frozen")
    return replace(frozen_to(argument), name=f"frozen_bn_to:{k}", train_bn=True,
                   label=f"frozen_bn_to:{k} (the first {k} stage groups frozen, their BatchNorm trains)")


def surgical(argument: str) -> TrainingMode:
    """`surgical:K`: one stage group alone trains with the head (K = 0 stem .. 4 layer4), the rest frozen with its
    BatchNorm (Lee et al., ICLR 2023: surgical fine-tuning)."""
    k = _depth("surgical", argument, "the stage group that trains", STAGE_GROUPS - 2)
    name = "stem" if k == 0 else f"layer{k}"
    return TrainingMode(f"surgical:{k}", f"surgical:{k} ({name} alone trains with the head)", -1, False, "one_cycle",
                        True, TRANSFER + ("bench",), train_groups=(k,))


def discriminative(argument: str) -> TrainingMode:
    """`discriminative:R`: every layer trains at rates spread geometrically from lr / R (stem) to lr (head)."""
    try:
        r = float(argument)
    except ValueError:
        r = float("nan")
    if not r >= 1 or argument != argument.strip() or r == float("inf"):
        raise ValueError(f"training mode 'discriminative:{argument}': discriminative takes the ratio of the head's "
                         "learning rate to the stem's, a number >= 1, e.g. discriminative:10")
    return TrainingMode(f"discriminative:{argument}", f"discriminative:{argument} (every layer, rates lr/{argument} at "
                        "the stem up to lr at the head)", 0, True, "one_cycle", True, TRANSFER + ("bench",),
                        lr_mult=r)


register_family("frozen_to", frozen_to, "K", "3")
register_family("frozen_bn_to", frozen_bn_to, "K", "3")
register_family("surgical", surgical, "K", "1")
register_family("discriminative", discriminative, "R", "10")


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
    check_name(name, list(MODES) + [f"{f.name}:{f.argument}" for f in FAMILIES.values()], "training mode")
    raise AssertionError  # check_name raised


def modes_for(command: str) -> tuple[str, ...]:
    """The table's modes that `command` accepts, in table order."""
    check_name(command, COMMANDS, "command")
    return tuple(n for n, m in MODES.items() if command in m.commands)


def families_for(command: str) -> tuple[str, ...]:
    """The parametrised modes that `command` accepts, as lists of modes write them ('frozen_to:K', ...)."""
    check_name(command, COMMANDS, "command")
    return tuple(f"{f.name}:{f.argument}" for f in FAMILIES.values() if command in f.commands())


def _choices(command: str) -> str:
    return ", ".join(modes_for(command) + families_for(command))


def check_modes(modes: str | Iterable[str], command: str) -> list[str]:
    """The modes (a list or 'a,b'), repeats dropped, each known and accepted by `command`; else a ValueError."""
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",")]
    names = [m for m in dict.fromkeys(str(m) for m in modes) if m]
    if not names:
        raise ValueError(f"no training mode given: tp3 {command} takes {_choices(command)}")
    unknown = [n for n in names if n not in MODES and n not in RENAMED and n.partition(":")[0] not in FAMILIES]
    if unknown:  # every unknown one at once, each with its close names among this command's modes
        check_names(unknown, modes_for(command) + families_for(command), "training mode")
    for name in names:
        mode = training_mode(name)
        if command not in mode.commands:
            raise ValueError(f"training mode {name!r} does not apply to tp3 {command} (it applies to tp3 "
                             f"{', '.join(mode.commands)}): choose from {_choices(command)}")
    return names


def mode_file_name(name: str) -> str:
    """The mode's name as run folders write it in file and folder names ('frozen_to:3' -> 'frozen_to-3': a colon
    is not allowed in Windows file names)."""
    return training_mode(name).name.replace(":", "-")


def mode_label(name: str) -> str:
    """The mode's label, as plot legends and reports show it."""
    return training_mode(name).label


class GradualUnfreezing(Callback):
    """ULMFiT's gradual unfreezing within one fit: before each training epoch, fastai's `opt.freeze_to(k)` with k
    one group lower than the epoch before (the head alone first, then the last stage with it, ...), keeping the
    optimiser state of the groups already training. Runs before BnFreeze, which then puts the BatchNorm layers of
    the groups still frozen in eval mode.

    In a data-parallel fit, DistributedDataParallel all-reduces the gradients of the parameters that trained when
    it wrapped the model (fastai's DistributedTrainer wraps it once, before the fit): when a group thaws, the model
    is wrapped again by the trainer's accelerator, on every rank at the same epoch, so that the new group's
    gradients are all-reduced too (without it the ranks' weights drifted apart)."""
    order = -5  # after TrainEvalCallback (-10) put the model in training mode, before BnFreeze (0)

    def __init__(self, mode: TrainingMode):
        self.mode = mode

    def before_train(self) -> None:
        opt = self.learn.opt
        frozen = sum(self.mode.frozen_groups(len(opt.param_lists), self.learn.epoch))
        if frozen == getattr(opt, "frozen_idx", None):
            return
        opt.freeze_to(frozen)  # a prefix: gradual thaws from the head down
        trainer = next((cb for cb in self.learn.cbs if hasattr(cb, "accelerator")), None)
        wrapped = getattr(self.learn.model, "module", None)
        if trainer is not None and wrapped is not None:  # data-parallel: all-reduce the thawed group's gradients
            self.learn.model = trainer.accelerator.prepare(wrapped)


def check_groups(mode: TrainingMode, n_groups: int, names: Sequence[str] = ()) -> None:
    """A ValueError when `mode` names stage groups that a learner with `n_groups` parameter groups lacks."""
    k = mode.freeze_to if mode.freeze_to >= 0 else n_groups + mode.freeze_to
    top = max([k, *[g + 1 for g in mode.train_groups]])
    if top >= n_groups or k < 0:
        have = f" ({', '.join(names)})" if names else ""
        raise ValueError(f"training mode {mode.name!r} needs {top + 1} parameter groups (a timm body that lists its "
                         f"stages, e.g. a ResNet: stem, layer1..layer4, head), but this learner has {n_groups}"
                         f"{have}: choose a smaller stage number or build the learner with resnet_learner from a "
                         "timm CNN")


def set_mode(learn: Learner, mode: str | TrainingMode) -> Learner:
    """Prepare a learner's trainable layers for `mode`: fastai's `freeze_to(mode.freeze_to)` on its parameter
    groups, the mode's `train_groups` trainable again (surgical), with the frozen groups' BatchNorm training
    (`train_bn`) or frozen in eval mode with its statistics (fastai's BnFreeze); a gradual mode starts with the head
    alone and thaws a group per epoch (GradualUnfreezing). A 'features' mode (precomputed) leaves the learner as its
    frozen body requires; its head trains elsewhere."""
    m = training_mode(mode)
    if m.train_bn != learn.train_bn:
        learn.train_bn = m.train_bn
        learn.opt = None  # BatchNorm's 'force_train' flags are set when the optimizer is created
    if learn.opt is None:
        learn.create_opt()
    check_groups(m, len(learn.opt.param_lists))
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (BnFreeze, GradualUnfreezing))])
    if m.body_frozen:
        if not m.train_bn:
            learn.add_cb(BnFreeze())  # only touches BatchNorm layers whose parameters are frozen
        learn.freeze_to(m.freeze_to)
        for g in m.train_groups:  # surgical: this stage trains with the head
            for p in learn.opt.param_lists[g]:
                p.requires_grad_(True)
    else:
        learn.unfreeze()
    if m.schedule == "gradual":
        learn.add_cb(GradualUnfreezing(m))
    return learn
