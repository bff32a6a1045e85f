"""Classify image files with a model exported by a finetune run (its run folder's model.pkl)."""
from tp3_fastai.cli import predict as main, run_script

if __name__ == "__main__":
    run_script(main)
