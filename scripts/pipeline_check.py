"""The input-pipeline stages of scripts/gpu_check.sh: `pipeline` (real-JPEG images/s per pipeline against synthetic
batches) or `syncdebug` (one epoch per pipeline, every host wait an error on CUDA); `--dry-run`: the CPU, tiny."""
import sys

from fastcore.script import call_parse

from tp3_fastai.bench.gpucheck import DRY_RUN, CheckConfig, pipeline_check, sync_check


@call_parse
def main(
    stage: str,  # pipeline or syncdebug
    out: str,  # pipeline: path without suffix (writes .md and .json); syncdebug: the text file
    dry_run: bool = False,  # the same stage on the CPU at tiny sizes
    cache_dir: str = "~/.cache/tp3_fastai",  # where the generated JPEG folders are written once
):
    "Run one input-pipeline stage of the GPU check."
    from dataclasses import replace

    cfg = replace(DRY_RUN if dry_run else CheckConfig(), cache_dir=cache_dir)
    if stage == "pipeline":
        pipeline_check(cfg, out)
    elif stage == "syncdebug":
        sys.exit(0 if sync_check(cfg, out) else 1)
    else:
        sys.exit(f"unknown stage {stage!r}: use pipeline or syncdebug")
