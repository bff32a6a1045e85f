"""The fastai contract: every kind of Learner the package builds keeps fastai's idioms working after a short fit
(predict, test_dl + get_preds on new items, get_preds with_loss, validate, tta, ClassificationInterpretation,
summary, lr_find, show_batch, show_results, export -> load_learner in a fresh process -> predict), and the
callbacks the package adds (learning curves, checkpoints, BatchNorm recalibration) stay silent in all of them.

A new learner or input pipeline joins by adding a factory to FACTORIES: it builds the learner (untrained, or
trained by the package's own function) and the new items a user would predict on.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from fastai.interpret import ClassificationInterpretation  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from PIL import Image  # noqa: E402

from tp3_fastai.train.checkpoint import CheckpointCallback  # noqa: E402
from tp3_fastai.data.mnist import mnist_dls  # noqa: E402
from tp3_fastai.transfer.features import train_head_on_features  # noqa: E402
from tp3_fastai.data.images import image_dls  # noqa: E402
from tp3_fastai.transfer.label_efficiency import RecalibrateBN, target_run  # noqa: E402
from tp3_fastai.mnist.learner import mnist_learner  # noqa: E402
from tp3_fastai.data.tasks import mnist_tasks  # noqa: E402
from tp3_fastai.transfer.learner import resnet_learner, set_mode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_ITEMS = 4  # new items per learner


@dataclass
class Case:
    """A learner the package builds, and what the contract needs to know about it."""
    learn: Learner
    items: list[Any]  # new unlabelled inputs as a user holds them, the raw form of validation items 0..N_ITEMS-1
    layers: tuple[str, ...]  # layer types that summary() must name
    lr: float = 2e-3
    images: bool = True  # inputs are images: show_batch / show_results draw them
    augments: bool = False  # its training transforms are random (tta then differs from plain predictions)
    snapshot: dict[str, Any] = field(default_factory=dict)  # curves and checkpoints right after the fit


def _png(image: torch.Tensor, path: Path) -> Path:
    """Save a uint8 1 x H x W (or H x W) tensor as a grayscale PNG: a file a user would bring."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.reshape(image.shape[-2:]).numpy().astype(np.uint8)).save(path)  # 2-D uint8: mode L
    return path


def mnist_case(folder: Path) -> Case:
    dls, _ = mnist_dls("sample", bs=64)
    items = [_png(dls.splits.x_valid[i], folder / "new" / f"digit_{i}.png") for i in range(N_ITEMS)]
    learn = mnist_learner(dls, "cnn", lr=3e-3, csv_path=folder / "metrics.csv", progress=False, path=folder)
    return Case(learn, items, layers=("Conv2d", "MaxPool2d", "Linear", "Dropout"), lr=3e-3)


def image_folder_case(folder: Path, pipeline: str = "auto") -> Case:
    # with its default augmentation; 'auto' keeps LFW decoded in memory (the 'cached' pipeline)
    dls = image_dls("lfw", size=32, bs=16, cache_dir=folder / "cache", pipeline=pipeline)
    assert dls.info.pipeline == ("cached" if pipeline == "auto" else pipeline)
    items = []
    for i, f in enumerate(dls.valid_ds.items[:N_ITEMS]):  # out of their class folders: unlabelled
        items.append(folder / "new" / f"image_{i}.png")
        items[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, items[-1])
    learn = resnet_learner(dls, "resnet10t", csv_path=folder / "metrics.csv", progress=False, path=folder)
    return Case(learn, items, layers=("Conv2d", "BatchNorm2d", "Linear"), augments=True)


def depth_mode_case(folder: Path, mode: str = "gradual") -> Case:
    """A learner by stage groups in a mode of fine-tuning by depth: gradual carries BnFreeze and the package's
    GradualUnfreezing among its callbacks (exported with them), and trains the head alone in its first epoch."""
    dls = image_dls("lfw", size=32, bs=16, aug="none", cache_dir=folder / "cache")
    items = []
    for i, f in enumerate(dls.valid_ds.items[:N_ITEMS]):
        items.append(folder / "new" / f"image_{i}.png")
        items[-1].parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, items[-1])
    learn = resnet_learner(dls, "resnet10t", csv_path=folder / "metrics.csv", progress=False, path=folder)
    set_mode(learn, mode)
    assert len(learn.opt.param_lists) == 6  # stem, layer1..layer4, head
    return Case(learn, items, layers=("Conv2d", "BatchNorm2d", "Linear"))


def label_efficiency_case(folder: Path) -> Case:
    _, target = mnist_tasks(target_test_pct=0.2, valid_pct=0.05)  # 500 test digits: target_run scores them
    learn, _ = target_run(target, "scratch", k=5, seed=0, weights=False, arch="resnet10t", size=32, epochs=1,
                          bs=16, device="cpu", precision="fp32", progress=False, csv_path=folder / "metrics.csv",
                          log=print)
    assert any(isinstance(cb, RecalibrateBN) for cb in learn.cbs)  # the study's curves recalibrate BatchNorm
    items = [_png(target.x_valid[i], folder / "new" / f"digit_{i}.png") for i in range(N_ITEMS)]
    return Case(learn, items, layers=("Conv2d", "BatchNorm2d", "Linear"))


def features_case(folder: Path) -> Case:
    dls = image_dls("lfw", size=32, bs=16, aug="none", cache_dir=folder / "cache")
    learn = resnet_learner(dls, "resnet10t", progress=False, log=None, path=folder)
    head = train_head_on_features(learn, epochs=1, csv_path=folder / "metrics.csv", log=print).head_learner
    items = [head.dls.valid.x[i].cpu() for i in range(N_ITEMS)]  # its inputs are body features
    return Case(head, items, layers=("BatchNorm1d", "Linear"), images=False)


FACTORIES: dict[str, Callable[[Path], Case]] = {
    "mnist": mnist_case,
    "image_folder": image_folder_case,  # the default pipeline: decoded cache
    "image_folder_pil": lambda folder: image_folder_case(folder, "pil"),  # fastai's PIL item transforms
    "image_folder_device": lambda folder: image_folder_case(folder, "device"),  # streamed, decoded per batch
    "depth_mode": depth_mode_case,  # gradual unfreezing on stage groups (issue 26)
    "label_efficiency": label_efficiency_case,
    "features": features_case,
}
_built: dict[str, Case] = {}


def _snapshot(learn: Learner, folder: Path) -> dict[str, Any]:
    """What the package's callbacks left: rows of the curves, the metrics CSV, the checkpoint files."""
    return dict(rows=len(learn.curves.history), csv=(folder / "metrics.csv").read_text(),
                checkpoints={p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                             for p in sorted((folder / "checkpoints").iterdir())})


def build(name: str, tmp_path_factory) -> Case:
    """The case `name`, after a short fit with learning curves and checkpoints (built once per module)."""
    if name not in _built:
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        case = FACTORIES[name](folder)
        case.learn.add_cb(CheckpointCallback(folder / "checkpoints"))
        rows = len(case.learn.curves.history)
        case.learn.fit(1, case.lr)
        assert len(case.learn.curves.history) == rows + 1  # the fit itself is recorded
        case.snapshot = _snapshot(case.learn, folder)
        case.folder = folder
        _built[name] = case
    return _built[name]


@pytest.fixture(scope="module", params=list(FACTORIES))
def case(request, tmp_path_factory, one_torch_thread) -> Case:
    return build(request.param, tmp_path_factory)


def _vocab(learn: Learner) -> list[str]:
    return [str(v) for v in learn.dls.vocab]


def _sums_to_one(probs: torch.Tensor) -> bool:
    return bool(torch.allclose(probs.sum(dim=-1), torch.ones(len(probs)), atol=1e-5)) and bool((probs >= 0).all())


def test_predict_names_the_class_the_learner_gives_that_image(case):
    """items[0] is validation item 0 as a user holds it: predict gives it the class, and the probabilities, that
    the learner gives that item in its validation pass."""
    label, idx, probs = case.learn.predict(case.items[0])
    vocab = _vocab(case.learn)
    assert probs.shape == (len(vocab),) and _sums_to_one(probs[None])
    valid_probs, _ = case.learn.get_preds()
    assert torch.allclose(probs, valid_probs[0], atol=1e-5)
    assert int(idx) == int(valid_probs[0].argmax()) and str(label) == vocab[int(idx)]


def test_test_dl_reads_new_items_as_the_validation_loader_reads_its_own(case):
    """Batch inference on new unlabelled items: no targets, and the very probabilities of the same images in the
    validation set (so the new items went through the same pipeline), and of `predict` one by one."""
    learn = case.learn
    probs, targs = learn.get_preds(dl=learn.dls.test_dl(case.items))
    assert targs is None and probs.shape == (N_ITEMS, len(_vocab(learn))) and _sums_to_one(probs)
    valid_probs, _ = learn.get_preds()
    assert torch.allclose(probs, valid_probs[:N_ITEMS], atol=1e-5)
    assert torch.allclose(probs[1], learn.predict(case.items[1])[2], atol=1e-5)


def test_get_preds_with_loss_gives_every_validation_item_its_loss(case):
    learn = case.learn
    probs, targs, losses = learn.get_preds(with_loss=True)
    n = len(learn.dls.valid_ds)
    assert probs.shape == (n, len(_vocab(learn))) and targs.shape == losses.shape == (n,) and _sums_to_one(probs)
    assert torch.allclose(losses, -probs[torch.arange(n), targs].log(), atol=1e-4)  # per-item cross-entropy
    loss, acc = learn.validate()
    assert loss == pytest.approx(float(losses.mean()), rel=1e-4)
    assert acc == pytest.approx(float((probs.argmax(dim=1) == targs).float().mean()))


def test_tta_predicts_every_validation_item(case):
    learn = case.learn
    probs, targs = learn.tta(n=1)
    plain, plain_targs = learn.get_preds()
    assert probs.shape == plain.shape and torch.equal(targs, plain_targs) and _sums_to_one(probs)
    if not case.augments:  # no random transform: every augmented pass is the plain one
        assert torch.allclose(probs, plain, atol=1e-5)


def test_interpretation_counts_every_validation_item(case):
    learn = case.learn
    interp = ClassificationInterpretation.from_learner(learn)
    cm = torch.as_tensor(interp.confusion_matrix())
    _, targs = learn.get_preds()
    c = len(_vocab(learn))
    assert cm.shape == (c, c) and int(cm.sum()) == len(learn.dls.valid_ds)
    assert cm.sum(dim=1).tolist() == torch.bincount(targs, minlength=c).tolist()  # rows: true classes
    assert float(cm.trace() / cm.sum()) == pytest.approx(learn.validate()[1])
    losses, idx = interp.top_losses(3)
    assert losses.shape == (3,) and bool((losses[:-1] >= losses[1:]).all())
    assert all(a in _vocab(learn) and b in _vocab(learn) and n > 0 for a, b, n in interp.most_confused())
    if case.images:
        plt.close("all")
        interp.plot_top_losses(3)
        axes = [ax for ax in plt.gcf().axes if ax.images]
        assert len(axes) == 3 and all(ax.get_title().split("/")[0] in _vocab(learn) for ax in axes)
        plt.close("all")


def test_summary_names_the_layers(case):
    text = case.learn.summary()
    for layer in case.layers:
        assert layer in text
    n_params = sum(p.numel() for p in case.learn.model.parameters())
    assert f"Total params: {n_params:,}" in text


def test_lr_find_prints_nothing(case, capsys, tmp_path, monkeypatch):
    """The learners print a line per training epoch; lr_find, whose mock training spans whole epochs here, none."""
    monkeypatch.chdir(tmp_path)  # lr_find saves the weights under learn.path / "models" (".": here) meanwhile
    learn = case.learn
    num_it = max(12, len(learn.dls.train) + 2)
    # stop_div=False: on these tiny sets the loss may diverge within a few steps, leaving fastai's suggestion
    # functions too few points
    suggestion = learn.lr_find(end_lr=1, num_it=num_it, stop_div=False, show_plot=False)
    assert capsys.readouterr().out == ""
    # the rates tried grow geometrically from 1e-7 towards end_lr; the suggestion is one of them
    lrs = learn.recorder.lrs
    assert len(lrs) == num_it and lrs[0] == pytest.approx(1e-7)
    assert all(b / a == pytest.approx((1 / 1e-7) ** (1 / num_it)) for a, b in zip(lrs, lrs[1:]))
    assert any(lr == pytest.approx(suggestion.valley) for lr in lrs)


def test_show_batch_and_show_results_draw_decoded_images(case):
    if not case.images:
        pytest.skip("its inputs are feature vectors, not images")
    learn, vocab = case.learn, _vocab(case.learn)
    plt.close("all")
    learn.dls.show_batch(max_n=4)
    axes = [ax for ax in plt.gcf().axes if ax.images]
    assert len(axes) == 4 and all(ax.get_title() in vocab for ax in axes)
    # decoded: pixel values, not the normalised inputs (which go negative). Not every image need have a bright
    # pixel: three of LFW's 200 are near black (max below 0.05) and the lighting augmentation can take them to 0.
    pixels = [np.asarray(ax.images[0].get_array()) for ax in axes]
    assert min(p.min() for p in pixels) >= 0 and max(p.max() for p in pixels) > 0
    plt.close("all")
    learn.show_results(max_n=4)
    axes = [ax for ax in plt.gcf().axes if ax.images]
    assert len(axes) == 4
    for ax in axes:  # true label, then the prediction
        true, pred = ax.get_title().split("\n")
        assert true in vocab and pred in vocab
    plt.close("all")


def test_idioms_leave_the_package_callbacks_silent(case, capsys):
    """After every idiom of the tests above (run first: pytest keeps their order for each case) and these once
    more, printing nothing: no new row of the curves, the metrics CSV and the checkpoints untouched."""
    learn = case.learn
    learn.predict(case.items[0])
    learn.get_preds(with_loss=True)
    learn.get_preds(dl=learn.dls.test_dl(case.items))
    learn.validate()
    learn.tta(n=1)
    learn.summary()
    assert capsys.readouterr().out == ""
    assert _snapshot(learn, case.folder) == case.snapshot


def test_mnist_predict_reads_a_file_a_pil_image_and_a_tensor_alike(tmp_path_factory):
    case = build("mnist", tmp_path_factory)
    learn, path = case.learn, case.items[0]
    digit = learn.dls.splits.x_valid[0]  # 1 x 28 x 28 uint8, the digit saved in `path`
    expected = learn.predict(path)
    for item in (Image.open(path), digit, digit[0], digit.float() / 255, digit[0].numpy()):
        label, idx, probs = learn.predict(item)
        assert label == expected[0] and torch.allclose(probs, expected[2], atol=1e-6)
    with pytest.raises(ValueError, match=r"uint8 \(0-255\) or floats in \[0, 1\]"):
        learn.predict(digit.float())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        learn.predict(path.with_name("missing.png"))
    (bad := path.with_name("notes.png")).write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*notes\.png"):
        learn.predict(bad)


def test_mnist_decode_gives_back_the_digits(tmp_path_factory):
    learn = build("mnist", tmp_path_factory).learn
    dl = learn.dls.valid
    x, y = dl.decode(dl.one_batch())
    raw = learn.dls.splits.x_valid[:len(x)]
    assert x.shape == raw.shape and int((x.long() - raw.long()).abs().max()) <= 1  # float rounding at most
    assert [str(s[1]) for s in dl.decode_batch(dl.one_batch(), max_n=3)] == [str(int(v)) for v in y[:3]]


def test_batch_transforms_added_after_encoding_are_refused(tmp_path_factory):
    """TensorLoader encodes once; a transform added later (as vision_learner adds Normalize) would be skipped in
    training and applied to new items: refused with a clear error instead."""
    from fastai.data.transforms import Normalize

    dls, _ = mnist_dls(splits=build("mnist", tmp_path_factory).learn.dls.splits)
    dls.add_tfms([Normalize.from_stats(0.5, 0.5, cuda=False)], "after_batch", loaders=[0])
    with pytest.raises(RuntimeError, match="applies its batch transforms once"):
        dls.train.one_batch()
    assert len(dls.valid.one_batch()[0]) == 128  # the loaders left alone still work


FRESH = """
import json, sys, warnings
import torch
from fastai.learner import load_learner

warnings.simplefilter("ignore")
out = {}
for name, model, item in json.loads(sys.argv[1]):
    learn = load_learner(model)
    label, idx, probs = learn.predict(torch.load(item) if item.endswith(".pt") else item)
    out[name] = [str(label), probs.tolist()]
print(json.dumps(out))
"""


def test_exported_learners_load_and_predict_in_a_fresh_process(tmp_path_factory, tmp_path, one_torch_thread):
    """`learn.export()`, then plain `fastai.learner.load_learner` in a new Python process that imports nothing of
    the package (pickle imports what it needs), predicts what the learner in memory predicts."""
    jobs, expected = [], {}
    for name in FACTORIES:
        case = build(name, tmp_path_factory)
        model = tmp_path / f"{name}.pkl"
        case.learn.export(model)
        item = case.items[0]
        if isinstance(item, torch.Tensor):
            torch.save(item, tmp_path / f"{name}.pt")
            item = tmp_path / f"{name}.pt"
        jobs.append([name, str(model), str(item)])
        label, _, probs = case.learn.predict(case.items[0])
        expected[name] = (str(label), probs)
    p = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for name, (label, probs) in expected.items():
        assert got[name][0] == label, name
        assert torch.allclose(torch.tensor(got[name][1]), probs, atol=1e-5), name
