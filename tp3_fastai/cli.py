"""The `tp3` console command and the command-line functions that the scripts in scripts/ expose."""
from __future__ import annotations

import argparse
import inspect
import os
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Callable

from fastcore.script import anno_parser, call_parse

from .core.config import BODY_CACHE, DEFAULT_CACHE


def run_guarded(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call `fn`; a user mistake (bad value, missing file, failed download) becomes one line of plain text on stderr
    and exit 2.
    Launched on several processes, each leaves the process group when `fn` ends: after the others on success
    (distributed.close_distributed), at once on failure."""
    from .core.checks import plain_text
    from .train.distributed import close_distributed
    from .data.download import DownloadError

    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError, DownloadError) as e:
        close_distributed(wait=False)
        print(f"error: {plain_text(str(e))}", file=sys.stderr)  # no terminal codes (torch's bold) in a log
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        close_distributed(wait=False)
        print("interrupted: what finished so far is in the run folder", file=sys.stderr)
        raise SystemExit(130) from None
    close_distributed(wait=True)
    return result


def split_list(s: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [p.strip() for p in s.split(",") if p.strip()]


def int_list(s: str, what: str) -> list[int]:
    """'5,10,20' -> [5, 10, 20], with a clear error."""
    try:
        return [int(v) for v in split_list(s)]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {s!r}") from None


def mirror_or_env(mirror: str | None) -> str | None:
    """--mirror, else the TP3_MIRROR environment variable, else None (the real addresses)."""
    from .data.download import MIRROR_ENV

    return mirror or os.environ.get(MIRROR_ENV) or None


# a flag a command had before, kept out of --help and refused with what replaced it
GONE = dict(help=argparse.SUPPRESS)
TRAIN_BN_GONE = ("--train-bn and --no-train-bn are gone: the modes say it (--modes frozen freezes the body's "
                 "BatchNorm with the body, --modes frozen_bn trains it)")


# the depth modes' default lists (bench.tradeoff's DEPTHS, DEPTH_MODES, SURGICAL_MODES), spelled here: the CLI imports
# no torch
DEPTH_CURVE = "frozen_to:0,frozen_to:1,frozen_to:2,frozen_to:3,frozen_to:4,frozen_to:5"
DEPTH_MODES = DEPTH_CURVE + ",surgical:0,surgical:1,surgical:2,surgical:3,surgical:4,gradual,discriminative:10"
SURGICAL_MODES = "frozen_to:0,surgical:0,surgical:1,surgical:2,surgical:3,surgical:4,frozen_to:5"


def command_line() -> str:
    """The command that started this process, as a user would type it again (for run folders and reports)."""
    if not sys.argv or not sys.argv[0]:
        return ""
    name = Path(sys.argv[0]).name
    if name.endswith(".py") and not name.startswith("pytest"):
        return shlex.join(["python", sys.argv[0], *sys.argv[1:]])
    return shlex.join(["tp3", *sys.argv[1:]]) if name == "tp3" else ""


@call_parse
def mnist(
    source: str = "sample",  # 'sample' (5,000 embedded digits), 'full' (download 70,000) or an MNIST folder
    archs: str = "mlp,cnn",  # comma-separated models: mlp, mlp-big, cnn
    epochs: int = 10,  # epochs of fit_one_cycle per model
    bs: int = 64,  # batch size
    lr: float = 3e-3,  # maximum learning rate of the one-cycle schedule
    seed: int = 42,  # seed for the split, the initialisation and the batch order
    device: str = "auto",  # auto, cpu or cuda
    precision: str = "auto",  # auto, fp32, fp16 or bf16 (mixed precision needs CUDA)
    out: str = "runs/mnist",  # run folder (a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing run folder instead
    resume: str = "",  # run folder of an interrupted run to continue (its saved arguments are used)
    cache_dir: str = str(DEFAULT_CACHE),  # where --source full is downloaded and extracted once
    mirror: str = None,  # base address holding mnist_png.tgz instead of the real one (default: $TP3_MIRROR)
):
    "Part I: train the perceptron and the small CNN on MNIST; write curves, metrics and a summary."
    from .mnist.train import MnistConfig, train_mnist

    config = MnistConfig(source=source, archs=split_list(archs), epochs=epochs, bs=bs, lr=lr, seed=seed,
                         device=device, precision=precision, out=out, overwrite=overwrite, resume=resume or None,
                         cache_dir=cache_dir, mirror=mirror_or_env(mirror))
    run_guarded(train_mnist, config=config)


@call_parse
def bench_mnist(
    archs: str = "cnn,mlp",  # comma-separated MNIST models to time
    epochs: int = 3,  # timed epochs per repeat (after one warm-up epoch)
    repeats: int = 3,  # repeats, alternating the two loops
    bs: int = 64,  # batch size
    device: str = "auto",  # auto, cpu or cuda
    out: str = "",  # optional JSON file for the measurements
):
    "Seconds per MNIST epoch: the package's fastai Learner next to a plain PyTorch loop, as a ratio."
    from .bench import bench_mnist_loop
    from .core.checks import check_names
    from .core.runs import write_json
    from .mnist.models import MODELS

    names = run_guarded(check_names, names=split_list(archs), known=list(MODELS), what="MNIST architecture")
    results = [run_guarded(bench_mnist_loop, arch=a, epochs=epochs, repeats=repeats, bs=bs, device=device)
               for a in names]  # every name checked before the first one is timed
    if out:
        write_json(out, results)


@call_parse
def run(
    parts: str = "layers,mnist,transfer,rf",  # comma-separated parts: layers (Part 0), mnist, transfer, rf
    mnist: str = "sample",  # MNIST source: sample, full or a folder
    mnist_epochs: int = 10,  # epochs per MNIST model
    ks: str = "10,50",  # Part II offline study: labelled target digits per class, comma-separated
    seeds: str = "0,1",  # Part II offline study: seeds, comma-separated
    images: str = "",  # Part II image-folder experiment instead: lfw (embedded), hymenoptera, pets, imagenette or a folder
    arch: str = "resnet50",  # Part II image-folder experiment: timm architecture
    transfer_epochs: int = 3,  # Part II image-folder experiment: epochs per mode
    pretrained: bool = False,  # Part II: ImageNet weights from the timm/Hugging Face hub (needs internet)
    weights: str = "",  # Part II: a local weights file (state dict or safetensors) for the body
    device: str = "auto",  # auto, cpu or cuda
    precision: str = "auto",  # auto, fp32, fp16 or bf16
    seed: int = 42,  # seed of Parts I and III (and of the image-folder experiment)
    out: str = "runs/practical",  # report folder (a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing report folder instead
    mirror: str = None,  # base address holding the downloaded archives (default: $TP3_MIRROR, else the real ones)
    pipeline: str = "auto",  # Part II image-folder experiment: input pipeline (auto, pil, device, cached)
    modes: str = "",  # Part II training modes, comma-separated (default: the experiment's own; see tp3 finetune)
    depth_modes: str = DEPTH_CURVE,  # Part II offline: the depth curve's modes ('' skips it)
):
    "The whole practical on the embedded data: every part, then report.md and report.html."
    from .practical import PracticalConfig, run_practical

    def checked() -> Any:
        if pretrained and weights:
            raise ValueError("give either --pretrained (hub weights) or --weights PATH (a local file), not both")
        config = PracticalConfig(parts=split_list(parts), mnist=mnist, mnist_epochs=mnist_epochs, images=images,
                                 arch=arch, transfer_epochs=transfer_epochs, modes=split_list(modes) or None,
                                 weights=weights or pretrained, ks=int_list(ks, "ks"), seeds=int_list(seeds, "seeds"),
                                 device=device, precision=precision, out=out, overwrite=overwrite, seed=seed,
                                 mirror=mirror_or_env(mirror), pipeline=pipeline,
                                 depth_modes=split_list(depth_modes))
        return run_practical(config)

    run_guarded(checked)


@call_parse
def finetune(
    data: str = "lfw",  # 'lfw' (200 embedded images, offline), 'hymenoptera', 'pets', 'imagenette' or a folder
    arch: str = "resnet50",  # any timm model name
    size: int = None,  # image side in pixels (default: 64 for lfw, 224 otherwise)
    bs: int = 32,  # batch size
    epochs: int = 5,  # passes over the training set per mode (finetune's frozen epochs included)
    modes: str = "scratch,finetune,frozen",  # scratch, finetune, frozen (BatchNorm frozen too), frozen_bn (it trains)
    pretrained: bool = False,  # ImageNet weights from the timm / Hugging Face hub (needs internet)
    weights: str = None,  # local weights file (.safetensors or .pth state dict) for every mode but scratch
    lr: float = 2e-3,  # learning rate (finetune: head lr; then lr/200 body, lr/2 head)
    freeze_epochs: int = 1,  # finetune: epochs on the head alone before unfreezing
    precision: str = "auto",  # auto, fp32, fp16 or bf16 (fp16/bf16 need CUDA)
    memory_format: str = "auto",  # auto (channels_last on CUDA, contiguous on a CPU), channels_last or contiguous
    aug: str = "default",  # none, default, noflip, or e.g. 'flip=0,rot=10,zoom=1.1,light=0.2,crop=0.35'
    seed: int = 42,  # random seed (same head init and batch order for every mode)
    device: str = "auto",  # auto, cpu, cuda or cuda:N
    out: str = "runs/finetune",  # run folder (a new -2, -3, ... folder if it holds files)
    overwrite: bool = False,  # replace the run folder instead
    cache_dir: str = str(DEFAULT_CACHE),  # where the embedded LFW folder is written and downloads extracted once
    resume: str = None,  # run folder of an interrupted run: continue it with its config.json's arguments
    mirror: str = None,  # base address holding the named sources' archives (default: $TP3_MIRROR, else the real ones)
    pipeline: str = "auto",  # input pipeline: auto, pil, device (decode + crop on the device) or cached (decoded once)
    train_bn: Annotated[bool, GONE] = False,  # gone: refused with what replaced it
    no_train_bn: Annotated[bool, GONE] = False,  # gone: refused with what replaced it
    deterministic: bool = False,  # cuDNN's deterministic algorithms (slower on a GPU; recorded in config.json)
    no_checkpoints: bool = False,  # write no checkpoints (no --resume; ResNet50: 103 MB less per mode)
):
    "Part II: a timm ResNet from scratch, fine-tuned and with a frozen body on an image folder; one run folder."
    from .core.device import parse_memory_format
    from .transfer.finetune import FinetuneConfig, finetune_experiment

    def checked() -> Any:
        if train_bn or no_train_bn:
            raise ValueError(TRAIN_BN_GONE)
        if pretrained and weights:
            raise ValueError("give either --pretrained (hub weights) or --weights PATH (a local file), not both")
        config = FinetuneConfig(data=data, arch=arch, size=size, bs=bs, epochs=epochs, modes=split_list(modes),
                                pretrained=weights or pretrained, lr=lr, freeze_epochs=freeze_epochs, aug=aug,
                                seed=seed, channels_last=parse_memory_format(memory_format), precision=precision,
                                device=device, out=out, overwrite=overwrite, cache_dir=cache_dir, resume=resume,
                                mirror=mirror_or_env(mirror), pipeline=pipeline,
                                deterministic=deterministic, checkpoints=not no_checkpoints)
        return finetune_experiment(config)

    # Ctrl-C: finetune_experiment has said where the checkpoints are and how to resume; run_guarded exits 130
    run_guarded(checked)


@call_parse
def predict(
    model: str,  # model.pkl written by a finetune run (unpickled: only use files you made)
    *images: str,  # image files to classify
):
    "Print the predicted label and its probability for each image."
    from .transfer.finetune import load_model, predict as predict_one

    def classify(model: str, images: tuple[str, ...]) -> None:
        if not images:
            raise ValueError("give at least one image file after the model file")
        learn = load_model(model)  # once, however many images
        for image in images:
            label, prob = predict_one(learn, image)
            print(f"{image}\t{label}\t{prob:.4f}")

    run_guarded(classify, model=model, images=images)


@call_parse
def pretrain(
    arch: str = "resnet10t",  # timm model name (any timm CNN; resnet10t: better and cheaper than resnet18 here)
    size: int = 32,  # input size in pixels (MNIST's 28 px digits are padded to it)
    n_in: int = 1,  # input channels of the body
    epochs: int = 4,  # epochs of fit_one_cycle on the source task
    lr: float = 5e-3,  # maximum learning rate
    bs: int = 64,  # batch size
    seed: int = 0,  # seed of the initialisation and batch order
    source: str = "mnist",  # 'mnist' (embedded digits, source classes below) or an image folder <path>/<class>/*
    source_classes: str = "0,1,2,3,4",  # MNIST digits of the source task (the others are the target)
    cache_dir: str = str(BODY_CACHE),  # where bodies are cached (file name from the configuration)
    retrain: bool = False,  # train again even if the cache holds this configuration
    device: str = "auto",  # auto, cpu or cuda
    precision: str = "auto",  # auto, fp32, fp16 or bf16 (mixed precision needs CUDA)
    out: str = "",  # also copy the body (and its JSON sidecar) to this .safetensors file, e.g. body.safetensors
):
    "Pretrain a body on the source task (or take it from the cache); print what it is and where it lies."
    from .transfer.pretrain import BodyConfig, body_destination, copy_body, describe_body, pretrained_body

    def body():
        if out:
            body_destination(out)  # before any training
        config = BodyConfig(arch=arch, size=size, n_in=n_in, epochs=epochs, lr=lr, bs=bs, seed=seed, source=source,
                            source_classes=source_classes)
        path, info = pretrained_body(config=config, cache_dir=cache_dir, retrain=retrain, device=device,
                                     precision=precision)
        return (copy_body(path, out) if out else path), info

    path, info = run_guarded(body)
    print(describe_body(dict(info, path=str(path))))
    print(path)


@call_parse
def label_efficiency(
    ks: str = "5,10,20,50,100",  # labelled target images per class, comma-separated
    seeds: str = "0,1,2",  # seeds (label draw, head init, batch order), comma-separated
    modes: str = "scratch,frozen,frozen_bn,finetune",  # training modes (frozen: BatchNorm frozen too; frozen_bn: it trains)
    arch: str = "resnet10t",  # timm model name (any timm CNN)
    size: int = 32,  # input size in pixels (MNIST's 28 px digits are padded to it)
    n_in: int = 1,  # input channels
    epochs: int = 20,  # epochs on the target, the same in every mode
    bs: int = 32,  # target batch size
    lr: float = 2e-3,  # target learning rate, the same in every mode
    lr_mult: float = 1.0,  # fine_tune's body lr = head lr / lr_mult (fastai's default 100 leaves the body ~frozen)
    no_recalibrate: bool = False,  # test with BatchNorm's running averages as training left them
    pretrain_epochs: int = 4,  # epochs of source pretraining (cached by configuration)
    pretrain_lr: float = 5e-3,  # source pretraining learning rate
    source: str = "mnist",  # 'mnist' (digits 0-4 -> 5-9) or a source image folder <path>/<class>/*
    target: str = "",  # target image folder (only with a source folder)
    shift: str = "label",  # target: label (new classes), or the source classes' held-out images: invert, noise, blur
    weights: str = "",  # use this weights file instead of a source-pretrained body
    curves_k: int = 0,  # also record per-epoch curves of every mode at this k (first seed): comparison.png
    cache_dir: str = str(BODY_CACHE),  # body cache
    retrain: bool = False,  # pretrain again even if cached (the run then times pretraining too)
    device: str = "auto",  # auto, cpu or cuda
    precision: str = "auto",  # auto, fp32, fp16 or bf16 (mixed precision needs CUDA)
    out: str = "runs/label_efficiency",  # run folder (a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing run folder instead
):
    "Test accuracy against k labelled target images per class for each mode and seed: PNG, JSON and Markdown."
    from .transfer.label_efficiency import StudyConfig, label_efficiency as study

    def checked() -> Any:
        config = StudyConfig(ks=int_list(ks, "ks"), seeds=int_list(seeds, "seeds"), modes=split_list(modes),
                             arch=arch, size=size, n_in=n_in, epochs=epochs, bs=bs, lr=lr, lr_mult=lr_mult,
                             recalibrate=not no_recalibrate, pretrain_epochs=pretrain_epochs, pretrain_lr=pretrain_lr,
                             source=source, target=target or None, shift=shift, weights=weights or None,
                             curves_k=curves_k or None, cache_dir=cache_dir, retrain=retrain, device=device,
                             precision=precision, out=out, overwrite=overwrite, command=command_line())
        return study(config)

    run_guarded(checked)


@call_parse
def freeze_depth(
    modes: str = DEPTH_MODES,  # modes timed, and trained on digits 5-9 (the label shift)
    surgical_modes: str = SURGICAL_MODES,  # modes trained on the input-shifted digits 0-4 ('' skips them)
    shift: str = "invert",  # the input-level shift of digits 0-4: invert, noise or blur
    ks: str = "10,50",  # labelled target images per class, comma-separated
    seeds: str = "0,1",  # seeds (label draw, head init, batch order), comma-separated
    arch: str = "resnet10t",  # timm model name (a CNN that lists its stages: timm's feature_info)
    size: int = 32,  # input size in pixels
    n_in: int = 1,  # input channels
    epochs: int = 20,  # epochs on the target, the same in every mode
    bs: int = 32,  # target batch size (and the timed steps')
    lr: float = 2e-3,  # target learning rate (discriminative:R: the head's; the stem gets lr / R)
    pretrain_epochs: int = 4,  # epochs of source pretraining (cached by configuration: the main job's body)
    weights: str = "",  # use this weights file instead of a source-pretrained body
    cache_dir: str = str(BODY_CACHE),  # body cache
    retrain: bool = False,  # pretrain again even if cached
    steps: int = 3,  # cost: timed steps per round
    repeats: int = 5,  # cost: rounds, the modes alternating
    warmup: int = 2,  # cost: untimed steps first
    threads: int = None,  # torch CPU threads (default: torch's choice); 1 helps on a CPU shared with other jobs
    device: str = "auto",  # auto, cpu or cuda
    precision: str = "auto",  # auto, fp32, fp16 or bf16 (mixed precision needs CUDA)
    out: str = "runs/freeze_depth",  # run folder (a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing run folder instead
):
    "Fine-tuning by depth: accuracy against cost per epoch for each freeze depth, surgical stage, gradual, rates."
    from .bench.tradeoff import DepthConfig, depth_study

    def checked() -> Any:
        config = DepthConfig(modes=split_list(modes), surgical_modes=split_list(surgical_modes), shift=shift,
                             ks=int_list(ks, "ks"), seeds=int_list(seeds, "seeds"), arch=arch, size=size, n_in=n_in,
                             epochs=epochs, bs=bs, lr=lr, pretrain_epochs=pretrain_epochs, weights=weights or None,
                             cache_dir=cache_dir, retrain=retrain, steps=steps, repeats=repeats, warmup=warmup,
                             threads=threads, device=device, precision=precision, out=out, overwrite=overwrite,
                             command=command_line())
        return depth_study(config)

    run_guarded(checked)


@call_parse
def rf(
    arch: str = "cnn",  # package (mlp, mlp-big, cnn), torchvision or timm name; 'timm:resnet50' picks a registry
    input_shape: str = "",  # batch,channels,*spatial, e.g. 1,3,224,224 (default: 1,1,28,28 or the model's default)
    layers: str = "",  # node or module names / glob patterns to show, e.g. 'maxpool,layer1.0,layer?' (default: all)
    verify: bool = False,  # also measure each shown node's field from the input gradient (slow for deep nodes)
    erf: bool = False,  # effective receptive field heat map of --node's centre unit (erf.png)
    image: str = "",  # draw the field of --node's centre unit on this image (rf_box.png)
    node: str = "",  # node for --erf and --image (default: the last shown node that still has positions)
    weights: str = "",  # state dict (.pt, .pth, .safetensors) to load first, e.g. to map a trained model's field
    out: str = "",  # run folder (default: runs/receptive_field-<arch>; a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing run folder instead
    seed: int = 42,  # seed of the random initialisation (the effective field depends on it)
):
    "Part III: print and save the receptive field (R, J, start) of every node of a model; --verify measures it."
    from .receptive_field import receptive_field_run

    summary = run_guarded(receptive_field_run, arch=arch, input_shape=input_shape or None, layers=layers or None,
                          verify=verify, erf=erf, image=image or None, node=node or None, weights=weights or None,
                          out=out or None, overwrite=overwrite, seed=seed)
    if summary.get("all_agree") is False:
        raise SystemExit(1)


@call_parse
def bench_freeze(
    arch: str = None,  # any timm model name (default: resnet50; --quick: resnet18)
    size: int = None,  # image side in pixels (default 224; --quick 64)
    bs: int = None,  # batch size (default 128; --quick 16)
    steps: int = None,  # timed steps per repeat (default 10; --quick 3)
    repeats: int = None,  # repeats; the median and min/max are reported (default 5; --quick 3)
    warmup: int = None,  # untimed steps first (default 5; --quick 2; at least 3 with --compile)
    modes: str = "unfrozen,frozen_bn,frozen,precomputed",  # training modes to measure (frozen: BatchNorm frozen too)
    precisions: str = "fp32,fp16,bf16",  # precisions (fp16/bf16 AMP need CUDA: reported as skipped elsewhere)
    formats: str = "contiguous,channels_last",  # memory formats
    compile: bool = False,  # also measure every cell with torch.compile (slow to compile)
    cudnn_benchmark: str = "both",  # cudnn.benchmark: both, on or off (CUDA only)
    no_overhead: bool = False,  # skip the fastai-loop-vs-plain-loop comparison
    overhead_modes: str = None,  # loop comparison (default unfrozen,frozen,precomputed; --quick frozen,precomputed)
    no_pipeline: bool = False,  # skip the synthetic-vs-real input pipeline comparison
    pipeline_modes: str = None,  # modes of the pipeline comparison (default unfrozen,frozen; --quick: frozen)
    data: str = "jpeg",  # real images: 'jpeg' (generated from the embedded LFW set), a named source or a folder
    jpeg_images: int = None,  # images in the generated JPEG folder (default 2560; --quick 200)
    num_workers: int = None,  # loader workers for the real pipeline (default: 0 on CPU, min(8, cores) on CUDA)
    epoch_images: int = None,  # dataset size for the per-epoch estimates (default 10,000; --quick 1,000)
    epochs_estimate: int = 5,  # epochs of the total-cost estimate (precomputed includes its cache pass)
    lr: float = 1e-3,  # learning rate of the one-cycle schedule
    device: str = "auto",  # auto, cpu, cuda or cuda:N
    seed: int = 42,  # seed of the weights, the synthetic batches and the data order
    no_count_reads: bool = False,  # skip counting host reads (syncs) per step
    threads: int = None,  # torch CPU threads (default: torch's choice); 1 helps on a CPU shared with other jobs
    quick: bool = False,  # the small CI configuration for a CPU (resnet18, 64 px, batch 16)
    out: str = "runs/bench_freeze",  # run folder (a new -2, -3, ... if it holds files)
    overwrite: bool = False,  # replace the run folder instead
    cache_dir: str = str(DEFAULT_CACHE),  # where the generated JPEG folder is written once
    compare: str = "",  # OTHER/bench.json: ratio to that run per cell (same arch/size/bs); A.json,B.json: no measuring
    pipeline: str = "pil,device,cached",  # input pipelines compared side by side in the pipeline section
    pipeline_aug: str = "default",  # augmentation in the pipeline section ('none': decoding and crops alone)
    depth_modes: str = "",  # modes timed in alternating rounds with their saved activations, e.g. frozen_to:0,frozen
):
    "Benchmark frozen vs unfrozen training (and precomputed features) across speed levers; write JSON, Markdown, PNG."
    from .bench import BenchConfig, bench_training_modes
    from .bench.compare import bench_and_compare

    config = BenchConfig(arch=arch, size=size, bs=bs, steps=steps, repeats=repeats, warmup=warmup, modes=modes,
                         precisions=precisions, formats=formats, compile=compile, cudnn_benchmark=cudnn_benchmark,
                         overhead=not no_overhead, overhead_modes=overhead_modes, pipeline=not no_pipeline,
                         pipeline_modes=pipeline_modes, pipelines=pipeline, pipeline_aug=pipeline_aug, data=data,
                         jpeg_images=jpeg_images, num_workers=num_workers, epoch_images=epoch_images,
                         epochs_estimate=epochs_estimate, lr=lr, device=device, seed=seed,
                         count_reads=not no_count_reads, threads=threads, quick=quick, out=out, overwrite=overwrite,
                         cache_dir=cache_dir, depth_modes=depth_modes or None, command=command_line())
    if compare:
        return run_guarded(bench_and_compare, compare=compare, config=config)
    return run_guarded(bench_training_modes, config=config)


COMMANDS: dict[str, Callable] = {"run": run, "mnist": mnist, "finetune": finetune, "predict": predict,
                                 "pretrain": pretrain, "label-efficiency": label_efficiency,
                                 "freeze-depth": freeze_depth, "rf": rf,
                                 "bench": bench_freeze, "bench-mnist": bench_mnist}


HIDDEN_OPTIONS = ("--pdb", "--xtra")  # fastcore's anno_parser adds them, hidden from --help


def command_parser(func: Callable, prog: str) -> argparse.ArgumentParser:
    """fastcore's `anno_parser` of a command function, strict: a flag is never taken for an abbreviation of
    another (argparse reads `allow_abbrev` when it parses, so it can be turned off on the parser fastcore built)."""
    parser = anno_parser(func, prog=prog)
    parser.allow_abbrev = False
    return parser


def parse_command(func: Callable, argv: list[str], prog: str) -> dict[str, Any]:
    """The options of `argv` for `func`; an unknown flag (a typo, an abbreviation) is refused, exit 2, with the
    close names, like an unknown mode or architecture."""
    from .core.checks import check_names

    parser = command_parser(func, prog)
    args, extra = parser.parse_known_args(argv)
    flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")]
    if flags:
        known = [o for action in parser._actions for o in action.option_strings if o not in HIDDEN_OPTIONS]
        try:
            check_names(flags, known, "option", hint=f"`{prog} --help` lists them.")
        except ValueError as e:
            parser.error(str(e))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return vars(args)


def run_script(func: Callable) -> None:
    """What scripts/<name>.py runs: its command with the script's arguments, parsed as `tp3 <command>` parses them."""
    name = next(n for n, f in COMMANDS.items() if f is func)
    main([name, *sys.argv[1:]], prog=Path(sys.argv[0]).name)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Dispatch `tp3 <command> [options]` to the command's function (`prog`: the name shown in usage lines)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = "\n".join(f"  {n:<17} {f.__doc__}" for n, f in COMMANDS.items())
        print(f"usage: tp3 <command> [options]\n\ncommands:\n{names}\n\n`tp3 <command> --help` lists the options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    func = COMMANDS[argv[0]]
    args = parse_command(func, argv[1:], prog or f"tp3 {argv[0]}")
    args.pop("pdb", None), args.pop("xtra", None)
    positional: list[Any] = []
    params = list(inspect.signature(func).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):  # e.g. predict MODEL IMAGE...: pass them in order
        for p in params:
            if p.kind is p.VAR_POSITIONAL:
                positional += args.pop(p.name)
                break
            positional.append(args.pop(p.name))
    func(*positional, **args)
