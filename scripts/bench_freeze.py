#!/usr/bin/env python
"""What frozen and full fine-tuning cost: throughput, step time and peak memory per training mode and speed lever,
the fastai loop against a plain PyTorch loop, and synthetic against real input batches. One command, on your GPU:

    python scripts/bench_freeze.py                 # resnet50, 224 px, batch 128: the GPU configuration
    python scripts/bench_freeze.py --quick         # resnet18, 64 px, batch 16: the CI configuration for a CPU
"""
from __future__ import annotations

import shlex
import sys

from fastcore.script import call_parse

from tp3_fastai.cli import run_guarded


@call_parse
def bench_freeze(
    arch: str = None,  # any timm model name (default: resnet50; --quick: resnet18)
    size: int = None,  # image side in pixels (default 224; --quick 64)
    bs: int = None,  # batch size (default 128; --quick 16)
    steps: int = None,  # timed steps per repeat (default 10; --quick 3)
    repeats: int = None,  # repeats; the median and min/max are reported (default 5; --quick 3)
    warmup: int = None,  # untimed steps first (default 5; --quick 2; at least 3 with --compile)
    modes: str = "unfrozen,frozen_train_bn,frozen,precomputed",  # training modes to measure
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
    cache_dir: str = "~/.cache/tp3_fastai",  # where the generated JPEG folder is written once
):
    "Benchmark frozen vs unfrozen training (and precomputed features) across speed levers; write JSON, Markdown, PNG."
    from tp3_fastai.bench import bench_training_modes

    command = "python scripts/bench_freeze.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]) \
        if sys.argv and sys.argv[0].endswith("bench_freeze.py") else ""
    return run_guarded(bench_training_modes, arch=arch, size=size, bs=bs, steps=steps, repeats=repeats,
                       warmup=warmup, modes=modes, precisions=precisions, formats=formats, compile=compile,
                       cudnn_benchmark=cudnn_benchmark, overhead=not no_overhead, overhead_modes=overhead_modes,
                       pipeline=not no_pipeline, pipeline_modes=pipeline_modes, data=data, jpeg_images=jpeg_images,
                       num_workers=num_workers, epoch_images=epoch_images, epochs_estimate=epochs_estimate, lr=lr,
                       device=device, seed=seed, count_reads=not no_count_reads, threads=threads, quick=quick, out=out,
                       overwrite=overwrite, cache_dir=cache_dir, command=command)
