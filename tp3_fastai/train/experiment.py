"""The steps Part I (mnist.py) and Part II (finetune.py) share: the saved arguments of a run folder to resume, the
run folder opened on rank 0 once every check has passed, a unit (model or mode) resumed from its last checkpoint,
and the distributed part of the log and the summary."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastai.learner import Learner

from .checkpoint import load_checkpoint, settle_best, truncate_csv
from .curves import read_curves
from .distributed import backend_for, broadcast_object, gather_object, rank
from ..core.runs import new_run_dir, read_json


@dataclass
class RunContext:
    """Where and how an experiment runs: its run folder, device, the precision that runs, whether this process is
    rank 0 (which alone writes and prints), the number of processes, progress bars and the log."""
    run: Path
    dev: torch.device
    precision: str
    main: bool
    world: int
    progress: bool | None
    log: Callable[[str], None] | None


def no_log(line: str) -> None:
    """The log of a run asked to say nothing (log=None): lines go nowhere."""


def resume_config(run: str | Path, keys: Sequence[str], what: str) -> dict[str, Any]:
    """The arguments saved in `run`/config.json, refused unless `run` is the run folder of a `what` run."""
    run = Path(run).expanduser()
    config = run / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: {run} is not a run folder; --resume takes the run folder "
                                f"of an interrupted {what} run (the folder holding its config.json)")
    try:
        saved = read_json(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}): not the run folder of a {what} run") from e
    missing = [k for k in keys if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise ValueError(f"{config} lacks {', '.join(missing)}: not the run folder of a {what} run")
    return saved


def on_rank_zero(fetch: Callable[[], Any], main: bool) -> None:
    """Run `fetch` (a download) on rank 0 while the other ranks wait; an error there is raised on every rank,
    so that they stop with it instead of waiting for rank 0 forever."""
    error = None
    if main:
        try:
            fetch()
        except Exception as e:  # whatever rank 0 raises, the others raise too
            error = e
    error = broadcast_object(error)
    if error is not None:
        raise error


def open_run(out: str | Path, overwrite: bool, resume: str | Path | None, main: bool) -> Path:
    """The run folder on every rank: `resume` itself, or a new one that rank 0 makes (`out`, else `out-2`, ...)."""
    return broadcast_object((Path(resume) if resume is not None else new_run_dir(out, overwrite)) if main else None)


def resume_unit(learn: Learner, ckpt: Path, csv_path: Path, main: bool) -> int:
    """Load the unit's last checkpoint (weights, optimizer, epoch) if it has one and return the epochs it had
    done (0 for a fresh unit); its metrics CSV loses the rows of epochs after the checkpoint."""
    start = load_checkpoint(learn, ckpt / "last.pth") if (ckpt / "last.pth").is_file() else 0
    if broadcast_object(start) != start:
        raise ValueError(f"rank {rank()} cannot see {ckpt / 'last.pth'}: resuming on several machines needs the "
                         "run folder on a file system that every process sees")
    if main:
        truncate_csv(csv_path, start)  # rows of epochs after the checkpoint are run again
        if start:
            best = max(read_curves(csv_path), key=lambda r: r["valid_accuracy"])  # the first of equal epochs
            learn.checkpoint.best = best["valid_accuracy"]
            settle_best(ckpt, start, best["epoch"])
    return start


def launch_note(dev: torch.device, bs: int, world: int) -> str:
    """What the log says about a data-parallel launch ('' in a single process)."""
    return f"; {world} processes ({backend_for(dev)}), {bs // world} images per process per step" if world > 1 else ""


def distributed_summary(dev: torch.device, bs: int, world: int, split: str) -> dict[str, Any]:
    """Backend, batch per process and every rank's host, process, device and split digest (a collective call)."""
    return dict(backend=backend_for(dev), bs_per_process=bs // world,
                ranks=gather_object(dict(rank=rank(), host=socket.gethostname(), pid=os.getpid(), device=str(dev),
                                         split=split)))
