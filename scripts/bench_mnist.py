"""Epoch time of the package's MNIST training next to a plain PyTorch loop (same tensors, model, optimizer)."""
from tp3_fastai.cli import bench_mnist

if __name__ == "__main__":
    bench_mnist()
