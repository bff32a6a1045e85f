"""Remembering which image files were checked: a JSON file of path -> (size, mtime_ns) for the files that decoded,
so that a later run checks only new or changed files (a bad file is never remembered: it is named every run)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from .files import Signature, signature

VERSION = 1


def memory_file(cache_dir: str | Path, root: str | Path) -> Path:
    """Where the checks of the image folder `root` are remembered, inside `cache_dir`."""
    key = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "checked_images" / f"{key}.json"


def read_memory(path: Path | None) -> dict[str, Signature]:
    """The remembered signatures ({} when there is no memory or it cannot be read)."""
    if path is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
        if saved.get("version") != VERSION:
            return {}
        return {k: tuple(v) for k, v in saved["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged memory only costs a full check


def unchecked(files: Sequence[Path], memory: dict[str, Signature]) -> tuple[list[Path], dict[str, Signature]]:
    """The files whose current (size, mtime) is not remembered, and the current signatures of all files."""
    now = {str(f): signature(f) for f in files}
    return [f for f in files if memory.get(str(f)) != now[str(f)]], now


def remember(path: Path | None, good: dict[str, Signature]) -> None:
    """Save the signatures of the files that passed (only these files: the folder as it is now)."""
    if path is None:
        return
    from ...core.runs import write_json

    try:
        write_json(path, dict(version=VERSION, files={k: list(v) for k, v in good.items()}))
    except OSError:
        pass  # a read-only cache folder only costs a full check next time
