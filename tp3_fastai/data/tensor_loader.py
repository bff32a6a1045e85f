"""A fastai DataLoader whose batches are slices of in-memory tensors: the speed of plain tensor slicing, and
fastai's API (decode, show_batch, show_results, test_dl, predict, export) through real fastai pipelines."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
from fastai.data.core import TfmdDL
from fastai.data.transforms import Category, CategoryMap
from fastai.torch_core import TensorCategory, TensorImage, TensorImageBW


class TensorItems:
    """What a TensorLoader holds (its fastai `dataset`): model-ready inputs `x`, integer labels `y` (None for
    unlabelled items, as `test_dl` makes) and the class names, decoding a sample for display as fastai's
    Datasets does."""
    n_inp = 1

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, vocab: Sequence[str] | None = None,
                 split_idx: int | None = None, encoded_by: tuple | None = None):
        if y is not None and len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y, self.split_idx = x, y, split_idx
        self.encoded_by = encoded_by  # the batch transforms `x` went through (set by the first loader over it)
        self.vocab = vocab if vocab is None or isinstance(vocab, CategoryMap) else CategoryMap(list(vocab), sort=False)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return (self.x[i],) if self.y is None else (self.x[i], self.y[i])

    @property
    def items(self) -> "TensorItems":
        """fastai's raw items: the tensors themselves (`Interpretation` takes them back through `test_dl`)."""
        return self

    @property
    def iloc(self) -> "_Subset":
        """`items.iloc[idxs]`, the items at `idxs` as a TensorItems (labels kept), as fastai asks pandas items."""
        return _Subset(self)

    @property
    def c(self) -> int | None:
        """Number of classes (fastai's `dls.c`)."""
        return None if self.vocab is None else len(self.vocab)

    def decode(self, sample: tuple, full: bool = True) -> tuple:
        """The sample with every class index after the input named by the vocab (fastai's `Category`)."""
        if self.vocab is None:
            return sample
        return (sample[0], *(Category(self.vocab[int(t)]) for t in sample[1:]))

    def new_empty(self) -> "TensorItems":
        """No items, the same vocab (what `learn.export` keeps)."""
        return TensorItems(self.x[:0], None if self.y is None else self.y[:0], self.vocab, self.split_idx,
                           self.encoded_by)

    def to(self, device: torch.device) -> "TensorItems":
        self.x = self.x.to(device, non_blocking=True)
        self.y = None if self.y is None else self.y.to(device, non_blocking=True)
        return self

    @contextmanager
    def set_split_idx(self, i: int) -> Iterator[None]:
        """fastai's training (0) / validation (1) switch, used by `tta`; the held tensors never change."""
        old, self.split_idx = self.split_idx, i
        try:
            yield
        finally:
            self.split_idx = old


class _Subset:
    def __init__(self, items: TensorItems):
        self.of = items

    def __getitem__(self, idxs: Any) -> TensorItems:
        idxs = torch.as_tensor(idxs, dtype=torch.long, device=self.of.x.device)
        y = None if self.of.y is None else self.of.y[idxs]
        return TensorItems(self.of.x[idxs], y, self.of.vocab, self.of.split_idx, self.of.encoded_by)


def input_type(x: torch.Tensor) -> type:
    """The fastai type a batch of `x` decodes to: an image batch (N x C x H x W) shows itself, anything else is kept."""
    if x.ndim == 4:
        return TensorImageBW if x.shape[1] == 1 else TensorImage
    return torch.Tensor


class TensorLoader(TfmdDL):
    """A fastai TfmdDL over in-memory tensors whose batches are tensor slices (no per-item Python work).

    fastai's generic DataLoader collates item by item, about 9x slower than slicing (measured here). The tensors
    are stored already encoded: `after_item` (one raw item -> a tensor, e.g. a file -> uint8 image) and
    `after_batch` (e.g. IntToFloatTensor + Normalize) are fastai transforms applied once, when the loader's items
    are made (see `encode`), so iterating is slicing; they serve to encode new items (`test_dl`, `predict`) and to
    decode batches (`show_batch`, `show_results`, `predict`'s label). Batches are plain tensors (fastai's tensor
    subclasses cost a dispatch per op in the model); `decode` gives them their fastai types back.
    `shard(rank, world)` gives one process of a data-parallel run its part of every batch (see there).
    """

    def __init__(self, x: torch.Tensor | TensorItems, y: torch.Tensor | None = None, bs: int = 64,
                 shuffle: bool = False, drop_last: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1, gen: torch.Generator | None = None,
                 vocab: Sequence[str] | None = None, **kwargs: Any):
        if bs is None or bs <= 0:
            raise ValueError(f"batch size must be positive, got {bs}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world) with world >= 1, got rank={rank}, world={world}")
        items = x if isinstance(x, TensorItems) else TensorItems(x, y, vocab)
        self.seed, self.rank, self.world = seed, rank, world
        # CPU generator: same order on every device; shared by shards, so every rank draws the same permutation
        self.gen = gen if gen is not None else torch.Generator().manual_seed(seed)
        kwargs.update(num_workers=0, do_setup=False)  # the transforms come set up; encoded items need no workers
        state = random.getstate()  # fastai's DataLoader seeds its own (unused here) shuffler from the global `random`:
        super().__init__(items, bs=bs, shuffle=shuffle, drop_last=drop_last, **kwargs)
        random.setstate(state)  # leave the global state as it was, so that runs stay reproducible
        if items.encoded_by is None:
            items.encoded_by = tuple(self.after_batch.fs)
        self._n_inp = 1
        self._types = {tuple: [input_type(items.x)] + ([] if items.y is None else [TensorCategory])}
        self.to(device)

    @property
    def x(self) -> torch.Tensor:
        return self.dataset.x

    @property
    def y(self) -> torch.Tensor | None:
        return self.dataset.y

    @property
    def n_local(self) -> int:
        """Items this loader yields per epoch: all of them, or a shard's ceil(n / world)."""
        return -(-self.n // self.world)

    def __len__(self) -> int:
        return self.n_local // self.bs if self.drop_last else -(-self.n_local // self.bs)

    def _order(self) -> torch.Tensor | None:
        """This epoch's item indices, or None for 0..n-1 in order (a single unshuffled process slices views)."""
        perm = torch.randperm(self.n, generator=self.gen) if self.shuffle else None
        if self.world == 1:
            return perm
        if perm is None:
            perm = torch.arange(self.n)
        total, b = self.n_local * self.world, self.bs
        if total > self.n:  # pad by wrapping round, as torch's DistributedSampler does: world - 1 repeats at most
            perm = perm.repeat(-(-total // self.n))[:total]
        # Global batch i is perm[i*b*world : (i+1)*b*world], the batch one process with batch size b*world would
        # take; rank r takes its r-th part. The tail (fewer than b*world items) is split in `world` equal parts.
        full = (self.n_local // b) * b * self.world
        head = perm[:full].view(-1, self.world, b)[:, self.rank].reshape(-1)
        tail = perm[full:].view(self.world, -1)[self.rank]
        return torch.cat([head, tail])

    def get_idxs(self) -> torch.Tensor:
        """The item order of a new epoch (fastai's `get_preds` fixes it through `new(get_idxs=...)` to reorder)."""
        order = self._order()
        return torch.arange(self.n) if order is None else order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if tuple(self.after_batch.fs) != self.dataset.encoded_by:
            raise RuntimeError(
                f"this loader's tensors were encoded with {list(self.dataset.encoded_by)}, but its after_batch now "
                f"holds {list(self.after_batch.fs)}: a TensorLoader applies its batch transforms once, when it is "
                "built, so build it with them (fastai's vision_learner adds a Normalize unless normalize=False)")
        self.before_iter()
        # an order fixed by fastai (get_preds passes `get_idxs`) or this epoch's own
        idx = self.get_idxs() if "get_idxs" in self.__dict__ else self._order()
        idx = torch.as_tensor(idx).to(self.x.device) if idx is not None else None
        x, y = self.dataset.x, self.dataset.y
        for i in range(len(self)):
            sl = slice(i * self.bs, (i + 1) * self.bs)
            b = sl if idx is None else idx[sl]
            yield (x[b],) if y is None else (x[b], y[b])
        self.after_iter()

    def to(self, device: torch.device | str) -> "TensorLoader":
        self.device = device  # fastai's setter moves after_batch's parameters (Normalize's mean and std)
        self.dataset.to(self.device)
        return self

    def encode(self, items: Iterable[Any]) -> torch.Tensor:
        """Raw items (files, images, tensors: whatever `after_item` reads) as model inputs, through fastai's item
        and batch pipelines: how `test_dl` and `predict` see new data."""
        xs = [self.after_item(o) for o in items]
        if not xs:
            raise ValueError("no items given")
        if not all(isinstance(o, torch.Tensor) for o in xs):
            bad = next(o for o in xs if not isinstance(o, torch.Tensor))
            raise TypeError(f"this loader holds precomputed tensors of shape {tuple(self.x.shape[1:])} and reads "
                            f"no {type(bad).__name__}: pass tensors of that shape")
        x = torch.stack([o.as_subclass(torch.Tensor) for o in xs]).as_subclass(type(xs[0]))  # the type of the
        x = self.after_batch(x.to(self.device)).as_subclass(torch.Tensor)  # items chooses the batch transforms
        if x.shape[1:] != self.x.shape[1:]:
            raise ValueError(f"items encode to shape {tuple(x.shape[1:])}, but the model takes "
                             f"{tuple(self.x.shape[1:])}")
        return x

    def new(self, dataset: Any = None, cls: type | None = None, **kwargs: Any) -> "TensorLoader":
        """A copy with other options (fastai's bs, shuffle, drop_last, get_idxs, pipelines, ...) over the same
        tensors (and shard), over a TensorItems, or over raw items (encoded: fastai's `test_dl` passes them)."""
        if dataset is None:
            dataset = self.dataset
        elif not isinstance(dataset, TensorItems):
            dataset = TensorItems(self.encode(dataset), None, self.vocab, encoded_by=tuple(self.after_batch.fs))
        opts = dict(bs=self.bs, shuffle=self.shuffle, drop_last=self.drop_last, seed=self.seed, device=self.device,
                    rank=self.rank, world=self.world, after_item=self.after_item, before_batch=self.before_batch,
                    after_batch=self.after_batch)
        opts.update({k: v for k, v in kwargs.items() if v is not None})
        return (cls or type(self))(dataset, **opts)

    def shard(self, rank: int, world: int) -> "TensorLoader":
        """This process's share for data-parallel training over `world` processes: the same tensors, batch size
        `bs // world`, and the `rank`-th part of every batch that this loader would yield in one process.

        Every rank draws the same seeded permutation each epoch (the generator is shared, and seeded alike on
        every rank) and takes a disjoint 1/world of it; n is padded to a multiple of `world` by repeating the
        first items, so every rank runs the same number of equally sized batches (DDP waits for all of them).
        With gradients averaged across ranks, a step sees exactly the batch a single process would see.
        """
        if self.world != 1:
            raise ValueError(f"this loader is already rank {self.rank}'s shard of {self.world}")
        if self.bs % world:
            raise ValueError(f"batch size {self.bs} is not divisible by {world} processes: the batch is split "
                             f"evenly across processes, choose a multiple of {world}")
        return self.new(bs=self.bs // world, rank=rank, world=world, gen=self.gen)

    def _pre_show_batch(self, b: Any, max_n: int = 9) -> Any:  # fastai's private hook: core.fastai_internals
        import fastai.vision.learner  # noqa: F401  (registers show_batch, show_results, plot_top_losses for images)

        return super()._pre_show_batch(b, max_n=max_n)
