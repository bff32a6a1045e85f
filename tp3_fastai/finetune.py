"""Part II on an image folder: every mode in one run folder (checkpoints, resume, distributed launches), its
comparison, predictions and confusion matrix, the exported model and `predict`."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner, load_learner
from fastai.torch_core import set_seed
from PIL import Image, UnidentifiedImageError

from .checkpoint import CheckpointCallback, load_checkpoint, truncate_csv
from .curves import CurvesCallback, plot_curves, read_curves
from .device import env_info, pick_device, resolve_precision
from .distributed import (LaunchConfig, as_single_process, backend_for, barrier, broadcast_object, digest,
                          distributed_context, gather_object, join_launch, main_only, rank)
from .image_data import (DEFAULT_CACHE, image_dls, image_source, info_dict, plot_image_grid, reseed,
                         show_batch_png)
from .runs import markdown_table, new_run_dir, pyplot, read_json, save_figure, write_json
from .transfer import MODES, check_image_size, check_plan, resnet_learner, set_mode, train_mode
from .weights import RANDOM_INIT, WeightsArg, hub_state_dict, describe_weights

# what a run folder's config.json fixes for `resume`: the experiment itself, not where or how fast it runs
RESUME_KEYS = ("data", "arch", "size", "bs", "epochs", "modes", "pretrained", "lr", "freeze_epochs", "train_bn", "aug",
               "seed", "channels_last")
SUMMARY_COLUMNS = ("mode", "weights", "trainable_params", "params", "epochs", "sec_per_epoch",
                   "final_valid_accuracy", "best_valid_accuracy")


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
    plt = pyplot()

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
    return save_figure(fig, path, dpi=110)


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
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (CurvesCallback, CheckpointCallback))])
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
    """(label, probability) of an image file by an exported model (a path, see load_model) or a loaded Learner.

    fastai's `learn.predict` reads the file through the learner's own pipeline (any image mode, as its training
    images were read); a missing or unreadable file is refused before the model is loaded.
    """
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"image file {image_path} does not exist")
    try:
        with Image.open(image_path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {image_path}: {e}") from e
    learn = model if isinstance(model, Learner) else load_model(model)
    with learn.no_bar():
        label, idx, probs = learn.predict(image_path)
    return str(label), float(probs[int(idx)])


def _best(results: dict[str, dict]) -> str:
    return max(results, key=lambda m: (results[m]["final_valid_accuracy"], -results[m]["final_valid_loss"]))


def _resume_config(run: Path) -> dict[str, Any]:
    """The experiment's arguments saved in a run folder's config.json (pretrained back to True / False / a path)."""
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run / 'config.json'} does not exist: resume needs the run folder of a finetune run")
    saved = read_json(run / "config.json")
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise ValueError(f"{run / 'config.json'} lacks {', '.join(missing)}: not a finetune run folder")
    kept = {k: saved[k] for k in RESUME_KEYS}
    kept["pretrained"] = {"True": True, "False": False}.get(str(saved["pretrained"]), saved["pretrained"])
    return dict(kept, weights=saved.get("weights"))


def _split_digest(dls: DataLoaders) -> str:
    """A short SHA-256 of the training and validation file lists, to show that every rank has the same split."""
    items = [[str(f) for f in ds.items] for ds in (dls.train_ds, dls.valid_ds)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def finetune_experiment(data: str | Path = "lfw", arch: str = "resnet50", size: int | None = None, bs: int = 32,
                        epochs: int = 5, modes: Sequence[str] = MODES, pretrained: WeightsArg = False,
                        lr: float = 2e-3, freeze_epochs: int = 1, train_bn: bool = True, precision: str = "auto",
                        channels_last: bool = False, aug: str = "default", seed: int = 42, device: str = "auto",
                        out: str | Path = "runs/finetune", overwrite: bool = False,
                        cache_dir: str | Path = DEFAULT_CACHE, progress: bool | None = None,
                        resume: str | Path | None = None, log: Callable[[str], None] = print,
                        launch: LaunchConfig | None = None) -> dict:
    """Train `arch` on `data` in each mode; write config.json, metrics_<mode>.csv, comparison.png, show_batch.png,
    predictions.png, confusion_matrix.png, model.pkl (the best mode), summary.json and summary.md.

    `size` defaults to 64 for the embedded 'lfw' (25 px images) and 224 otherwise. scratch always starts
    from a random init; finetune and frozen use `pretrained` (True: timm hub, a path: local weights file,
    False: random init, labelled so everywhere).

    Checkpoints: after every epoch `<run>/checkpoints/<mode>/last.pth` (and `best.pth` when the validation
    accuracy improves), written atomically; a finished mode leaves `result.json` there. `resume=RUN_DIR`
    continues an interrupted run with the arguments of its config.json: finished modes are kept, the
    interrupted one continues after its last completed epoch with the same schedule (in either of fine_tune's
    phases), its metrics CSV without repeated or missing epochs. Ctrl-C stops after saying how to resume.

    Launched on several processes (`torchrun`, `accelerate launch`) it trains data-parallel like
    mnist.train_mnist: `bs` stays the batch of one optimiser step, `bs // world` images per process; every rank
    draws the same split from `seed`; rank 0 alone writes the run folder and prints.
    """
    if resume is not None:
        saved = _resume_config(Path(resume))
        (data, arch, size, bs, epochs, modes, pretrained, lr, freeze_epochs, train_bn, aug, seed,
         channels_last) = (saved[k] for k in RESUME_KEYS)
    modes = check_plan(modes, MODES, "training mode", arch, epochs, bs, lr, freeze_epochs)
    size = (64 if str(data) == "lfw" else 224) if size is None else size
    check_image_size(arch, size)  # before any data is read or folder made
    weights, weights_info = describe_weights(pretrained, arch)
    if resume is not None and saved["weights"] and weights.startswith("file:") and weights != saved["weights"]:
        raise ValueError(f"the weights file changed since the run started ({saved['weights']}, now {weights}): "
                         "resume needs the same file")
    dev, main, world = join_launch(bs, pick_device(device), launch)
    prec = resolve_precision(precision, dev)
    log = main_only(log)
    t0 = time.perf_counter()
    if main:  # rank 0 alone writes the embedded set or downloads (data, hub weights); the others then read them
        image_source(data, cache_dir)
        if pretrained is True and world > 1:
            hub_state_dict(arch, 3)
    barrier()
    set_seed(seed, reproducible=True)
    dls = image_dls(data, size=size, bs=bs // world, seed=seed, aug=aug, device=dev, cache_dir=cache_dir)
    # rank 0 names the run folder (a new -2, -3, ... if it exists) and tells the others
    run = broadcast_object((Path(resume) if resume is not None else new_run_dir(out, overwrite)) if main else None)
    env = env_info(dev)
    config = dict(data=str(data), arch=arch, size=size, bs=bs, epochs=epochs, modes=modes,
                  pretrained=pretrained if isinstance(pretrained, bool) else str(pretrained), weights=weights, lr=lr,
                  freeze_epochs=freeze_epochs, train_bn=train_bn, aug=aug, seed=seed, device=str(dev), precision=prec,
                  channels_last=channels_last, optimizer="fastai Adam (wd 0.01 decoupled)", world_size=world, env=env)
    if world > 1:
        config.update(bs_per_process=bs // world, backend=backend_for(dev))
    if resume is None and main:
        write_json(run / "config.json", config)
    info = info_dict(dls)
    log(f"data: {info['source']} [{info['layout']}], classes {info['classes']}, split sizes {dls.info.sizes()} "
        f"({time.perf_counter() - t0:.1f}s)"
        + (f"; {world} processes ({backend_for(dev)}), {bs // world} images per process per step" if world > 1
           else ""))
    if info["skipped"]:
        log(f"skipped {len(info['skipped'])} file(s) that are not images: {', '.join(info['skipped'][:10])}"
            + (" ..." if len(info["skipped"]) > 10 else ""))
    if main:
        show_batch_png(dls, run / "show_batch.png", title=f"training batch ({aug} augmentation)")
    if weights == RANDOM_INIT and set(modes) & {"finetune", "frozen"}:
        log("WARNING: no pretrained weights: finetune and frozen start from a random init and are labelled "
            "'random init'. Pass pretrained=PATH (--weights PATH) or pretrained=True (--pretrained) to transfer.")

    def build(mode: str, csv_path: Path | None = None, init: WeightsArg = False) -> Learner:
        return resnet_learner(dls, arch, pretrained=init, precision=prec,
                              channels_last=channels_last, train_bn=train_bn, csv_path=csv_path,
                              progress=progress if main else False, log=log, path=run, lr=lr, name=mode)

    results: dict[str, dict] = {}
    histories: dict[str, list] = {}
    resumed: dict[str, int] = {}
    best_learn, best_learn_mode = None, None
    mode = modes[0]
    try:
        for mode in modes:
            ckpt, csv_path = run / "checkpoints" / mode, run / f"metrics_{mode}.csv"
            if (ckpt / "result.json").is_file():  # finished before an interruption: kept as it was
                results[mode] = read_json(ckpt / "result.json")
                resumed[mode] = epochs
                history = read_curves(csv_path) if main else []
                log(f"{mode}: finished before, kept ({ckpt / 'result.json'})")
            else:
                set_seed(seed, reproducible=True)  # every mode gets the same head init, augmentation draws ...
                reseed(dls, seed)  # ... and batch order
                learn = build(mode, csv_path if main else None, False if mode == "scratch" else pretrained)
                log(f"{mode}: {learn.weights}")
                if main:
                    learn.add_cb(CheckpointCallback(ckpt))
                set_mode(learn, mode, train_bn)  # the optimizer state loads into the layout training uses
                start = load_checkpoint(learn, ckpt / "last.pth") if (ckpt / "last.pth").is_file() else 0
                if broadcast_object(start) != start:
                    raise ValueError(f"rank {rank()} cannot see {ckpt / 'last.pth'}: resuming on several machines "
                                     "needs the run folder on a file system that every process sees")
                if main:
                    truncate_csv(csv_path, start)  # rows of epochs after the checkpoint are run again
                    if start:
                        learn.checkpoint.best = max(r["valid_accuracy"] for r in read_curves(csv_path))
                if start:
                    resumed[mode] = start
                    phase = (" (head-only phase)" if start < freeze_epochs else " (unfrozen phase)") * (
                        mode == "finetune")
                    log(f"{mode}: resuming after epoch {start}/{epochs}{phase}")
                with distributed_context(learn):  # no-op in a single process
                    done = train_mode(learn, mode, epochs, lr=lr, freeze_epochs=freeze_epochs, train_bn=train_bn,
                                      start=start)
                history = broadcast_object(read_curves(csv_path) if main else None)  # the whole run, resumed or not
                results[mode] = dict(
                    mode=mode, weights=learn.weights, trainable_params=done["phases"][-1]["trainable_params"],
                    params=done["phases"][-1]["total_params"], epochs=epochs,
                    sec_per_epoch=sum(r["seconds"] for r in history) / len(history),
                    final_valid_accuracy=history[-1]["valid_accuracy"], final_valid_loss=history[-1]["valid_loss"],
                    best_valid_accuracy=max(r["valid_accuracy"] for r in history),
                    best_epoch=max(history, key=lambda r: r["valid_accuracy"])["epoch"],
                    phases=done["phases"], seconds=done["seconds"], metrics_csv=csv_path.name,
                    device=str(dev), precision=prec)
                if world > 1:  # what each process did: same weights everywhere means the gradients were all-reduced
                    results[mode]["ranks"] = gather_object(dict(rank=rank(), train_batches=done["train_batches"],
                                                                weights=digest(learn.model)))
                if main:
                    write_json(ckpt / "result.json", results[mode])
                if best_learn_mode is None or _best({best_learn_mode: results[best_learn_mode],
                                                     mode: results[mode]}) == mode:
                    best_learn, best_learn_mode = learn, mode
                del learn
            r = results[mode]
            label = f"{mode} (random init)" if r["weights"] == RANDOM_INIT and mode != "scratch" else mode
            histories[label] = history
    except KeyboardInterrupt:
        log(f"\ninterrupted during {mode}: every completed epoch is saved in {run / 'checkpoints'}; continue with "
            f"resume={str(run)!r} (scripts/finetune.py --resume {run})")
        raise
    best_mode = _best(results)
    summary = dict(run_dir=str(run), data=info, arch=arch, size=size, bs=bs, epochs=epochs, lr=lr,
                   freeze_epochs=freeze_epochs, train_bn=train_bn, aug=aug, seed=seed, device=str(dev),
                   device_name=env.get("device_name"), precision=prec, channels_last=channels_last,
                   weights=weights, weights_info=weights_info, modes=results, best_mode=best_mode, world_size=world,
                   env=env)
    if resume is not None:
        summary["resumed"] = resumed  # epochs each mode had completed before this process
    if world > 1:
        summary["distributed"] = dict(
            backend=backend_for(dev), bs_per_process=bs // world,
            ranks=gather_object(dict(rank=rank(), host=socket.gethostname(), pid=os.getpid(), device=str(dev),
                                     split=_split_digest(dls))))
    if not main:
        return summary
    # the hub's full id (e.g. timm/resnet50.a1_in1k) is known once a learner has loaded it
    weights = summary["weights"] = next((r["weights"] for m, r in results.items() if m != "scratch"), weights)
    if best_learn_mode != best_mode:  # the best mode finished before an interruption: rebuild it from its checkpoint
        best_learn = build(best_mode)  # random init: the checkpoint replaces every weight
        load_checkpoint(best_learn, run / "checkpoints" / best_mode / "last.pth")
    with as_single_process():  # rank 0 alone predicts, plots and exports
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
    summary.update(confusion_matrix=dict(mode=best_mode, classes=classes, rows="true", columns="predicted",
                                         matrix=matrix),
                   model=str(model_path), seconds=time.perf_counter() - t0)
    write_json(run / "summary.json", summary)
    log("\n" + table + f"\n\nbest: {best_mode} (exported to {model_path})\nrun folder: {run}")
    return summary
