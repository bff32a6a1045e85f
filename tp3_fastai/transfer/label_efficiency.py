"""The training modes on a target task with few labels (scratch, frozen body with or without its BatchNorm
training, fine-tune, frozen to a depth, one stage alone, ...: train.modes' table) and the label-efficiency study:
test accuracy against labelled images per class, one line per mode, several seeds, on a target with new classes
(a label shift) or with the source classes' images changed (an input-level shift)."""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import set_seed
from torch import nn

from ..data.mnist import MNIST_MEAN, MNIST_STD, TensorLoader
from ..train.curves import plot_curves
from ..core.device import env_info, pick_device, resolve_precision
from ..data.images import plot_image_grid
from ..core.config import BODY_CACHE, build_config, config_dict
from ..train.modes import DEFAULT_MODES, check_modes, mode_file_name, mode_label, training_mode
from ..train.optimizer import OPTIMIZER_NAME
from .pretrain import DEFAULT_ARCH, BodyConfig, describe_body, pretrained_body
from ..core.runs import markdown_table, new_run_dir, pyplot, read_json, save_figure, write_json
from ..data.tasks import SHIFTS, SourceTask, TargetTask, load_tasks, prepare, prepare_pipelines, tensor_dls
from .learner import check_plan, resnet_learner, train_mode
from .weights import WeightsArg

DEFAULT_KS = (5, 10, 20, 50, 100)


def recalibrate_bn(learn: Learner, dl: Any = None) -> list[str]:
    """Recompute the running statistics of the BatchNorm layers that trained (trainable weights) as averages over
    one pass of `dl` (default: the training set) weighted by batch size, the rest of the model in eval mode.

    BatchNorm's running averages (momentum 0.1) still remember the first, wild steps after a short training:
    measured here, resnet18 from scratch on 50 digits (40 steps) scored 0.20 in eval mode on its own training
    images, chance level. Layers frozen by BnFreeze (train_bn=False) keep their statistics. Returns their names.
    """
    model = learn.model
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.track_running_stats and m.weight is not None and m.weight.requires_grad]
    if not layers:
        return []
    loader = dl if dl is not None else learn.dls.train.new(shuffle=False, drop_last=False)
    was_training = model.training
    momenta = [m.momentum for _, m in layers]
    model.eval()
    for _, m in layers:
        m.reset_running_stats()
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for xb, _ in loader:
                if len(xb) < 2:  # BatchNorm1d cannot normalise a batch of one
                    continue
                for _, m in layers:
                    m.momentum = len(xb) / (seen + len(xb))  # a running mean weighted by batch size
                model(xb)
                seen += len(xb)
    finally:
        for (_, m), mom in zip(layers, momenta):
            m.momentum = mom
        model.train(was_training)
    return [n for n, _ in layers]


class RecalibrateBN(Callback):
    """Recalibrate BatchNorm statistics before each validation, so that learning curves measure the model that is
    tested (see recalibrate_bn); training is unchanged, since BatchNorm trains on batch statistics. Only in
    training fits: predict, get_preds and validate use the statistics as they are."""
    order = 50  # before CurvesCallback (60) reads the validation results
    fitting = False

    def before_epoch(self) -> None:
        self.fitting = False  # predict, get_preds, validate, tta: no training, no recalibration

    def before_train(self) -> None:
        self.fitting = True

    def before_validate(self) -> None:
        if self.fitting:
            recalibrate_bn(self.learn)


@dataclass
class TargetSetup:
    """How every target run of a study trains: the weights of the transferring modes, the model, its inputs
    (size, channels, normalisation) and the schedule, the same in every mode."""
    weights: WeightsArg = False
    arch: str = DEFAULT_ARCH
    size: int = 32
    n_in: int = 1
    mean: float = MNIST_MEAN
    std: float = MNIST_STD
    epochs: int = 20
    bs: int = 32
    lr: float = 2e-3
    freeze_epochs: int = 1
    lr_mult: float = 1.0  # fine_tune's body lr = head lr / lr_mult
    recalibrate: bool = True  # recompute the statistics of the BatchNorm layers that trained before testing


def target_run(target: TargetTask, mode: str, k: int, seed: int, setup: TargetSetup | None = None, *,
               device: str | torch.device = "auto", precision: str = "auto", progress: bool | None = None,
               csv_path: str | Path | None = None, log: Callable[[str], None] | None = None,
               **options: Any) -> tuple[Learner, dict[str, Any]]:
    """Train one of the table's modes on `k` labelled target images per class (draw and init from `seed`) through
    `resnet_learner` and `train_mode`, then measure accuracy on the unseen target test set.

    `setup`: a TargetSetup (or its fields as keywords in `options`). Modes that do not start pretrained (scratch)
    ignore its `weights`. finetune is fastai's `fine_tune` with `lr_mult`. `recalibrate`: recompute the
    statistics of the BatchNorm layers that trained before testing (recalibrate_bn). `csv_path`: write the
    per-epoch curves there (valid columns need a target validation set). A study passes its resolved device and
    precision.
    """
    s = build_config(TargetSetup, setup, options)
    check_modes([mode], "label-efficiency")
    m = training_mode(mode)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    x, y = target.train(k, seed)
    dls = tensor_dls(prepare(x, s.size, s.mean, s.std, s.n_in), y, prepare(target.x_valid, s.size, s.mean, s.std,
                                                                           s.n_in),
                     target.y_valid, target.classes, s.bs, seed, dev,
                     **prepare_pipelines(x.shape[-1], s.size, s.mean, s.std, s.n_in))
    test = TensorLoader(prepare(target.x_test, s.size, s.mean, s.std, s.n_in), target.y_test, 256, device=dev)
    set_seed(seed, reproducible=True)  # same head init and batch order in every mode
    learn = resnet_learner(dls, s.arch, pretrained=s.weights if m.pretrained else False, n_in=s.n_in,
                           precision=prec, train_bn=m.train_bn, csv_path=csv_path, progress=progress, log=log,
                           lr=s.lr, name=mode)
    if s.recalibrate and csv_path is not None and len(target.y_valid):
        learn.add_cb(RecalibrateBN())
    done = train_mode(learn, mode, s.epochs, lr=s.lr, freeze_epochs=s.freeze_epochs, lr_mult=s.lr_mult)
    start = time.perf_counter()
    recalibrated = recalibrate_bn(learn) if s.recalibrate else []
    recal_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loss, acc = learn.validate(dl=test)
    return learn, dict(mode=mode, k=k, seed=seed, test_accuracy=float(acc), test_loss=float(loss),
                       n_train=len(y), n_test=len(target.y_test), epochs=s.epochs,
                       steps=sum(p["epochs"] for p in done["phases"]) * len(dls.train),
                       train_seconds=done["seconds"], recalibrate_seconds=recal_seconds,
                       recalibrated_bn_layers=len(recalibrated), test_seconds=time.perf_counter() - start,
                       weights=learn.weights, phases=done["phases"],
                       trainable_params=done["phases"][-1]["trainable_params"],
                       params=done["phases"][-1]["total_params"])


# ---------------------------------------------------------------- the label-efficiency study

def _spread(values: Sequence[float]) -> dict[str, float]:
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))


def efficiency_rows(accuracy: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Rows of the study's table: one per k, a 'mean ± std (n)' cell per mode."""
    ks = sorted({int(k) for per_k in accuracy.values() for k in per_k})
    rows = []
    for k in ks:
        row: dict[str, Any] = {"labels per class": k}
        for mode, per_k in accuracy.items():
            acc = per_k.get(str(k), [])
            s = _spread(acc) if acc else None
            row[mode] = f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n']})" if s else ""
        rows.append(row)
    return rows


def plot_label_efficiency(accuracy: dict[str, dict[str, list[float]]], path: str | Path,
                          title: str = "") -> Path:
    """Test accuracy against labelled images per class (log axis): one line per mode at the seed mean, the band
    from the worst to the best seed, every seed as a dot. Saved as PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (mode, per_k) in enumerate(accuracy.items()):
        ks = sorted(int(k) for k in per_k if per_k[k])
        if not ks:
            continue
        c = colours[i % len(colours)]
        stats = [_spread(per_k[str(k)]) for k in ks]
        ax.plot(ks, [s["mean"] for s in stats], "-o", color=c, ms=4, label=mode_label(mode))
        ax.fill_between(ks, [s["min"] for s in stats], [s["max"] for s in stats], color=c, alpha=0.15, lw=0)
        for k in ks:
            ax.plot([k] * len(per_k[str(k)]), per_k[str(k)], ".", color=c, ms=3, alpha=0.6)
    ax.set_xscale("log")
    all_ks = sorted({int(k) for per_k in accuracy.values() for k in per_k})
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.minorticks_off()
    ax.set_xlabel("labelled target images per class (k)")
    ax.set_ylabel("test accuracy (unseen target images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def study_title(config: dict[str, Any], source_accuracy: float | None = None) -> str:
    """The figure title of a study from its config.json: model, body, target and training budget."""
    def short(description: str) -> str:
        return description.split(" (")[0]  # without the "(embedded sample, ...)" note

    body = (f"body pretrained on {short(config['source'])}, source accuracy {source_accuracy:.3f}"
            if source_accuracy is not None else f"weights {Path(config['weights']).name}")
    return (f"{config['arch']}, {config['size']} px, {config['n_in']} ch; {body}\n"
            f"target {short(config['target'])}; {config['epochs']} epochs, bs {config['bs']}, lr {config['lr']:g}, "
            f"{len(config['seeds'])} seeds (dots; band: min to max)")


def plot_test_predictions(learn: Learner, target: TargetTask, size: int, mean: float, std: float, n_in: int,
                          path: str | Path, n: int = 16, title: str = "") -> Path:
    """A grid of target test images with predicted and true labels: up to half of them mistakes (red)."""
    test = TensorLoader(prepare(target.x_test, size, mean, std, n_in), target.y_test, 256, device=learn.dls.device)
    probs, targs = learn.get_preds(dl=test)
    preds = probs.argmax(dim=1)
    wrong = (preds != targs).nonzero().flatten().tolist()
    right = (preds == targs).nonzero().flatten().tolist()
    n_wrong = min(len(wrong), n // 2)
    # evenly spaced: the test images are sorted by class
    chosen = [items[round(i * (len(items) - 1) / max(m - 1, 1))]
              for items, m in ((wrong, n_wrong), (right, n - n_wrong)) for i in range(min(m, len(items)))]
    titles = [f"{target.classes[int(preds[i])]} ({float(probs[i].max()):.2f})\ntrue: {target.classes[int(targs[i])]}"
              for i in chosen]
    return plot_image_grid([target.x_test[i] for i in chosen], titles, path, title=title,
                           colours=["green" if preds[i] == targs[i] else "red" for i in chosen])


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (timings on a shared machine mean little without them)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def timing_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Training seconds per mode (median over seeds, per k and in total) and frozen_bn / frozen (train_bn cost)."""
    out: dict[str, Any] = {"train_seconds": {}, "total_train_seconds": {}}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode]
        ks = sorted({r["k"] for r in mine})
        out["train_seconds"][mode] = {str(k): statistics.median(r["train_seconds"] for r in mine if r["k"] == k)
                                      for k in ks}
        out["total_train_seconds"][mode] = sum(r["train_seconds"] for r in mine)
    tot = out["total_train_seconds"]
    if tot.get("frozen") and tot.get("frozen_bn"):
        out["train_bn_cost"] = tot["frozen_bn"] / tot["frozen"]
    return out


@dataclass
class StudyConfig:
    """Everything a label-efficiency study is asked for (see label_efficiency); config.json holds it as it ran."""
    ks: Sequence[int] = DEFAULT_KS  # labelled target images per class
    seeds: Sequence[int] = (0, 1, 2)  # seeds of the label draw, head init and batch order
    modes: Sequence[str] = DEFAULT_MODES["label-efficiency"]
    arch: str = DEFAULT_ARCH
    size: int = 32
    n_in: int = 1
    epochs: int = 20
    bs: int = 32
    lr: float = 2e-3
    freeze_epochs: int = 1
    lr_mult: float = 1.0  # fine_tune's body lr = head lr / lr_mult
    recalibrate: bool = True  # recompute the statistics of the BatchNorm layers that trained before testing
    pretrain_epochs: int = 4
    pretrain_lr: float = 5e-3
    pretrain_bs: int = 64
    pretrain_seed: int = 0
    source: str | Path = "mnist"  # 'mnist' (digits 0-4 -> 5-9) or a source image folder
    target: str | Path | None = None  # the target image folder, with a source folder
    shift: str = "label"  # the target: 'label' (new classes) or the source classes' held-out images 'invert'ed, ...
    weights: WeightsArg | None = None  # None: the body pretrained on the source (cached); True or a path instead
    valid_pct: float = 0.0
    curves_k: int | None = None  # also record every mode's learning curves at this k (first seed)
    cache_dir: str | Path = BODY_CACHE  # the body cache
    retrain: bool = False
    device: str = "auto"
    precision: str = "auto"
    out: str | Path = "runs/label_efficiency"
    overwrite: bool = False
    command: str = ""  # the command line that started the study, for the report

    def body(self) -> BodyConfig:
        """The body the study pretrains on the source task, when no weights are given."""
        return BodyConfig(self.arch, self.size, self.n_in, self.pretrain_epochs, self.pretrain_lr, self.pretrain_bs,
                          self.pretrain_seed)

    def setup(self, weights: WeightsArg, mean: float, std: float) -> TargetSetup:
        """How each target run trains, with the transferring modes' `weights` and the inputs' normalisation."""
        return TargetSetup(weights, self.arch, self.size, self.n_in, mean, std, self.epochs, self.bs, self.lr,
                           self.freeze_epochs, self.lr_mult, self.recalibrate)


def label_efficiency(config: StudyConfig | None = None, *, tasks: tuple[SourceTask, TargetTask] | None = None,
                     log: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """Test accuracy against k labelled target images per class, for each mode and seed, from one pretrained body.

    `config`: a StudyConfig (or its fields as keywords in `options`); `tasks`: the (source, target) tasks, instead
    of loading `source` and `target`. Writes config.json, runs.csv (one row per run, as they finish),
    label_efficiency.json ({mode: {k: [accuracy per seed]}}), label_efficiency.png, label_efficiency.md and
    summary.json (with the body's sidecar and the seconds of pretraining and of each mode). `weights`: None uses
    (and caches) a body pretrained on the source task; a path or True (timm hub) uses those weights instead. With
    `curves_k`, the first seed's runs at that k also write curves_<mode>.csv, comparison.png (learning curves of
    every mode on `valid_pct` of the target images) and predictions.png (the last mode's predictions on target test
    images). The device and the precision are resolved once, here, and every run uses them.
    """
    cfg = _check_study(build_config(StudyConfig, config, options))
    src, tgt = tasks if tasks is not None else load_tasks(cfg.source, cfg.target, cfg.size, valid_pct=cfg.valid_pct,
                                                          shift=cfg.shift)
    if tgt is None:
        raise ValueError("the study needs a target task: pass target=FOLDER with a source folder, or source='mnist'")
    for k in cfg.ks:
        tgt.draw(k, cfg.seeds[0])  # a k larger than the pool fails now, not after an hour
    dev = pick_device(cfg.device)
    prec = resolve_precision(cfg.precision, dev)
    t0 = time.perf_counter()
    run = new_run_dir(cfg.out, cfg.overwrite)
    env = env_info(dev)
    weights, body_info, (mean, std) = _study_weights(cfg, src, dev, prec, log)
    config = dict(config_dict(cfg), source=src.description, target=tgt.description, source_sizes=src.sizes(),
                  target_sizes=tgt.sizes(), weights=str(weights), normalize=dict(mean=mean, std=std),
                  device=str(dev), precision=prec, optimizer=OPTIMIZER_NAME,
                  mode_settings={m: training_mode(m).settings() for m in cfg.modes}, load_average=_load(), env=env)
    write_json(run / "config.json", config)
    log(f"source: {src.description} {src.sizes()}; target: {tgt.description} {tgt.sizes()}")
    if body_info is not None:
        log(f"weights: {describe_body(body_info)}")

    accuracy, runs, histories = _run_grid(run, tgt, cfg, cfg.setup(weights, mean, std), dev, prec, log)
    timing = timing_summary(runs)
    if body_info is not None:
        timing["pretrain_seconds"] = body_info["seconds"]
        timing["pretrain_cached"] = body_info["cached"]
    plot_label_efficiency(accuracy, run / "label_efficiency.png",
                          title=study_title(config, body_info["source_accuracy"] if body_info else None))
    if histories:
        plot_curves(histories, run / "comparison.png",
                    title=f"{cfg.arch}, k={cfg.curves_k} labelled images per class, seed {cfg.seeds[0]}: "
                          f"{len(tgt.y_valid)} validation images")
    rows = efficiency_rows(accuracy)
    table = markdown_table(rows, ["labels per class", *cfg.modes])
    (run / "label_efficiency.md").write_text(
        _study_markdown(config, tgt, table, timing, body_info, env.get("device_name", dev)))
    summary = dict(run_dir=str(run), config=config, accuracy=accuracy, table=rows, timing=timing, load_average=_load(),
                   body=body_info, runs=runs, device=str(dev), device_name=env.get("device_name"), precision=prec,
                   seconds=time.perf_counter() - t0)
    write_json(run / "summary.json", summary)
    log("\n" + table + f"\n\nrun folder: {run}")
    return summary


def _check_study(cfg: StudyConfig) -> StudyConfig:
    """The study with its ks (sorted) and seeds (in order) without repeats and its modes checked; else a
    ValueError, before any work."""
    ks = sorted(dict.fromkeys(int(k) for k in cfg.ks))
    seeds = list(dict.fromkeys(int(s) for s in cfg.seeds))
    if not ks or not seeds:
        raise ValueError("ks and seeds must each name at least one value")
    if cfg.lr_mult <= 0:
        raise ValueError(f"lr_mult must be positive, got {cfg.lr_mult}")
    modes = check_plan(cfg.modes, "label-efficiency", cfg.arch, cfg.epochs, cfg.bs, cfg.lr, cfg.freeze_epochs)
    if cfg.shift not in SHIFTS:
        raise ValueError(f"unknown shift {cfg.shift!r}: choose from {', '.join(SHIFTS)}")
    if cfg.curves_k is not None and cfg.curves_k not in ks:
        raise ValueError(f"curves_k={cfg.curves_k} must be one of the ks {ks}")
    return replace(cfg, ks=ks, seeds=seeds, modes=modes)


def _study_weights(cfg: StudyConfig, src: SourceTask, dev: torch.device, prec: str, log: Callable[[str], None]
                   ) -> tuple[WeightsArg, dict[str, Any] | None, tuple[float, float]]:
    """(weights of the transfer modes, the pretrained body's sidecar or None, the inputs' (mean, std)).

    None (or False) pretrains a body on the source task, or takes it from the cache, when a mode transfers; a body
    file of ours brings the normalisation it was trained with; anything else gets the source task's."""
    weights = cfg.weights
    mean, std = src.mean, src.std
    if isinstance(weights, (str, Path)) and Path(weights).with_suffix(".json").is_file():
        try:  # a body of ours: the target gets the inputs it was trained on
            norm = read_json(Path(weights).with_suffix(".json")).get("normalize") or {}
            mean, std = float(norm["mean"][0]), float(norm["std"][0])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
            pass  # any other sidecar: the source task's normalisation
    if weights is not None and weights is not False:
        return weights, None, (mean, std)
    if not any(training_mode(m).pretrained for m in cfg.modes):  # nothing transfers: no body to pretrain
        return False, None, (mean, std)
    path, body = pretrained_body(replace(cfg.body(), source=src), cache_dir=cfg.cache_dir, retrain=cfg.retrain,
                                 device=dev, precision=prec, progress=False, log=log)
    return path, body, (body["normalize"]["mean"][0], body["normalize"]["std"][0])


RUN_COLUMNS = ("mode", "k", "seed", "test_accuracy", "test_loss", "n_train", "steps", "train_seconds", "test_seconds",
               "trainable_params", "params")


def _run_grid(run: Path, tgt: TargetTask, cfg: StudyConfig, setup: TargetSetup, dev: torch.device, prec: str,
              log: Callable[[str], None]
              ) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """Every (k, seed, mode) target run, k then seed then mode; runs.csv and label_efficiency.json written as each
    ends. Returns ({mode: {k: [accuracy per seed]}}, the runs' results, the learning curves at `curves_k`)."""
    modes, seeds = cfg.modes, cfg.seeds
    accuracy: dict[str, dict[str, list[float]]] = {m: {str(k): [] for k in cfg.ks} for m in modes}
    runs: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    with open(run / "runs.csv", "w", newline="") as f:
        csv.writer(f).writerow(RUN_COLUMNS)
    for k in cfg.ks:
        for seed in seeds:
            for mode in modes:
                curves = k == cfg.curves_k and seed == seeds[0]
                learn, r = target_run(tgt, mode, k, seed, setup, device=dev, precision=prec, progress=False,
                                      csv_path=run / f"curves_{mode_file_name(mode)}.csv" if curves else None, log=None)
                if curves:
                    histories[mode_label(mode)] = learn.curves.history
                    if mode == modes[-1]:
                        plot_test_predictions(learn, tgt, setup.size, setup.mean, setup.std, setup.n_in,
                                              run / "predictions.png",
                                              title=f"{mode}, k={k}: target test predictions (red = wrong)")
                del learn
                runs.append(r)
                accuracy[mode][str(k)].append(r["test_accuracy"])
                with open(run / "runs.csv", "a", newline="") as f:
                    csv.writer(f).writerow([f"{r[c]:.6g}" if isinstance(r[c], float) else r[c] for c in RUN_COLUMNS])
                write_json(run / "label_efficiency.json", accuracy)
                log(f"k={k:<4} seed={seed} {mode:<10} test accuracy {r['test_accuracy']:.4f}  "
                    f"train {r['train_seconds']:.1f}s")
    return accuracy, runs, histories


def _study_markdown(config: dict[str, Any], tgt: TargetTask, table: str, timing: dict[str, Any],
                    body_info: dict[str, Any] | None, device_name: Any) -> str:
    """label_efficiency.md: the accuracy table, where the weights came from, the settings and the timings."""
    ks, modes, mean, std = config["ks"], config["modes"], config["normalize"]["mean"], config["normalize"]["std"]
    time_rows = [dict(mode=m, **{f"k={k}": timing["train_seconds"][m][str(k)] for k in ks},
                      total=timing["total_train_seconds"][m]) for m in modes]
    lines = [f"# Label efficiency: {tgt.description}", "",
             f"Test accuracy on {len(tgt.y_test):,} unseen target images (mean ± std over seeds {config['seeds']}, "
             "n runs).", "", table, "",
             f"Weights: {describe_body(body_info) if body_info else config['weights']}.", "",
             f"Every mode: {config['epochs']} epochs, batch {config['bs']}, lr {config['lr']:g}, torch AdamW, the "
             f"same inputs (normalised with mean {mean:.4g}, std {std:.4g}); finetune = "
             f"fine_tune(lr_mult={config['lr_mult']:g}); BatchNorm statistics "
             + ("recalibrated on the training images before testing." if config["recalibrate"]
                else "as training left them."),
             "",
             f"Training seconds per run (median over seeds), device {device_name}, load average "
             f"{config['load_average']} at the start and {_load()} at the end:", "",
             markdown_table(time_rows, ["mode", *[f"k={k}" for k in ks], "total"]), ""]
    if "train_bn_cost" in timing:
        lines += [f"frozen_bn (the body's BatchNorm trains) vs frozen (it stays frozen): "
                  f"{timing['train_bn_cost']:.2f}x the training time.", ""]
    if body_info is not None:
        lines += [f"Pretraining: {body_info['seconds']:.1f} s"
                  + (" (cached from an earlier run)" if body_info["cached"] else " (in this run)") + ".", ""]
    if config["command"]:
        lines += [f"Command: `{config['command']}`", ""]
    return "\n".join(lines)
