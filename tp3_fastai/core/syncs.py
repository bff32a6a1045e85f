"""Host waits that a GPU run would make, made visible on any device.

On CUDA the host waits for the GPU when it reads a device tensor (`item`, `cpu`, `float`, ...) and when it copies a
host tensor to the device from pageable memory or without `non_blocking=True`; each wait stops it from queueing the
next step. A CPU run has no such copies, so nothing would show them there. Here every batch the package moves to the
training device goes through `to_device`, which records the copy as a CUDA run makes it: from staged host memory
(`stage`: pinned where CUDA is available; on a CPU, the buffer a CUDA run would pin) without blocking, or blocking.
`CopyLedger` counts these copies in every thread. Reads are counted by a TorchFunctionMode (the bench's
HostReadCounter); such modes are per thread, so a counter registers itself with `follow_threads` and every thread
that prepares batches enters the registered counters with `thread_modes` (see data.pipeline.prefetch).

Also here: the side stream and event hand-off a batch-preparing thread uses on CUDA (`side_stream`, `ready_event`,
`hand_over`), and a non-blocking read of a device scalar (`HostValue`, for progress bars).
"""
from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

import torch

_LOCK = threading.Lock()
_STAGED: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()  # id -> staged tensor
_LEDGERS: list["CopyLedger"] = []
_FOLLOW: list[Any] = []  # context managers (TorchFunctionModes) to enter in every batch-preparing thread


def can_pin() -> bool:
    """Whether host memory can be page-locked here (a CUDA device is visible)."""
    return torch.cuda.is_available()


def stage(t: torch.Tensor) -> torch.Tensor:
    """`t` in staged host memory, ready for a copy that does not block: page-locked (pinned) where CUDA is available;
    on a CPU, where nothing can be pinned, `t` itself, remembered as the buffer a CUDA run would pin."""
    if t.device.type != "cpu":
        return t
    if can_pin():
        return t if t.is_pinned() else t.pin_memory()
    _STAGED[id(t)] = t
    return t


def is_staged(t: torch.Tensor) -> bool:
    """Whether `t` is a host tensor in staged memory (pinned, or marked by `stage` on a CPU)."""
    if t.device.type != "cpu":
        return False
    if can_pin() and t.is_pinned():
        return True
    return _STAGED.get(id(t)) is t


class CopyLedger:
    """Counts the host-to-device copies `to_device` makes while open, in every thread: all of them, and those that
    would block the host on CUDA (source not staged). Use as a context manager."""

    def __init__(self):
        self.copies = self.blocking = self.bytes = 0
        self.where: dict[str, int] = {}  # blocking copies by calling function, to find them

    def __enter__(self) -> "CopyLedger":
        with _LOCK:
            _LEDGERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            if self in _LEDGERS:
                _LEDGERS.remove(self)

    def record(self, nbytes: int, blocking: bool, caller: str) -> None:
        """Count one copy of `nbytes` bytes."""
        self.copies += 1
        self.bytes += nbytes
        if blocking:
            self.blocking += 1
            self.where[caller] = self.where.get(caller, 0) + 1


def _caller() -> str:
    import sys

    f = sys._getframe(2)
    return f"{f.f_globals.get('__name__', '?')}.{f.f_code.co_name}"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, copied without blocking (`non_blocking=True`); a host tensor's copy is recorded in every open
    CopyLedger as a CUDA run makes it, blocking unless `t` is staged (see `stage`), even when `device` is the CPU.
    Device tensors are returned as `.to(device)` gives them (no host copy)."""
    if t.device.type == "cpu" and _LEDGERS:
        blocking, caller = not is_staged(t), _caller()
        with _LOCK:
            for ledger in _LEDGERS:
                ledger.record(t.numel() * t.element_size(), blocking, caller)
    return t.to(device, non_blocking=True)


@contextmanager
def follow_threads(mode: Any) -> Iterator[Any]:
    """While open, `mode` (a context manager such as a TorchFunctionMode counting host reads) is also entered by
    every thread that prepares batches (see `thread_modes`), not only by the thread that opened it."""
    with _LOCK:
        _FOLLOW.append(mode)
    try:
        yield mode
    finally:
        with _LOCK:
            if mode in _FOLLOW:
                _FOLLOW.remove(mode)


def thread_modes() -> ContextManager:
    """Enter, in this thread, the modes registered with `follow_threads` (for a thread other than the one that
    registered them)."""
    with _LOCK:
        modes = list(_FOLLOW)
    if not modes:
        return nullcontext()
    stack = ExitStack()
    for m in modes:
        stack.enter_context(m)
    return stack


# --- CUDA streams and events for a batch-preparing thread ------------------------------------------------------

def side_stream(device: torch.device) -> Any:
    """A CUDA stream of its own for work queued by another thread (None on a CPU)."""
    return torch.cuda.Stream(device=device) if device.type == "cuda" else None


def current_stream(device: torch.device) -> Any:
    """`device`'s current CUDA stream in this thread (None on a CPU)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def wait_for(stream: Any, other: Any) -> None:
    """Make `stream` wait, on the GPU, for the work queued on `other` so far (nothing on a CPU)."""
    if stream is not None and other is not None:
        stream.wait_stream(other)


def on_stream(stream: Any) -> ContextManager:
    """Queue the work of this block on `stream` (nothing on a CPU)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def ready_event(stream: Any) -> Any:
    """An event recorded on `stream` after the work queued so far (None on a CPU)."""
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def hand_over(batch: Any, event: Any, device: torch.device) -> Any:
    """Make `batch`, prepared on a side stream up to `event`, safe to use on `device`'s current stream: the stream
    waits for the event on the GPU (the host does not), and each tensor is marked as used there so that the caching
    allocator does not reuse its memory early. Nothing to do on a CPU."""
    if event is None:
        return batch
    current = torch.cuda.current_stream(device)
    current.wait_event(event)
    for t in _tensors(batch):
        if t.device.type == "cuda":
            t.record_stream(current)
    return batch


def _tensors(o: Any) -> Iterator[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, (list, tuple)):
        for x in o:
            yield from _tensors(x)
    elif isinstance(o, dict):
        for x in o.values():
            yield from _tensors(x)


class HostValue:
    """The latest value of a device scalar that the host can read without waiting: `offer` starts a non-blocking
    copy into pinned memory (at most one in flight); `value` is the last copy that has arrived (None before). On a
    CPU the value is read directly (no wait there)."""

    def __init__(self):
        self.latest: float | None = None
        self._pending: tuple[torch.Tensor, Any] | None = None

    def offer(self, t: torch.Tensor) -> None:
        """Start copying the scalar `t` to the host, unless a copy is still on its way."""
        self.poll()
        if self._pending is not None:
            return
        t = t.detach().reshape(()).float()
        if t.device.type == "cpu":
            self.latest = float(t.as_subclass(torch.Tensor).numpy())  # host memory: no wait on any device
            return
        buf = torch.empty((), dtype=torch.float32, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(t.device))
        self._pending = (buf, ev)

    def poll(self) -> float | None:
        """The latest value that has arrived (checks the copy in flight without waiting for it)."""
        if self._pending is not None and self._pending[1].query():
            self.latest = float(self._pending[0].numpy())
            self._pending = None
        return self.latest
