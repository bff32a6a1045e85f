"""Overlap: the next batches prepared on a background thread while the current step computes.

`prefetched(make, depth, device)` runs the generator `make()` on a thread of its own, up to `depth` batches ahead
of the consumer, in order. On CUDA the thread queues its GPU work (nvJPEG decoding, crops, augmentation) on a side
stream and hands each batch over with an event: the training stream waits for it on the GPU, the host never does, so
a step costs max(loader, compute) rather than their sum. torchvision's batched nvJPEG decoder waits on the host for
its own stream (decode_jpegs_cuda synchronises it before and after each batch): on this thread, not the training
one. On a CPU the thread still overlaps the pipeline's torch kernels (which release the GIL) with the step's.

Random draws of the package's transforms use their own generators, seeded in the consuming thread when the epoch
starts (see transforms.reseed_transforms), so that the batches of a seeded run do not depend on thread timing.
Counters of host reads registered with core.syncs.follow_threads count this thread's reads too. An exception in the
thread is raised in the consumer; closing the consumer (end of epoch, `one_batch`, an exception, Ctrl-C) stops and
joins the thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import torch

from ...core.syncs import current_stream, hand_over, on_stream, ready_event, side_stream, thread_modes, wait_for

THREAD_NAME = "tp3-prefetch"
_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(make: Callable[[], Iterator], depth: int, device: torch.device | None) -> Iterator:
    """The items of the generator `make()`, produced on a background thread up to `depth` ahead (`depth` 0: in
    this thread, as they are asked for). See the module docstring."""
    if depth <= 0:
        yield from make()
        return
    dev = torch.device(device) if device is not None else torch.device("cpu")
    stream, consumer = side_stream(dev), current_stream(dev)
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            wait_for(stream, consumer)  # what the consumer queued before (a cache being filled) comes first
            with on_stream(stream):
                source = make()
                while not stop.is_set():
                    with thread_modes():
                        try:
                            b = next(source)
                        except StopIteration:
                            break
                        ev = ready_event(stream)
                    if not put((b, ev)):
                        break
                source.close()
            put(_END)
        except BaseException as e:  # raised again in the consumer, with its traceback
            put(_Failed(e))

    thread = threading.Thread(target=run, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.error
            b, ev = item
            yield hand_over(b, ev, dev)
    finally:
        stop.set()
        while thread.is_alive():  # drain, so that a producer waiting on a full queue sees the stop
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def live_prefetch_threads() -> list[threading.Thread]:
    """The prefetch threads alive now (none once every epoch and `one_batch` has finished)."""
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]
