"""Checks of the names a user passes (modes, architectures, parts, layers, options): unknown ones refused with close
matches, every one of a list at once, none dropped; messages in plain text."""
from __future__ import annotations

import difflib
import re
from typing import Sequence

LISTED = 20  # a catalogue longer than this is not listed in an error, only the close names


def close_names(name: str, known: Sequence[str], n: int = 5) -> list[str]:
    """Up to `n` names of `known` close to `name` (neither case nor leading dashes count: 'ResNet50' finds
    'resnet50', '--epoch' finds '--epochs' and not '--arch')."""
    plain: dict[str, str] = {}
    for k in known:
        plain.setdefault(k.lower().lstrip("-"), k)
    return [plain[m] for m in difflib.get_close_matches(name.lower().lstrip("-"), list(plain), n=n, cutoff=0.6)]


def _unknown(name: str, known: Sequence[str]) -> str:
    close = close_names(name, known)
    return f"{name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else "")


def _catalogue(known: Sequence[str], hint: str) -> str:
    """Where to find the known names: `hint`, else the names themselves (a short catalogue) or their number."""
    if hint:
        return f" {hint}"
    return f" Known: {', '.join(known)}." if len(known) <= LISTED else f" {len(known)} known names."


def check_name(name: str, known: Sequence[str], what: str = "architecture", hint: str = "") -> None:
    """Raise a ValueError naming close matches when `name` is not among `known`, then the known names (a short
    catalogue) or `hint` (where to look instead)."""
    if name in known:
        return
    close = close_names(name, known)
    mean = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}.{mean}{_catalogue(known, hint)}")


def check_names(names: Sequence[str], known: Sequence[str], what: str = "name", hint: str = "") -> list[str]:
    """`names` without repeats, in order, when every one is among `known`; else a ValueError naming every unknown
    one with its close matches (one unknown name: the message of `check_name`)."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in known]
    if len(unknown) == 1:
        check_name(unknown[0], known, what, hint)
    if unknown:
        raise ValueError(f"unknown {what}s {', '.join(_unknown(n, known) for n in unknown)}."
                         f"{_catalogue(known, hint)}")
    return names


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain_text(text: str) -> str:
    """`text` without terminal escape codes (torch's messages carry bold on/off codes, shown raw in logs)."""
    return ANSI_ESCAPE.sub("", text)
