"""Part III: the receptive field (R, J, start) of every node of a model, optionally measured, mapped and drawn."""
from tp3_fastai.cli import rf as main, run_script

if __name__ == "__main__":
    run_script(main)
