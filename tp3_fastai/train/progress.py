"""A progress bar that never makes the host wait for the GPU: fastai's ProgressCallback reads the smoothed loss
back to the host after every batch (`smooth_loss.item()`, a synchronisation per step on CUDA, in every notebook
run). Here the loss shown is copied to the host without blocking every `every` batches (core.syncs.HostValue) and
displayed once it has arrived; the bar itself (fastprogress: HTML in a notebook, text in a terminal) is fastai's."""
from __future__ import annotations

from fastai.callback.progress import ProgressCallback

from ..core.syncs import HostValue

LOSS_EVERY = 10  # batches between two loss read-backs shown on the bar


class LeanProgress(ProgressCallback):
    """fastai's progress bars (same bars, same epoch table) with the loss read every `every` batches without
    waiting: the comment shows the smoothed loss of the last read that has arrived. Named 'progress', as fastai's,
    so that `learn.no_bar()` hides it."""

    def __init__(self, every: int = LOSS_EVERY):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1 batch, got {every}")
        self.every = every
        self.shown: list[tuple[int, float]] = []  # (batch, loss) pairs shown, for tests and logs

    @property
    def name(self) -> str:
        return "progress"

    def before_train(self) -> None:
        self.host_loss = HostValue()
        super().before_train()

    def after_batch(self) -> None:
        self.pbar.update(self.iter + 1)
        if not self.training or not hasattr(self.learn, "smooth_loss"):
            return
        if (self.iter + 1) % self.every == 0 or self.iter + 1 == self.n_iter:
            self.host_loss.offer(self.learn.smooth_loss)
        value = self.host_loss.poll()
        if value is not None:
            if not self.shown or self.shown[-1][1] != value:
                self.shown.append((self.iter + 1, value))
            self.pbar.comment = f"{value:.4f}"


def lean_progress(learn, every: int = LOSS_EVERY):
    """Replace fastai's ProgressCallback of `learn` by LeanProgress (in place); returns `learn`."""
    learn.remove_cb(ProgressCallback)
    learn.add_cb(LeanProgress(every))
    return learn
