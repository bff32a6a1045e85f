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


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


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
    # the finished mode keeps its best epoch's weights alone; the interrupted one what resume needs besides
    assert _files(out / "checkpoints" / "scratch") == ["best.pth", "result.json"]
    assert _files(out / "checkpoints" / "finetune") == ["best.pth", "last.pth"]
    # interrupted after epoch 2's CSV row, before its checkpoint: epoch 1 is the last saved
    saved = torch.load(out / "checkpoints" / "finetune" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["opt"]["state"]
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
    for mode in ("scratch", "finetune"):  # done: the optimiser state is gone, the best epoch's weights stay
        assert _files(out / "checkpoints" / mode) == ["best.pth", "result.json"]
        best = torch.load(out / "checkpoints" / mode / "best.pth", weights_only=True)
        assert best["opt"] is None and best["epoch"] == s["modes"][mode]["best_epoch"]
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
    assert not last.exists()  # done: resume's file is removed, the best epoch's weights stay
    assert torch.load(last.with_name("best.pth"), weights_only=True)["epoch"] == s["modes"]["finetune"]["best_epoch"]
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


# ---------------------------------------------------------------- what a finished run keeps, and what it exports

@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """Three modes, 3 epochs each (default augmentation): the run folder, its summary and its log. Measured here
    (seed 42): scratch peaks at epoch 1 (valid accuracy 0.88, final 0.62), finetune at epoch 1, frozen at 3."""
    lines: list[str] = []
    s = finetune_experiment(modes=["scratch", "finetune", "frozen"], epochs=3, cache_dir=cache,
                            out=tmp_path_factory.mktemp("finished") / "r", log=lines.append,
                            **dict(FAST, aug="default"))
    return Path(s["run_dir"]), s, lines


def _weights_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def test_a_finished_run_keeps_each_modes_best_weights_without_optimiser_state(finished):
    from tp3_fastai.core.runs import folder_size, human_bytes

    run, s, lines = finished
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["finetune", "frozen", "scratch"]
    for mode in ("scratch", "finetune", "frozen"):
        assert _files(checkpoints / mode) == ["best.pth", "result.json"]  # no last.pth, no temporary file
        best = torch.load(checkpoints / mode / "best.pth", weights_only=True)
        assert best["opt"] is None and best["epoch"] == s["modes"][mode]["best_epoch"]
        size, weights = (checkpoints / mode / "best.pth").stat().st_size, _weights_bytes(best["model"])
        assert weights <= size <= 1.05 * weights + 64 * 1024, (size, weights)  # the weights and little else
    said = next(one for line in lines for one in line.splitlines() if one.startswith("run folder:"))
    assert said == (f"run folder: {run} ({human_bytes(folder_size(run))}; checkpoints "
                    f"{human_bytes(folder_size(checkpoints))}, best epoch's weights per mode)")


def test_the_export_is_the_best_epoch_of_the_mode_whose_best_epoch_is_best(finished):
    from tp3_fastai.transfer.finetune import EXPORT_RULE, load_model

    run, s, lines = finished
    modes = s["modes"]
    want = max(modes, key=lambda m: (modes[m]["best_valid_accuracy"], -modes[m]["best_valid_loss"]))
    best = modes[want]
    assert s["best_mode"] == want and s["best_epoch"] == best["best_epoch"] and s["exported"] == EXPORT_RULE
    # the case the rule is about: the exported epoch is not the mode's last one, nor the best final accuracy's mode
    assert best["best_epoch"] < 3 and best["final_valid_accuracy"] < best["best_valid_accuracy"]
    # model.pkl holds exactly that epoch's weights, and its validation accuracy is the one in the table
    exported = load_model(run / "model.pkl").model.state_dict()
    saved = torch.load(run / "checkpoints" / want / "best.pth", weights_only=True)["model"]
    assert_same_state(exported, saved, "model.pkl")
    matrix = torch.tensor(s["confusion_matrix"]["matrix"])
    assert s["confusion_matrix"]["mode"] == want
    assert float(matrix.trace() / matrix.sum()) == pytest.approx(best["best_valid_accuracy"], abs=1e-6)
    # said in the log, the table (exported column) and summary.md
    rule = f"exported: {want}, epoch {best['best_epoch']} of 3"
    assert any(one.startswith(rule) and EXPORT_RULE in one for line in lines for one in line.splitlines())
    md = (run / "summary.md").read_text()
    assert "| exported |" in md and f"| model.pkl (epoch {best['best_epoch']}) |" in md and rule in md
    assert md.count("model.pkl (epoch") == 1


def test_no_checkpoints_writes_none_exports_the_same_model_and_cannot_resume(finished, cache, tmp_path, capsys):
    from tp3_fastai.transfer.finetune import load_model

    run, s, _ = finished
    out = tmp_path / "r"
    tp3(["finetune", "--arch", ARCH, "--size", "32", "--bs", "32", "--epochs", "3", "--device", "cpu",
         "--cache-dir", str(cache), "--out", str(out), "--no-checkpoints"])
    assert not (out / "checkpoints").exists() and (out / "model.pkl").is_file()
    assert "no checkpoints)" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert again["best_mode"] == s["best_mode"] and again["best_epoch"] == s["best_epoch"]
    assert_same_state(load_model(out / "model.pkl").model.state_dict(),
                      load_model(run / "model.pkl").model.state_dict(), "model.pkl")  # kept in memory instead
    with pytest.raises(SystemExit) as e:
        tp3(["finetune", "--resume", str(out)])
    assert e.value.code == 2 and "without checkpoints (--no-checkpoints)" in capsys.readouterr().err


def test_a_kill_between_last_and_best_leaves_best_pth_right_after_resume(tmp_path):
    from tp3_fastai.train.checkpoint import atomic_torch_save, settle_best

    folder = tmp_path / "ck"
    atomic_torch_save({"model": {"w": torch.ones(2)}, "opt": None, "epoch": 1, "metric": 0.5}, folder / "best.pth")
    atomic_torch_save({"model": {"w": torch.full((2,), 3.0)}, "opt": {"state": {}}, "epoch": 3, "metric": 0.9},
                      folder / "last.pth")
    assert not settle_best(folder, start=3, best_epoch=1)  # epoch 3 was no improvement: best.pth is right
    assert settle_best(folder, start=3, best_epoch=3)  # it was, and the kill came before best.pth was written
    best = torch.load(folder / "best.pth", weights_only=True)
    assert best["epoch"] == 3 and best["opt"] is None and torch.equal(best["model"]["w"], torch.full((2,), 3.0))
    assert not settle_best(folder, start=3, best_epoch=3)  # once


def test_the_learner_reads_the_image_size_from_the_dataloaders_and_refuses_it_before_training(cache, tmp_path):
    import random

    import numpy as np

    from tp3_fastai.transfer.learner import input_size

    for pipeline in ("pil", "cached"):
        dls = image_dls("lfw", size=32, bs=16, cache_dir=cache, pipeline=pipeline)
        states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
        assert input_size(dls) == 32
        after = random.getstate(), np.random.get_state()[1], torch.get_rng_state()
        assert states[0] == after[0] and (states[1] == after[1]).all() and torch.equal(states[2], after[2])
        with pytest.raises(ValueError, match="32 px is too small for InceptionV3: its body needs images of at least "
                                             "75 px.*Pass size=75"):
            resnet_learner(dls, "inception_v3", progress=False, log=None, path=tmp_path)  # no size= given
    resnet_learner(dls, ARCH, progress=False, log=None, path=tmp_path)  # a ResNet takes 32 px
