"""The `tp3` command: dispatch, help and errors, and each command's path through its options, on tiny settings
(commands run in this process through `tp3_fastai.cli.main`, the function behind the `tp3` console script)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from tp3_fastai.cli import COMMANDS, main as tp3
from probes import FirstStepState, installed

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _exits(code: int, *argv: str) -> None:
    with pytest.raises(SystemExit) as e:
        tp3(list(argv))
    assert e.value.code == code


# ---------------------------------------------------------------- the entry point
def test_the_console_script_lists_every_command_and_refuses_an_unknown_one():
    exe = Path(sys.executable).parent / "tp3"
    if not exe.is_file():
        pytest.skip("the tp3 console script is not installed (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("usage: tp3 <command> [options]")
    listed = re.findall(r"^  (\S+) ", ok.stdout, flags=re.M)
    assert listed == list(COMMANDS)
    bad = subprocess.run([str(exe), "trian"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown command 'trian'"
    assert bad.stdout.startswith("usage: tp3 <command>")


def test_no_command_prints_the_usage_and_a_command_help_lists_its_options(capsys):
    tp3([])
    assert "`tp3 <command> --help` lists the options." in capsys.readouterr().out
    _exits(0, "mnist", "--help")
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: tp3 mnist") and "--resume" in help_text and "--archs" in help_text
    _exits(2, "mnist", "--epochs", "many")  # argparse: an option of the wrong type
    assert "invalid int value: 'many'" in capsys.readouterr().err


# ---------------------------------------------------------------- predict
@pytest.fixture(scope="module")
def model(cache, tmp_path_factory):
    """A small learner trained here, its predictions on the validation images, and its export."""
    from tp3_fastai.transfer.finetune import export_learner, valid_predictions
    from tp3_fastai.data.images import image_dls
    from tp3_fastai.transfer.learner import resnet_learner

    tmp = tmp_path_factory.mktemp("model")
    dls = image_dls("lfw", size=32, bs=32, aug="none", cache_dir=cache)
    torch.manual_seed(0)
    learn = resnet_learner(dls, "test_resnet", progress=False, log=None, path=tmp)
    learn.fit_one_cycle(3, 3e-3)
    probs, _ = valid_predictions(learn)
    vocab = list(dls.vocab)
    predicted = {str(f): (vocab[int(p.argmax())], float(p.max())) for f, p in zip(dls.valid_ds.items, probs)}
    return export_learner(learn, tmp / "model.pkl"), predicted


def test_predict_classifies_several_images_as_the_trained_learner_did(model, capsys):
    path, predicted = model
    # one image the learner called a face, one it called a non-face, and one more
    first = {label: image for image, (label, _) in reversed(predicted.items())}
    assert set(first) == {"face", "non_face"}, "the learner predicts one class only: pick another seed"
    images = [first["face"], first["non_face"], next(iter(predicted))]
    tp3(["predict", str(path), *images])
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [line[0] for line in lines] == images
    for image, label, prob in lines:
        assert (label, float(prob)) == (predicted[image][0], pytest.approx(predicted[image][1], abs=1e-4))


def test_predict_without_an_image_or_with_a_missing_one_says_so(model, tmp_path, capsys):
    path, _ = model
    _exits(2, "predict", str(path))
    assert capsys.readouterr().err.strip() == "error: give at least one image file after the model file"
    _exits(2, "predict", str(path), str(tmp_path / "missing.png"))
    assert capsys.readouterr().err.strip() == f"error: image file {tmp_path / 'missing.png'} does not exist"
    _exits(2, "predict")  # no model file: argparse says what is missing
    assert "the following arguments are required: model" in capsys.readouterr().err


# ---------------------------------------------------------------- bench-mnist, run, label-efficiency
def test_bench_mnist_prints_and_writes_its_measurements(tmp_path, capsys):
    out = tmp_path / "bench.json"
    tp3(["bench-mnist", "--archs", "mlp", "--epochs", "1", "--repeats", "2", "--bs", "128", "--device", "cpu",
         "--out", str(out)])
    (r,) = json.loads(out.read_text())
    assert (r["arch"], r["bs"], r["train_images"], r["optimizer"]) == ("mlp", 128, 3200, "torch.optim.Adam")
    f, p = r["fastai_epoch_s"], r["plain_epoch_s"]
    assert f["n"] == p["n"] == 2 and r["ratio"] == pytest.approx(f["median"] / p["median"])  # 1 epoch x 2 repeats
    # the same work: both loops learn alike (the second repeat's batch orders differ)
    acc = r["final_valid_accuracy"]
    assert acc["fastai"] > 0.8 and acc["plain"] > 0.8 and acc["fastai"] == pytest.approx(acc["plain"], abs=0.03)
    assert f"ratio {r['ratio']:.3f}x" in capsys.readouterr().out


def test_run_writes_the_report_of_the_parts_asked_for(mnist_folder, tmp_path, capsys):
    out = tmp_path / "report"  # Part I alone, on a folder of 240 real digits (conftest)
    tp3(["run", "--parts", "mnist", "--mnist", str(mnist_folder), "--mnist-epochs", "1", "--device", "cpu",
         "--out", str(out)])
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    part1 = json.loads((out / "part1_mnist" / "summary.json").read_text())
    assert [m["epochs"] for m in part1["models"]] == [1, 1] and part1["split_sizes"]["test"] == 120
    for m in part1["models"]:
        assert re.search(rf"\| {m['model']} \| {m['params']:,} \| 1 \|.*\| {m['test_accuracy']:.4g} \|\n", md)
    assert "## Part II" not in md and "## Part III" not in md and (out / "report.html").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["part1_mnist"]


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "--weights", "w.pth"], "give either --pretrained (hub weights) or --weights PATH"),
    (["--ks", "5,ten"], "ks must be comma-separated integers, got '5,ten'"),
    (["--seeds", "0;1"], "seeds must be comma-separated integers, got '0;1'"),
])
def test_run_refuses_bad_arguments_before_any_work(args, message, tmp_path, capsys):
    _exits(2, "run", *args, "--out", str(tmp_path / "r"))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_label_efficiency_takes_its_options(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "body.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=0, in_chans=1).state_dict(), str(weights))
    out = tmp_path / "le"
    tp3(["label-efficiency", "--ks", "2", "--seeds", "0", "--modes", "scratch,finetune", "--arch", "test_resnet",
         "--epochs", "2", "--bs", "4", "--lr", "0.004", "--lr-mult", "4", "--no-recalibrate", "--weights",
         str(weights), "--curves-k", "2", "--device", "cpu", "--out", str(out)])
    assert f"run folder: {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["ks"], config["seeds"], config["modes"]) == ([2], [0], ["scratch", "finetune"])
    assert config["lr_mult"] == 4 and config["recalibrate"] is False and config["weights"] == str(weights)
    assert (config["arch"], config["epochs"], config["bs"], config["lr"]) == ("test_resnet", 2, 4, 0.004)
    # k = 2 labelled digits of each of the 5 target classes, in batches of 4, 4 and 2: 3 steps per epoch, 2 epochs
    with open(out / "runs.csv", newline="") as f:
        assert [(r["mode"], r["k"], r["seed"], r["n_train"], r["steps"]) for r in csv.DictReader(f)] == [
            ("scratch", "2", "0", "10", "6"), ("finetune", "2", "0", "10", "6")]
    summary = json.loads((out / "summary.json").read_text())
    scratch, finetune = summary["runs"]
    assert scratch["weights"] == "random init" and finetune["weights"].startswith(f"file: {weights.resolve()}")
    assert finetune["phases"][0]["lr"] == "0.004"  # --lr: the head-only phase
    assert finetune["phases"][1]["lr"] == "slice(0.0005, 0.002)"  # then lr / 2, body lr = head lr / 4
    assert scratch["recalibrated_bn_layers"] == finetune["recalibrated_bn_layers"] == 0
    md = (out / "label_efficiency.md").read_text()
    assert "fine_tune(lr_mult=4)" in md and "as training left them" in md
    # --curves-k 2: every mode's curves at k = 2 (first seed) and the fine-tuned body's test predictions
    assert {"curves_scratch.csv", "curves_finetune.csv", "comparison.png", "predictions.png"} <= {
        p.name for p in out.iterdir()}
    assert len((out / "curves_finetune.csv").read_text().splitlines()) == 1 + 2  # --epochs 2


# ---------------------------------------------------------------- rf, overwrite, finetune --memory-format
def test_rf_exits_1_when_a_field_disagrees_with_its_measurement(tmp_path, monkeypatch, capsys):
    from tp3_fastai.receptive_field import run as rf_run

    tp3(["rf", "--arch", "cnn", "--layers", "pool1,pool2", "--verify", "--out", str(tmp_path / "ok")])
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["all_agree"] is True

    measure = rf_run.measure_receptive_field

    def wrong_for_pool2(model, name, shape):  # as if the analytic trace had pool2's field wrong
        m = measure(model, name, shape)
        return dataclasses.replace(m, R=(15, 15), agrees=False) if name == "pool2" else m

    monkeypatch.setattr(rf_run, "measure_receptive_field", wrong_for_pool2)
    capsys.readouterr()
    _exits(1, "rf", "--arch", "cnn", "--layers", "pool1,pool2", "--verify", "--out", str(tmp_path / "bad"))
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["all_agree"] is False and [m["agrees"] for m in summary["measurements"]] == [True, False]
    assert "measured pool2: R 15x15 (analytic 16x16)" in capsys.readouterr().out


def test_overwrite_replaces_the_run_folder_instead_of_making_a_new_one(tmp_path):
    out = tmp_path / "rf"
    tp3(["rf", "--arch", "cnn", "--out", str(out)])
    (out / "stale.txt").write_text("from an earlier run")
    tp3(["rf", "--arch", "cnn", "--out", str(out)])
    assert (out / "stale.txt").is_file() and (tmp_path / "rf-2" / "summary.json").is_file()
    tp3(["rf", "--arch", "cnn", "--out", str(out), "--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rf", "rf-2"]


def test_finetune_memory_format_channels_last_trains_in_that_memory_format(cache, tmp_path):
    out = tmp_path / "run"
    with installed(FirstStepState) as records:
        tp3(["finetune", "--arch", "test_resnet", "--size", "32", "--bs", "32", "--epochs", "1", "--modes", "scratch",
             "--aug", "none", "--memory-format", "channels_last", "--device", "cpu", "--cache-dir", str(cache), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert config["channels_last"] is True and summary["channels_last"] is True
    # the convolutions' weights at the first training step (fastai's load_learner makes model.pkl contiguous again)
    (trained,) = [r for r in records if r]
    kernels = [w for w in trained["model"].values() if w.dim() == 4 and w.shape[2:] != (1, 1)]
    assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in kernels)


# ---------------------------------------------------------------- options and names: refused, never guessed

@pytest.mark.parametrize("argv, message", [
    (["finetune", "--epoch", "1"], "unknown option '--epoch'. Did you mean: --epochs? `tp3 finetune --help` lists them."),
    (["mnist", "--arch", "cnn"], "unknown option '--arch'. Did you mean: --archs?"),
    (["finetune", "--mode", "scratch", "--bogus=3"], "unknown options '--mode' (did you mean: --modes?), '--bogus'."),
])
def test_an_abbreviated_or_unknown_flag_is_refused_with_the_close_names(argv, message, tmp_path, capsys):
    _exits(2, *argv, "--out", str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert f"tp3 {argv[0]}: error: {message}" in err
    assert not (tmp_path / "r").exists()


def test_the_scripts_parse_as_tp3_does(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--epoch", "1", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 2 and "finetune.py: error: unknown option '--epoch'. Did you mean: --epochs?" in p.stderr
    assert not (tmp_path / "r").exists()


def test_an_architecture_typo_names_close_names_only(tmp_path, capsys):
    _exits(2, "finetune", "--arch", "resnet-50", "--out", str(tmp_path / "r"))
    err = capsys.readouterr().err.strip()
    close = re.search(r"Did you mean: (.*)\?", err).group(1).split(", ")
    assert close[0] == "resnet50" and all(c.startswith("resnet5") for c in close), err
    assert "Known:" not in err and "timm.list_models('resnet*')" in err and "\n" not in err


def test_every_unknown_name_of_a_comma_list_is_refused_at_once(tmp_path, capsys):
    _exits(2, "finetune", "--modes", "scratch,scrach,frozn", "--out", str(tmp_path / "r"))
    assert capsys.readouterr().err.strip() == (
        "error: unknown training modes 'scrach' (did you mean: scratch?), 'frozn' (did you mean: frozen, frozen_bn, "
        "frozen_to:K?). Known: scratch, finetune, frozen, frozen_bn, gradual, frozen_to:K, frozen_bn_to:K, surgical:K, "
        "discriminative:R.")
    _exits(2, "mnist", "--archs", "cnn,mpl", "--out", str(tmp_path / "r"))
    assert "unknown MNIST architecture 'mpl'. Did you mean: mlp?" in capsys.readouterr().err
    _exits(2, "bench-mnist", "--archs", "mlp,cnm", "--out", str(tmp_path / "b.json"))  # before mlp is timed
    out, err = capsys.readouterr()
    assert "unknown MNIST architecture 'cnm'. Did you mean: cnn?" in err and "ratio" not in out
    assert not (tmp_path / "r").exists()


def test_rf_refuses_a_mixed_layers_list_naming_the_unknown_one(tmp_path, capsys):
    _exits(2, "rf", "--arch", "timm:resnet18", "--input-shape", "1,3,64,64", "--layers", "max_pool,layer1.0",
           "--out", str(tmp_path / "r"))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown node or module name 'max_pool'. Did you mean: maxpool") and "\n" not in err
    _exits(2, "rf", "--arch", "cnn", "--layers", "pool1,conv?,poool2,fc9", "--out", str(tmp_path / "r"))
    assert "unknown node or module names 'poool2' (did you mean: pool2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_python_session_starts_without_fastais_torch_jit_warning():
    code = "import warnings; import tp3_fastai.transfer.learner; warnings.warn('still shown', FutureWarning)"
    p = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and "torch.jit.script" not in p.stderr
    assert "FutureWarning: still shown" in p.stderr  # only that one warning is silenced


def test_an_error_reaches_the_terminal_as_plain_text(capsys):
    from tp3_fastai.cli import run_guarded

    def fails():
        raise ValueError("weights_only load failed: \x1b[1mdo those steps only if you trust it\x1b[0m. Save it")

    with pytest.raises(SystemExit) as e:
        run_guarded(fails)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: weights_only load failed: do those steps only if you trust it. Save it\n"
