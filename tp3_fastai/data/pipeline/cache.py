"""The decoded cache: images decoded once at the stored size (uint8), resident on the training device within a
memory budget; each entry remembers its file's (size, mtime), so that a changed file is decoded again."""
from __future__ import annotations

from typing import Sequence

import torch

from .files import Signature

DEFAULT_FRACTION = 0.4  # of free GPU memory on CUDA, of available RAM on a CPU


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: free GPU memory on CUDA, available RAM (MemAvailable) on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cache_budget(device: torch.device, budget: float | int | None = None) -> int:
    """The cache's memory budget in bytes: `budget` bytes if it is an int > 1, that fraction of the device's free
    memory if a float in (0, 1], DEFAULT_FRACTION of it if None."""
    if budget is None:
        budget = DEFAULT_FRACTION
    if isinstance(budget, float) and 0 < budget <= 1:
        return int(free_memory(device) * budget)
    if budget < 0 or (isinstance(budget, float) and budget > 1 and not budget.is_integer()):
        raise ValueError(f"cache budget must be a fraction in (0, 1] of free memory or a number of bytes, got {budget}")
    return int(budget)


def image_bytes(stored: int) -> int:
    """Bytes one cached image takes (3 x stored x stored uint8)."""
    return 3 * stored * stored


class DecodedCache:
    """Up to `budget` bytes of images decoded at `stored` x `stored`, one slot per file of `paths` (the first ones
    that fit), on `device`. A slot is valid while its file keeps the (size, mtime) it had when decoded; files
    without a slot, or whose slot is stale, are decoded again by the caller (streamed)."""

    def __init__(self, paths: Sequence[str], stored: int, device: torch.device, budget: int):
        self.stored, self.device, self.budget = stored, torch.device(device), int(budget)
        n = min(len(paths), self.budget // image_bytes(stored))
        try:
            self.images = torch.empty((n, 3, stored, stored), dtype=torch.uint8, device=self.device)
        except (RuntimeError, MemoryError):  # the budget was optimistic: stream everything rather than fail
            n, self.images = 0, torch.empty((0, 3, stored, stored), dtype=torch.uint8, device=self.device)
        self.slots = {str(p): i for i, p in enumerate(paths[:n])}
        self.signatures: list[Signature | None] = [None] * n
        self.sizes = torch.zeros(n, 2, device=self.device)  # original width, height, beside the images
        self.hits = self.misses = self.refreshed = 0

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def filled(self) -> int:
        """Slots holding a decoded image."""
        return sum(s is not None for s in self.signatures)

    def lookup(self, path: str, sig: Signature | None) -> int | None:
        """The slot holding `path` as it is now (same size and mtime), or None."""
        i = self.slots.get(path)
        if i is not None and sig is not None and self.signatures[i] == sig:
            self.hits += 1
            return i
        self.misses += 1
        return None

    def slot_table(self, paths: Sequence[str]) -> torch.Tensor:
        """The slot of each of `paths` (-1: none), on the cache's device: a batch's slots are then looked up there
        from its images' positions, without a copy per batch."""
        from ...core.syncs import stage, to_device

        table = torch.tensor([self.slots.get(str(p), -1) for p in paths], dtype=torch.long)
        return to_device(stage(table), self.device)

    def store(self, path: str, sig: Signature | None, image: torch.Tensor, width: int, height: int) -> bool:
        """Keep a decoded, stored-size image of `path` if it has a slot; True if kept."""
        i = self.slots.get(path)
        if i is None or sig is None:
            return False
        if self.signatures[i] is not None:
            self.refreshed += 1  # the file changed since it was cached
        self.images[i] = image.to(self.device)
        self.signatures[i] = sig
        self.sizes[i, 0], self.sizes[i, 1] = width, height
        return True

    def to(self, device: torch.device) -> "DecodedCache":
        """Move the cached images to `device`."""
        self.device = torch.device(device)
        self.images, self.sizes = self.images.to(self.device), self.sizes.to(self.device)
        return self

    def info(self) -> dict:
        """Sizes and counters, for run folders and benchmarks."""
        return dict(slots=len(self), filled=self.filled, stored_px=self.stored, bytes=self.images.numel(),
                    budget_bytes=self.budget, device=str(self.device), hits=self.hits, misses=self.misses,
                    refreshed=self.refreshed)

    def __getstate__(self) -> dict:
        # an exported learner carries its DataLoaders' transforms: never the cached images themselves
        state = dict(self.__dict__)
        # (fresh empty tensors: a slice would pickle the whole storage under it)
        state.update(images=torch.empty((0, 3, self.stored, self.stored), dtype=torch.uint8), slots={},
                     signatures=[], sizes=torch.zeros(0, 2), device="cpu")
        return state

    def __setstate__(self, state: dict) -> None:
        state["device"] = torch.device(state["device"])
        self.__dict__.update(state)
