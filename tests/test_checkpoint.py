"""Checkpoints survive a SIGKILL mid-run, and --resume continues without duplicated or missing epochs."""
import csv
import re
import subprocess
import sys
from pathlib import Path

import torch

from tp3_fastai.checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from tp3_fastai.data import mnist_dls
from tp3_fastai.learners import mnist_learner
from conftest import run_then_kill

ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    dls, _ = mnist_dls(bs=256)
    learn = mnist_learner(dls, "mlp", progress=False, log=None)
    learn.fit_one_cycle(1, 1e-3)
    save_checkpoint(learn, tmp_path / "last.pth", epoch=1, metric=0.5)
    other = mnist_learner(dls, "mlp", progress=False, log=None)
    assert load_checkpoint(other, tmp_path / "last.pth") == 1
    for a, b in zip(learn.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    for (p, *_), (q, *_) in zip(learn.opt.all_params(), other.opt.all_params()):
        assert torch.equal(learn.opt.state[p]["grad_avg"], other.opt.state[q]["grad_avg"])


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = atomic_torch_save({"x": torch.ones(2)}, tmp_path / "c.pth")

    class Unsaveable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")  # what a full disk raises mid-write

    try:
        atomic_torch_save({"x": Unsaveable()}, path)
    except OSError as e:
        assert e.errno == 28
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary file left behind


def test_sigkill_mid_training_then_resume_completes_every_epoch_once(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train_mnist.py"), "--archs", "cnn", "--epochs", "4",
           "--out", str(out)]
    run_then_kill(cmd, "cnn epoch 2/4", timeout=240)
    assert (out / "checkpoints" / "cnn" / "last.pth").is_file()
    assert not (out / "summary.json").exists()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_mnist.py"), "--resume", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the kill lands after epoch 2's CSV row, before or after its checkpoint: resume from 1 or 2
    assert re.search(r"cnn: resuming after epoch [12]/4", done.stdout), done.stdout
    with open(out / "metrics_cnn.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [1, 2, 3, 4]
    assert (out / "summary.json").is_file()
    ck = torch.load(out / "checkpoints" / "cnn" / "last.pth", weights_only=True)
    assert ck["epoch"] == 4


def test_resume_of_a_folder_without_checkpoint_says_so(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_mnist.py"), "--resume", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "config.json" in p.stderr
