"""The training-mode benchmark: timing helpers, the modes' trainable parameters, the package's lean fastai loop
against fastai's stock loop, and a --quick smoke run of scripts/bench_freeze.py on the CPU checking the outputs'
structure and consistency."""
from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from fastai import learner as fastai_learner
from fastai.data.core import DataLoaders
from torch import nn

from tp3_fastai.bench import (BENCH_MODES, LOOPS, BatchLoader, HostReadCounter, LearnerLoop, PlainLoop,
                              lever_skip_reason, mode_learner, resolve_config, spread,
                              synthetic_batches, trainable_names)
from tp3_fastai.cli import main as tp3
from tp3_fastai.transfer.features import feature_split
from tp3_fastai.train.loop import LeanRecorder, Learner
from figures import assert_series

ROOT = Path(__file__).resolve().parents[1]
ARCH = "resnet18"
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def syn():
    batches = synthetic_batches(2, 4, 32, 2, CPU, seed=0)
    dls = DataLoaders(BatchLoader(batches, 1), BatchLoader([], 0), device=CPU)
    dls.c = 2
    return dls, batches


def _bn_param_names(model: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}{m}.{p}" for m, mod in model.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) for p, _ in mod.named_parameters(recurse=False)}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_modes_train_exactly_the_expected_parameters(syn):
    dls, batches = syn
    learners = {m: mode_learner(dls, ARCH, m, seed=0) for m in BENCH_MODES}
    model = learners["unfrozen"].model
    every = {n for n, _ in model.named_parameters()}
    head = {f"1.{n}" for n, _ in model[1].named_parameters()}
    body_bn = _bn_param_names(model[0], "0.")
    assert trainable_names(learners["unfrozen"].model) == every
    assert trainable_names(learners["frozen_bn"].model) == head | body_bn  # fastai's default freeze()
    assert trainable_names(learners["frozen"].model) == head  # BatchNorm frozen too: exactly the head
    # precomputed trains, on cached features, the very parameter tensors of its learner that would train: the head
    pre = learners["precomputed"].model
    _, cached_head = feature_split(pre)
    assert {id(p) for p in cached_head.parameters()} == {id(p) for p in pre.parameters() if p.requires_grad} \
        == {id(p) for p in pre[1].parameters()}
    # same seed: every mode starts from the same weights
    for m in BENCH_MODES:
        for (n, a), b in zip(model.state_dict().items(), learners[m].model.state_dict().values()):
            assert torch.equal(a, b), (m, n)

    # a frozen step (BatchNorm frozen too) moves the head only: body weights and BatchNorm statistics stay
    frozen = learners["frozen"].model
    body_before = copy.deepcopy(frozen[0].state_dict())
    head_before = copy.deepcopy(frozen[1].state_dict())
    PlainLoop(frozen, CPU, lr=1e-2, bn_eval=True).run(BatchLoader(batches, 3), 1, 1, 2)
    assert all(torch.equal(v, body_before[k]) for k, v in frozen[0].state_dict().items())
    assert any(not torch.equal(v, head_before[k]) for k, v in frozen[1].state_dict().items())


def test_timing_helpers_and_levers_on_cpu(syn):
    dls, batches = syn
    s = spread([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert lever_skip_reason(CPU, "fp32", None) is None
    assert lever_skip_reason(CPU, "fp16", None) == lever_skip_reason(CPU, "bf16", None) == "skipped: needs CUDA"
    assert lever_skip_reason(CPU, "fp32", True) == "skipped: needs CUDA"  # cudnn.benchmark
    with pytest.raises(ValueError, match="precision"):
        lever_skip_reason(CPU, "fp8", None)
    assert resolve_config(quick=True)["arch"] == "resnet18" and resolve_config()["arch"] == "resnet50"
    assert resolve_config(quick=True, bs=4)["bs"] == 4
    with pytest.raises(ValueError, match="positive"):
        resolve_config(steps=0)

    # each loop times groups of `steps` steps after `warmup` untimed ones: with batches that take DELAY s to come,
    # a group takes at least steps * DELAY, and warm-up plus groups fit in the wall time of the run
    loop = PlainLoop(mode_learner(dls, ARCH, "frozen", 0).model, CPU, bn_eval=True)
    _timed_groups(loop, batches, warmup=1, steps=2, groups=3)
    with pytest.raises(ValueError, match="fewer"):
        loop.run(BatchLoader(batches, 2), warmup=1, steps=2, groups=1)
    _timed_groups(LearnerLoop(mode_learner(dls, ARCH, "frozen", 0), CPU), batches, warmup=1, steps=2, groups=2)


DELAY = 0.05


class _SlowLoader(BatchLoader):
    """A BatchLoader whose every batch arrives DELAY seconds late; counts the batches it handed out."""

    def __iter__(self):
        self.given = 0
        for b in super().__iter__():
            time.sleep(DELAY)
            self.given += 1
            yield b


def _timed_groups(loop, batches, warmup: int, steps: int, groups: int) -> None:
    loader = _SlowLoader(batches, warmup + steps * groups)
    start = time.perf_counter()
    times = loop.run(loader, warmup=warmup, steps=steps, groups=groups)
    wall = time.perf_counter() - start
    assert loader.given == warmup + steps * groups and len(times) == groups
    assert all(t >= steps * DELAY for t in times) and loop.warmup_s >= warmup * DELAY
    assert loop.warmup_s + sum(times) <= wall


def test_package_loop_trains_like_fastais_stock_loop_and_reads_the_host_less(syn):
    """The package's lean loop (on by default) removes per-batch costs, not maths: the same weights, smoothed losses
    and scheduled hyper-parameters as fastai's stock loop after the same steps; and fastai's per-batch read-back of
    the smoothed loss (`.cpu()` every batch, a GPU sync) is gone."""
    dls, batches = syn
    package = mode_learner(dls, ARCH, "frozen", 0)
    stock = mode_learner(dls, ARCH, "frozen", 0, stock=True)
    assert type(package) is Learner and type(stock) is fastai_learner.Learner
    for learn in (package, stock):
        torch.manual_seed(0)
        LearnerLoop(learn, CPU).run(BatchLoader(batches, 4), 1, 3, 1)
    for (n, a), b in zip(stock.model.state_dict().items(), package.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert len(package.recorder.losses) == 4 and all(t.device.type == "cpu" for t in package.recorder.losses)
    assert torch.equal(torch.stack(stock.recorder.losses), torch.stack(package.recorder.losses))
    assert package.recorder.hps == stock.recorder.hps and len(package.recorder.hps["mom"]) == 4

    def reads(loop):
        counts = []
        for steps in (1, 2):
            with HostReadCounter(CPU) as c:
                loop.run(BatchLoader(batches, 1 + steps), 1, steps, 1)
            counts.append(c.total)
        return counts[1] - counts[0]

    assert reads(PlainLoop(copy.deepcopy(package.model), CPU, bn_eval=True)) == 0
    assert reads(LearnerLoop(stock, CPU)) >= 1  # AvgSmoothLoss: to_detach(..., cpu=True) every batch
    assert reads(LearnerLoop(package, CPU)) == 0


def test_package_learner_still_exports_and_predicts(tmp_path):
    """Every resnet_learner is the package's Learner with the lean loop's callbacks: export and predict must keep
    working."""
    from tp3_fastai.transfer.finetune import export_learner, predict, valid_predictions
    from tp3_fastai.data.images import image_dls
    from tp3_fastai.transfer.learner import resnet_learner

    dls = image_dls("lfw", size=32, bs=16, aug="default", cache_dir=tmp_path / "cache")
    learn = resnet_learner(dls, ARCH, progress=False, log=None, path=tmp_path)
    assert type(learn) is Learner and type(learn.recorder) is LeanRecorder
    learn.fit_one_cycle(1, 1e-3)
    assert len(learn.recorder.losses) == len(dls.train) and learn.recorder.losses[0].device.type == "cpu"
    probs, targs = valid_predictions(learn)
    assert probs.shape == (50, 2) and torch.allclose(probs.sum(1), torch.ones(50))
    model = export_learner(learn, tmp_path / "model.pkl")
    # the exported model gives every validation image the class and probability the tuned learner gave it
    vocab = list(dls.vocab)
    for image, p in zip(dls.valid_ds.items, probs):
        label, prob = predict(model, image)
        assert (label, prob) == (vocab[int(p.argmax())], pytest.approx(float(p.max()), abs=1e-4)), image


def test_quick_smoke_run_writes_consistent_outputs(tmp_path):
    """--quick through the script's command function, shrunk further by its arguments to stay short on 2 cores."""
    bench_freeze = _script("bench_freeze").bench_freeze
    out = tmp_path / "bench"
    threads_before = torch.get_num_threads()
    r = bench_freeze(quick=True, size=32, bs=4, steps=1, repeats=2, warmup=1, jpeg_images=40, epoch_images=100,
                     overhead_modes="frozen,precomputed", pipeline_modes="frozen", device="cpu", out=str(out),
                     cache_dir=str(tmp_path / "cache"), threads=1)  # one thread: robust on a shared CPU
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.md", "bench.png", "config.json"}
    saved = json.loads((out / "bench.json").read_text())
    assert saved["grid"] == json.loads(json.dumps(r["grid"]))
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["size"] == 32 and config["quick"] is True
    assert config["env"]["torch_threads"] == 1 and torch.get_num_threads() == threads_before
    for key in ("torch", "fastai", "timm", "device_name", "torch_threads"):
        assert config["env"][key]
    assert len(config["load_average_start"]) == 3

    grid = r["grid"]
    assert grid[0]["baseline"] and (grid[0]["mode"], grid[0]["precision"]) == ("unfrozen", "fp32")
    assert len(grid) == 4 * 3 * 2  # modes x precisions x formats, cudnn.benchmark n/a on CPU
    ok = [g for g in grid if g["status"] == "ok"]
    assert {(g["mode"], g["memory_format"]) for g in ok} == {(m, f) for m in BENCH_MODES
                                                             for f in ("contiguous", "channels_last")}
    assert all(g["precision"] == "fp32" for g in ok)
    assert all(g["status"] == "skipped: needs CUDA" for g in grid if g["precision"] != "fp32")
    for g in ok:
        ms = g["step_ms"]
        assert 0 < ms["min"] <= ms["median"] <= ms["max"] and ms["n"] == 2
        assert g["images_per_s"] == pytest.approx(4 / (ms["median"] / 1000))
        assert g["speedup_vs_baseline"] == pytest.approx(g["images_per_s"] / grid[0]["images_per_s"])
        assert g["epoch_s"] == pytest.approx(100 / g["images_per_s"]) and g["peak_memory_mb"] is None
        assert 0 < g["trainable_params"] <= g["total_params"]
    assert grid[0]["speedup_vs_baseline"] == 1.0
    by_mode = {g["mode"]: g for g in ok if g["memory_format"] == "contiguous"}
    params = {m: by_mode[m]["trainable_params"] for m in BENCH_MODES}
    assert params["unfrozen"] > params["frozen_bn"] > params["frozen"] == params["precomputed"]
    pre = by_mode["precomputed"]
    assert pre["cache_images_per_s"] > 0 and pre["cache_s"] == pytest.approx(100 / pre["cache_images_per_s"])
    assert pre["estimate_s"] == pytest.approx(pre["cache_s"] + 5 * pre["epoch_s"])
    assert "n/a on CPU" in r["memory_note"]

    over = r["overhead"]
    assert {(o["mode"], o["loop"]) for o in over} == {(m, l) for m in ("frozen", "precomputed") for l in LOOPS}
    for o in over:
        assert o["images_per_s"] > 0 and o["ratio_vs_plain"] > 0
        if o["loop"] == "plain":
            assert o["ratio_vs_plain"] == 1.0 and o["host_reads_per_step"] == 0
    assert all(o["host_reads_per_step"] == 0 for o in over if o["loop"] == "package")
    assert all(o["host_reads_per_step"] >= 1 for o in over if o["loop"] == "stock")

    pipe = r["pipeline"]
    assert pipe["loader"]["images_per_s"] > 0 and pipe["loader"]["workers"] == 0
    assert {(p["loop"], p["data"]) for p in pipe["rows"]} == {(lp, data) for lp in ("plain", "package", "stock")
                                                              for data in ("synthetic", "real")} | {
        ("loader alone", "real")}
    assert all(p["images_per_s"] > 0 for p in pipe["rows"])
    assert all(p["reads_per_step"] == p["blocking_copies_per_step"] == 0 for p in pipe["rows"]
               if p["loop"] == "package" and p["data"] == "real")

    md = (out / "bench.md").read_text()
    for text in ("| mode | precision | format |", "skipped: needs CUDA", "(baseline)", "x plain step time",
                 "Loader alone", "load average"):
        assert text in md
    # every measured cell is a row of the table with its own numbers; the skipped ones say why
    rows = [line for line in md.splitlines() if line.startswith("| ") and " | off | n/a | " in line]
    assert len(rows) == len(grid)
    for g, line in zip(grid, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [g["mode"] + (" (baseline)" if g.get("baseline") else ""), g["precision"],
                             g["memory_format"]]
        if g["status"] == "ok":
            assert cells[5:9] == [f"{g['images_per_s']:.4g}", f"{g['step_ms']['median']:.4g} "
                                  f"[{g['step_ms']['min']:.4g}-{g['step_ms']['max']:.4g}]", "n/a",
                                  f"{g['speedup_vs_baseline']:.3g}"]
        else:
            assert cells[5] == g["status"]
    loops = md.split("## fastai Learner vs plain PyTorch loop")[1].split("##")[0].splitlines()
    for o in over:
        prefix = f"| {o['mode']} | {o['loop']}{'' if o['same_optimizer'] else ' (other optimiser)'} | "
        (line,) = [line for line in loops if line.startswith(prefix)]
        assert f"| {o['images_per_s']:.4g} | {o['ratio_vs_plain']:.3f} |" in line
    assert_series(out / "bench.png", len(BENCH_MODES), min_pixels=200)  # a bar colour per mode


def test_mnist_loop_benchmark_keeps_its_result():
    from tp3_fastai.bench import bench_mnist_loop

    lines = []
    r = bench_mnist_loop(arch="mlp", epochs=1, repeats=1, device="cpu", log=lines.append)
    assert r["optimizer"] == "torch.optim.Adam" and (r["train_images"], r["valid_images"]) == (3200, 800)
    assert r["fastai_epoch_s"]["n"] == r["plain_epoch_s"]["n"] == 1
    # the ratio compares the same work: both loops learnt alike in their 2 epochs (measured, seeds 42, 0, 1: the
    # same valid accuracy to 4 digits in both loops, 0.889, 0.885, 0.873)
    acc = r["final_valid_accuracy"]
    assert acc["fastai"] > 0.8 and acc["plain"] > 0.8 and acc["fastai"] == pytest.approx(acc["plain"], abs=0.005)
    assert f"ratio {r['ratio']:.3f}x" in lines[0] and f"{acc['plain']:.4f}" in lines[0]


def test_script_help_and_errors(tmp_path, capsys):
    from fastcore.script import anno_parser

    help_text = anno_parser(_script("bench_freeze").bench_freeze).format_help()
    for flag in ("--quick", "--compile", "--arch", "--precisions", "--formats", "--cudnn-benchmark", "--threads"):
        assert flag in help_text
    with pytest.raises(SystemExit) as bad:  # the script's command function, in this process
        tp3(["bench", "--modes", "frozn", "--quick", "--device", "cpu", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert bad.value.code == 2 and err.startswith("error: unknown training mode 'frozn'")
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
