"""Timing and device helpers of the benchmarks: synchronised timings, medians with spread, cudnn.benchmark, peak
device memory, driver and TF32 settings, load average."""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.device import synchronize


@dataclass(frozen=True)
class StepPlan:
    """How a measurement times training steps: `warmup` untimed steps, then `repeats` groups of `steps` steps of
    `bs` images, at learning rate `lr` (one-cycle schedule)."""
    warmup: int
    steps: int
    repeats: int
    bs: int
    lr: float


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that `fn` takes, with the device synchronised before and after."""
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def spread(times: list[float]) -> dict[str, float]:
    """Median, min and max of repeated timings."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def step_stats(group_s: list[float], steps: int, bs: int) -> dict[str, Any]:
    per_step = [g / steps for g in group_s]
    s = spread(per_step)
    return dict(step_ms={k: (v * 1000 if k != "n" else v) for k, v in s.items()},
                images_per_s=bs / s["median"])


# --- small device helpers (CUDA-specific calls, to move into device.py) ---------------------------------------

def set_cudnn_benchmark(flag: bool | None) -> bool:
    """Set `torch.backends.cudnn.benchmark` (None leaves it); returns the previous value."""
    prev = bool(torch.backends.cudnn.benchmark)
    if flag is not None:
        torch.backends.cudnn.benchmark = bool(flag)
    return prev


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak device memory allocated by tensors since `reset_peak_memory`, in MiB; None on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks to the device between measurements."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def driver_version(device: torch.device) -> str | None:
    """The NVIDIA driver version (from nvidia-smi), None on CPU or when unknown."""
    if device.type != "cuda":
        return None
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def tf32_flags(device: torch.device) -> dict[str, bool] | None:
    """Whether fp32 matmuls and convolutions may run as TF32 on this GPU (PyTorch's defaults: matmul no, cuDNN
    convolutions yes): 'fp32' figures on Ampere and later GPUs depend on it. None on CPU."""
    if device.type != "cuda":
        return None
    return dict(matmul=bool(torch.backends.cuda.matmul.allow_tf32), cudnn=bool(torch.backends.cudnn.allow_tf32))



def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (timings on a shared machine are only as good as this)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []
