"""Part II of the practical: a timm ResNet through fastai's vision_learner, trained from scratch, fine-tuned or
with a frozen body, compared in one run folder; predictions, confusion matrix, export and `predict`."""
from __future__ import annotations

import csv
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle / fine_tune)
import timm
import torch
from fastai.callback.training import BnFreeze
from fastai.data.core import DataLoaders
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from torch import nn

from .curves import COLUMNS, CurvesCallback, plot_curves
from .data import DownloadError
from .device import env_info, pick_device, resolve_precision
from .image_data import DEFAULT_CACHE, image_dls, info_dict, plot_image_grid, reseed, show_batch_png
from .learners import setup_learner
from .models import check_name, count_params
from .runs import markdown_table, new_run_dir, write_json

MODES = ("scratch", "finetune", "frozen")
RANDOM_INIT = "random init"
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
STRIP_PREFIXES = ("module.", "0.model.", "model.")  # DataParallel, a fastai Learner's state dict, timm wrappers
SUMMARY_COLUMNS = ("mode", "weights", "trainable_params", "params", "epochs", "sec_per_epoch",
                   "final_valid_accuracy", "best_valid_accuracy")
WeightsArg = bool | str | Path


def check_arch(arch: str) -> None:
    """Raise a ValueError with close matches when `arch` is not a timm model name."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a timm model name such as 'resnet50', got {arch!r}")
    if not timm.is_model(arch):
        check_name(arch, timm.list_models(), "timm architecture")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_path(pretrained: WeightsArg) -> Path | None:
    """The weights file of `pretrained` (None for True/False), checked to exist."""
    if isinstance(pretrained, bool):
        return None
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise ValueError(f"pretrained must be True, False or the path of a weights file, got {pretrained!r}")
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: pass a .safetensors file or a PyTorch "
                                "state dict (.pt/.pth) holding a timm body of the chosen arch")
    return path


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON file beside a weights file (same stem, .json), if any."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"weights sidecar {side} is not valid JSON: {e}") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a PyTorch state dict, loaded without executing pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for non-torch files
            raise ValueError(f"{path} is not a plain PyTorch state dict (loaded with weights_only=True, which refuses "
                             f"pickled objects such as a whole model or a fastai export): {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}. Save `model.state_dict()` instead.") from e
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return dict(sd)


def _first_conv_keys(body: nn.Module) -> list[str]:
    first = getattr(body, "pretrained_cfg", {}).get("first_conv") or []
    return [f"{k}.weight" for k in ([first] if isinstance(first, str) else first)]


def load_body_weights(body: nn.Module, path: str | Path, n_in: int = 3) -> dict[str, Any]:
    """Load a weights file into a timm body (classifier keys ignored, first conv adapted to `n_in`), strictly."""
    path = Path(path)
    sd = read_state_dict(path)
    own = body.state_dict()
    for prefix in STRIP_PREFIXES:
        if not own.keys() & sd.keys() and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    dropped = sorted(k for k in sd if k.startswith(CLASSIFIER_PREFIXES) and k not in own)
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not match this {type(body).__name__} body: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}. Is it a state dict of "
                         "the same timm architecture?")
    adapted = []
    for k in _first_conv_keys(body):
        if k in sd and sd[k].ndim == 4 and sd[k].shape[1] != own[k].shape[1]:
            from timm.models import adapt_input_conv

            sd[k] = adapt_input_conv(own[k].shape[1], sd[k], base_chans=sd[k].shape[1])  # as timm adapts in_chans
            adapted.append(k)
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{path} has tensors of other shapes than this body: {'; '.join(bad[:3])}. "
                         "Is it the same architecture (depth, width)?")
    body.load_state_dict(sd, strict=True)
    return dict(ignored_keys=dropped, adapted_first_conv=adapted, n_in=n_in)


def _hub_state_dict(arch: str, n_in: int) -> tuple[dict[str, torch.Tensor], str]:
    try:
        model = timm.create_model(arch, pretrained=True, num_classes=0, in_chans=n_in)
    except RuntimeError as e:
        msg = str(e).lower()
        if "no pretrained weights" in msg or "invalid pretrained tag" in msg:  # timm's own refusals, not network
            raise ValueError(f"timm has no pretrained weights for {arch!r}: {e}. Choose another arch or tag, or "
                             "pass a local weights file (pretrained=PATH).") from e
        raise DownloadError(_hub_message(arch, e)) from e
    except Exception as e:  # huggingface_hub / requests / urllib raise many types; all mean "not downloaded"
        raise DownloadError(_hub_message(arch, e)) from e
    cfg = model.pretrained_cfg
    return model.state_dict(), cfg.get("hf_hub_id") or cfg.get("url") or arch


def _hub_message(arch: str, e: Exception) -> str:
    return (f"could not download ImageNet weights for {arch} from the timm / Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Are you offline? Instead pass a local "
            "weights file: pretrained=PATH (or --weights PATH), a .safetensors or .pth state dict of the same timm "
            "architecture; or train from a random init with pretrained=False.")


def describe_weights(pretrained: WeightsArg, arch: str = "") -> tuple[str, dict | None]:
    """Where weights come from, as written into summaries, and the JSON sidecar of a weights file."""
    path = weights_path(pretrained)
    if path is not None:
        return f"file: {path.resolve()} (sha256 {_file_sha256(path)[:16]})", read_sidecar(path)
    return (f"timm hub: {arch}" if pretrained else RANDOM_INIT), None


def resnet_learner(dls: DataLoaders, arch: str = "resnet50", pretrained: WeightsArg = False, n_in: int = 3,
                   precision: str = "fp32", channels_last: bool = False, train_bn: bool = True,
                   csv_path: str | Path | None = None, progress: bool | None = None,
                   log: Callable[[str], None] | None = print, path: str | Path = ".", lr: float = 2e-3,
                   name: str = "") -> Learner:
    """A timm model (body + a new fastai head sized to the classes) via `vision_learner`, with every layer trainable.

    `pretrained`: True (ImageNet weights from the timm / Hugging Face hub), False (random init) or the path of a
    .safetensors / .pth state dict of the same architecture (classifier keys ignored, loaded with
    weights_only). Normalisation is left to the DataLoaders (see image_data.folder_dls). The learner records
    `learn.weights` (where the weights came from) and `learn.weights_info` (the file's JSON sidecar).
    """
    check_arch(arch)
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    file = weights_path(pretrained)
    weights, weights_info = describe_weights(pretrained, arch)
    hub_sd = None
    if pretrained is True:  # download before building, so an offline error comes first and fast
        hub_sd, hub_id = _hub_state_dict(arch, n_in)
        weights = f"timm hub: {hub_id}"
    learn = vision_learner(dls, arch, normalize=False, pretrained=False, n_in=n_in, loss_func=CrossEntropyLossFlat(),
                           metrics=accuracy, lr=lr, path=path, train_bn=train_bn)
    body = learn.model[0].model
    if hub_sd is not None:
        body.load_state_dict(hub_sd, strict=True)
    elif file is not None:
        learn.weights_load = load_body_weights(body, file, n_in)
    learn.weights, learn.weights_info = weights, weights_info
    learn.pretrained = weights != RANDOM_INIT
    return setup_learner(learn, precision, csv_path, name=name or arch, progress=progress, log=log,
                         channels_last=channels_last)


def trainable_summary(learn: Learner) -> tuple[int, int]:
    """(trainable, total) parameters of the learner's model as it stands."""
    return count_params(learn.model)


def set_mode(learn: Learner, mode: str, train_bn: bool | None = None) -> Learner:
    """Prepare the trainable layers for a mode: scratch = everything; finetune and frozen start with only the head
    (plus BatchNorm when `train_bn`; with train_bn=False BatchNorm statistics are frozen too, via BnFreeze)."""
    check_name(mode, MODES, "training mode")
    if train_bn is not None and train_bn != learn.train_bn:
        learn.train_bn = train_bn
        learn.opt = None  # BatchNorm's 'force_train' flags are set when the optimizer is created
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, BnFreeze)])
    if mode == "scratch":
        learn.unfreeze()
    else:
        if not learn.train_bn:
            learn.add_cb(BnFreeze())  # only touches BatchNorm layers whose parameters are frozen
        learn.freeze()
    return learn


def _phase(learn: Learner, epochs: int, lr: Any) -> dict[str, Any]:
    trainable, total = trainable_summary(learn)
    what = "all layers" if trainable == total else (
        "head + body BatchNorm" if learn.train_bn else "head only (BatchNorm frozen too)")
    return dict(trains=what, epochs=epochs, lr=str(lr), trainable_params=trainable, total_params=total)


def _renumber(learn: Learner, first_row: int, phases: list[dict]) -> None:
    """Number epochs across fastai's separate fits (fine_tune runs two) and tag each row with its phase."""
    cb = getattr(learn, "curves", None)
    if cb is None:
        return
    rows = cb.history
    new = rows[first_row:]
    labels = [p["trains"] for p in phases for _ in range(p["epochs"])]
    for i, row in enumerate(new):
        row["phase"] = labels[i] if i < len(labels) else labels[-1]
    for i, row in enumerate(rows):
        row["epoch"] = i + 1
    if cb.csv_path is not None and cb.csv_path.is_file():
        with open(cb.csv_path, newline="") as f:
            n_written = sum(1 for _ in f) - 1
        if n_written == len(rows):  # the file is this learner's alone
            with open(cb.csv_path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows([[r[c] if c == "epoch" else f"{r[c]:.6g}" for c in COLUMNS] for r in rows])


def train_mode(learn: Learner, mode: str, epochs: int, lr: float = 2e-3, freeze_epochs: int = 1,
               train_bn: bool | None = None) -> dict[str, Any]:
    """Train in one of the practical's modes; `epochs` counts every pass, so all modes get the same budget.

    scratch: `fit_one_cycle(epochs, lr)` on everything. finetune: `fine_tune(epochs - freeze_epochs, lr,
    freeze_epochs)`: the head alone first, then everything with discriminative rates (body lr/200, head lr/2).
    frozen: `freeze()` then `fit_one_cycle(epochs, lr)`: only the head (and BatchNorm if `train_bn`) learns.
    Every mode trains the weights the learner holds: build a scratch learner with pretrained=False.
    """
    check_name(mode, MODES, "training mode")
    if epochs <= 0 or lr <= 0:
        raise ValueError(f"epochs and lr must be positive, got epochs={epochs}, lr={lr}")
    if mode == "finetune" and not 0 < freeze_epochs < epochs:
        raise ValueError(f"finetune needs 0 < freeze_epochs < epochs (head first, then everything), got "
                         f"freeze_epochs={freeze_epochs}, epochs={epochs}")
    first_row = len(learn.curves.history) if hasattr(learn, "curves") else 0
    set_mode(learn, mode, train_bn)
    start = time.perf_counter()
    if mode == "finetune":
        phases = [_phase(learn, freeze_epochs, lr)]
        learn.fine_tune(epochs - freeze_epochs, base_lr=lr, freeze_epochs=freeze_epochs)
        phases.append(_phase(learn, epochs - freeze_epochs, f"slice({lr / 200:.3g}, {lr / 2:.3g})"))
    else:
        phases = [_phase(learn, epochs, lr)]
        learn.fit_one_cycle(epochs, lr)
    _renumber(learn, first_row, phases)
    return dict(mode=mode, epochs=epochs, phases=phases, seconds=time.perf_counter() - start)


def valid_predictions(learn: Learner, dl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, targets) on the validation set (or `dl`), in the loader's order."""
    probs, targs = learn.get_preds(dl=dl if dl is not None else learn.dls.valid)
    return probs.float(), targs.long()


def confusion_matrix(preds: torch.Tensor, targs: torch.Tensor, n_classes: int) -> list[list[int]]:
    """Counts with true classes as rows and predicted classes as columns."""
    counts = torch.bincount(targs * n_classes + preds, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).tolist()


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """The confusion matrix as an annotated heat map, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    side = max(3.5, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    m = torch.tensor(matrix, dtype=torch.float64)
    im = ax.imshow(m.numpy(), cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title or f"accuracy {float(m.trace() / m.sum()):.3f}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _spread(items: list[int], k: int) -> list[int]:
    """`k` items evenly spaced over `items` (the validation set is sorted by class)."""
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(k - 1, 1))] for i in range(k)]


def plot_predictions(learn: Learner, probs: torch.Tensor, targs: torch.Tensor, path: str | Path, n: int = 16,
                     title: str = "") -> Path:
    """Validation images with predicted label, probability and true label; up to half of them mistakes (red)."""
    preds = probs.argmax(dim=1)
    wrong = (preds != targs).nonzero().flatten().tolist()
    right = (preds == targs).nonzero().flatten().tolist()
    n_wrong = min(len(wrong), max(n // 2, n - len(right)))  # up to half mistakes, more if few are right
    chosen = sorted(_spread(wrong, n_wrong) + _spread(right, n - n_wrong))
    vocab = list(learn.dls.vocab)
    images, titles, colours = [], [], []
    dl, pos, wanted = learn.dls.valid, 0, set(chosen)
    for b in dl:
        samples = dl.decode_batch(b, max_n=len(b[0]))
        for s in samples:
            if pos in wanted:
                p, t = int(preds[pos]), int(targs[pos])
                images.append(s[0])
                titles.append(f"{vocab[p]} ({float(probs[pos, p]):.2f})\ntrue: {vocab[t]}")
                colours.append("green" if p == t else "red")
            pos += 1
        if pos > max(chosen, default=-1):
            break
    return plot_image_grid(images, titles, path, colours=colours,
                           title=title or f"validation predictions ({len(wrong)} wrong of {len(targs)}; red = wrong)")


def export_learner(learn: Learner, path: str | Path) -> Path:
    """`learn.export` for inference, after removing what need not (or cannot) be pickled."""
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, CurvesCallback)])
    if getattr(learn, "precision", "fp32") != "fp32":
        learn.to_fp32()
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    learn.export(path)
    return path


def load_model(model_path: str | Path) -> Learner:
    """A model exported by finetune_experiment, on the CPU, ready for `predict`.

    `load_learner` unpickles the file, which can run code: acceptable here because the model file is one this
    package wrote on the user's own machine. Never pass a model file from someone else.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist: run scripts/finetune.py first "
                                "(it writes model.pkl into its run folder)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai warns that pickle is unsafe: see the docstring
        return load_learner(model_path, cpu=True)


def predict(model: str | Path | Learner, image_path: str | Path) -> tuple[str, float]:
    """(label, probability) of an image file by an exported model (a path, see load_model) or a loaded Learner."""
    image_path = Path(image_path)
    learn = model if isinstance(model, Learner) else load_model(model)
    if not image_path.is_file():
        raise FileNotFoundError(f"image file {image_path} does not exist")
    from fastai.vision.core import PILImage
    from PIL import UnidentifiedImageError

    try:
        image = PILImage.create(image_path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {image_path}: {e}") from e
    with learn.no_bar():
        label, idx, probs = learn.predict(image)
    return str(label), float(probs[int(idx)])


def _best(results: dict[str, dict]) -> str:
    return max(results, key=lambda m: (results[m]["final_valid_accuracy"], -results[m]["final_valid_loss"]))


def finetune_experiment(data: str | Path = "lfw", arch: str = "resnet50", size: int | None = None, bs: int = 32,
                        epochs: int = 5, modes: Sequence[str] = MODES, pretrained: WeightsArg = False,
                        lr: float = 2e-3, freeze_epochs: int = 1, train_bn: bool = True, precision: str = "auto",
                        channels_last: bool = False, aug: str = "default", seed: int = 42, device: str = "auto",
                        out: str | Path = "runs/finetune", overwrite: bool = False,
                        cache_dir: str | Path = DEFAULT_CACHE, progress: bool | None = None,
                        log: Callable[[str], None] = print) -> dict:
    """Train `arch` on `data` in each mode; write config.json, metrics_<mode>.csv, comparison.png, show_batch.png,
    predictions.png, confusion_matrix.png, model.pkl (the best mode), summary.json and summary.md.

    `size` defaults to 64 for the embedded 'lfw' (25 px images) and 224 otherwise. scratch always starts
    from a random init; finetune and frozen use `pretrained` (True: timm hub, a path: local weights file,
    False: random init, labelled so everywhere).
    """
    modes = list(dict.fromkeys(modes))
    if not modes:
        raise ValueError(f"no modes given: choose from {', '.join(MODES)}")
    for m in modes:
        check_name(m, MODES, "training mode")
    check_arch(arch)
    if epochs <= 0 or bs <= 0 or lr <= 0:
        raise ValueError(f"epochs, batch size and lr must be positive, got epochs={epochs}, bs={bs}, lr={lr}")
    if "finetune" in modes and not 0 < freeze_epochs < epochs:
        raise ValueError(f"finetune needs 0 < freeze_epochs < epochs, got freeze_epochs={freeze_epochs}, "
                         f"epochs={epochs}: raise --epochs")
    size = size or (64 if str(data) == "lfw" else 224)
    weights, weights_info = describe_weights(pretrained, arch)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    t0 = time.perf_counter()
    set_seed(seed, reproducible=True)
    dls = image_dls(data, size=size, bs=bs, seed=seed, aug=aug, device=dev, cache_dir=cache_dir)
    run = new_run_dir(out, overwrite)
    env = env_info(dev)
    config = dict(data=str(data), arch=arch, size=size, bs=bs, epochs=epochs, modes=modes, pretrained=str(pretrained),
                  weights=weights, lr=lr, freeze_epochs=freeze_epochs, train_bn=train_bn, aug=aug, seed=seed,
                  device=str(dev), precision=prec, channels_last=channels_last,
                  optimizer="fastai Adam (wd 0.01 decoupled)", env=env)
    write_json(run / "config.json", config)
    info = info_dict(dls)
    log(f"data: {info['source']} [{info['layout']}], classes {info['classes']}, split sizes {dls.info.sizes()} "
        f"({time.perf_counter() - t0:.1f}s)")
    show_batch_png(dls, run / "show_batch.png", title=f"training batch ({aug} augmentation)")
    if weights == RANDOM_INIT and set(modes) & {"finetune", "frozen"}:
        log("WARNING: no pretrained weights: finetune and frozen start from a random init and are labelled "
            "'random init'. Pass pretrained=PATH (--weights PATH) or pretrained=True (--pretrained) to transfer.")

    results: dict[str, dict] = {}
    histories: dict[str, list] = {}
    best_learn, best_mode = None, None
    for mode in modes:
        set_seed(seed, reproducible=True)  # every mode gets the same head init, augmentation draws ...
        reseed(dls, seed)  # ... and batch order
        learn = resnet_learner(dls, arch, pretrained=False if mode == "scratch" else pretrained,
                               precision=prec, channels_last=channels_last, train_bn=train_bn,
                               csv_path=run / f"metrics_{mode}.csv", progress=progress, log=log, path=run,
                               lr=lr, name=mode)
        log(f"{mode}: {learn.weights}")
        done = train_mode(learn, mode, epochs, lr=lr, freeze_epochs=freeze_epochs, train_bn=train_bn)
        history = learn.curves.history
        trainable, total = done["phases"][-1]["trainable_params"], done["phases"][-1]["total_params"]
        label = f"{mode} (random init)" if learn.weights == RANDOM_INIT and mode != "scratch" else mode
        histories[label] = history
        results[mode] = dict(
            mode=mode, weights=learn.weights, trainable_params=trainable, params=total, epochs=epochs,
            sec_per_epoch=sum(r["seconds"] for r in history) / len(history),
            final_valid_accuracy=history[-1]["valid_accuracy"], final_valid_loss=history[-1]["valid_loss"],
            best_valid_accuracy=max(r["valid_accuracy"] for r in history),
            best_epoch=max(history, key=lambda r: r["valid_accuracy"])["epoch"],
            phases=done["phases"], seconds=done["seconds"], metrics_csv=f"metrics_{mode}.csv",
            device=str(dev), precision=prec)
        if best_mode is None or _best({best_mode: results[best_mode], mode: results[mode]}) == mode:
            best_learn, best_mode = learn, mode
        else:
            del learn
    # the hub's full id (e.g. timm/resnet50.a1_in1k) is known once a learner has loaded it
    weights = next((r["weights"] for m, r in results.items() if m != "scratch"), weights)
    plot_curves(histories, run / "comparison.png",
                title=f"{arch} on {data} ({size} px), {epochs} epochs; weights: {weights}")
    probs, targs = valid_predictions(best_learn)
    preds = probs.argmax(dim=1)
    classes = list(dls.vocab)
    matrix = confusion_matrix(preds, targs, len(classes))
    plot_predictions(best_learn, probs, targs, run / "predictions.png")
    plot_confusion(matrix, classes, run / "confusion_matrix.png",
                   title=f"{best_mode}: valid accuracy {float((preds == targs).float().mean()):.3f}")
    model_path = export_learner(best_learn, run / "model.pkl")

    rows = [dict(r, weights=r["weights"] if r["weights"] == RANDOM_INIT else r["weights"].split(" (sha256")[0])
            for r in results.values()]
    table = markdown_table(rows, SUMMARY_COLUMNS)
    (run / "summary.md").write_text(f"{arch} on {info['source']}, {size} px, weights: {weights}\n\n{table}\n")
    summary = dict(run_dir=str(run), data=info, arch=arch, size=size, bs=bs, epochs=epochs, lr=lr,
                   freeze_epochs=freeze_epochs, train_bn=train_bn, aug=aug, seed=seed, device=str(dev),
                   device_name=env.get("device_name"), precision=prec, channels_last=channels_last,
                   weights=weights, weights_info=weights_info, modes=results, best_mode=best_mode,
                   confusion_matrix=dict(mode=best_mode, classes=classes, rows="true", columns="predicted",
                                         matrix=matrix),
                   model=str(model_path), env=env, seconds=time.perf_counter() - t0)
    write_json(run / "summary.json", summary)
    log("\n" + table + f"\n\nbest: {best_mode} (exported to {model_path})\nrun folder: {run}")
    return summary
