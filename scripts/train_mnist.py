"""Part I: the perceptron and the small CNN trained from scratch on MNIST. `--help` lists the options."""
from tp3_fastai.cli import mnist

if __name__ == "__main__":
    mnist()
