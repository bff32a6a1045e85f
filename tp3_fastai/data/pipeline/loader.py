"""`ImageFolderDL`: fastai's TfmdDL for image folders, with two changes that keep what it yields and remove two
costs: batches of file items skip fastai's per-item pipelines (the device pipelines), and worker processes, where
there are any, persist from epoch to epoch (fastai starts new ones at every epoch)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from fastai.data.core import Datasets, TfmdDL
from fastai.data.transforms import ToTensor
from fastai.torch_core import to_device

from .files import EncodedImage, ImageBatch
from .transforms import ReadImage


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


class ImageFolderDL(TfmdDL):
    """fastai's TfmdDL that yields the same batches in the same order, with:

    - file items of the device pipelines (the dataset's x transform is ReadImage) batched directly: labels of the
      whole dataset computed once by the dataset's own transforms, a batch = the ImageBatch of its files and their
      labels (what do_item + collate make, without fastai's per-item dispatch); anything else (test_dl on PIL images,
      extra item transforms) takes fastai's usual path;
    - persistent workers when `num_workers` > 0 and `persistent_workers`: this epoch's batch order is drawn in the
      main process as fastai draws it, and sent to workers that live as long as the loader.
    """

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
                self._fast = (items, labels, x_tfms[0].read)
        return self._fast

    def before_iter(self) -> None:
        super().before_iter()
        self._fast_items()  # in the main process, before any worker starts

    def make_batch(self, idxs: Sequence[int]) -> tuple:
        """The collated batch of the samples `idxs` (before the batch transforms)."""
        fast = self._fast_items()
        if fast is None:
            return self.do_batch([b for b in map(self.do_item, idxs) if b is not None])
        items, labels, read = fast
        images = ImageBatch([EncodedImage.create(items[i], read=read) for i in idxs])
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
            loader = self._workers_loader = torch.utils.data.DataLoader(
                _Batches(self), batch_size=None, sampler=self._epoch, num_workers=self.fake_l.num_workers,
                collate_fn=_keep, pin_memory=self.pin_memory, timeout=self.timeout, worker_init_fn=_one_thread,
                persistent_workers=True)
        return loader

    def __iter__(self):
        if not (self.fake_l.num_workers > 0 and self.fake_l.persistent_workers and self.indexed):
            yield from super().__iter__()
            return
        self.randomize()
        self.before_iter()
        idxs = list(self.get_idxs())  # fastai's order for this epoch, drawn here as fastai draws it
        batches = [idxs[i:i + self.bs] for i in range(0, len(idxs), self.bs)]
        if batches and self.drop_last and len(batches[-1]) < self.bs:
            batches.pop()
        loader = self._persistent()
        self._epoch.batches = batches
        for b in loader:
            if self.device is not None:
                b = to_device(b, self.device)
            yield self.after_batch(b)
        self.after_iter()
        if hasattr(self, "it"):
            del self.it

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_workers_loader", "_epoch", "_fast_for", "_fast"):  # processes and per-dataset caches stay here
            state.pop(k, None)
        return state
