"""The whole practical in one call: Part 0 (the review: layers, architectures, first layers), Part I (MNIST),
Part II (transfer), Part III (receptive fields), one report."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .core.checks import check_names
from .core.config import build_config, config_dict
from .core.device import pick_device, resolve_precision
from .report import Section, write_report
from .core.runs import new_run_dir, write_json
from .train.modes import check_modes, mode_label

PARTS = ("layers", "mnist", "transfer", "rf")
PART0_TRAINS = ("Part 0 ends with what a first convolution learns, drawn from a trained network: Part I does not "
                "run, so after the tables its small CNN is trained here for 2 epochs on the embedded digits (a few "
                "seconds; `--parts layers,mnist` shows Part I's own)")


def layers_sections(run: Path, review: dict) -> list[Section]:
    """Report sections of Part 0 from the summary of `review.layers_review` + `review.kernel_review`."""
    from .review.layers import LAYER_COLUMNS
    from .review.run import SOFTMAX_LOGITS, STEM_COLUMNS

    rel = lambda p: str(Path(p).relative_to(run))  # noqa: E731
    kernels = review.get("kernels", [])
    return [
        Section("Part 0: layers, shapes and weights",
                ["The course's layer examples, computed by the package and checked against PyTorch's own modules "
                 "(column pytorch: the module run on the meta device). Output-size rule of a convolution or "
                 f"pooling: `{review['size_rule']}`; weights of a convolution: `out_channels x (in_channels x k^d) "
                 "+ out_channels`. Memory: float32 activations of one forward pass. Where the course's slides "
                 "print another value, column slide shows it and the notes say why.", *review["layer_notes"]],
                [(review["layers"], LAYER_COLUMNS)]),
        Section("Part 0: VGG and ResNet",
                [f"torchvision definitions (no weights needed) at {review['input_size']} px: parameters, weighted "
                 "depth (convolutions and linear layers on the longest path), multiply-adds (G) for one image, and "
                 "at the end of each stage (ResNet: stem, layer1..4; VGG: the five max-pools) the output shape, "
                 "the receptive field R and the jump J in pixels, from the receptive-field module's traced graph.",
                 "The slides compute the ResNet50 field after the first max-pool as 9x9 and after the first block "
                 "as 17x17, taking the max-pool's kernel as 2; it is 3 (`nn.MaxPool2d(kernel_size=3, stride=2, "
                 "padding=1)`). Second table: both recurrences next to the field measured by back-propagation "
                 "through the model."],
                [(review["architectures"], None), (review["stem"], STEM_COLUMNS)],
                [(rel(review["figures"]["architectures"]), "VGG and ResNet: size, cost and field per stage")]),
        Section("Part 0: activations and softmax",
                [f"Softmax over the vector {SOFTMAX_LOGITS}: exp(z) / sum(exp(z)), next to `torch.softmax`."],
                [(review["softmax"], ("z", "exp_z", "probability", "torch_softmax"))],
                [(rel(review["figures"]["activations"]), "Activations and their derivatives (autograd)")]),
        Section("Part 0: what a first layer learns",
                [*[f"**{k['title']}** ({k['layer']}, {'x'.join(map(str, k['shape']))}, {k['filters']} filters). "
                   f"Where the weights came from: {k['source']}." for k in kernels],
                 *review.get("kernel_notes", [])],
                [],
                [(rel(k["figure"]), f"First-layer kernels: {k['title']}") for k in kernels]),
    ]


def mnist_section(run: Path, summary: dict) -> Section:
    """Report section of Part I from the summary that `train_mnist` returned."""
    rel = Path(summary["run_dir"]).relative_to(run)
    models = summary["models"]
    return Section(
        "Part I: MLP vs CNN on MNIST, from scratch",
        [f"Data: {summary['data']}; split sizes {summary['split_sizes']} (stratified, seed {summary['seed']}). "
         f"Device {summary['env']['device_name']}, precision {summary['precision']}.",
         "Train loss/accuracy are means over each epoch's batches (dropout on); valid and test are in eval mode. "
         "The test split is never seen in training or model choice."],
        [(models, ("model", "params", "epochs", "sec_per_epoch", "valid_accuracy", "test_accuracy"))],
        [(str(rel / "curves.png"), "Learning curves: train dashed, valid solid")],
    )


def transfer_section(run: Path, folder: dict) -> Section:
    """Report section of Part II from the image-folder experiment's summary."""
    rel = lambda p: str(Path(p).relative_to(run))  # noqa: E731
    modes = [dict(mode=m, weights=r["weights"].split(" (sha256")[0], trainable_params=r["trainable_params"],
                  params=r["params"], sec_per_epoch=r["sec_per_epoch"],
                  best_valid_accuracy=r["best_valid_accuracy"], best_epoch=r["best_epoch"])
             for m, r in folder["modes"].items()]
    return Section(
        "Part II: transfer learning, " + " vs ".join(folder["modes"]),
        [f"**Where the weights came from: {folder['weights']}.** "
         + ("ImageNet weights cannot be downloaded offline, so every mode starts from the same random init and the "
            "comparison shows the mechanics (what trains, what it costs), not the benefit of pretraining. Pass "
            "`--pretrained` online or `--weights PATH` (a state dict or safetensors file) for a real transfer."
            if folder["weights"] == "random init" else ""),
         f"Data: {folder['data']['source']}, {folder['size']} px, {folder['epochs']} epochs per mode, "
         f"device {folder['device_name']}, precision {folder['precision']}.",
         f"Exported (model.pkl) and shown in the predictions: {folder['best_mode']}, epoch "
         f"{folder['modes'][folder['best_mode']]['best_epoch']}, by the rule: {folder['exported']}."],
        [(modes, ("mode", "weights", "trainable_params", "params", "sec_per_epoch", "best_valid_accuracy",
                  "best_epoch"))],
        [(rel(Path(folder["run_dir"]) / "show_batch.png"), "An augmented training batch"),
         (rel(Path(folder["run_dir"]) / "comparison.png"), f"Every mode ({folder['arch']}): loss and accuracy"),
         (rel(Path(folder["run_dir"]) / "predictions.png"),
          f"Predictions of the exported model ({folder['best_mode']}, its best epoch)")],
    )


def study_section(run: Path, study: dict) -> Section:
    """Report section of Part II from the label-efficiency study's summary (the offline default)."""
    from .transfer.pretrain import describe_body  # imported when used: a mistyped part is refused in a second

    rel = lambda name: str(Path(study["run_dir"]).relative_to(run) / name)  # noqa: E731
    cfg, body, timing = study["config"], study["body"], study["timing"]
    if body is not None:
        where = (f"**Where the weights came from:** {describe_body(body)}. Pretraining took {body['seconds']:.0f} s"
                 + (" in an earlier run (cached)." if body["cached"] else " in this run."))
    else:
        where = f"**Where the weights came from:** {cfg['weights']}."
    modes = [dict(mode=m, what=mode_label(m), train_seconds=timing["total_train_seconds"][m]) for m in cfg["modes"]]
    return Section(
        "Part II: transfer learning with few labels, " + " vs ".join(cfg["modes"]),
        [where,
         f"Target: {cfg['target']}; {cfg['target_sizes']['test']:,} test images seen by neither pretraining nor "
         f"target training. Each mode trains {cfg['arch']} ({cfg['size']} px) for {cfg['epochs']} epochs on k "
         f"labelled images per class (k = {', '.join(map(str, cfg['ks']))}; seeds {cfg['seeds']}), same data, "
         "same inputs, same learning rate. Cells: test accuracy, mean ± std over seeds (runs).",
         "ImageNet weights cannot be downloaded offline; pass `--pretrained` online or `--weights PATH` to run "
         "the ResNet50 image-folder experiment with them instead (`--images` picks the folder)."],
        [(study["table"], None), (modes, ("mode", "what", "train_seconds"))],
        [(rel("label_efficiency.png"), "Label efficiency: test accuracy against labelled images per class"),
         (rel("comparison.png"), f"Learning curves of every mode at k={cfg['curves_k']} (first seed)"),
         (rel("predictions.png"), "Target test predictions of the fine-tuned body")],
    )


def depth_section(run: Path, depth: dict) -> Section:
    """Report section of Part II from the depth study's summary (bench.tradeoff.depth_study): accuracy against
    the cost of an epoch for each freeze depth."""
    rel = lambda name: str(Path(depth["run_dir"]).relative_to(run) / name)  # noqa: E731
    cfg = depth["config"]
    cost = {r["mode"]: r for r in depth["cost"]}
    rows = [dict(mode=p["mode"], k=p["k"], weights_that_train=cost[p["mode"]]["trainable_params"],
                 step_ms=cost[p["mode"]]["step_ms"]["median"], saved_for_backward_mib=p["saved_mb"],
                 s_per_epoch=p["epoch_s"], accuracy=f"{p['accuracy']:.3f} ± {p['std']:.3f} ({p['n']})",
                 accuracy_per_s=p["accuracy_per_s"]) for p in depth["points"]]
    paragraphs = [
        f"The same body, target and budget as above ({cfg['epochs']} epochs, k = {', '.join(map(str, cfg['ks']))} "
        f"labelled digits per class, seeds {cfg['seeds']}), trained with the first K stage groups frozen (K = 0: "
        "every layer; 5: the head alone, the same as `frozen`; the frozen stages' BatchNorm frozen too). Cost: one "
        f"training step of batch {cfg['bs']} in the plain loop, the modes in {cfg['repeats']} alternating rounds on "
        f"{depth['config']['device_name']} (load average {depth['timing']['load_average_start']}); cost per epoch = "
        "steps x step time. Saved for backward: the activations autograd keeps in one training forward; a frozen "
        "prefix keeps none."]
    check = depth["falls_with_depth"]
    if len(check["step_ms"]) > 1:
        paragraphs.append("Step time falls with every stage frozen: " + (
            "yes." if check["monotone"] else f"no, it rose at {', '.join(check['rises'])} (timings on a shared "
            "CPU are noisy: see the range in `depth.md`)."))
    for v in depth["verdicts"]:
        if v["complete"]:
            ends = v["ends"]
            winners = ", ".join(f"frozen_to:{K}" for K in v["beats_both_per_s"])
            paragraphs.append(
                f"**At k = {v['k']}, does a depth strictly between 0 and 5 beat both ends on accuracy per second of "
                f"an epoch?** {'Yes: ' + winners if winners else 'No'}"
                f" (frozen_to:0 {ends[0]['accuracy_per_s']:.3g}/s, frozen_to:5 {ends[5]['accuracy_per_s']:.3g}/s). "
                "Above the straight line between the ends: "
                + (", ".join(f"frozen_to:{K}" for K in v["above_the_line"]) or "none") + "; as accurate as "
                "frozen_to:0 for less: " + (", ".join(f"frozen_to:{K}" for K in v["as_accurate_as_k0_cheaper"])
                                            or "none") + ".")
    paragraphs.append("The whole study (K = 0..5, surgical, gradual and discriminative rates, k = 10 and 50, and "
                      "surgical fine-tuning on an input-level shift): `tp3 freeze-depth`, docs/transfer.md.")
    return Section(
        "Part II: fine-tuning by depth, " + ", ".join(dict.fromkeys(p["mode"] for p in depth["points"])),
        paragraphs,
        [(rows, ("mode", "k", "weights_that_train", "step_ms", "saved_for_backward_mib", "s_per_epoch", "accuracy",
                 "accuracy_per_s"))],
        [(rel("tradeoff.png"), "Test accuracy against the cost of an epoch, by freeze depth")],
    )


RF_LAYERS = "conv1,maxpool,layer1.0,layer1,layer2,layer3,layer4,global_pool*,fc"
DEPTH_MODES = tuple(f"frozen_to:{k}" for k in range(6))  # Part II's depth curve (bench.tradeoff.DEPTHS)


def rf_section(run: Path, table: dict, erf: dict) -> Section:
    """Report section of Part III from the summaries of two `receptive_field_run` calls."""
    rows = [dict(layer=m["name"], R="x".join(str(v) for v in m["R_analytic"]),
                 J="x".join(str(v) for v in m["J_analytic"]) if m["J_analytic"][0] is not None else "-",
                 measured_R="x".join(str(v) for v in m["R"]), agrees="yes" if m["agrees"] else "NO")
            for m in table.get("measurements", [])]
    e = erf["erf"]
    return Section(
        f"Part III: receptive fields of {table['arch']}",
        [f"Receptive field R (pixels) and jump J of {table['arch']} at "
         f"{'x'.join(map(str, table['input_shape'][2:]))}, "
         "from the model's traced graph (R_n = R_{n-1} + (k_n - 1) J_{n-1}, J_n = J_{n-1} s_n, union at residual "
         "additions), each checked by a gradient measurement on a constant-weight copy of the model.",
         f"Effective receptive field (Luo et al., 2016) of the centre unit of `{e['name']}` in a randomly initialised "
         f"{erf['arch']}: {e['area_fraction']['50%']:.1%} of the theoretical field holds half of the "
         f"gradient mass, {e['area_fraction']['90%']:.1%} holds 90%. (timm creates its ResNets with the last "
         "BatchNorm of each block at zero, so untrained they send gradient through the shortcuts only.)"],
        [(rows, ("layer", "R", "J", "measured_R", "agrees"))],
        [(str(Path(erf["run_dir"]).relative_to(run) / "erf.png"), "Effective receptive field (gradient magnitude)")],
    )


@dataclass
class PracticalConfig:
    """What the whole practical runs (see run_practical); practical.json holds it."""
    parts: Sequence[str] = PARTS
    mnist: str = "sample"  # Part I's source: sample, full or a folder
    mnist_epochs: int = 10
    images: str | Path = ""  # Part II: an image folder (or lfw, ...) for the image-folder experiment
    arch: str = "resnet50"  # Part II image-folder experiment's timm architecture
    transfer_epochs: int = 3
    modes: Sequence[str] | None = None  # Part II's training modes (None: the experiment's own)
    weights: bool | str | Path = False  # Part II: True (hub ImageNet weights) or a weights file
    ks: Sequence[int] = (10, 50)  # the offline study's labelled images per class
    seeds: Sequence[int] = (0, 1)
    study_options: dict[str, Any] | None = None  # more StudyConfig fields for the offline study
    depth_modes: Sequence[str] = DEPTH_MODES  # the offline study's depth curve at its smallest k; () skips it
    rf_arch: str = "timm:resnet50"
    rf_size: int = 224
    device: str = "auto"
    precision: str = "auto"
    out: str | Path = "runs/practical"
    overwrite: bool = False
    seed: int = 42  # of Parts I and III and of the image-folder experiment
    mirror: str | None = None  # a base address holding the downloaded sources' archives (see download.py)
    pipeline: str = "auto"  # the image-folder experiment's input pipeline


def run_practical(config: PracticalConfig | None = None, *, log: Callable[[str], None] = print,
                  **options: Any) -> Path:
    """Run the chosen parts into one folder and write report.md and report.html there; returns the folder.

    `config`: a PracticalConfig (or its fields as keywords in `options`). Part 0 (`layers`): the course's layer
    examples, VGG / ResNet, activations, and the first-layer kernels of the parts that ran (Part I's CNN trained
    for 2 epochs, the cached body, if those parts did not run). Part II: without `weights` and `images`, the
    offline study (a body pretrained here on digits 0-4, then k labelled digits 5-9 per class for `ks` and
    `seeds`), then the depth curve (`depth_modes`, default frozen_to:0..5, at the smallest of `ks`: accuracy
    against the cost of an epoch, bench.tradeoff); with hub weights (`weights=True`), a weights file or an image
    folder, the `arch` experiment on `images` (default: the embedded LFW faces); `modes`: its training modes
    (train.modes; default: the experiment's). `study_options`: more StudyConfig fields (e.g. arch, epochs,
    cache_dir; the depth curve takes those it has too). Part III maps `rf_arch`
    at `rf_size` px. The device and the precision are resolved once, here, and every part runs with them.
    """
    cfg = build_config(PracticalConfig, config, options)
    cfg = replace(cfg, parts=check_names(cfg.parts, PARTS, "part"))
    modes = {} if cfg.modes is None else dict(modes=check_modes(cfg.modes, "run"))
    if cfg.depth_modes:
        check_modes(cfg.depth_modes, "label-efficiency")
    weights, images = cfg.weights, cfg.images
    if weights is not False and weights is not True:
        from .transfer.weights import weights_path

        weights_path(weights)   # a missing weights file fails here, before any part runs
    dev = pick_device(cfg.device)
    device, precision = str(dev), resolve_precision(cfg.precision, dev)
    run = new_run_dir(cfg.out, cfg.overwrite)
    t0 = time.perf_counter()
    sections: list[Section] = []
    timings: dict[str, float] = {}
    mnist_run = body = None
    if "layers" in cfg.parts:
        from .review.run import layers_review

        log("== Part 0: layers, shapes and weights; VGG and ResNet ==")
        if "mnist" not in cfg.parts:
            log(PART0_TRAINS)
        t = time.perf_counter()
        review = layers_review(run / "part0_layers", log=log)
        timings["layers"] = time.perf_counter() - t
    if "mnist" in cfg.parts:
        from .mnist.train import train_mnist

        log("== Part I: MNIST from scratch ==")
        t = time.perf_counter()
        summary = train_mnist(source=cfg.mnist, epochs=cfg.mnist_epochs, seed=cfg.seed, device=device,
                              precision=precision, out=run / "part1_mnist", overwrite=True, mirror=cfg.mirror,
                              log=log)
        timings["mnist"] = time.perf_counter() - t
        sections.append(mnist_section(run, summary))
        mnist_run = summary["run_dir"]
    if "transfer" in cfg.parts:
        log("== Part II: transfer learning ==")
        t = time.perf_counter()
        if weights is not False or images:
            from .transfer.finetune import finetune_experiment

            data = images or "lfw"
            folder = finetune_experiment(data=data, arch=cfg.arch, size=64 if str(data) == "lfw" else 224, bs=16,
                                         epochs=cfg.transfer_epochs, pretrained=weights, seed=cfg.seed,
                                         device=device, precision=precision, out=run / "part2_transfer",
                                         overwrite=True, mirror=cfg.mirror, pipeline=cfg.pipeline, log=log, **modes)
            sections.append(transfer_section(run, folder))
        else:
            from .transfer.label_efficiency import label_efficiency

            study = label_efficiency(ks=cfg.ks, seeds=cfg.seeds, valid_pct=0.1, curves_k=min(cfg.ks), device=device,
                                     precision=precision, out=run / "part2_transfer", overwrite=True, log=log,
                                     **modes, **(cfg.study_options or {}))
            sections.append(study_section(run, study))
            body = (study.get("body") or {}).get("path")
            if cfg.depth_modes:
                from dataclasses import fields

                from .bench.tradeoff import DepthConfig, depth_study

                known = {f.name for f in fields(DepthConfig)}
                # one torch thread: steady step times on a shared CPU (measured: 44 s for this part, wall = CPU time)
                options = dict(threads=1) | {k: v for k, v in (cfg.study_options or {}).items() if k in known}
                depth = depth_study(modes=list(cfg.depth_modes), surgical_modes=(), ks=(min(cfg.ks),),
                                    seeds=cfg.seeds, device=device, precision=precision, out=run / "part2_depth",
                                    overwrite=True, log=log, **options)
                sections.append(depth_section(run, depth))
        timings["transfer"] = time.perf_counter() - t
    if "rf" in cfg.parts:
        from .receptive_field import receptive_field_run

        log("== Part III: receptive fields ==")
        t = time.perf_counter()
        shape = (1, 3, cfg.rf_size, cfg.rf_size)
        table = receptive_field_run(cfg.rf_arch, shape, layers=RF_LAYERS, verify=True, out=run / "part3_rf",
                                    overwrite=True, seed=cfg.seed, log=log)
        # torchvision's ResNet for the effective field: timm zero-initialises each block's last BatchNorm
        erf = receptive_field_run(cfg.rf_arch.replace("timm:", "torchvision:"), shape, layers="layer3", erf=True,
                                  out=run / "part3_erf", overwrite=True, seed=cfg.seed, log=log)
        timings["rf"] = time.perf_counter() - t
        sections.append(rf_section(run, table, erf))
    if "layers" in cfg.parts:
        from .review.run import kernel_review

        log("== Part 0: first-layer kernels ==")
        t = time.perf_counter()
        opts = cfg.study_options or {}
        review = kernel_review(run / "part0_layers", mnist_run=mnist_run, body=body, weights=weights, arch=cfg.arch,
                               cache_dir=opts.get("cache_dir"), body_arch=opts.get("arch"), seed=cfg.seed,
                               device=device, log=log)
        timings["layers"] += time.perf_counter() - t
        sections[:0] = layers_sections(run, review)  # the review comes before Part I in the report
    timings["total"] = time.perf_counter() - t0
    sections.append(Section("Run", [f"Wall time per part (seconds): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}."]))
    write_json(run / "practical.json", dict(config_dict(cfg), parts=list(cfg.parts), seconds=timings,
                                             images=str(images), weights=str(weights), device=device,
                                             precision=precision))
    md, page = write_report(run, "The CNN practical with fastai", sections)
    log(f"\nreport: {md}\n        {page}")
    return run
