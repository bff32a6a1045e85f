"""Label efficiency: target test accuracy against labelled images per class, for scratch / frozen / fine-tune."""
from tp3_fastai.cli import label_efficiency

if __name__ == "__main__":
    label_efficiency()
