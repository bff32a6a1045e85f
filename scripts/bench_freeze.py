"""What frozen and full fine-tuning cost, per training mode and speed lever; `--quick` is the CPU configuration."""
from tp3_fastai.cli import bench_freeze, run_script

if __name__ == "__main__":
    run_script(bench_freeze)
