"""Part III: the receptive field (R, J, start) of every node of a model, optionally measured, mapped and drawn."""
from tp3_fastai.cli import rf as main

if __name__ == "__main__":
    main()
