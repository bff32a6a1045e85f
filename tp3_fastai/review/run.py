"""Part 0 of the practical, the review before it: the course's layer examples, the classic architectures, the
activations, and what a first layer learns, written to a run folder (Markdown tables, figures, summary.json)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .activations import plot_activations, softmax_steps
from .architectures import (ARCHITECTURES, architecture_rows, architecture_table, maxpool_kernel_rows,
                            plot_architectures)
from .layers import LAYER_COLUMNS, SIZE_RULE, course_layer_facts, layer_notes, layer_rows
from ..core.runs import markdown_table, read_json, write_json

STEM_COLUMNS = ("layer", "slides (max-pool k=2)", "recurrence (max-pool k=3)", "measured")
SOFTMAX_LOGITS = (2.0, 1.0, 0.1)


def layers_review(out: str | Path, archs: Sequence[str] = ARCHITECTURES, input_size: int = 224,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Part 0's tables and figures (no training): layer examples, architectures, the ResNet50 stem, activations.
    Writes layers.md, architectures.md, architectures.png, activations.png and summary.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    facts = course_layer_facts()
    layers = layer_rows(facts)
    notes = layer_notes(facts)
    (out / "layers.md").write_text(f"Output-size rule: `{SIZE_RULE}`\n\n" + markdown_table(layers, LAYER_COLUMNS)
                                   + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    log(markdown_table(layers, LAYER_COLUMNS))
    summaries = architecture_table(archs, input_size)
    arch_rows = architecture_rows(summaries)
    stem = maxpool_kernel_rows()
    (out / "architectures.md").write_text(markdown_table(arch_rows) + "\n\n" + markdown_table(stem, STEM_COLUMNS)
                                          + "\n")
    log("\n" + markdown_table(arch_rows) + "\n\n" + markdown_table(stem, STEM_COLUMNS))
    softmax = softmax_steps(SOFTMAX_LOGITS)
    figures = dict(architectures=str(plot_architectures(summaries, out / "architectures.png")),
                   activations=str(plot_activations(out / "activations.png")))
    summary = dict(run_dir=str(out), size_rule=SIZE_RULE, layers=layers, layer_notes=notes,
                   input_size=input_size, architectures=arch_rows,
                   stages={s.name: [dict(label=st.label, node=st.node, out_shape=list(st.out_shape), R=st.R, J=st.J)
                                    for st in s.stages] for s in summaries},
                   stem=stem, softmax=softmax, figures=figures, seconds=round(time.perf_counter() - t0, 2))
    write_json(out / "summary.json", summary)
    return summary


def _train_small_cnn(out: Path, seed: int, device: str, log: Callable[[str], None]) -> Path:
    """Part I's CNN trained for 2 epochs (a few seconds), when Part I did not run."""
    from ..mnist.train import train_mnist

    return Path(train_mnist(archs=("cnn",), epochs=2, seed=seed, device=device, out=out, overwrite=True,
                            progress=False, log=log)["run_dir"])


def kernel_review(out: str | Path, mnist_run: str | Path | None = None, body: str | Path | None = None,
                  weights: bool | str | Path = False, arch: str = "resnet50", cache_dir: str | Path | None = None,
                  body_arch: str | None = None, seed: int = 42, device: str = "auto",
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """First-layer kernel grids, each saying where its weights came from: Part I's CNN (`mnist_run`, else trained
    here for 2 epochs), the body pretrained offline (`body`, else the cached default body if there is one) and
    `arch` with `weights` (True: timm hub; a path: a weights file; False: not shown). Adds them to summary.json."""
    from ..data.download import DownloadError
    from .kernels import body_grid, cached_body, grid_summary, imagenet_grid, mnist_cnn_grid, plot_kernel_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    notes: list[str] = []
    grids = []
    where = "in Part I"
    if mnist_run is None:
        log("Part I did not run: training its CNN for 2 epochs to show its first layer")
        mnist_run = _train_small_cnn(out / "mnist_cnn", seed, device, log)
        where = "here for Part 0 (Part I did not run)"
    grids.append(("kernels_mnist_cnn.png", mnist_cnn_grid(mnist_run, where)))
    body = body or cached_body(cache_dir, body_arch)
    if body is not None:
        grids.append(("kernels_body.png", body_grid(body)))
    else:
        notes.append("No body pretrained offline in the cache yet: run Part II (`tp3 run --parts transfer`) or "
                     "`tp3 pretrain` to see the first layer it learns.")
    if weights is False or weights == "":
        notes.append(f"{arch} with ImageNet weights is not shown: pass `--pretrained` (online) or `--weights PATH`.")
    else:
        try:
            grids.append(("kernels_imagenet.png", imagenet_grid(weights, arch)))
        except DownloadError as e:
            notes.append(f"{arch} ImageNet weights not available: {e}")
        except ValueError as e:   # a file of another architecture: say so, keep the rest of the report
            notes.append(f"the weights given do not load into {arch}: {e}")
    kernels = []
    for name, grid in grids:
        kernels.append(grid_summary(grid, plot_kernel_grid(grid, out / name)))
        log(f"{grid.title}: {grid.layer} {tuple(grid.shape)}, {len(grid.tiles)} filters; weights: {grid.source}")
    for n in notes:
        log(n)
    summary_path = out / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else dict(run_dir=str(out))
    summary.update(kernels=kernels, kernel_notes=notes, kernel_seconds=round(time.perf_counter() - t0, 2))
    write_json(summary_path, summary)
    return summary
