"""`ImageFolderDL`: fastai's TfmdDL for image folders, yielding what fastai's yields, without its per-batch waits
and costs: batches of file items skip fastai's per-item pipelines (the device pipelines); worker processes, where
there are any, persist from epoch to epoch (fastai starts new ones at every epoch); batches and labels go to the
device from staged (pinned) memory without blocking (core.syncs.to_device; fastai copies from pageable memory and
waits); the cache's slots are looked up on the device; and the next batches are prepared on a background thread
(prefetch.prefetched) while the current step computes."""
from __future__ import annotations

from pathlib import Path
import random
from typing import Any, Iterator, Sequence

import torch
from fastai.data.core import Datasets, TfmdDL
from fastai.data.transforms import ToTensor

from ...core.syncs import stage, to_device
from fastai.vision.augment import RandTransform

from .augment import Seeded, reseed_transforms
from .files import EncodedImage, ImageBatch
from .prefetch import prefetched
from .transforms import DecodeCropResize, ReadImage


def _keep(x: Any) -> Any:
    return x


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # as fastai's workers: decoding processes must not oversubscribe the cores


class _Batches(torch.utils.data.Dataset):
    """Map-style view of a DataLoader for torch's workers: item = a list of sample indices, value = that batch."""

    def __init__(self, dl: "ImageFolderDL"):
        self.dl = dl

    def __getitem__(self, idxs: list[int]) -> tuple:
        return self.dl.make_batch(idxs)


class _EpochBatches(torch.utils.data.Sampler):
    """The current epoch's batches of indices, set by the main process before each epoch (torch's persistent workers
    receive them through their index queues)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def send(b: Any, device: torch.device) -> Any:
    """A collated batch on `device`: tensors staged and copied without blocking (core.syncs), an ImageBatch's
    pixels, sizes and positions likewise (its encoded bytes stay on the host), anything else as it is."""
    if isinstance(b, tuple):
        return tuple(send(o, device) for o in b)
    if isinstance(b, list):
        return [send(o, device) for o in b]
    if isinstance(b, ImageBatch):
        return b.to(device)
    if isinstance(b, torch.Tensor):
        return to_device(stage(b), device) if b.device.type == "cpu" else b.to(device)
    return b


class ImageFolderDL(TfmdDL):
    """fastai's TfmdDL that yields the same batches in the same order, with:

    - file items of the device pipelines (the dataset's x transform is ReadImage) batched directly: labels of the
      whole dataset computed once by the dataset's own transforms, a batch = the ImageBatch of its files and their
      labels (what do_item + collate make, without fastai's per-item dispatch); anything else (test_dl on PIL images,
      extra item transforms) takes fastai's usual path;
    - persistent workers when `num_workers` > 0 and `persistent_workers`: this epoch's batch order is drawn in the
      main process as fastai draws it, and sent to workers that live as long as the loader;
    - every batch sent to the device from staged memory without blocking (`send`), with the cache's slots of a
      device pipeline's batch looked up on the device from the images' positions;
    - `prefetch` batches prepared ahead on a background thread (None: see `prefetch_depth`; 0: none), the
      package's random transforms reseeded from Python's `random` as each epoch starts (in this thread), so that a
      seeded run gives the same batches whatever the threads' timing.
    """
    prefetch: int | None = None

    def _fast_items(self) -> tuple[list, list[torch.Tensor], bool] | None:
        ds = self.dataset
        if getattr(self, "_fast_for", None) is ds:
            return self._fast
        self._fast_for, self._fast = ds, None
        tls = getattr(ds, "tls", None) if isinstance(ds, Datasets) else None
        plain_items = all(isinstance(t, ToTensor) for t in self.after_item.fs) and not self.before_batch.fs
        x_tfms = [f for f in tls[0].tfms.fs if getattr(f, "name", "") != "noop"] if tls else []
        if plain_items and len(x_tfms) == 1 and isinstance(x_tfms[0], ReadImage):
            items = list(tls[0].items)
            if items and all(isinstance(i, (str, Path)) for i in items):
                labels = [torch.stack([tl[i] for i in range(len(items))]) for tl in tls[1:]]
                self._fast = (items, labels, x_tfms[0].read, getattr(x_tfms[0], "stored", None))
        return self._fast

    def before_iter(self) -> None:
        super().before_iter()
        self._fast_items()  # in the main process, before any worker starts

    def make_batch(self, idxs: Sequence[int]) -> tuple:
        """The collated batch of the samples `idxs` (before the batch transforms)."""
        fast = self._fast_items()
        if fast is None:
            return self.do_batch([b for b in map(self.do_item, idxs) if b is not None])
        items, labels, read, stored = fast
        images = ImageBatch([EncodedImage.create(items[i], read=read, stored=stored) for i in idxs], index=idxs)
        t = torch.tensor(list(idxs), dtype=torch.long)
        return (images, *(lab[t] for lab in labels))

    def create_batches(self, samps):
        if self._fast_items() is None:
            yield from super().create_batches(samps)
            return
        idx: list[int] = []
        for s in samps:
            idx.append(s)
            if len(idx) == self.bs:
                yield self.make_batch(idx)
                idx = []
        if idx and not self.drop_last:
            yield self.make_batch(idx)

    def _persistent(self) -> torch.utils.data.DataLoader:
        loader = getattr(self, "_workers_loader", None)
        if loader is None:
            self._epoch = _EpochBatches()
            # on CUDA torch's pin-memory thread stages each batch as it arrives (ImageBatch.pin_memory)
            pin = self.pin_memory or getattr(self.device, "type", "cpu") == "cuda"
            loader = self._workers_loader = torch.utils.data.DataLoader(
                _Batches(self), batch_size=None, sampler=self._epoch, num_workers=self.fake_l.num_workers,
                collate_fn=_keep, pin_memory=pin, timeout=self.timeout, worker_init_fn=_one_thread,
                persistent_workers=True)
        return loader

    def new(self, dataset=None, cls=None, **kwargs):
        """fastai's `new` (test_dl, a loader of n batches), keeping persistent workers and `prefetch` (fastai's
        drops the first: a loader made this way would start workers at every epoch and copy from pageable
        memory)."""
        kwargs.setdefault("persistent_workers", self.fake_l.persistent_workers)
        res = super().new(dataset, cls, **kwargs)
        if "prefetch" in self.__dict__:
            res.prefetch = self.prefetch
        return res

    @property
    def prefetch_depth(self) -> int:
        """Batches prepared ahead: `prefetch`, or by default 2 on CUDA and 1 on a CPU; none (0) when a batch
        transform draws from torch's global generator (a fastai transform kept as it is), whose draws on another
        thread would interleave with the training step's (dropout) and change from run to run."""
        if self.prefetch is not None:
            return int(self.prefetch)
        if any(isinstance(t, RandTransform) and not isinstance(t, Seeded) for t in self.after_batch.fs):
            return 0
        return 2 if getattr(self.device, "type", "cpu") == "cuda" else 1

    def _slot_table(self) -> torch.Tensor | None:
        """Each item's slot in the decoded cache of this loader's DecodeCropResize, on the cache's device (None
        without a cache or on fastai's per-item path)."""
        fast = self._fast_items()
        decoder = next((t for t in self.after_batch.fs if isinstance(t, DecodeCropResize)), None)
        cache = getattr(decoder, "cache", None)
        if fast is None or cache is None or not len(cache):
            return None
        key = (id(fast[0]), cache.device)
        if getattr(self, "_slots_for", None) != key:
            self._slots_for, self._slots = key, cache.slot_table(fast[0])
        return self._slots

    def send(self, b: Any) -> Any:
        """Batch `b` on this loader's device (see `send`), with the cache slots of its images looked up there."""
        if self.device is None:
            return b
        b = send(b, self.device)
        table = self._slot_table() if isinstance(b, tuple) and b and isinstance(b[0], ImageBatch) else None
        if table is not None and b[0].index is not None:
            b[0].slots = table[b[0].index.to(table.device)]
        return b

    def _batches(self, idxs: list[int]) -> Iterator:
        """This epoch's collated batches (before the batch transforms): from persistent workers, or made here."""
        if self.fake_l.num_workers > 0 and self.fake_l.persistent_workers:
            batches = [idxs[i:i + self.bs] for i in range(0, len(idxs), self.bs)]
            if batches and self.drop_last and len(batches[-1]) < self.bs:
                batches.pop()
            loader = self._persistent()
            self._epoch.batches = batches
            yield from loader
        else:
            yield from self.create_batches(iter(idxs))

    def __iter__(self):
        if not self.indexed or (self.fake_l.num_workers > 0 and not self.fake_l.persistent_workers):
            yield from super().__iter__()  # fastai's own path (workers started per epoch)
            return
        self.randomize()
        self.before_iter()
        reseed_transforms(self.after_batch.fs, random.getrandbits(62))
        idxs = list(self.get_idxs())  # fastai's order for this epoch, drawn here as fastai draws it
        if not (self.fake_l.num_workers > 0 and self.fake_l.persistent_workers):
            # torch's single-process iterator, which fastai's path goes through, draws a base seed from torch's
            # generator each epoch: drawn here too, so that seeded runs keep their random streams (dropout, ...)
            torch.empty((), dtype=torch.int64).random_()
        depth = self.prefetch_depth

        def ready() -> Iterator:
            for b in self._batches(idxs):
                yield self.after_batch(self.send(b))

        yield from prefetched(ready, depth, self.device)
        self.after_iter()
        if hasattr(self, "it"):
            del self.it

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_workers_loader", "_epoch", "_fast_for", "_fast", "_slots_for", "_slots"):  # processes and
            state.pop(k, None)  # per-dataset caches stay here
        return state
