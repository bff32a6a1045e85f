"""The whole practical in one call: Part I (MNIST), Part II (transfer), Part III (receptive fields), one report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from .report import Section, write_report
from .runs import new_run_dir, write_json

PARTS = ("mnist", "transfer", "rf")


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


def run_practical(parts: Sequence[str] = PARTS, mnist: str = "sample", mnist_epochs: int = 10,
                  device: str = "auto", precision: str = "auto", out: str | Path = "runs/practical",
                  overwrite: bool = False, seed: int = 42, log: Callable[[str], None] = print) -> Path:
    """Run the chosen parts into one folder and write report.md and report.html there; returns the folder."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}")
    run = new_run_dir(out, overwrite)
    t0 = time.perf_counter()
    sections: list[Section] = []
    timings: dict[str, float] = {}
    if "mnist" in parts:
        from .mnist import train_mnist

        log("== Part I: MNIST from scratch ==")
        t = time.perf_counter()
        summary = train_mnist(source=mnist, epochs=mnist_epochs, seed=seed, device=device, precision=precision,
                              out=run / "part1_mnist", overwrite=True, log=log)
        timings["mnist"] = time.perf_counter() - t
        sections.append(mnist_section(run, summary))
    timings["total"] = time.perf_counter() - t0
    sections.append(Section("Run", [f"Wall time per part (seconds): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}."]))
    write_json(run / "practical.json", dict(parts=list(parts), seconds=timings, mnist=mnist, seed=seed))
    md, page = write_report(run, "The CNN practical with fastai", sections)
    log(f"\nreport: {md}\n        {page}")
    return run
