"""Training without host waits outside the data: the progress bar reads the loss every N batches without waiting
(tp3_fastai.train.progress), and cuDNN's deterministic algorithms only when a run asks (`finetune --deterministic`,
recorded in config.json), seeded runs giving the same losses either way on a CPU."""
from __future__ import annotations

import json

import pytest
import torch
from fastai.callback.progress import ProgressCallback

from tp3_fastai.bench import HostReadCounter
from tp3_fastai.data.images import image_dls
from tp3_fastai.train.curves import read_curves
from tp3_fastai.train.progress import LeanProgress
from tp3_fastai.transfer.learner import resnet_learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_progress_bar_reads_the_loss_every_n_batches_and_nothing_else(tmp_path):
    """With bars on (a terminal, a notebook) the Learner shows fastai's bars, with the smoothed loss read back every
    `every` batches (and at the last), never each batch: the values shown are the Recorder's at those batches, and
    a fit makes as many host reads with the bar as without it."""
    dls = image_dls("lfw", size=32, bs=8, cache_dir=tmp_path / "cache")
    n = len(dls.train)
    reads = {}
    for progress in (True, False):
        learn = resnet_learner(dls, "test_resnet", progress=progress, log=None, path=tmp_path)
        bars = [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)]
        assert [type(cb) for cb in bars] == ([LeanProgress] if progress else [])
        if progress:
            learn.progress.every = 5
            with learn.no_bar():  # fastai's switch still hides it
                assert not any(isinstance(cb, ProgressCallback) for cb in learn.cbs)
            learn.remove_cb(ProgressCallback)
            learn.add_cb(LeanProgress(every=5))
        torch.manual_seed(0)
        with HostReadCounter("cpu") as c:
            learn.fit(1, 1e-3)
        reads[progress] = c.total
        if progress:
            shown = learn.progress.shown
            assert [b for b, _ in shown] == [b for b in range(5, n + 1, 5)] + ([n] if n % 5 else [])
            losses = [float(t) for t in learn.recorder.losses]
            assert [v for _, v in shown] == [losses[b - 1] for b, _ in shown]
    assert reads[True] == reads[False]
    with pytest.raises(ValueError, match="every must be at least 1 batch"):
        LeanProgress(every=0)


def _run(tmp_path, name: str, **kwargs) -> tuple[dict, list[dict]]:
    from tp3_fastai.transfer.finetune import finetune_experiment

    run = tmp_path / name
    finetune_experiment(data="lfw", arch="test_resnet", size=32, bs=16, epochs=1, modes=["scratch"], out=run,
                        cache_dir=tmp_path / "cache", progress=False, log=lambda m: None, pipeline="cached", **kwargs)
    return json.loads((run / "config.json").read_text()), read_curves(run / "metrics_scratch.csv")


def test_deterministic_cudnn_only_when_asked_recorded_and_seeded_runs_repeat(tmp_path):
    from fastcore.script import anno_parser

    from tp3_fastai import cli

    assert "--deterministic" in anno_parser(cli.finetune).format_help()
    torch.backends.cudnn.deterministic = False
    det_config, det_a = _run(tmp_path, "a", deterministic=True)
    assert det_config["deterministic"] is True and torch.backends.cudnn.deterministic is True
    _, det_b = _run(tmp_path, "b", deterministic=True)
    free_config, free = _run(tmp_path, "c")
    assert free_config["deterministic"] is False and torch.backends.cudnn.deterministic is False
    keys = ("train_loss", "valid_loss", "valid_accuracy")
    assert [[r[k] for k in keys] for r in det_a] == [[r[k] for k in keys] for r in det_b]
    assert [[r[k] for k in keys] for r in det_a] == [[r[k] for k in keys] for r in free]  # seeded either way
