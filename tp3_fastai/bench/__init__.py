"""Benchmarks: timing harness (warm-up, synchronisation, medians with spread); the package's loop against a plain
PyTorch loop; what each training mode of train.modes' table (unfrozen, frozen_bn, frozen, precomputed features)
costs with each speed lever.

Modules: ``timing`` (timings, spread and device helpers), ``loops`` (loaders, the plain and fastai training loops,
counting host reads and blocking copies; the lean loop is ``tp3_fastai.train.loop``), ``mnist`` (the MNIST loop
benchmark), ``modes`` (training modes x speed levers: building and measuring each mode, loop overhead),
``pipelines`` (the input pipelines against synthetic batches, host waits per step, the sync-debug epoch),
``freeze`` (the whole training-modes benchmark and its run folder), ``report`` (its Markdown report and chart),
``depth`` (what each freeze depth costs: step time in alternating rounds, activations kept for backward) and
``tradeoff`` (the depth study: accuracy against cost, surgical fine-tuning on two shifts).
"""
from .freeze import (CPU_MEMORY_NOTE, PRESETS, BenchConfig, bench_training_modes, jpeg_folder, plan_bench,
                     resolve_config)
from .loops import (BatchLoader, DeviceSmoothLoss, FastLearner, GroupTimer, HostLosses, HostReadCounter,
                    LeanRecorder, LearnerLoop, PlainLoop, PlainTensors, QuietMixedPrecision, StreamLoader,
                    cycle_loader, host_reads_per_step, synthetic_batches)
from .mnist import bench_mnist_loop, plain_epoch
from .modes import (BENCH_MODES, LEVER_PRECISIONS, LOOP_LABELS, LOOPS, MEMORY_FORMATS, Levers, bench_overhead,
                    lever_skip_reason, measure_cell, mode_learner, trainable_names)
from .pipelines import (PIPELINE_LOOPS, PipelinePlan, SyncDebug, bench_pipeline, pipeline_syncs,
                        sync_debug_epoch,
                        warmup_batches)
from .report import bench_markdown, plot_bench
from .timing import (StepPlan, driver_version, free_device_memory, load_average, peak_memory_mb, reset_peak_memory,
                     set_cudnn_benchmark, spread, tf32_flags, timed)

__all__ = [
    # timing
    "StepPlan", "timed", "spread", "set_cudnn_benchmark", "reset_peak_memory", "peak_memory_mb", "free_device_memory",
    "driver_version", "tf32_flags", "load_average",
    # loops
    "BatchLoader", "StreamLoader", "cycle_loader", "synthetic_batches", "PlainLoop", "GroupTimer", "LearnerLoop",
    "DeviceSmoothLoss", "HostLosses", "PlainTensors", "LeanRecorder", "QuietMixedPrecision", "FastLearner",
    "HostReadCounter", "host_reads_per_step",
    # mnist
    "plain_epoch", "bench_mnist_loop",
    # modes
    "BENCH_MODES", "Levers", "LEVER_PRECISIONS", "MEMORY_FORMATS", "LOOPS", "LOOP_LABELS",
    "lever_skip_reason", "mode_learner", "trainable_names", "measure_cell", "bench_overhead",
    # pipelines
    "PIPELINE_LOOPS", "PipelinePlan", "bench_pipeline", "pipeline_syncs", "sync_debug_epoch", "SyncDebug",
    "warmup_batches",
    # freeze
    "CPU_MEMORY_NOTE", "PRESETS", "BenchConfig", "jpeg_folder", "resolve_config", "plan_bench",
    "bench_training_modes",
    # report
    "bench_markdown", "plot_bench",
]
