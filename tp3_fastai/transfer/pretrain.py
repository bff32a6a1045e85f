"""Source pretraining: a timm body trained on a source task, saved as safetensors with a JSON sidecar, cached by
its configuration so that the main job, the notebooks and the study reuse one body."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from fastai.learner import Learner
from fastai.torch_core import set_seed

from ..core.device import env_info, pick_device, resolve_precision
from ..core.config import BODY_CACHE, build_config
from ..train.optimizer import OPTIMIZER_NAME
from ..core.runs import read_json, write_json
from ..data.tasks import SourceTask, load_tasks, prepare, tensor_dls
from .learner import check_arch, resnet_learner
from .weights import file_sha256

# Measured here at k=10 labels per class (3-5 seeds, 20 epochs): resnet10t's body reached source accuracy 0.986
# and fine-tune 0.830 vs scratch 0.685; resnet18's 0.982 and 0.784 vs 0.61, at about twice the time per step.
DEFAULT_ARCH = "resnet10t"
RECIPE = 2  # part of every cache key: bump it when the pretraining code changes what a configuration produces
SIDECAR_KEYS = ("format", "arch", "n_in", "size", "input_size", "normalize", "source", "epochs", "lr", "bs",
                "seed", "optimizer", "schedule", "source_accuracy", "source_loss", "seconds", "device", "precision",
                "env", "sha256", "config", "key", "params", "created")


@dataclass
class BodyConfig:
    """What decides a pretrained body (besides the source task's data): the model, its inputs and its training."""
    arch: str = DEFAULT_ARCH
    size: int = 32  # input size in pixels
    n_in: int = 1  # input channels
    epochs: int = 4
    lr: float = 5e-3
    bs: int = 64
    seed: int = 0
    source: SourceTask | str | Path = "mnist"  # 'mnist' (digits `source_classes` of the embedded pair), a folder
    source_classes: Sequence[int] | str = (0, 1, 2, 3, 4)


def body_config(source: SourceTask, arch: str = DEFAULT_ARCH, size: int = 32, n_in: int = 1, epochs: int = 4,
                lr: float = 5e-3, bs: int = 64, seed: int = 0) -> dict[str, Any]:
    """Everything that decides a pretrained body: its cache key is a digest of this."""
    return dict(recipe=RECIPE, arch=arch, size=size, n_in=n_in, epochs=epochs, lr=lr, bs=bs, seed=seed,
                source=source.description, source_classes=list(source.classes), n_source=len(source.y_train),
                source_data_sha256=source.data_sha256(), normalize=[source.mean, source.std])


def body_key(config: dict[str, Any]) -> str:
    """The cache file stem of a configuration: '<arch>-<size>px-<n_in>ch-<digest>'."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{config['arch']}-{config['size']}px-{config['n_in']}ch-{digest}"


def body_state_dict(learn: Learner) -> dict[str, torch.Tensor]:
    """The timm body of a `resnet_learner` (no head, no classifier) as CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in learn.model[0].model.state_dict().items()}


def save_body(state_dict: dict[str, torch.Tensor], path: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write a body as safetensors and its JSON sidecar (`<stem>.json`, with the file's sha256), each atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata={"arch": str(info.get("arch", "")), "format": "pt",
                                             "sidecar": path.with_suffix(".json").name})
        info = dict(info, sha256=file_sha256(tmp), file=path.name)
        _ordinary_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _ordinary_mode(write_json(path.with_suffix(".json"), info))
    return info


def _ordinary_mode(path: Path) -> None:
    """Give a file written through mkstemp (private, 0600) the permissions of any new file (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_body_info(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The JSON sidecar of a body file; with `verify`, check that the file's sha256 is the one recorded."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise FileNotFoundError(f"body {path} or its sidecar {side.name} is missing")
    try:
        info = read_json(side)
    except json.JSONDecodeError as e:
        raise ValueError(f"body sidecar {side} is not valid JSON: {e}") from e
    if verify and info.get("sha256") != file_sha256(path):
        raise ValueError(f"{path} does not match the sha256 in {side.name}: the file changed after it was written")
    return info


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX), so that two jobs asking for the same body train it once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic writes still keep the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pretrain_body(source: SourceTask, path: str | Path, body: BodyConfig, device: str | torch.device = "auto",
                  precision: str = "auto", progress: bool | None = None,
                  log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train `body.arch` (timm, random init) on the source task with `fit_one_cycle` and save its body to `path`
    (safetensors) with a sidecar; returns the sidecar. Source accuracy is measured on the held-out source images."""
    b = body
    check_arch(b.arch)
    if b.epochs <= 0 or b.bs <= 0 or b.lr <= 0 or b.size <= 0:
        raise ValueError(f"epochs, bs, lr and size must be positive, got epochs={b.epochs}, bs={b.bs}, lr={b.lr}, "
                         f"size={b.size}")
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    config = body_config(source, b.arch, b.size, b.n_in, b.epochs, b.lr, b.bs, b.seed)
    set_seed(b.seed, reproducible=True)
    dls = tensor_dls(prepare(source.x_train, b.size, source.mean, source.std, b.n_in), source.y_train,
                     prepare(source.x_test, b.size, source.mean, source.std, b.n_in), source.y_test,
                     source.classes, b.bs, b.seed, dev)
    learn = resnet_learner(dls, b.arch, pretrained=False, n_in=b.n_in, precision=prec, progress=progress,
                           log=log, lr=b.lr, name=f"pretrain {b.arch}")
    start = time.perf_counter()
    learn.fit_one_cycle(b.epochs, b.lr)
    seconds = time.perf_counter() - start
    loss, acc = learn.validate()
    state = body_state_dict(learn)
    info = dict(
        format="tp3_fastai body v1", arch=b.arch, n_in=b.n_in, size=b.size, input_size=[b.n_in, b.size, b.size],
        normalize=dict(mean=[source.mean] * b.n_in, std=[source.std] * b.n_in, scale="pixels / 255"),
        source=dict(task=source.description, classes=list(source.classes), n_train=len(source.y_train),
                    n_test=len(source.y_test), data_sha256=config["source_data_sha256"]),
        epochs=b.epochs, lr=b.lr, bs=b.bs, seed=b.seed, optimizer=OPTIMIZER_NAME,
        schedule="fit_one_cycle", source_accuracy=float(acc), source_loss=float(loss), seconds=seconds,
        device=str(dev), precision=prec, env=env_info(dev), config=config, key=body_key(config),
        params=sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked"))),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return save_body(state, path, info)


def pretrained_body(config: BodyConfig | None = None, *, cache_dir: str | Path = BODY_CACHE, retrain: bool = False,
                    device: str | torch.device = "auto", precision: str = "auto", progress: bool | None = None,
                    log: Callable[[str], None] | None = print, **options: Any) -> tuple[Path, dict[str, Any]]:
    """(path, sidecar) of the body pretrained as `config` says (a BodyConfig, or its fields as keywords in
    `options`): from the cache, or trained and cached the first time (or every time with `retrain`).
    `info['cached']` says which; `info['seconds']` is the pretraining time whenever it ran. `source`: 'mnist'
    (digits `source_classes` of the embedded pair), an image folder, or a SourceTask."""
    b = build_config(BodyConfig, config, options)
    check_arch(b.arch)
    device = pick_device(device)  # a device or precision this machine lacks: refused before anything is read
    precision = resolve_precision(precision, device)
    source = b.source if isinstance(b.source, SourceTask) else load_tasks(b.source, size=b.size,
                                                                             source_classes=b.source_classes)[0]
    config = body_config(source, b.arch, b.size, b.n_in, b.epochs, b.lr, b.bs, b.seed)
    cache = Path(cache_dir).expanduser()
    path = cache / f"{body_key(config)}.safetensors"
    with _file_lock(path.with_suffix(".lock")):
        if not retrain and path.is_file() and path.with_suffix(".json").is_file():
            try:
                info = read_body_info(path)
            except ValueError as e:  # a damaged or foreign file under our name: train it again
                if log:
                    log(f"cached body unusable ({e}); training it again")
            else:
                if info.get("config") == config:
                    if log:
                        log(f"pretrained body from cache: {path}")
                    return path, dict(info, cached=True, path=str(path))
        if log:
            log(f"pretraining {b.arch} on {source.description} ({len(source.y_train)} images, {b.epochs} epochs); "
                f"cache: {path}")
        info = pretrain_body(source, path, b, device, precision, progress, log)
    if log:
        log(f"source accuracy {info['source_accuracy']:.4f} on {info['source']['n_test']} held-out images, "
            f"{info['seconds']:.1f}s")
    return path, dict(info, cached=False, path=str(path))


def body_destination(dest: str | Path) -> Path:
    """`dest` as a body file name, refused unless it ends in .safetensors (checked before any training)."""
    dest = Path(dest).expanduser()
    if dest.suffix != ".safetensors":
        raise ValueError(f"{dest}: a body is written as .safetensors, name the file so (e.g. body.safetensors)")
    return dest


def copy_body(path: str | Path, dest: str | Path) -> Path:
    """Copy a body and its JSON sidecar to `dest` (a .safetensors file; its sidecar beside it, same stem), checked
    against the sidecar's sha256: one named file to pass as weights, offline (`pretrained=dest`, `--weights dest`)."""
    path, dest = Path(path), body_destination(dest)
    info = read_body_info(path)  # the bytes are those the sidecar describes
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.resolve() != path.resolve():
        shutil.copyfile(path, dest)
    _ordinary_mode(write_json(dest.with_suffix(".json"), dict(info, file=dest.name)))
    return dest


def describe_body(info: dict[str, Any]) -> str:
    """One plain sentence on where a body's weights came from (for reports)."""
    src = info["source"]
    return (f"{info['arch']} body pretrained here on {src['task']} ({src['n_train']:,} images, {info['epochs']} "
            f"epochs, {info['seconds']:.0f} s on {info.get('env', {}).get('device_name', info['device'])}); "
            f"source accuracy {info['source_accuracy']:.3f} on {src['n_test']:,} held-out source images; "
            f"file {info.get('path', info.get('file', '?'))} (sha256 {info['sha256'][:16]})")
