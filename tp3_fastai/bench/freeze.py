"""The whole training-modes benchmark (`scripts/bench_freeze.py`): presets, the real-JPEG folder, the modes x
levers grid, the loop and pipeline comparisons, and the run folder (config.json, bench.json, bench.md,
bench.png)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.device import device_name, env_info, pick_device, resolve_precision
from ..core.checks import check_names
from ..core.runs import new_run_dir, write_json
from .loops import BatchLoader, synthetic_batches
from .modes import (FREEZE_MODES, LEVER_PRECISIONS, LOOP_LABELS, MEMORY_FORMATS, MODE_LABELS, bench_overhead,
                    bench_pipeline, measure_cell, mode_learner)
from .report import cell_label, bench_markdown, plot_bench
from .timing import driver_version, free_device_memory, load_average, tf32_flags

CPU_MEMORY_NOTE = "n/a on CPU (peak device memory is measured with torch.cuda.max_memory_allocated on CUDA only)"
PRESETS = {
    # the GPU configuration (default) and the CI configuration (--quick: sized for a 2-core CPU)
    "gpu": dict(arch="resnet50", size=224, bs=128, steps=10, repeats=5, warmup=5, jpeg_images=2560,
                epoch_images=10_000, overhead_modes=("unfrozen", "frozen", "precomputed"),
                pipeline_modes=("unfrozen", "frozen")),
    "quick": dict(arch="resnet18", size=64, bs=16, steps=3, repeats=3, warmup=2, jpeg_images=200,
                  epoch_images=1_000, overhead_modes=("frozen", "precomputed"), pipeline_modes=("frozen",)),
}


def jpeg_folder(cache_dir: str | Path, n: int = 512, px: int = 392, seed: int = 0, quality: int = 90) -> Path:
    """A folder of `n` real JPEGs (`train/` + `valid/`, classes face / non_face): the 200 embedded LFW images
    (skimage.data.lfw_subset) resized to `px` x `px` RGB, cycled, written once into `cache_dir`."""
    import numpy as np
    from PIL import Image

    if n < 20 or px < 8:
        raise ValueError(f"jpeg_folder needs n >= 20 images of px >= 8 pixels, got n={n}, px={px}")
    root = Path(cache_dir).expanduser()
    final = root / f"bench_jpeg2_{n}_{px}"  # 2: both classes for n < 200 too
    if (final / "info.json").is_file():
        return final
    from skimage.data import lfw_subset

    images = lfw_subset()
    labels = np.repeat(np.arange(2), 100)
    classes = ("face", "non_face")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".bench_jpeg-"))
    try:
        # evenly over the 200 images (sorted by class), so that even a small folder holds both classes
        order = np.random.default_rng(seed).permutation(np.arange(n) * len(images) // n)
        n_valid = max(2, n // 5)
        for j, i in enumerate(order):
            split = "valid" if j < n_valid else "train"
            c = classes[labels[i]]
            (tmp / split / c).mkdir(parents=True, exist_ok=True)
            im = Image.fromarray((images[i] * 255).round().astype(np.uint8), mode="L").convert("RGB")
            im.resize((px, px), Image.BICUBIC).save(tmp / split / c / f"{c}_{j:05d}.jpg", quality=quality)
        (tmp / "info.json").write_text(json.dumps(dict(source="skimage.data.lfw_subset() resized", n=n, px=px,
                                                        quality=quality, n_valid=n_valid)) + "\n")
        if final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "info.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- the whole benchmark --------------------------------------------------------------------------------------

def _split_opt(value: str | Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value or [])
    return check_names([p for p in items if p], list(known), what)


def _cudnn_options(device: torch.device, cudnn_benchmark: str) -> list[bool | None]:
    if cudnn_benchmark not in ("both", "on", "off"):
        raise ValueError(f"cudnn_benchmark must be 'both', 'on' or 'off', got {cudnn_benchmark!r}")
    if device.type != "cuda":
        return [None]  # cudnn.benchmark does nothing on a CPU: one column value, 'n/a'
    return {"both": [False, True], "on": [True], "off": [False]}[cudnn_benchmark]


def resolve_config(quick: bool = False, **given: Any) -> dict[str, Any]:
    """The preset ('quick' or 'gpu') with every non-None value of `given` on top."""
    cfg = dict(PRESETS["quick" if quick else "gpu"])
    cfg.update({k: v for k, v in given.items() if v is not None})
    for k in ("size", "bs", "steps", "repeats", "warmup", "jpeg_images", "epoch_images"):
        if not isinstance(cfg[k], int) or cfg[k] <= 0:
            raise ValueError(f"{k} must be a positive integer, got {cfg[k]!r}")
    return cfg


def bench_training_modes(arch: str | None = None, size: int | None = None, bs: int | None = None,
                         steps: int | None = None, repeats: int | None = None, warmup: int | None = None,
                         modes: str | Sequence[str] = FREEZE_MODES, precisions: str | Sequence[str] = LEVER_PRECISIONS,
                         formats: str | Sequence[str] = MEMORY_FORMATS, compile: bool = False,
                         cudnn_benchmark: str = "both", overhead: bool = True,
                         overhead_modes: str | Sequence[str] | None = None, pipeline: bool = True,
                         pipeline_modes: str | Sequence[str] | None = None,
                         data: str = "jpeg", jpeg_images: int | None = None, num_workers: int | None = None,
                         n_classes: int = 2, epoch_images: int | None = None, epochs_estimate: int = 5,
                         lr: float = 1e-3, device: str = "auto", seed: int = 42, count_reads: bool = True,
                         out: str | Path = "runs/bench_freeze", overwrite: bool = False,
                         cache_dir: str | Path = "~/.cache/tp3_fastai", quick: bool = False, command: str = "",
                         threads: int | None = None, log: Callable[[str], None] | None = print,
                         pipelines: str | Sequence[str] = ("pil", "device", "cached"),
                         pipeline_aug: str = "default") -> dict[str, Any]:
    """Training throughput, step time (median, min, max) and peak memory of a timm model in each training mode
    (unfrozen; frozen with train_bn True / False; frozen on precomputed features) crossed with the speed levers
    (precision, memory format, torch.compile, cudnn.benchmark); the fastai loop against a plain PyTorch loop;
    synthetic on-device batches against the real image pipelines (`pipelines`: pil, device, cached, auto; see
    tp3_fastai.data.pipeline), side by side on the same folder, with augmentation `pipeline_aug` (see
    image_data.parse_aug; 'none' times decoding and cropping alone). Writes config.json, bench.json, bench.md and
    bench.png into a new run folder and returns what bench.json holds.

    Unset sizes (and the overhead / pipeline modes) come from the preset: `quick` (resnet18, 64 px, batch 16; loop
    and pipeline comparisons on the frozen modes only) or the GPU one (resnet50, 224 px, batch 128). Levers that
    cannot run on the device are reported as skipped, never imitated. Every figure carries its ratio to the unfrozen
    fp32 baseline measured in the same run. `threads` sets torch's CPU threads for the run (restored afterwards):
    on a CPU shared with other jobs, fewer threads than cores avoids OpenMP threads waiting on each other.
    """
    if threads is not None and threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    kwargs = {k: v for k, v in locals().items() if k != "threads"}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_training_modes(**kwargs)
    finally:
        torch.set_num_threads(previous)


def _bench_training_modes(arch, size, bs, steps, repeats, warmup, modes, precisions, formats, compile, cudnn_benchmark,
                          overhead, overhead_modes, pipeline, pipeline_modes, data, jpeg_images, num_workers,
                          n_classes, epoch_images, epochs_estimate, lr, device, seed, count_reads, out, overwrite,
                          cache_dir, quick, command, log, pipelines, pipeline_aug) -> dict[str, Any]:
    from fastai.data.core import DataLoaders

    t_start = time.perf_counter()
    cfg = resolve_config(quick, arch=arch, size=size, bs=bs, steps=steps, repeats=repeats, warmup=warmup,
                         jpeg_images=jpeg_images, epoch_images=epoch_images, overhead_modes=overhead_modes,
                         pipeline_modes=pipeline_modes)
    arch, size, bs, steps, repeats, warmup = (cfg[k] for k in ("arch", "size", "bs", "steps", "repeats", "warmup"))
    overhead_modes, pipeline_modes = cfg.pop("overhead_modes"), cfg.pop("pipeline_modes")
    modes, precisions, formats, overhead_modes, pipeline_modes, pipelines = _check_options(
        arch, modes, precisions, formats, overhead_modes if overhead else "", pipeline_modes if pipeline else "",
        pipelines, lr, epochs_estimate, n_classes)
    dev = pick_device(device)
    cudnn_opts = _cudnn_options(dev, cudnn_benchmark)
    loop_precision = resolve_precision("auto", dev)  # what users train with: fp16 AMP on CUDA, fp32 on CPU
    if dev.type == "cpu" and not quick and size * bs >= 224 * 64 and log:
        log("note: the default configuration is sized for a GPU; on a CPU use --quick (or a small --size / --bs)")

    run = new_run_dir(out, overwrite)
    env = env_info(dev)
    env.update(driver=driver_version(dev), tf32=tf32_flags(dev), torch_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count())
    config = dict(cfg, arch=arch, modes=modes, precisions=precisions, formats=formats, compile=compile,
                  cudnn_benchmark=cudnn_benchmark, overhead_modes=overhead_modes, pipeline_modes=pipeline_modes,
                  pipelines=pipelines, pipeline_aug=pipeline_aug,
                  data=data, num_workers=num_workers, n_classes=n_classes, epochs_estimate=epochs_estimate, lr=lr,
                  device=str(dev), device_name=device_name(dev), loop_precision=loop_precision, seed=seed,
                  quick=quick, command=command, env=env, load_average_start=load_average())
    write_json(run / "config.json", config)
    if log:
        log(f"bench_freeze: {arch}, {size} px, batch {bs} on {device_name(dev)}; load average "
            f"{config['load_average_start']}; run folder {run}")

    pipe_dls = _pipeline_dls(pipelines, data, cache_dir, cfg["jpeg_images"], size, bs, seed, pipeline_aug, dev,
                             num_workers) if pipeline_modes else {}
    if pipe_dls:
        n_classes = next(iter(pipe_dls.values())).c
    batches = synthetic_batches(4, bs, size, n_classes, dev, seed)
    syn_dls = DataLoaders(BatchLoader(batches, 1), BatchLoader([], 0), device=dev)
    syn_dls.c = n_classes
    grid = _measure_grid(syn_dls, arch, modes, precisions, formats, compile, cudnn_opts, batches, dev, seed, warmup,
                         steps, repeats, bs, lr, log)
    base_row = grid[0]
    _add_estimates(grid, cfg["epoch_images"], epochs_estimate)
    overhead_rows = bench_overhead(syn_dls, arch, overhead_modes, batches, dev, loop_precision, seed, warmup, steps,
                                   repeats, bs, lr, count_reads, log=log) if overhead_modes else []
    pipe = bench_pipeline(pipe_dls, syn_dls, arch, pipeline_modes, dev, loop_precision, seed, warmup, steps,
                          repeats, bs, size, lr, log=log) if pipeline_modes else None
    result = dict(config=config, env=env, device=str(dev), device_name=device_name(dev), arch=arch, size=size, bs=bs,
                  baseline=dict(mode="unfrozen", precision="fp32", memory_format="contiguous",
                                images_per_s=base_row["images_per_s"], step_ms=base_row["step_ms"]),
                  grid=grid, epoch_images=cfg["epoch_images"], epochs_estimate=epochs_estimate,
                  overhead=overhead_rows, pipeline=pipe,
                  memory_note=None if dev.type == "cuda" else CPU_MEMORY_NOTE,
                  timing=("median of `repeats` groups of `steps` steps after `warmup` untimed steps; device "
                          "synchronised at group edges only; synthetic batches are the same seeded tensors for "
                          "every mode"),
                  mode_labels=MODE_LABELS, loop_labels=LOOP_LABELS, load_average_end=load_average(),
                  seconds=time.perf_counter() - t_start, run_dir=str(run))
    write_json(run / "bench.json", result)
    md = bench_markdown(result)
    (run / "bench.md").write_text(md)
    plot_bench(result, run / "bench.png")
    if log:
        log("\n" + md + f"\nrun folder: {run} ({result['seconds']:.0f}s)")
    return result


def _check_options(arch: str, modes: str, precisions: str, formats: str, overhead_modes: str, pipeline_modes: str,
                   pipelines: str, lr: float, epochs_estimate: int, n_classes: int) -> tuple[list[str], ...]:
    """The bench's comma-separated options as checked lists (modes, precisions, formats, overhead modes, pipeline
    modes, pipelines; empty strings give empty lists), before anything is measured; else a ValueError."""
    from ..data.pipeline import PIPELINES
    from ..transfer.learner import check_arch

    check_arch(arch)
    modes = _split_opt(modes, FREEZE_MODES, "benchmark mode")
    precisions = _split_opt(precisions, LEVER_PRECISIONS, "precision")
    formats = _split_opt(formats, MEMORY_FORMATS, "memory format")
    overhead_modes = _split_opt(overhead_modes, FREEZE_MODES, "overhead mode") if overhead_modes else []
    pipeline_modes = _split_opt(pipeline_modes, ("unfrozen", "frozen_train_bn", "frozen"), "pipeline mode") \
        if pipeline_modes else []
    pipelines = _split_opt(pipelines, PIPELINES, "pipeline") if pipeline_modes else []
    if pipeline_modes and not pipelines:
        raise ValueError(f"the pipeline comparison needs at least one pipeline ({', '.join(PIPELINES)})")
    if not modes or not precisions or not formats:
        raise ValueError("modes, precisions and formats each need at least one value")
    if lr <= 0 or epochs_estimate <= 0 or n_classes < 2:
        raise ValueError(f"lr and epochs_estimate must be positive and n_classes >= 2, got lr={lr}, "
                         f"epochs_estimate={epochs_estimate}, n_classes={n_classes}")
    return modes, precisions, formats, overhead_modes, pipeline_modes, pipelines


def _pipeline_dls(pipelines: list[str], data: str, cache_dir: Any, jpeg_images: int, size: int, bs: int, seed: int,
                  aug: str, dev: torch.device, num_workers: int | None) -> dict[str, Any]:
    """The same folder, split and augmentation through each input pipeline: {pipeline: DataLoaders}."""
    from ..data.images import image_dls

    folder = jpeg_folder(cache_dir, jpeg_images, px=round(size * 1.75)) if data == "jpeg" else data
    kw = {} if num_workers is None else dict(num_workers=num_workers)
    return {p: image_dls(folder, size=size, bs=bs, seed=seed, aug=aug, device=dev, cache_dir=cache_dir, pipeline=p,
                         **kw) for p in pipelines}


def _measure_grid(syn_dls: Any, arch: str, modes: list[str], precisions: list[str], formats: list[str],
                  compile: bool, cudnn_opts: list[bool], batches: list, dev: torch.device, seed: int, warmup: int,
                  steps: int, repeats: int, bs: int, lr: float, log: Any) -> list[dict[str, Any]]:
    """Modes x levers, the plain loop on the synthetic batches; the first row is the unfrozen fp32 contiguous
    baseline (a RuntimeError if it could not run)."""
    base = {m: mode_learner(syn_dls, arch, m, seed).model.to(dev) for m in modes}
    if "unfrozen" not in base:
        base["unfrozen"] = mode_learner(syn_dls, arch, "unfrozen", seed).model.to(dev)
    baseline_key = ("unfrozen", "fp32", "contiguous", False, cudnn_opts[0] if dev.type != "cuda" else False)
    cells = [baseline_key] + [(m, p, f, c, b) for m in modes for p in precisions for f in formats
                              for c in ([False, True] if compile else [False]) for b in cudnn_opts]
    grid = []
    for i, (m, p, f, c, b) in enumerate(dict.fromkeys(cells)):
        row = measure_cell(base, m, batches, dev, p, f, c, b, max(warmup, 3) if c else warmup, steps, repeats,
                           bs, lr)
        row["baseline"] = i == 0
        grid.append(row)
        if log:
            what = (f"{row['images_per_s']:9.1f} images/s, {row['step_ms']['median']:8.2f} ms/step "
                    f"[{row['step_ms']['min']:.2f}-{row['step_ms']['max']:.2f}]") if row["status"] == "ok" \
                else row["status"]
            log(f"  {cell_label(row):<48} {what}  load {load_average()[0] if load_average() else '?'}")
    del base
    free_device_memory(dev)
    if grid[0]["status"] != "ok":
        raise RuntimeError(f"the unfrozen fp32 baseline did not run: {grid[0]['status']}")
    return grid


def _add_estimates(grid: list[dict[str, Any]], n_img: int, n_ep: int) -> None:
    """Each measured cell's ratio to the baseline (the first row) and its epoch / `n_ep`-epoch estimates for
    `n_img` images (precomputed: plus its one-off cache pass)."""
    for row in grid:
        if row["status"] != "ok":
            continue
        row["speedup_vs_baseline"] = row["images_per_s"] / grid[0]["images_per_s"]
        row["epoch_s"] = n_img / row["images_per_s"]
        row["estimate_s"] = n_ep * row["epoch_s"]
        if row["mode"] == "precomputed":
            row["cache_s"] = n_img / row["cache_images_per_s"]
            row["estimate_s"] += row["cache_s"]
