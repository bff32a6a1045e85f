"""Configuration as objects: each experiment takes one dataclass (built from keywords where a caller prefers them)
and writes it to its run folder's config.json with `config_dict`; the package's one default cache folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, TypeVar

DEFAULT_CACHE = Path("~/.cache/tp3_fastai")  # downloads, the embedded folders written out, the bench's JPEGs
BODY_CACHE = DEFAULT_CACHE / "bodies"  # pretrained bodies (transfer.pretrain), named by their configuration

C = TypeVar("C")


def build_config(cls: type[C], config: C | None = None, options: Mapping[str, Any] | None = None) -> C:
    """`config` (a `cls`), or `cls()`, with the keyword `options` on top; an unknown option is refused by name,
    with the new spelling when the option was renamed (`cls.RENAMED`: {old name: what to use now})."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}: pass the options as keywords "
                        f"or build {cls.__name__}(...)")
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in options:
        if name not in fields:
            renamed = getattr(cls, "RENAMED", {}).get(name)
            if renamed:
                raise ValueError(f"{name} is gone: {renamed}")
            raise TypeError(f"{cls.__name__} has no option {name!r}: choose from {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **options) if config is not None else cls(**options)


def config_dict(config: Any) -> dict[str, Any]:
    """A configuration dataclass as plain JSON values (`dataclasses.asdict`; paths as strings, tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
