"""Checks of the names a user passes (modes, architectures, parts, layers): unknown ones refused with close
matches."""
from __future__ import annotations

import difflib
from typing import Sequence


def check_name(name: str, known: Sequence[str], what: str = "architecture") -> None:
    """Raise a ValueError naming close matches when `name` is not among `known`."""
    if name in known:
        return
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown {what} {name!r}.{hint} Known: {', '.join(sorted(known)[:20])}"
                     + (" ..." if len(known) > 20 else ""))
