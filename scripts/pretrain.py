"""Pretrain a timm body on a source task (MNIST digits 0-4 by default) and cache it; `--help` lists the options."""
from tp3_fastai.cli import pretrain, run_script

if __name__ == "__main__":
    run_script(pretrain)
