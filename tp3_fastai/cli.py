"""The `tp3` console command and the command-line functions that the scripts in scripts/ expose."""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

from fastcore.script import anno_parser, call_parse

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)


def run_guarded(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call `fn`; a user mistake (bad value, missing file, failed download) becomes one line on stderr and exit 2."""
    from .data import DownloadError

    try:
        return fn(**kwargs)
    except (ValueError, FileNotFoundError, NotADirectoryError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: what finished so far is in the run folder", file=sys.stderr)
        raise SystemExit(130) from None


def split_list(s: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [p.strip() for p in s.split(",") if p.strip()]


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
):
    "Part I: train the perceptron and the small CNN on MNIST; write curves, metrics and a summary."
    from .mnist import train_mnist

    run_guarded(train_mnist, source=source, archs=split_list(archs), epochs=epochs, bs=bs, lr=lr, seed=seed,
                device=device, precision=precision, out=out, overwrite=overwrite, resume=resume or None)


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
    from .runs import write_json

    results = [run_guarded(bench_mnist_loop, arch=a, epochs=epochs, repeats=repeats, bs=bs, device=device)
               for a in split_list(archs)]
    if out:
        write_json(out, results)


@call_parse
def run(
    parts: str = "mnist,transfer,rf",  # comma-separated parts: mnist, transfer, rf
    mnist: str = "sample",  # MNIST source: sample, full or a folder
    mnist_epochs: int = 10,  # epochs per MNIST model
    images: str = "lfw",  # Part II image folder: lfw (embedded), hymenoptera, pets, imagenette or a folder
    arch: str = "resnet50",  # Part II: timm architecture
    transfer_epochs: int = 3,  # Part II: epochs per mode
    pretrained: bool = False,  # Part II: ImageNet weights from the timm/Hugging Face hub (needs internet)
    weights: str = "",  # Part II: a local weights file (state dict or safetensors) for the body
    device: str = "auto",  # auto, cpu or cuda
    precision: str = "auto",  # auto, fp32, fp16 or bf16
    seed: int = 42,  # seed of every part
    out: str = "runs/practical",  # report folder (a new -2, -3, ... if it exists)
    overwrite: bool = False,  # replace an existing report folder instead
):
    "The whole practical on the embedded data: every part, then report.md and report.html."
    from .practical import run_practical

    run_guarded(run_practical, parts=split_list(parts), mnist=mnist, mnist_epochs=mnist_epochs, images=images,
                arch=arch, transfer_epochs=transfer_epochs, weights=weights or pretrained, device=device,
                precision=precision, seed=seed, out=out, overwrite=overwrite)


COMMANDS: dict[str, Callable] = {"run": run, "mnist": mnist, "bench-mnist": bench_mnist}


def main(argv: list[str] | None = None) -> None:
    """Dispatch `tp3 <command> [options]` to the command's function."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = "\n".join(f"  {n:<10} {f.__doc__}" for n, f in COMMANDS.items())
        print(f"usage: tp3 <command> [options]\n\ncommands:\n{names}\n\n`tp3 <command> --help` lists the options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    func = COMMANDS[argv[0]]
    args = vars(anno_parser(func, prog=f"tp3 {argv[0]}").parse_args(argv[1:]))
    args.pop("pdb", None), args.pop("xtra", None)
    func(**args)
