#!/usr/bin/env python
"""Part II: a timm ResNet trained from scratch, fine-tuned, and with a frozen body; one run folder compares them."""
from __future__ import annotations

import sys

from fastcore.script import call_parse


@call_parse
def main(data: str = "lfw",  # 'lfw' (200 embedded images, offline), 'hymenoptera', 'pets', 'imagenette' or a folder
         arch: str = "resnet50",  # any timm model name
         size: int = None,  # image side in pixels (default: 64 for lfw, 224 otherwise)
         bs: int = 32,  # batch size
         epochs: int = 5,  # passes over the training set per mode (finetune's frozen epochs included)
         modes: str = "scratch,finetune,frozen",  # comma list of modes to run
         pretrained: bool = False,  # ImageNet weights from the timm / Hugging Face hub (needs internet)
         weights: str = None,  # local weights file (.safetensors or .pth state dict) for finetune and frozen
         lr: float = 2e-3,  # learning rate (finetune: head lr; then lr/200 body, lr/2 head)
         freeze_epochs: int = 1,  # finetune: epochs on the head alone before unfreezing
         train_bn: bool = True,  # freeze BatchNorm with the body (fastai trains it by default: the backward pass then runs through the whole body)
         precision: str = "auto",  # auto, fp32, fp16 or bf16 (fp16/bf16 need CUDA)
         channels_last: bool = False,  # channels_last memory format (helps tensor cores on CUDA)
         aug: str = "default",  # none, default, noflip, or e.g. 'flip=0,rot=10,zoom=1.1,light=0.2,crop=0.35'
         seed: int = 42,  # random seed (same head init and batch order for every mode)
         device: str = "auto",  # auto, cpu, cuda or cuda:N
         out: str = "runs/finetune",  # run folder (a new -2, -3, ... folder if it holds files)
         overwrite: bool = False,  # replace the run folder instead
         cache_dir: str = "~/.cache/tp3_fastai",  # where the embedded LFW folder is written once
         ) -> None:
    "Train a timm ResNet in the practical's three modes and write the comparison into a run folder."
    from tp3_fastai.data import DownloadError
    from tp3_fastai.transfer import finetune_experiment

    try:
        if pretrained and weights:
            raise ValueError("give either --pretrained (hub weights) or --weights PATH (a local file), not both")
        finetune_experiment(data=data, arch=arch, size=size, bs=bs, epochs=epochs,
                            modes=[m.strip() for m in modes.split(",") if m.strip()],
                            pretrained=weights if weights else pretrained, lr=lr, freeze_epochs=freeze_epochs,
                            train_bn=train_bn, precision=precision, channels_last=channels_last, aug=aug, seed=seed,
                            device=device, out=out, overwrite=overwrite, cache_dir=cache_dir)
    except (ValueError, FileNotFoundError, NotImplementedError, DownloadError) as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        sys.exit(2)
