"""Part I: the perceptron and the small CNN trained from scratch on MNIST. `--help` lists the options."""
from tp3_fastai.cli import mnist, run_script

if __name__ == "__main__":
    run_script(mnist)
