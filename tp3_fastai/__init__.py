"""tp3_fastai: the CNN practical (MNIST from scratch, transfer learning, receptive fields) on fastai."""
__version__ = "0.1.0"
