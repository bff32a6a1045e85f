"""End-to-end Part I: a short real training on the embedded sample, and the run folder it writes."""
import csv
import os
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tp3_fastai.cli import main as tp3
from tp3_fastai.train.curves import COLUMNS, read_curves
from tp3_fastai.data.mnist import mnist_dls
from tp3_fastai.core.device import resolve_precision
from tp3_fastai.mnist.learner import mnist_learner
from tp3_fastai.mnist.train import train_mnist
from figures import assert_series

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("runs") / "mnist"
    lines: list[str] = []
    summary = train_mnist(epochs=3, out=out, log=lines.append, progress=False, device=device)
    return Path(summary["run_dir"]), summary, lines


def test_short_training_on_real_digits_reaches_measured_accuracy(run):
    _, summary, _ = run
    acc = {m["model"]: m["test_accuracy"] for m in summary["models"]}
    # measured with 3 epochs, seeds 0/1/42, CPU: mlp 0.897-0.900, cnn 0.936-0.954, with fastai's Adam and with the
    # package's AdamW alike (docs/benchmarks.md); the margins leave room for seed noise and a GPU's bf16
    assert acc["mlp"] > 0.88 and acc["cnn"] > 0.92
    assert acc["cnn"] > acc["mlp"]


def test_run_folder_holds_curves_metrics_and_summary(run, device):
    folder, summary, lines = run
    assert {p.name for p in folder.iterdir()} >= {"config.json", "summary.json", "summary.md", "curves.png",
                                                   "metrics_mlp.csv", "metrics_cnn.csv"}
    with open(folder / "metrics_cnn.csv") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS and [r[0] for r in rows[1:]] == ["1", "2", "3"]
    curves = read_curves(folder / "metrics_cnn.csv")
    assert all(0 <= r["train_accuracy"] <= 1 and r["seconds"] > 0 for r in curves)
    assert curves[-1]["valid_loss"] < curves[0]["valid_loss"]
    assert_series(folder / "curves.png", 2)  # the MLP's and the CNN's curves
    s = json.loads((folder / "summary.json").read_text())
    assert s["precision"] == resolve_precision("auto", torch.device(device)) and s["device"] == device
    assert s["seed"] == 42
    assert s["split_sizes"] == {"train": 3200, "valid": 800, "test": 1000}
    assert {m["model"]: m["params"] for m in s["models"]} == {"mlp": 39_760, "cnn": 27_830}
    assert set(s["env"]) >= {"torch", "fastai", "timm", "device_name"}
    assert s["models"][1]["valid_accuracy"] == pytest.approx(curves[-1]["valid_accuracy"], abs=1e-5)
    assert any(line.startswith("cnn epoch 3/3") for line in lines)
    assert "| cnn | 27,830 | 3 |" in (folder / "summary.md").read_text()


def test_existing_run_folder_is_not_overwritten(run, tmp_path):
    folder, _, _ = run
    summary = train_mnist(archs=("mlp",), epochs=1, out=folder, log=lambda s: None, progress=False)
    assert summary["run_dir"] == f"{folder}-2"
    assert (folder / "metrics_cnn.csv").exists()


def test_learner_supports_fit_and_lr_find(tmp_path):
    dls, _ = mnist_dls(bs=128)
    learn = mnist_learner(dls, "cnn", progress=False, log=None, path=tmp_path)
    learn.fit(1, 1e-3)
    assert len(learn.curves.history) == 1
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    res = learn.lr_find(num_it=20, show_plot=False)
    # a mock training at learning rates growing geometrically from 1e-7 (x 10^0.4 a batch), stopped after 20
    # batches or when the loss diverges; the suggestion is one of the rates tried
    lrs, losses = learn.recorder.lrs, learn.recorder.losses
    assert 6 <= len(lrs) == len(losses) <= 20 and lrs[0] == pytest.approx(1e-7)
    assert all(b / a == pytest.approx(10 ** 0.4) for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] <= res.valley <= lrs[-1]
    # and then gives the learner back as it was: weights restored, no epoch added to the curves
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    assert len(learn.curves.history) == 1


def test_fp16_on_cpu_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="precision fp16 needs a CUDA GPU"):
        train_mnist(precision="fp16", device="cpu", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_script_runs_without_progress_flood_and_reports_bad_input(tmp_path, capsys, monkeypatch):
    # the script file as `python scripts/train_mnist.py ...` runs it, in this process (its output is not a terminal
    # either: no progress bar redrawn with carriage returns)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "train_mnist.py"), "--archs", "mlp", "--epochs", "1",
                                      "--out", str(tmp_path / "r")])
    runpy.run_path(sys.argv[0], run_name="__main__")
    out = capsys.readouterr().out
    assert "mlp epoch 1/1" in out and "| mlp | 39,760 | 1 |" in out and "\r" not in out
    with pytest.raises(SystemExit) as bad:  # the script's command function, in this process (no second start-up)
        tp3(["mnist", "--archs", "resnet", "--out", str(tmp_path / "bad")])
    assert bad.value.code == 2 and capsys.readouterr().err.startswith("error: unknown MNIST architecture 'resnet'")
    assert not (tmp_path / "bad").exists()


SEEDED = """
from tp3_fastai.data.mnist import mnist_dls
from tp3_fastai.mnist.learner import mnist_learner
dls, test_dl = mnist_dls("sample", seed=42, bs=64)
for seed in (42, 42, 0):
    learn = mnist_learner(dls, "cnn", seed=seed, progress=False, log=None)
    learn.fit_one_cycle(1, 3e-3)
    print(learn.validate(dl=test_dl)[1])
"""


def test_the_same_seeds_give_the_same_accuracy_twice_from_python(tmp_path):
    # two Python sessions (torch seeds each one differently), each training twice with seed 42 on the same
    # DataLoaders, then once with seed 0: measured 0.839, 0.839, 0.851 (CNN, 1 epoch); unseeded: 0.862 vs 0.838
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", SEEDED], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr
        runs.append([float(v) for v in p.stdout.split()])
    (a, b, other), again = runs
    assert a == b == again[0] == again[1] and again == runs[0]
    assert other != a and a > 0.8  # another seed, another run; and it learnt


def test_train_mnist_with_log_none_says_nothing_and_trains(tmp_path, capsys):
    s = train_mnist(archs=("mlp",), epochs=1, out=tmp_path / "r", log=None, progress=False)
    assert s["models"][0]["test_accuracy"] > 0.5 and (tmp_path / "r" / "summary.json").is_file()
    assert capsys.readouterr().out == ""
