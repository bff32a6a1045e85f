"""Part 0, the review before the practical: the course's layer examples (`layers`), VGG and ResNet
(`architectures`), activations, first-layer kernels (`kernels`) and the part's run folder (`run`)."""
