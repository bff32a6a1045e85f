"""The whole training-modes benchmark (`scripts/bench_freeze.py`): presets, the real-JPEG folder, the modes x
levers grid, the loop and pipeline comparisons, and the run folder (config.json, bench.json, bench.md,
bench.png)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.device import device_name, env_info, pick_device, resolve_precision
from ..core.checks import check_name, check_names
from ..core.config import DEFAULT_CACHE, build_config, config_dict
from ..core.runs import new_run_dir, write_json
from ..train.modes import check_modes, mode_label, modes_for
from .depth import bench_depth
from .loops import BatchLoader, synthetic_batches
from .modes import (BENCH_MODES, LEVER_PRECISIONS, LOOP_LABELS, MEMORY_FORMATS, Levers, bench_overhead,
                    measure_cell, mode_learner)
from .pipelines import PipelinePlan, bench_pipeline
from .report import cell_label, bench_markdown, plot_bench
from .timing import StepPlan, driver_version, free_device_memory, load_average, tf32_flags

PIPELINE_SYNC_BATCHES = 3  # training batches the pipeline comparison's host-read count draws at once
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


@dataclass
class BenchConfig:
    """Everything a training-modes benchmark is asked for (see bench_training_modes). None: the preset's value
    (`quick` or the GPU one); option lists may be given as 'a,b' strings. config.json holds it as it ran."""
    arch: str | None = None
    size: int | None = None
    bs: int | None = None
    steps: int | None = None  # timed steps per repeat
    repeats: int | None = None
    warmup: int | None = None  # untimed steps first
    modes: str | Sequence[str] = BENCH_MODES
    precisions: str | Sequence[str] = LEVER_PRECISIONS
    formats: str | Sequence[str] = MEMORY_FORMATS
    compile: bool = False
    cudnn_benchmark: str = "both"  # both, on or off (CUDA only)
    overhead: bool = True  # the package's loop against the plain loop
    overhead_modes: str | Sequence[str] | None = None
    pipeline: bool = True  # synthetic batches against the real image pipelines
    pipeline_modes: str | Sequence[str] | None = None
    pipelines: str | Sequence[str] = ("pil", "device", "cached")
    pipeline_aug: str = "default"
    depth_modes: str | Sequence[str] | None = None  # modes timed in alternating rounds with their saved activations
    data: str = "jpeg"  # real images: 'jpeg' (generated from the embedded LFW set), a named source or a folder
    jpeg_images: int | None = None
    num_workers: int | None = None
    n_classes: int = 2
    epoch_images: int | None = None  # dataset size of the per-epoch estimates
    epochs_estimate: int = 5
    lr: float = 1e-3
    device: str = "auto"
    seed: int = 42
    count_reads: bool = True  # count host reads (syncs) per step
    threads: int | None = None  # torch CPU threads during the run (restored afterwards)
    quick: bool = False
    out: str | Path = "runs/bench_freeze"
    overwrite: bool = False
    cache_dir: str | Path = DEFAULT_CACHE
    command: str = ""  # the command line that started the run, for the report

    def steps_plan(self) -> StepPlan:
        """How each measurement times its steps."""
        return StepPlan(self.warmup, self.steps, self.repeats, self.bs, self.lr)


def bench_training_modes(config: BenchConfig | None = None, *, log: Callable[[str], None] | None = print,
                         **options: Any) -> dict[str, Any]:
    """Training throughput, step time (median, min, max) and peak memory of a timm model in each training mode
    (train.modes' bench modes: unfrozen; frozen_bn and frozen, the body frozen with its BatchNorm training or not;
    precomputed, frozen on precomputed features) crossed with the speed levers (precision, memory format,
    torch.compile, cudnn.benchmark); the fastai loop against a plain PyTorch loop; synthetic on-device batches
    against the real image pipelines (`pipelines`: pil, device, cached, auto; see tp3_fastai.data.pipeline), side
    by side on the same folder, with augmentation `pipeline_aug` (see image_data.parse_aug; 'none' times decoding
    and cropping alone). Writes config.json, bench.json, bench.md and bench.png into a new run folder and returns
    what bench.json holds.

    `config`: a BenchConfig (or its fields as keywords in `options`). Unset sizes (and the overhead / pipeline
    modes) come from the preset: `quick` (resnet18, 64 px, batch 16; loop and pipeline comparisons on the frozen
    modes only) or the GPU one (resnet50, 224 px, batch 128). Levers that cannot run on the device are reported as
    skipped, never imitated. Every figure carries its ratio to the unfrozen fp32 baseline measured in the same run.
    `threads` sets torch's CPU threads for the run (restored afterwards): on a CPU shared with other jobs, fewer
    threads than cores avoids OpenMP threads waiting on each other.
    """
    cfg = plan_bench(build_config(BenchConfig, config, options))
    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _bench_training_modes(cfg, log)
    finally:
        torch.set_num_threads(previous)


def plan_bench(config: BenchConfig) -> BenchConfig:
    """The configuration with the preset's values for what is unset and every option checked, as lists (empty
    for a comparison that is off), before anything is measured; else a ValueError."""
    from ..data.pipeline import PIPELINES
    from ..transfer.learner import check_arch

    if config.threads is not None and config.threads <= 0:
        raise ValueError(f"threads must be positive, got {config.threads}")
    preset = resolve_config(config.quick, **{k: getattr(config, k) for k in PRESETS["gpu"]})
    cfg = replace(config, **preset)
    check_arch(cfg.arch)
    overhead_modes = check_modes(cfg.overhead_modes, "bench") if cfg.overhead and cfg.overhead_modes else []
    pipeline_modes = check_modes(cfg.pipeline_modes, "bench") if cfg.pipeline and cfg.pipeline_modes else []
    depth_modes = check_modes(cfg.depth_modes, "bench") if cfg.depth_modes else []
    for what, chosen in (("--modes", check_modes(cfg.modes, "bench")), ("--overhead-modes", overhead_modes),
                         ("--pipeline-modes", pipeline_modes)):
        if "gradual" in chosen:
            raise ValueError(f"{what}: gradual changes what trains every epoch, and this comparison times one "
                             "state; time it with --depth-modes gradual (each epoch's state, averaged)")
    if "precomputed" in depth_modes:
        raise ValueError("--depth-modes: precomputed trains on cached features, not through the body: choose "
                         "frozen for the head-only step")
    if depth_modes:
        from ..transfer.stages import check_stage_modes

        check_stage_modes(cfg.arch, depth_modes)
    if "precomputed" in pipeline_modes:
        raise ValueError("the pipeline comparison trains on the images themselves: precomputed does not apply; "
                         "choose from " + ", ".join(m for m in BENCH_MODES if m != "precomputed"))
    pipelines = _split_opt(cfg.pipelines, PIPELINES, "pipeline") if pipeline_modes else []
    if pipeline_modes and not pipelines:
        raise ValueError(f"the pipeline comparison needs at least one pipeline ({', '.join(PIPELINES)})")
    cfg = replace(cfg, modes=check_modes(cfg.modes, "bench"),
                  precisions=_split_opt(cfg.precisions, LEVER_PRECISIONS, "precision"),
                  formats=_split_opt(cfg.formats, MEMORY_FORMATS, "memory format"), overhead_modes=overhead_modes,
                  pipeline_modes=pipeline_modes, pipelines=pipelines, depth_modes=depth_modes)
    if not cfg.precisions or not cfg.formats:
        raise ValueError("modes, precisions and formats each need at least one value")
    if cfg.lr <= 0 or cfg.epochs_estimate <= 0 or cfg.n_classes < 2:
        raise ValueError(f"lr and epochs_estimate must be positive and n_classes >= 2, got lr={cfg.lr}, "
                         f"epochs_estimate={cfg.epochs_estimate}, n_classes={cfg.n_classes}")
    _cudnn_options(torch.device("cpu"), cfg.cudnn_benchmark)  # its value is checked on any device
    return cfg


def _bench_training_modes(cfg: BenchConfig, log: Callable[[str], None] | None) -> dict[str, Any]:
    from fastai.data.core import DataLoaders

    t_start = time.perf_counter()
    dev = pick_device(cfg.device)
    cudnn_opts = _cudnn_options(dev, cfg.cudnn_benchmark)
    loop_precision = resolve_precision("auto", dev)  # what users train with: fp16 AMP on CUDA, fp32 on CPU
    if dev.type == "cpu" and not cfg.quick and cfg.size * cfg.bs >= 224 * 64 and log:
        log("note: the default configuration is sized for a GPU; on a CPU use --quick (or a small --size / --bs)")

    pipe_dls = _pipeline_dls(cfg, dev) if cfg.pipeline_modes else {}  # a folder too small: refused before any work
    run = new_run_dir(cfg.out, cfg.overwrite)
    env = env_info(dev)
    env.update(driver=driver_version(dev), tf32=tf32_flags(dev), torch_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count())
    config = dict(config_dict(cfg), device=str(dev), device_name=device_name(dev), loop_precision=loop_precision,
                  env=env, load_average_start=load_average())
    write_json(run / "config.json", config)
    if log:
        log(f"bench_freeze: {cfg.arch}, {cfg.size} px, batch {cfg.bs} on {device_name(dev)}; load average "
            f"{config['load_average_start']}; run folder {run}")

    n_classes = cfg.n_classes
    if pipe_dls:
        n_classes = next(iter(pipe_dls.values())).c
    batches = synthetic_batches(4, cfg.bs, cfg.size, n_classes, dev, cfg.seed)
    syn_dls = DataLoaders(BatchLoader(batches, 1), BatchLoader([], 0), device=dev)
    syn_dls.c = n_classes
    grid = _measure_grid(cfg, syn_dls, batches, dev, cudnn_opts, log)
    base_row = grid[0]
    _add_estimates(grid, cfg.epoch_images, cfg.epochs_estimate)
    overhead_rows = bench_overhead(syn_dls, cfg.arch, cfg.overhead_modes, batches, dev, loop_precision, cfg.seed,
                                   cfg.steps_plan(), cfg.count_reads, log=log) if cfg.overhead_modes else []
    plan = PipelinePlan(cfg.arch, cfg.pipeline_modes, loop_precision, cfg.bs, cfg.size, cfg.seed, cfg.lr, cfg.warmup,
                        cfg.steps, cfg.repeats)
    pipe = bench_pipeline(pipe_dls, syn_dls, plan, dev, log=log) if cfg.pipeline_modes else None
    depth = bench_depth(syn_dls, cfg.arch, cfg.depth_modes, batches, dev, loop_precision, cfg.seed, cfg.steps_plan(),
                        cfg.epochs_estimate, log=log) if cfg.depth_modes else []
    result = dict(config=config, env=env, device=str(dev), device_name=device_name(dev), arch=cfg.arch,
                  size=cfg.size, bs=cfg.bs,
                  baseline=dict(mode="unfrozen", precision="fp32", memory_format="contiguous",
                                images_per_s=base_row["images_per_s"], step_ms=base_row["step_ms"]),
                  grid=grid, epoch_images=cfg.epoch_images, epochs_estimate=cfg.epochs_estimate,
                  overhead=overhead_rows, pipeline=pipe, depth=depth,
                  memory_note=None if dev.type == "cuda" else CPU_MEMORY_NOTE,
                  timing=("median of `repeats` groups of `steps` steps after `warmup` untimed steps; device "
                          "synchronised at group edges only; synthetic batches are the same seeded tensors for "
                          "every mode"),
                  mode_labels={m: mode_label(m) for m in dict.fromkeys([*modes_for("bench"), *cfg.modes,
                                                                        *cfg.depth_modes])},
                  loop_labels=LOOP_LABELS,
                  load_average_end=load_average(), seconds=time.perf_counter() - t_start, run_dir=str(run))
    write_json(run / "bench.json", result)
    md = bench_markdown(result)
    (run / "bench.md").write_text(md)
    plot_bench(result, run / "bench.png")
    if log:
        log("\n" + md + f"\nrun folder: {run} ({result['seconds']:.0f}s)")
    return result


def _pipeline_dls(cfg: BenchConfig, dev: torch.device) -> dict[str, Any]:
    """The same folder, split and augmentation through each input pipeline: {pipeline: DataLoaders}."""
    from ..data.images import image_dls

    size = cfg.size
    folder = jpeg_folder(cfg.cache_dir, cfg.jpeg_images, px=round(size * 1.75)) if cfg.data == "jpeg" else cfg.data
    kw = {} if cfg.num_workers is None else dict(num_workers=cfg.num_workers)
    dls = {p: image_dls(folder, size=size, bs=cfg.bs, seed=cfg.seed, aug=cfg.pipeline_aug, device=dev,
                        cache_dir=cfg.cache_dir, pipeline=p, **kw) for p in cfg.pipelines}
    n_train = len(next(iter(dls.values())).train_ds)
    if n_train < PIPELINE_SYNC_BATCHES * cfg.bs:  # pipeline_syncs counts over loaders of 2 and 3 of its batches
        raise ValueError(f"the pipeline comparison needs {PIPELINE_SYNC_BATCHES} training batches of {cfg.bs} "
                         f"images, and {cfg.data if cfg.data != 'jpeg' else folder} holds {n_train} training images: "
                         f"lower --bs to {max(n_train // PIPELINE_SYNC_BATCHES, 1)} or less, or pass a larger folder "
                         "(or --no-pipeline)")
    return dls


def _measure_grid(cfg: BenchConfig, syn_dls: Any, batches: list, dev: torch.device, cudnn_opts: list[bool | None],
                  log: Any) -> list[dict[str, Any]]:
    """Modes x levers, the plain loop on the synthetic batches; the first row is the unfrozen fp32 contiguous
    baseline (a RuntimeError if it could not run)."""
    base = {m: mode_learner(syn_dls, cfg.arch, m, cfg.seed).model.to(dev) for m in cfg.modes}
    if "unfrozen" not in base:
        base["unfrozen"] = mode_learner(syn_dls, cfg.arch, "unfrozen", cfg.seed).model.to(dev)
    baseline_key = ("unfrozen", "fp32", "contiguous", False, cudnn_opts[0] if dev.type != "cuda" else False)
    cells = [baseline_key] + [(m, p, f, c, b) for m in cfg.modes for p in cfg.precisions for f in cfg.formats
                              for c in ([False, True] if cfg.compile else [False]) for b in cudnn_opts]
    plan = cfg.steps_plan()
    grid = []
    for i, (m, p, f, c, b) in enumerate(dict.fromkeys(cells)):
        row = measure_cell(base, m, batches, dev, Levers(p, f, c, b),
                           replace(plan, warmup=max(plan.warmup, 3)) if c else plan)
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
