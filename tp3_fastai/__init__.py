"""tp3_fastai: the CNN practical (MNIST from scratch, transfer learning, receptive fields) on fastai."""
import warnings

# fastai.layers scripts four functions with torch.jit.script when it is imported, which torch 2.14 deprecates: a
# FutureWarning a student cannot act on at the start of every Python session. Ignored here, before any module of
# the package imports fastai, and only that one (its message, from torch.jit._script): Python shows a warning once
# per place anyway, so a user's own torch.jit.script call after fastai's import would not show it either.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")

__version__ = "0.1.0"
