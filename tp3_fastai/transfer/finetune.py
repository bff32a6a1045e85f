"""Part II on an image folder: every mode in one run folder (checkpoints, resume, distributed launches), its
comparison, predictions and confusion matrix, the exported model and `predict`."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner, load_learner
from fastai.torch_core import set_seed
from PIL import Image, UnidentifiedImageError

from ..train.checkpoint import CheckpointCallback, finish_unit, load_best
from ..train.curves import CurvesCallback, plot_curves, read_curves
from ..core.device import env_info, pick_device, resolve_channels_last, resolve_precision
from ..train.distributed import (LaunchConfig, as_single_process, backend_for, broadcast_object, digest,
                                 distributed_context, gather_object, join_launch, main_only, rank)
from ..train.experiment import (RunContext, distributed_summary, launch_note, no_log, on_rank_zero, open_run,
                                resume_config, resume_unit)
from ..data.images import image_dls, image_source, info_dict, parse_aug, plot_image_grid, reseed, show_batch_png
from ..train.optimizer import OPTIMIZER_NAME
from ..data.pipeline import check_pipeline
from ..core.config import DEFAULT_CACHE, build_config, config_dict
from ..core.runs import folder_size, human_bytes, markdown_table, pyplot, read_json, save_figure, write_json
from ..train.modes import DEFAULT_MODES, mode_file_name, mode_label, set_mode, training_mode
from .learner import check_image_size, check_plan, resnet_learner, train_mode
from .weights import RANDOM_INIT, WeightsArg, check_weights, describe_weights, normalization, short_weights

# what a run folder's config.json fixes for `resume`: the experiment itself, not where or how fast it runs
RESUME_KEYS = ("data", "arch", "size", "bs", "epochs", "modes", "pretrained", "lr", "freeze_epochs", "aug", "seed",
               "channels_last")
SUMMARY_COLUMNS = ("mode", "weights", "trainable_params", "params", "epochs", "sec_per_epoch",
                   "final_valid_accuracy", "best_valid_accuracy", "best_epoch", "exported")
# Which model a run exports (model.pkl), judges (predictions, confusion matrix) and calls best, said in its log,
# summary.md and report: the weights of the best epoch (checkpoints' best.pth) of the mode whose best epoch is best.
EXPORT_RULE = ("the best epoch's weights of the mode with the highest best_valid_accuracy (ties: the lower valid "
               "loss at that epoch, then the earlier mode)")


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


def short_data(data: str | Path) -> str:
    """A data source as a figure title names it: a named source as it is, a folder by its last two parts."""
    parts = Path(str(data)).parts
    return str(data) if len(parts) <= 2 else str(Path(*parts[-2:]))


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


def best_mode(results: dict[str, dict]) -> str:
    """The mode that is exported (EXPORT_RULE): highest best_valid_accuracy, then lowest valid loss at that epoch,
    then the first in `results`' order."""
    return max(results, key=lambda m: (results[m]["best_valid_accuracy"], -results[m]["best_valid_loss"]))


def _resume_config(run: Path) -> dict[str, Any]:
    """The experiment's arguments saved in a run folder's config.json (pretrained back to True / False / a path)."""
    saved = resume_config(run, RESUME_KEYS, "finetune")
    kept = {k: saved[k] for k in RESUME_KEYS}
    kept["pretrained"] = {"True": True, "False": False}.get(str(saved["pretrained"]), saved["pretrained"])
    if "train_bn" in saved:  # written before the modes table: train_bn beside the modes
        _check_old_train_bn(run, kept["modes"], saved["train_bn"])
    if saved.get("checkpoints") is False:
        raise ValueError(f"{run} was run without checkpoints (--no-checkpoints): there is nothing to resume from; "
                         "start the run again")
    return dict(kept, weights=saved.get("weights"))


def _check_old_train_bn(run: Path, modes: Sequence[str], train_bn: bool) -> None:
    """Refuse to resume a run whose saved train_bn gave one of its modes another meaning than the table's."""
    if train_bn and "frozen" in modes:
        raise ValueError(f"{run} was made before the modes were renamed: its 'frozen' trained the body's BatchNorm "
                         "(train_bn=True), which is 'frozen_bn' now, and its checkpoints cannot continue under "
                         "another mode: start a new run (--modes ...,frozen_bn for what it trained)")
    if not train_bn and "finetune" in modes:
        raise ValueError(f"{run} was made before the modes were renamed: its 'finetune' kept the body's BatchNorm "
                         "frozen in the head-only phase (train_bn=False), which no mode does now: start a new run")


def _split_digest(dls: DataLoaders) -> str:
    """A short SHA-256 of the training and validation file lists, to show that every rank has the same split."""
    items = [[str(f) for f in ds.items] for ds in (dls.train_ds, dls.valid_ds)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass
class FinetuneConfig:
    """Everything a finetune run is asked for (see finetune_experiment): what it trains, where its data and weights
    come from, and where and how it runs. config.json holds it, checked (FinetunePlan), as the run ran it."""
    RENAMED: ClassVar[dict[str, str]] = {
        "train_bn": "the modes say it: 'frozen' freezes the body's BatchNorm with the body, 'frozen_bn' trains it"}
    data: str | Path = "lfw"
    arch: str = "resnet50"
    size: int | None = None  # None: 64 for 'lfw', 224 otherwise
    bs: int = 32
    epochs: int = 5
    modes: Sequence[str] = DEFAULT_MODES["finetune"]
    pretrained: WeightsArg = False
    lr: float = 2e-3
    freeze_epochs: int = 1
    aug: str = "default"
    seed: int = 42
    channels_last: bool | None = None  # None: on CUDA only (device.resolve_channels_last)
    precision: str = "auto"
    device: str = "auto"
    out: str | Path = "runs/finetune"
    overwrite: bool = False
    cache_dir: str | Path = DEFAULT_CACHE
    progress: bool | None = None
    resume: str | Path | None = None
    mirror: str | None = None
    pipeline: str = "auto"
    deterministic: bool = False  # cuDNN's deterministic algorithms (how it runs, not what: not a resume key)
    checkpoints: bool = True  # False: no checkpoint files (no resume); the best epoch's weights are kept in memory


@dataclass
class FinetunePlan(FinetuneConfig):
    """A checked FinetuneConfig (a resumed run's saved arguments, modes without repeats, the image size chosen),
    with where its weights come from and how its inputs are normalised."""
    weights: str = RANDOM_INIT
    weights_info: dict | None = None
    normalize: dict = field(default_factory=dict)

    @property
    def transfers(self) -> bool:
        """Whether a mode starts from the pretrained weights (every mode but scratch)."""
        return any(training_mode(m).pretrained for m in self.modes)


def plan_finetune(config: FinetuneConfig) -> FinetunePlan:
    """Check every argument before any work: a resumed run's folder and saved arguments, the modes and schedule,
    the architecture and image size, and a weights file (read with weights_only into a fresh body of `arch`)."""
    saved = _resume_config(Path(config.resume)) if config.resume is not None else {}
    given = {f.name: getattr(config, f.name) for f in fields(config)}
    given.update({k: saved[k] for k in RESUME_KEYS if k in saved})
    plan = FinetunePlan(**given)
    plan.resume = Path(plan.resume) if plan.resume is not None else None
    plan.modes = check_plan(plan.modes, "finetune", plan.arch, plan.epochs, plan.bs, plan.lr, plan.freeze_epochs)
    plan.size = (64 if str(plan.data) == "lfw" else 224) if plan.size is None else plan.size
    check_image_size(plan.arch, plan.size)  # before any data is read or folder made
    parse_aug(plan.aug)
    check_pipeline(plan.pipeline)
    plan.weights, plan.weights_info = describe_weights(plan.pretrained, plan.arch)
    if saved.get("weights") and plan.weights.startswith("file:") and plan.weights != saved["weights"]:
        raise ValueError(f"the weights file changed since the run started ({saved['weights']}, now {plan.weights}): "
                         "resume needs the same file")
    if plan.transfers and not isinstance(plan.pretrained, bool):
        check_weights(plan.pretrained, plan.arch)  # a pickle, another architecture: refused before any training
    plan.normalize = normalization(plan.pretrained if plan.transfers else False, plan.arch)
    return plan


def finetune_data(plan: FinetunePlan, dev: torch.device, main: bool, world: int,
                  log: Callable[[str], None] | None) -> DataLoaders:
    """Rank 0 fetches what is online (hub weights, a named source's archive) while the others wait; then every
    rank reads the DataLoaders, refused when the training set holds less than one batch."""
    def fetch() -> None:
        if plan.transfers and plan.pretrained is True:
            check_weights(True, plan.arch)  # downloaded or found in the Hugging Face cache: the learners read it there
        image_source(plan.data, plan.cache_dir, plan.mirror, log)

    on_rank_zero(fetch, main)
    set_seed(plan.seed, reproducible=plan.deterministic)
    dls = image_dls(plan.data, size=plan.size, bs=plan.bs // world, seed=plan.seed, aug=plan.aug, device=dev,
                    cache_dir=plan.cache_dir, stats=(plan.normalize["mean"], plan.normalize["std"]),
                    pipeline=plan.pipeline)
    if dls.info.n_train < plan.bs:  # fastai drops the last incomplete training batch
        raise ValueError(f"batch size {plan.bs} is larger than the {dls.info.n_train} training images of "
                         f"{plan.data}, so not one training batch would remain (fastai drops the last incomplete "
                         f"one): lower --bs to {dls.info.n_train} or less")
    return dls


def start_run(ctx: RunContext, plan: FinetunePlan, dls: DataLoaders, t0: float) -> dict:
    """config.json (a new run: the plan, with the device and precision that run), show_batch.png and the log's
    account of the data; returns the config."""
    config = dict(config_dict(plan), device=str(ctx.dev), precision=ctx.precision,
                  mode_settings={m: training_mode(m).settings() for m in plan.modes},
                  optimizer=OPTIMIZER_NAME, world_size=ctx.world,
                  pipeline=dls.info.pipeline_info.get("asked"), pipeline_ran=dls.info.pipeline, env=env_info(ctx.dev))
    if ctx.world > 1:
        config.update(bs_per_process=plan.bs // ctx.world, backend=backend_for(ctx.dev))
    if plan.resume is None and ctx.main:
        write_json(ctx.run / "config.json", config)
    info = info_dict(dls)
    ctx.log(f"data: {info['source']} [{info['layout']}], classes {info['classes']}, split sizes {dls.info.sizes()} "
            f"({time.perf_counter() - t0:.1f}s)" + launch_note(ctx.dev, plan.bs, ctx.world))
    if info["skipped"]:
        ctx.log(f"skipped {len(info['skipped'])} file(s) that are not images: {', '.join(info['skipped'][:10])}"
                + (" ..." if len(info["skipped"]) > 10 else ""))
    if ctx.main:
        show_batch_png(dls, ctx.run / "show_batch.png", title=f"training batch ({plan.aug} augmentation)")
    if plan.weights == RANDOM_INIT and plan.transfers:
        ctx.log(f"WARNING: no pretrained weights: {', '.join(m for m in plan.modes if training_mode(m).pretrained)} "
                "start from a random init and are labelled 'random init'. Pass pretrained=PATH (--weights PATH) or "
                "pretrained=True (--pretrained) to transfer.")
    return config


def build_learner(ctx: RunContext, plan: FinetunePlan, dls: DataLoaders, mode: str, csv_path: Path | None = None,
                  init: WeightsArg = False) -> Learner:
    """The mode's learner: `arch` with weights `init` on `dls`, writing its curves to `csv_path`."""
    return resnet_learner(dls, plan.arch, pretrained=init, precision=ctx.precision, channels_last=plan.channels_last,
                          train_bn=training_mode(mode).train_bn, csv_path=csv_path,
                          progress=ctx.progress if ctx.main else False, log=ctx.log, path=ctx.run, lr=plan.lr, name=mode)


def train_one_mode(ctx: RunContext, plan: FinetunePlan, dls: DataLoaders,
                   mode: str) -> tuple[dict, list[dict], Learner | None, int]:
    """Train (or resume, or keep when finished before) one mode: its result, history, learner (None when kept)
    and the epochs it had done before this process."""
    stem = mode_file_name(mode)
    ckpt, csv_path = ctx.run / "checkpoints" / stem, ctx.run / f"metrics_{stem}.csv"
    if (ckpt / "result.json").is_file():  # finished before an interruption: kept as it was
        ctx.log(f"{mode}: finished before, kept ({ckpt / 'result.json'})")
        if ctx.main:
            finish_unit(ckpt)  # a kill between result.json and the clean-up left last.pth behind
        return read_json(ckpt / "result.json"), read_curves(csv_path) if ctx.main else [], None, plan.epochs
    set_seed(plan.seed, reproducible=plan.deterministic)  # every mode gets the same head init, augmentation draws ...
    reseed(dls, plan.seed)  # ... and batch order
    learn = build_learner(ctx, plan, dls, mode, csv_path if ctx.main else None,
                          plan.pretrained if training_mode(mode).pretrained else False)
    ctx.log(f"{mode}: {learn.weights}")
    if ctx.main:
        learn.add_cb(CheckpointCallback(ckpt if plan.checkpoints else None))
    set_mode(learn, mode)  # the optimizer state loads into the layout training uses
    start = resume_unit(learn, ckpt, csv_path, ctx.main)
    if start:
        fine_tune = training_mode(mode).schedule == "fine_tune"
        phase = (" (head-only phase)" if start < plan.freeze_epochs else " (unfrozen phase)") * fine_tune
        ctx.log(f"{mode}: resuming after epoch {start}/{plan.epochs}{phase}")
    with distributed_context(learn):  # no-op in a single process
        done = train_mode(learn, mode, plan.epochs, lr=plan.lr, freeze_epochs=plan.freeze_epochs, start=start)
    history = broadcast_object(read_curves(csv_path) if ctx.main else None)  # the whole run, resumed or not
    best_row = max(history, key=lambda r: r["valid_accuracy"])  # the first of equal epochs, as best.pth keeps
    result = dict(
        mode=mode, weights=learn.weights, trainable_params=done["phases"][-1]["trainable_params"],
        params=done["phases"][-1]["total_params"], epochs=plan.epochs,
        sec_per_epoch=sum(r["seconds"] for r in history) / len(history),
        final_valid_accuracy=history[-1]["valid_accuracy"], final_valid_loss=history[-1]["valid_loss"],
        best_valid_accuracy=best_row["valid_accuracy"], best_valid_loss=best_row["valid_loss"],
        best_epoch=best_row["epoch"],
        phases=done["phases"], seconds=done["seconds"], metrics_csv=csv_path.name,
        device=str(ctx.dev), precision=ctx.precision)
    if ctx.world > 1:  # what each process did: same weights everywhere means the gradients were all-reduced
        result["ranks"] = gather_object(dict(rank=rank(), train_batches=done["train_batches"],
                                             weights=digest(learn.model)))
    if ctx.main and plan.checkpoints:
        write_json(ckpt / "result.json", result)  # first: a kill before the clean-up still finds the mode done
        finish_unit(ckpt)  # the optimiser state only served resume; best.pth (weights) stays
    return result, history, learn, start


@dataclass
class Trained:
    """Every mode's result and history (labelled for the figure), the epochs resumed modes had done, and the
    learner of the best mode trained in this process."""
    results: dict[str, dict] = field(default_factory=dict)
    histories: dict[str, list] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)
    best_mode: str | None = None
    best_learn: Learner | None = None


def train_modes(ctx: RunContext, plan: FinetunePlan, dls: DataLoaders) -> Trained:
    """Each mode in turn; Ctrl-C stops after saying how to resume."""
    out, mode = Trained(), plan.modes[0]
    try:
        for mode in plan.modes:
            result, history, learn, start = train_one_mode(ctx, plan, dls, mode)
            out.results[mode] = result
            if start:
                out.resumed[mode] = start
            if learn is not None and (out.best_mode is None or best_mode({out.best_mode: out.results[out.best_mode],
                                                                          mode: result}) == mode):
                out.best_mode, out.best_learn = mode, learn
            pretrained = training_mode(mode).pretrained
            out.histories[mode_label(mode) + (" [random init]" if pretrained and result["weights"] == RANDOM_INIT
                                              else "")] = history
    except KeyboardInterrupt:
        if plan.checkpoints:
            ctx.log(f"\ninterrupted during {mode}: every completed epoch is saved in {ctx.run / 'checkpoints'}; "
                    f"continue with resume={str(ctx.run)!r} (scripts/finetune.py --resume {ctx.run})")
        else:
            ctx.log(f"\ninterrupted during {mode}: run without checkpoints, so it cannot be resumed")
        raise
    return out


def evaluate_best(ctx: RunContext, plan: FinetunePlan, dls: DataLoaders, trained: Trained, mode: str,
                  weights: str) -> dict:
    """comparison.png, and predictions.png, confusion_matrix.png and model.pkl of the best mode's best epoch
    (EXPORT_RULE; rank 0 alone)."""
    learn, folder = trained.best_learn, ctx.run / "checkpoints" / mode_file_name(mode)
    if trained.best_mode != mode:  # the best mode finished before an interruption: rebuild it from its checkpoint
        learn = build_learner(ctx, plan, dls, mode)  # random init: the checkpoint replaces every weight
    load_best(learn, folder if plan.checkpoints else None)
    run = ctx.run
    with as_single_process():  # rank 0 alone predicts, plots and exports
        plot_curves(trained.histories, run / "comparison.png",
                    title=f"{plan.arch} on {short_data(plan.data)} ({plan.size} px), {plan.epochs} epochs; "
                          f"weights: {short_weights(weights)}")
        probs, targs = valid_predictions(learn)
        preds = probs.argmax(dim=1)
        classes = list(dls.vocab)
        matrix = confusion_matrix(preds, targs, len(classes))
        plot_predictions(learn, probs, targs, run / "predictions.png")
        epoch = trained.results[mode]["best_epoch"]
        plot_confusion(matrix, classes, run / "confusion_matrix.png",
                       title=f"{mode}, epoch {epoch}: valid accuracy {float((preds == targs).float().mean()):.3f}")
        model_path = export_learner(learn, run / "model.pkl")
    return dict(confusion_matrix=dict(mode=mode, classes=classes, rows="true", columns="predicted",
                                      matrix=matrix), model=str(model_path))


def write_finetune_summary(ctx: RunContext, plan: FinetunePlan, dls: DataLoaders, config: dict, trained: Trained,
                           t0: float) -> dict:
    """Evaluate the best mode and write summary.md and summary.json (rank 0); the summary on every rank."""
    info, results = info_dict(dls), trained.results
    best = best_mode(results)
    summary = dict(run_dir=str(ctx.run), data=info, arch=plan.arch, size=plan.size, bs=plan.bs, epochs=plan.epochs,
                   lr=plan.lr, freeze_epochs=plan.freeze_epochs, aug=plan.aug, seed=plan.seed,
                   device=str(ctx.dev), device_name=config["env"].get("device_name"), precision=ctx.precision,
                   channels_last=plan.channels_last, weights=plan.weights, weights_info=plan.weights_info,
                   normalize=plan.normalize, modes=results, best_mode=best, best_epoch=results[best]["best_epoch"],
                   exported=EXPORT_RULE, checkpoints=plan.checkpoints, world_size=ctx.world, env=config["env"])
    if plan.resume is not None:
        summary["resumed"] = trained.resumed  # epochs each mode had completed before this process
    if ctx.world > 1:
        summary["distributed"] = distributed_summary(ctx.dev, plan.bs, ctx.world, _split_digest(dls))
    if not ctx.main:
        return summary
    # the learners' own account of their weights (the hub's full id, a file's digest), as each mode recorded it
    weights = summary["weights"] = next((r["weights"] for m, r in results.items() if training_mode(m).pretrained),
                                        plan.weights)
    summary.update(evaluate_best(ctx, plan, dls, trained, best, weights))
    rows = [dict(r, weights=r["weights"] if r["weights"] == RANDOM_INIT else r["weights"].split(" (sha256")[0],
                 exported=f"model.pkl (epoch {r['best_epoch']})" if m == best else "")
            for m, r in results.items()]
    table = markdown_table(rows, SUMMARY_COLUMNS)
    exported = exported_line(best, results[best], summary["model"])
    (ctx.run / "summary.md").write_text(f"{plan.arch} on {info['source']}, {plan.size} px, weights: {weights}\n\n"
                                        f"{table}\n\n{exported}\n")
    summary["seconds"] = time.perf_counter() - t0
    write_json(ctx.run / "summary.json", summary)
    size = folder_size(ctx.run)
    summary["run_folder_bytes"] = size  # in the returned summary only: summary.json is part of what it counts
    ctx.log("\n" + table + f"\n\n{exported}\nrun folder: {ctx.run} ({human_bytes(size)}"
            + (f"; checkpoints {human_bytes(folder_size(ctx.run / 'checkpoints'))}, best epoch's weights per mode)"
               if plan.checkpoints else ", no checkpoints)"))
    return summary


def exported_line(mode: str, result: dict, model: str) -> str:
    """What the log and summary.md say about the exported model: which mode and epoch, by which rule."""
    return (f"exported: {mode}, epoch {result['best_epoch']} of {result['epochs']} (valid accuracy "
            f"{result['best_valid_accuracy']:.4g}) -> {model}; the rule: {EXPORT_RULE}")


def finetune_experiment(config: FinetuneConfig | None = None, *, log: Callable[[str], None] = print,
                        launch: LaunchConfig | None = None, **options: Any) -> dict:
    """Train `arch` on `data` in each mode; write config.json, metrics_<mode>.csv, comparison.png, show_batch.png,
    predictions.png, confusion_matrix.png, model.pkl (the best mode), summary.json and summary.md.

    `config`: a FinetuneConfig; `options`: its fields as keywords (on top of `config` when both are given), e.g.
    `finetune_experiment(data="lfw", arch="resnet18", epochs=3)`. `size` defaults to 64 for the embedded 'lfw'
    (25 px images) and 224 otherwise. The modes are train.modes' (default scratch, finetune, frozen; also
    frozen_bn): scratch always starts from a random init; the others from `pretrained` (True: timm hub, a path:
    local weights file, False: random init, labelled so everywhere). Inputs are normalised with the statistics the
    weights expect (hub weights: their timm pretrained config; otherwise ImageNet's), recorded as `normalize`.

    Everything is checked before the run folder is made, so bad input stops within seconds and leaves nothing
    behind: the arguments, a weights file (read with weights_only into a body of `arch`), hub weights (downloaded,
    or found in the Hugging Face cache), the data (a named source downloaded once into `cache_dir`, from `mirror`
    when given: a base address holding the archives under their file names), its images, and a training set
    holding at least one batch. The device and the precision are resolved once, here.

    Checkpoints: after every epoch `<run>/checkpoints/<mode>/last.pth` (weights and optimiser state, for resume)
    and `best.pth` (weights alone) when the validation accuracy improves, written atomically; once a mode is done,
    `result.json` is written there and `last.pth` removed, so a finished run keeps each mode's best epoch's weights
    (ResNet50: 103 MB each, where `last.pth` with Adam's state is 308 MB). model.pkl exports the
    best epoch of the best mode (EXPORT_RULE). `checkpoints=False` writes none (no resume) and keeps the best
    epoch's weights in memory. `resume=RUN_DIR`
    continues an interrupted run with the arguments of its config.json: finished modes are kept, the
    interrupted one continues after its last completed epoch with the same schedule (in either of fine_tune's
    phases), its metrics CSV without repeated or missing epochs. Ctrl-C stops after saying how to resume.

    Launched on several processes (`torchrun`, `accelerate launch`) it trains data-parallel like
    mnist.train_mnist: `bs` stays the batch of one optimiser step, `bs // world` images per process; every rank
    draws the same split from `seed`; rank 0 alone downloads, writes the run folder and prints.

    Seeded runs draw the same weights, batches and augmentation; `deterministic` also makes cuDNN use its
    deterministic (slower) algorithms, recorded in config.json; without it cuDNN chooses freely, as the benchmarks
    measure it.
    """
    plan = plan_finetune(build_config(FinetuneConfig, config, options))
    dev, main, world = join_launch(plan.bs, pick_device(plan.device), launch)
    prec = resolve_precision(plan.precision, dev)
    torch.backends.cudnn.deterministic = plan.deterministic  # for this run only, as asked
    plan.channels_last = resolve_channels_last(plan.channels_last, dev)  # None: on CUDA
    log = main_only(log or no_log)
    t0 = time.perf_counter()
    dls = finetune_data(plan, dev, main, world, log)
    # rank 0 names the run folder (a new -2, -3, ... if it exists) and tells the others
    ctx = RunContext(open_run(plan.out, plan.overwrite, plan.resume, main), dev, prec, main, world, plan.progress,
                     log)
    config = start_run(ctx, plan, dls, t0)
    trained = train_modes(ctx, plan, dls)
    return write_finetune_summary(ctx, plan, dls, config, trained, t0)
