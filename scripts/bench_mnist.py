"""Epoch time of the package's MNIST training next to a plain PyTorch loop (same tensors, model, optimizer)."""
from tp3_fastai.cli import bench_mnist, run_script

if __name__ == "__main__":
    run_script(bench_mnist)
