"""Part II, transfer learning: timm bodies through fastai (`learner`), their parameter groups by stage (`stages`),
their weights (`weights`), the image-folder experiment and inference (`finetune`), source pretraining (`pretrain`),
the label-efficiency study and precomputed body features (`features`)."""
