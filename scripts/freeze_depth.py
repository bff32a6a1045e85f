"""Fine-tuning by depth: accuracy against cost per epoch for each freeze depth, surgical stage, gradual unfreezing
and discriminative rates, and surgical fine-tuning on a label shift and an input-level shift."""
from tp3_fastai.cli import freeze_depth

if __name__ == "__main__":
    freeze_depth()
