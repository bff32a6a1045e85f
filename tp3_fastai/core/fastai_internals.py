"""Every private name of fastai that the package relies on, looked up here and nowhere else.

fastai's private names (a leading underscore) can change in any release without notice. The package reads two and
overrides two; each is listed in `PRIVATE_NAMES` with where the package uses it, why, and the fastai functions that
must still use it. The reads go through `lookup` here and nowhere else; tests/test_fastai_internals.py checks that
no other module imports, reads or overrides a private name of fastai, fastcore, fastprogress or fasttransform that
is not listed, and that `check_private_names` finds every listed name where the package expects it. A release that
renames one fails at import (or at first use) with a message naming it, not deep in a fit.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["SUPPORTED_FASTAI", "PrivateName", "PRIVATE_NAMES", "FastaiInternalsError", "lookup",
           "check_private_names", "INNER_LOOP_EVENTS", "get_sz"]

SUPPORTED_FASTAI = ">=2.8,<2.9"  # the fastai releases whose private names were checked (setup.cfg declares the same)



@dataclass(frozen=True)
class PrivateName:
    """How the package uses one private fastai name, and the fastai functions whose source must still use it for
    the package's use to mean what it meant (an override fastai no longer calls would be skipped silently)."""
    use: str
    fastai_users: tuple[str, ...]


PRIVATE_NAMES: dict[str, PrivateName] = {
    "fastai.callback.core._inner_loop": PrivateName(
        "read by train/loop.py: the events of the batch loop, the only ones for which fastai's Callback.__call__ "
        "looks at `run_train` / `run_valid`; the package Learner's event dispatch applies the same rule",
        ("fastai.callback.core.Callback.__call__",)),
    "fastai.vision.augment._get_sz": PrivateName(
        "read by data/pipeline/pil.py: an item's (width, height) as fastai's RandomResizedCrop reads it, for the "
        "centre crop of validation items",
        ("fastai.vision.augment.RandomResizedCrop.before_call",)),
    "fastai.learner.Learner._set_device": PrivateName(
        "overridden by train/loop.py (the package Learner): fastai calls it on every batch to move it to the "
        "model's device; the override returns a batch of plain tensors already there as it is (fastai's walks it "
        "and evaluates default_device() each time, about 60 us a batch on the CPU here)",
        ("fastai.learner.Learner.one_batch",)),
    "fastai.data.core.TfmdDL._pre_show_batch": PrivateName(
        "overridden by data/tensor_loader.py (TensorLoader): the override imports fastai.vision.learner first, "
        "which registers the image versions of show_batch, show_results and plot_top_losses (a 2 s import, paid "
        "only when something is shown)",
        ("fastai.data.core.TfmdDL.show_batch",  # which show_results calls too
         "fastai.interpret.Interpretation.plot_top_losses")),
}


class FastaiInternalsError(ImportError):
    """A private fastai name the package relies on is missing from the installed fastai."""


def _resolve(dotted: str) -> Any:
    """The object named by a dotted path: a module, then attributes (classes, their members)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {dotted!r}")


@functools.cache
def lookup(dotted: str) -> Any:
    """The object `dotted` names (one of PRIVATE_NAMES); FastaiInternalsError saying which and why when the
    installed fastai lacks it."""
    if dotted not in PRIVATE_NAMES:
        raise ValueError(f"{dotted} is not listed in tp3_fastai.core.fastai_internals.PRIVATE_NAMES: list every "
                         f"private fastai name the package uses there, with where and why")
    try:
        return _resolve(dotted)
    except (ImportError, AttributeError) as e:
        import fastai

        raise FastaiInternalsError(
            f"fastai {fastai.__version__} has no `{dotted}` ({type(e).__name__}: {e}), a private name tp3_fastai "
            f"relies on ({PRIVATE_NAMES[dotted].use}). tp3_fastai supports fastai{SUPPORTED_FASTAI}: install a "
            f"fastai in that range, or adapt tp3_fastai/core/fastai_internals.py to this release") from e


def check_private_names() -> list[str]:
    """One line per problem with the installed fastai (empty when there is none): a listed private name it lacks,
    or a fastai function that no longer uses one (the package's read or override would no longer mean what it
    meant)."""
    problems = []
    for dotted, private in PRIVATE_NAMES.items():
        try:
            lookup(dotted)
        except FastaiInternalsError as e:
            problems.append(str(e))
            continue
        short = dotted.rsplit(".", 1)[1]
        for user in private.fastai_users:
            try:
                source = inspect.getsource(_resolve(user))
            except (ImportError, AttributeError, OSError, TypeError) as e:
                problems.append(f"cannot read the source of {user} ({type(e).__name__}: {e}), which used {dotted}")
                continue
            if short not in source:
                problems.append(f"{user} no longer uses {dotted}, so the package's use of it is stale: "
                                f"{private.use}")
    return problems


INNER_LOOP_EVENTS: frozenset[str] = frozenset(lookup("fastai.callback.core._inner_loop"))


def get_sz(item: Any) -> tuple[int, int]:
    """(width, height) of an item (a PIL image, a tensor, or a tuple starting with one) as fastai's crops read it.
    Looked up on first use: fastai.vision.augment takes about 1.4 s to import here."""
    return lookup("fastai.vision.augment._get_sz")(item)
