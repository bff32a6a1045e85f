"""Part II: a timm ResNet from scratch, fine-tuned and with a frozen body on an image folder. `--help`: options."""
from tp3_fastai.cli import finetune as main, run_script

if __name__ == "__main__":
    run_script(main)
