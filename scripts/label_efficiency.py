"""Label efficiency: target test accuracy against labelled images per class, for scratch / frozen / fine-tune."""
from tp3_fastai.cli import label_efficiency, run_script

if __name__ == "__main__":
    run_script(label_efficiency)
