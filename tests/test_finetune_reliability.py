"""Part II reliability: checkpoints and resume of the finetune run (Ctrl-C, SIGKILL), in either phase of
fine_tune, and image sizes too small for the network, refused before any work."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback

from tp3_fastai.cli import main as tp3
from tp3_fastai.train.curves import read_curves
from tp3_fastai.transfer.finetune import finetune_experiment
from tp3_fastai.data.images import image_dls
from tp3_fastai.transfer.learner import check_image_size, resnet_learner, train_mode
from conftest import run_then_kill
from probes import EpochSchedule, FirstStepState, assert_same_state, installed

ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"  # timm's smallest ResNet: seconds per run on the CPU
FAST = dict(arch=ARCH, size=32, bs=32, aug="none", device="cpu", progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# The first resumed epoch next to an uninterrupted run's same epoch (test_resnet, LFW 32 px, seed 42, 4 epochs),
# measured in-process: resumed after epoch 1 (freeze_epochs 2), 2 and 3 (freeze_epochs 1), train loss 0.515, 0.238,
# 0.166 against 0.520, 0.483, 0.316 (4 batches an epoch: the resumed epoch's other batch order moves it by half) and
# valid loss 0.598, 0.562, 0.467 against 0.603, 0.552, 0.469. A resume that restored nothing: train loss 0.867,
# 0.948, 1.266 and valid loss 0.628, 0.656, 0.715. Hence: train loss at most 25% above, valid loss within 0.03.
TRAIN_LOSS_AT_MOST, VALID_LOSS_TOL = 1.25, 0.03


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    """Curves of uninterrupted finetune runs, by freeze_epochs (4 epochs, the settings of the resume tests)."""
    def curves(freeze_epochs: int) -> list[dict]:
        s = finetune_experiment(modes=["finetune"], epochs=4, freeze_epochs=freeze_epochs, cache_dir=cache,
                                out=tmp_path_factory.mktemp("uninterrupted") / "r", log=lambda s: None, **FAST)
        return read_curves(Path(s["run_dir"]) / "metrics_finetune.csv")
    return curves


def _continued(got: dict, want: dict) -> None:
    """The first resumed epoch learnt like the uninterrupted run's same epoch."""
    assert got["epoch"] == want["epoch"]
    assert got["train_loss"] <= TRAIN_LOSS_AT_MOST * want["train_loss"], (got, want)
    assert got["valid_loss"] == pytest.approx(want["valid_loss"], abs=VALID_LOSS_TOL), (got, want)


def _restored(records: list[dict], checkpoint: dict) -> None:
    """The resumed learner trained its first batch from the checkpoint's weights and optimiser state."""
    (resumed,) = [r for r in records if r]  # the one learner that trained
    assert_same_state(resumed["model"], checkpoint["model"], "model")
    assert_same_state(resumed["opt"], checkpoint["opt"]["state"], "optimizer")


def _epochs(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


class _Interrupt:
    """A log that presses Ctrl-C when a line starts with `at` (CurvesCallback prints after the epoch's CSV row)."""

    def __init__(self, at: str):
        self.at, self.lines = at, []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith(self.at):
            raise KeyboardInterrupt


def test_ctrl_c_then_resume_keeps_finished_modes_and_continues_the_head_only_phase(cache, tmp_path, uninterrupted):
    out = tmp_path / "run"
    log = _Interrupt("finetune epoch 2/4")
    with pytest.raises(KeyboardInterrupt):
        finetune_experiment(modes=["scratch", "finetune"], epochs=4, freeze_epochs=2, out=out, cache_dir=cache,
                            log=log, **FAST)
    assert any(f"--resume {out}" in line for line in log.lines)
    assert (out / "checkpoints" / "scratch" / "result.json").is_file() and not (out / "summary.json").exists()
    # interrupted after epoch 2's CSV row, before its checkpoint: epoch 1 is the last saved
    saved = torch.load(out / "checkpoints" / "finetune" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1
    assert _epochs(out / "metrics_finetune.csv") == [1, 2]
    lines = []
    with installed(FirstStepState) as records:
        s = finetune_experiment(resume=out, cache_dir=cache, log=lines.append, device="cpu", progress=False)
    _restored(records, saved)  # fastai's freeze() in fine_tune clears the optimiser: it must be restored after
    assert "scratch: finished before, kept" in "\n".join(lines)
    assert "finetune: resuming after epoch 1/4 (head-only phase)" in lines
    assert s["resumed"] == {"scratch": 4, "finetune": 1}
    assert not any(line.startswith("scratch epoch") for line in lines)  # nothing of scratch ran again
    for mode in ("scratch", "finetune"):
        assert _epochs(out / f"metrics_{mode}.csv") == [1, 2, 3, 4]
        assert s["modes"][mode]["epochs"] == 4 and s["modes"][mode]["best_epoch"] in (1, 2, 3, 4)
    assert (out / "model.pkl").is_file() and (out / "summary.json").is_file()
    assert torch.load(out / "checkpoints" / "finetune" / "last.pth", weights_only=True)["epoch"] == 4
    _continued(read_curves(out / "metrics_finetune.csv")[1], uninterrupted(2)[1])


class _Schedule(Callback):
    """(trainable parameters, learning rates) at the first batch of every training epoch."""
    order = 70  # after ParamScheduler (60) set the rates

    def __init__(self):
        self.seen = []

    def before_batch(self):
        if self.training and self.iter == 0:
            trainable = sum(p.numel() for p in self.learn.model.parameters() if p.requires_grad)
            self.seen.append((trainable, [round(float(h["lr"]), 12) for h in self.learn.opt.hypers]))


@pytest.mark.parametrize("start", [1, 2, 3])  # inside the head-only phase, at its end, inside the unfrozen phase
def test_resumed_fine_tune_follows_the_uninterrupted_schedule(cache, tmp_path, start):
    dls = image_dls("lfw", size=32, bs=64, aug="none", cache_dir=cache)
    runs = {}
    for begin in (0, start):
        learn = resnet_learner(dls, ARCH, progress=False, log=None, path=tmp_path, csv_path=tmp_path / f"{begin}.csv")
        rec = _Schedule()
        learn.add_cb(rec)
        train_mode(learn, "finetune", epochs=4, lr=1e-3, freeze_epochs=2, start=begin)
        runs[begin] = rec.seen
        assert [r["epoch"] for r in learn.curves.history] == list(range(begin + 1, 5))
    assert len(runs[0]) == 4 and runs[0][0][0] < runs[0][-1][0]  # head only, then everything
    assert runs[start] == runs[0][start:]


def test_sigkill_mid_finetune_then_resume_through_the_script_completes_every_epoch_once(cache, tmp_path, capsys,
                                                                                      uninterrupted):
    out = tmp_path / "run"
    args = ["--arch", ARCH, "--size", "32", "--bs", "32", "--aug", "none", "--device", "cpu", "--cache-dir",
            str(cache)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_then_kill([sys.executable, str(ROOT / "scripts" / "finetune.py"), *args, "--modes", "finetune", "--epochs", "4",
                   "--out", str(out)], "finetune epoch 3/4", timeout=240, env=env)
    last = out / "checkpoints" / "finetune" / "last.pth"
    assert last.is_file() and not (out / "summary.json").exists()
    saved = torch.load(shutil.copy(last, tmp_path / "killed.pth"), weights_only=True)
    with installed(FirstStepState) as records:  # `tp3 finetune --resume` / scripts/finetune.py --resume
        tp3(["finetune", "--resume", str(out), "--device", "cpu", "--cache-dir", str(cache)])
    _restored(records, saved)  # fastai's unfreeze() in fine_tune clears the optimiser: it must be restored after
    stdout = capsys.readouterr().out
    # the kill lands after epoch 3's CSV row, before or after its checkpoint: both in the unfrozen phase
    start = saved["epoch"]
    assert start in (2, 3) and f"finetune: resuming after epoch {start}/4 (unfrozen phase)" in stdout, stdout
    assert _epochs(out / "metrics_finetune.csv") == [1, 2, 3, 4]
    s = json.loads((out / "summary.json").read_text())
    assert set(s["modes"]) == {"finetune"} and s["modes"]["finetune"]["epochs"] == 4
    assert s["resumed"] == {"finetune": start} and (out / "model.pkl").is_file()
    assert torch.load(last, weights_only=True)["epoch"] == 4
    _continued(read_curves(out / "metrics_finetune.csv")[start], uninterrupted(1)[start])


DEPTH_MODES = ["frozen_to:2", "frozen_bn_to:3", "surgical:1", "discriminative:10", "gradual"]


@pytest.mark.parametrize("mode", DEPTH_MODES)
def test_sigkill_mid_run_then_resume_continues_each_depth_mode_where_it_stopped(cache, tmp_path, capsys, mode):
    """The modes of fine-tuning by depth resume like the others: killed after epoch 3's row, resumed through
    `tp3 finetune --resume`, from the checkpoint's weights and optimiser state, with the uninterrupted run's
    weights that train and learning rates at every resumed epoch (gradual: the groups thawed by then)."""
    out, stem = tmp_path / "run", mode.replace(":", "-")
    args = ["--arch", ARCH, "--size", "32", "--bs", "32", "--aug", "none", "--device", "cpu", "--cache-dir",
            str(cache)]
    with installed(EpochSchedule) as schedules:
        full = finetune_experiment(modes=[mode], epochs=4, out=tmp_path / "full", cache_dir=cache, log=lambda s: None,
                                   **FAST)
    want = schedules[0]["epochs"]
    assert [want[e][0] for e in range(4)] == ([want[0][0]] * 4 if mode != "gradual" else sorted(
        want[e][0] for e in range(4)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run_then_kill([sys.executable, str(ROOT / "scripts" / "finetune.py"), *args, "--modes", mode, "--epochs", "4",
                   "--out", str(out)], f"{mode} epoch 3/4", timeout=240, env=env)
    last = out / "checkpoints" / stem / "last.pth"
    assert last.is_file() and not (out / "summary.json").exists()
    saved = torch.load(shutil.copy(last, tmp_path / "killed.pth"), weights_only=True)
    with installed(FirstStepState) as records, installed(EpochSchedule) as resumed:
        tp3(["finetune", "--resume", str(out), "--device", "cpu", "--cache-dir", str(cache)])
    _restored(records, saved)
    start = saved["epoch"]
    assert start in (2, 3) and f"{mode}: resuming after epoch {start}/4" in capsys.readouterr().out
    got = [r for r in resumed if r.get("epochs")][0]["epochs"]
    assert got == {e: want[e] for e in range(start, 4)}  # what trains, at which rates, epoch by epoch
    assert _epochs(out / f"metrics_{stem}.csv") == [1, 2, 3, 4]
    s = json.loads((out / "summary.json").read_text())
    assert list(s["modes"]) == [mode] and s["resumed"] == {mode: start} and (out / "model.pkl").is_file()
    assert s["modes"][mode]["phases"] == full["modes"][mode]["phases"]
    # (no loss tolerance here: the restored state and the schedule are checked exactly above; the first resumed
    # epoch's batch order differs from the uninterrupted run's, which moved frozen_bn_to:3's valid loss by 0.033)


def test_script_resume_of_a_folder_without_config_says_so(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "scripts" / "finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        script.main(resume=str(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "config.json does not exist" in err and "\n" not in err.strip()


@pytest.mark.parametrize("arch, size, minimum", [("inception_v3", 64, "at least 75 px"),
                                                  ("vit_tiny_patch16_224", 64, "224 px only")])
def test_image_size_too_small_for_the_network_is_refused_up_front(arch, size, minimum, tmp_path):
    with pytest.raises(ValueError, match=rf"image size {size} px is too small for {arch}.*{minimum}.*--size"):
        check_image_size(arch, size)
    with pytest.raises(ValueError, match="too small"):
        finetune_experiment(arch=arch, size=size, epochs=2, out=tmp_path / "run", cache_dir=tmp_path)
    assert not (tmp_path / "run").exists()  # nothing made before the refusal


def test_learner_checks_its_body_against_the_image_size(cache, tmp_path):
    dls = image_dls("lfw", size=32, bs=16, aug="none", cache_dir=cache)
    with pytest.raises(ValueError, match="32 px is too small for InceptionV3: its body needs images of at least 75"):
        resnet_learner(dls, "inception_v3", size=32, progress=False, log=None, path=tmp_path)
    resnet_learner(dls, ARCH, size=32, progress=False, log=None, path=tmp_path)


def test_non_positive_size_is_refused_and_resnets_take_any_size(tmp_path):
    for size in (0, -32):
        with pytest.raises(ValueError, match="image size must be a positive number of pixels"):
            finetune_experiment(arch=ARCH, size=size, out=tmp_path / "run", cache_dir=tmp_path)
    check_image_size("resnet18", 8)  # padding keeps a 1x1 feature map: no minimum
