#!/usr/bin/env python
"""Classify image files with a model exported by scripts/finetune.py (its run folder's model.pkl)."""
from __future__ import annotations

import sys

from fastcore.script import call_parse


@call_parse
def main(model: str,  # model.pkl written by scripts/finetune.py (unpickled: only use files you made)
         *images: str,  # image files to classify
         ) -> None:
    "Print the predicted label and its probability for each image."
    from tp3_fastai.transfer import load_model, predict

    try:
        if not images:
            raise ValueError("give at least one image file after the model file")
        learn = load_model(model)  # once, however many images
        for image in images:
            label, prob = predict(learn, image)
            print(f"{image}\t{label}\t{prob:.4f}")
    except (ValueError, FileNotFoundError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        sys.exit(2)
