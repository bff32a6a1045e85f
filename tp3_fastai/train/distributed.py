"""Data-parallel training over several processes with fastai's own distributed support.

A command launched by `torchrun --nproc_per_node N ...` or `accelerate launch --multi_gpu --num_processes N ...`
runs once per process; the launcher tells each process its place in environment variables (WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The pieces here, in the order a command uses them:

* `launch_config()` reads those variables once, at the edge (the experiment function or the script);
* `setup_distributed(device, launch)` joins the process group (gloo on the CPU, nccl on GPUs, `env://`) and
  returns this process's device (`cuda:LOCAL_RANK` on GPUs);
* `distributed_context(learn)` trains a Learner data-parallel: fastai's `DistributedTrainer` (accelerate wraps
  the model in DistributedDataParallel, so gradients are all-reduced), each process on its shard of every
  loader; metrics recorded by `curves.CurvesCallback` and fastai's Recorder are gathered over the processes;
* `rank()`, `world_size()`, `is_main_process()`, `main_only(log)`, `broadcast_object()`, `gather_object()`:
  only rank 0 writes files and prints, and the ranks agree on names and compare results;
* `as_single_process()`: rank 0 alone predicts, plots or exports after training, fastai gathering nothing;
* `close_distributed()`: every rank waits until all are done (rank 0 has written everything), then the group is
  destroyed and its worker threads joined; the `tp3` commands call it when they end, and an exit hook calls it for
  code that does not.

In a single process (no launcher, or WORLD_SIZE=1) every one of them is a no-op, so the same code runs
unchanged with and without a launcher.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: torch.distributed.nn.functional takes `group.WORLD` as a
# default argument of ten functions, evaluated at its first import, which DistributedDataParallel triggers. Imported
# after the group is made, it holds the group forever: destroying it then leaves gloo's worker threads running into
# interpreter shutdown, where a worker releasing a finished collective's tensors needs the GIL, and the process
# aborts ("terminate called without an active exception").
import torch.distributed.nn  # noqa: F401

T = TypeVar("T")


@dataclass(frozen=True)
class LaunchConfig:
    """Where this process sits in a launch: `world_size` processes in all, this one is `rank` (global) and
    `local_rank` (on its machine). A plain run is world 1, rank 0."""
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_config(env: Mapping[str, str] | None = None) -> LaunchConfig:
    """The launch as torchrun / accelerate launch describe it in WORLD_SIZE, RANK and LOCAL_RANK (os.environ by
    default); without them, a single process. Call it once, where a command starts."""
    env = os.environ if env is None else env
    try:
        world, rank = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0))
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"the launcher's WORLD_SIZE / RANK / LOCAL_RANK must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent launch: WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}")
    return LaunchConfig(world, rank, local)


def backend_for(device: torch.device) -> str:
    """The collective backend for a device: nccl for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup_distributed(device: torch.device, launch: LaunchConfig | None = None) -> torch.device:
    """Join the launch's process group (once per process) and return the device this process trains on.

    With more than one process, a CUDA device without an index becomes `cuda:LOCAL_RANK` (one GPU per process,
    made the current device) and the group is initialised from `env://` with nccl (CUDA) or gloo (CPU). The group
    lives as long as the process. In a single process nothing happens and `device` comes back unchanged.
    """
    launch = launch or launch_config()
    if not launch.distributed:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), init_method="env://",
                                world_size=launch.world_size, rank=launch.rank)
        _watch_for_failure()
        atexit.register(_close_at_exit)
    return device


def join_launch(bs: int, device: torch.device, launch: LaunchConfig | None = None) -> tuple[torch.device, bool, int]:
    """Check that the batch `bs` splits evenly over the launched processes, join their group (setup_distributed)
    and return (this process's device, whether it is rank 0, the number of processes)."""
    launch = launch or launch_config()
    if bs % launch.world_size:
        raise ValueError(f"batch size {bs} does not split evenly over {launch.world_size} processes: "
                         f"use a multiple of {launch.world_size}")
    dev = setup_distributed(device, launch)  # joins the process group when launched on several
    return dev, is_main_process(), world_size()


def close_distributed(wait: bool = True) -> None:
    """Leave the launch's process group (a no-op without one).

    `wait`: first wait at a barrier until every rank gets here, so that no rank leaves while another still needs it
    for a collective or while rank 0 still writes the run folder (torchrun stops every process as soon as one ends
    badly). Without `wait`, for a rank that failed: leave at once. The group is then destroyed, which joins its worker
    threads while the interpreter is whole (see the import of torch.distributed.nn above).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


_failed = False


def _watch_for_failure() -> None:
    """Note an uncaught exception (sys.excepthook runs before exit hooks), so that a failing rank does not wait at
    the exit barrier for ranks that will never get there."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        global _failed
        _failed = True
        previous(kind, value, tb)

    sys.excepthook = hook


def _close_at_exit() -> None:
    close_distributed(wait=not _failed)


def world_size() -> int:
    """Processes in the running process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the running process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0, the process that writes files and prints (and in a single process)."""
    return rank() == 0


def main_only(log: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """`log` on rank 0; on the other ranks a logger that says nothing (None stays None)."""
    if log is None or is_main_process():
        return log
    return lambda line: None


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (picklable) on every rank, e.g. the run folder that rank 0 created."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def as_single_process() -> Iterator[None]:
    """Inside, fastai sees one process: for what rank 0 does alone after training (predictions in the loader's
    order, plots, export) while the other ranks skip it.

    fastai decides from WORLD_SIZE whether to gather metrics and predictions from all ranks (`maybe_gather`),
    and a gather on one rank waits forever for the others; outside `distributed_context` it would also return
    every rank's identical copy. Sets WORLD_SIZE=1 and RANK=0 for the block, then puts them back.
    """
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE="1", RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def digest(*items: torch.Tensor | torch.nn.Module) -> str:
    """A short SHA-256 of tensors' values (a module: its state dict, unwrapped from DDP), to compare ranks."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, torch.nn.Module):
            tensors = list(getattr(item, "module", item).state_dict().values())
        else:
            tensors = [item]
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def barrier() -> None:
    """Wait until every rank gets here."""
    if world_size() > 1:
        dist.barrier()


# fastai.distributed imports accelerate; importing it lazily keeps single-process commands free of it.
def _trainer_classes():
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ImportError("distributed training needs Hugging Face accelerate: pip install accelerate") from e
    from fastai.distributed import DistributedDL, DistributedTrainer

    class BackendDistributedDL(DistributedDL):
        """fastai's DistributedDL (a TfmdDL split into equal per-rank parts), with a broadcast that works on gloo,
        and each rank taking its part of every step rather than a contiguous part of the epoch."""

        def get_idxs(self):
            # fastai gives rank r the r-th contiguous part of the epoch's order. Taking the r-th part of each step
            # (the bs * world items one process with that batch would take), as TensorLoader.shard does, gives
            # every step the images of a single process's step. Padding stays at the end, where fastai's
            # to_detach removes it from gathered predictions.
            idxs = self._broadcast(list(self.dl.get_idxs()), 0)
            self.n = len(idxs)
            self.n_padded = -(-self.n // self.world_size) * self.world_size
            idxs += (idxs * (self.n_padded // max(self.n, 1) + 1))[:self.n_padded - self.n]  # as fastai pads
            step = self.bs * self.world_size
            mine = []
            for i in range(0, self.n_padded, step):
                chunk = idxs[i:i + step]
                part = len(chunk) // self.world_size
                mine += chunk[self.rank * part:(self.rank + 1) * part]
            return mine

        def _broadcast(self, t, rank):
            # fastai calls `.cuda()` here ("nccl only works with cuda tensors"), which fails without a GPU; gloo
            # broadcasts CPU tensors. Put the tensor where the group's backend needs it.
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor(t, dtype=torch.long, device=dev)
            dist.broadcast(t, rank)
            return t.cpu().tolist()

    class ShardingTrainer(DistributedTrainer):
        """fastai's DistributedTrainer (accelerate prepares the model: DistributedDataParallel), with each loader
        cut into this rank's share the way that loader supports."""

        def _wrap_dl(self, dl):
            if isinstance(dl, DistributedDL) or getattr(dl, "world", 1) > 1:
                return dl  # already this rank's share
            if hasattr(dl, "shard"):  # data.TensorLoader: slice the in-memory tensors, no per-item work
                return dl.shard(rank(), world_size())
            # fastai passes `self.learn.model.device`, which DistributedDataParallel does not have
            return BackendDistributedDL(dl, device=getattr(dl, "device", None))

    ShardingTrainer.dl_class = BackendDistributedDL  # for tests that shard a loader without a process group
    return ShardingTrainer


def _learner_device(learn) -> torch.device:
    dev = getattr(learn.dls, "device", None)
    if dev is None:
        dev = next(iter(learn.model.parameters())).device
    return torch.device(dev)


@contextmanager
def distributed_context(learn, sync_bn: bool | None = None, launch: LaunchConfig | None = None) -> Iterator:
    """Train and evaluate `learn` data-parallel inside this block when the command was launched on several
    processes; in a single process it does nothing.

    It does what fastai's `Learner.distrib_ctx` does (DistributedTrainer, accelerate, DDP; no progress bar off
    rank 0) with two fixes, because fastai's trainer wraps every loader in DistributedDL: our in-memory `TensorLoader` shards
    itself instead (DistributedDL needs a TfmdDL and would collate item by item), and DistributedDL's broadcast of
    the batch order works on gloo (see BackendDistributedDL). Inside the block every rank must run the same
    fits and validations: fastai gathers metrics from all ranks each batch, DDP all-reduces every backward.
    `sync_bn` (BatchNorm statistics over all processes) defaults to True on GPUs; SyncBatchNorm needs CUDA.
    """
    device = _learner_device(learn)
    if not dist.is_initialized():  # the command did not call setup_distributed: read the launch here
        launch = launch or launch_config()
        if launch.distributed:
            setup_distributed(device, launch)
    if world_size() < 2:
        yield learn
        return
    cpu = device.type != "cuda"
    if sync_bn is None:
        sync_bn = not cpu
    if sync_bn and cpu:
        raise ValueError("sync_bn=True needs CUDA: SyncBatchNorm does not run on the CPU")
    from fastai.callback.progress import ProgressCallback

    # what learn.distrib_ctx() -> learn.to_distributed() does, with our trainer; `cpu=True` makes accelerate take
    # the MULTI_CPU path (DDP over gloo) instead of treating a GPU-less process as not distributed
    trainer = _trainer_classes()(sync_bn=sync_bn, cpu=cpu)
    learn.add_cb(trainer)
    quiet = rank() > 0 and hasattr(learn, "progress")
    if quiet:
        learn.remove_cb(ProgressCallback)
    try:
        yield learn
    finally:
        # fastai's detach_distributed() would add a progress bar on rank > 0 even where the learner had none
        learn.remove_cb(trainer)
        if quiet:
            learn.add_cb(ProgressCallback())
