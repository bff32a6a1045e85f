"""Input pipelines for image folders (tp3_fastai.data.pipeline): the device and cached pipelines against fastai's PIL one
on real images (LFW faces as JPEGs and in every PNG mode), crop and flip statistics against fastai's own
RandomResizedCrop, bad files, the cache's budget and freshness, workers, export / predict, the remembered check."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.data.transforms import Normalize
from fastai.vision.augment import RandomResizedCrop
from PIL import Image
from scipy.stats import ks_2samp

from tp3_fastai.data import images as image_data
from tp3_fastai.bench import jpeg_folder
from tp3_fastai.data.images import check_images, folder_dls
from tp3_fastai.data.pipeline.pil import RGBImage
from tp3_fastai.data.pipeline import (DecodeCropResize, EncodedImage, ImageBatch, choose_pipeline, decode_images,
                                 draw_flips, find_decoder, jpeg_components, random_resized_boxes, stored_size)
from tp3_fastai.data.pipeline.cache import image_bytes
from tp3_fastai.data.pipeline.check import memory_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PIPES = ("pil", "device", "cached")
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # ImageNet std: normalised units -> [0, 1] pixels
SIZE = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def jpegs(cache) -> Path:
    """40 real JPEGs (LFW faces and non-faces at 56 px): train/ 32, valid/ 8."""
    return jpeg_folder(cache, 40, px=56)


@pytest.fixture(scope="module")
def dls(jpegs, cache) -> dict:
    return {p: folder_dls(jpegs, size=SIZE, bs=8, pipeline=p, cache_dir=cache) for p in PIPES}


def _valid(d) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(d.valid))
    return torch.cat(xs).as_subclass(torch.Tensor), torch.cat(ys).as_subclass(torch.Tensor)


def _pixel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised batches, in [0, 1] pixel units."""
    return ((a - b) * STD).abs().flatten()


def test_every_pipeline_gives_pils_classes_labels_shapes_dtype_and_normalisation(dls):
    ref = dls["pil"]
    for p in ("device", "cached"):
        d = dls[p]
        assert d.info.pipeline == p and d.info.pipeline_info["asked"] == p
        assert list(d.vocab) == list(ref.vocab) == ["face", "non_face"]
        assert d.train_ds.items == ref.train_ds.items and d.valid_ds.items == ref.valid_ds.items
        assert d.info.sizes() == ref.info.sizes() == {"train": 32, "valid": 8}
        x, y = d.one_batch()
        rx, ry = ref.one_batch()
        assert type(x) is type(rx) and x.shape == rx.shape == (8, 3, SIZE, SIZE)
        assert x.dtype == rx.dtype == torch.float32
        assert type(y) is type(ry) and y.dtype == ry.dtype
        norm = [t for t in d.after_batch.fs if isinstance(t, Normalize)]
        ref_norm = [t for t in ref.after_batch.fs if isinstance(t, Normalize)]
        assert len(norm) == 1 and torch.equal(norm[0].mean.cpu(), ref_norm[0].mean.cpu())
        assert torch.equal(norm[0].std.cpu(), ref_norm[0].std.cpu())
        assert torch.equal(_valid(d)[1], _valid(ref)[1])  # same labels in the same order
        # the same transforms follow the crop: fastai's (the flip is drawn in the crop: Warp leads the affine ones)
        assert [type(t).__name__ for t in d.after_batch.fs] == [
            "DecodeCropResize", "IntToFloatTensor", "Warp", "Brightness", "Normalize"]


def test_validation_batches_are_deterministic_and_match_pil_within_resampling_tolerance(dls):
    ref, _ = _valid(dls["pil"])
    device, again = _valid(dls["device"])[0], _valid(dls["device"])[0]
    assert torch.equal(device, again)
    assert torch.equal(device, _valid(dls["cached"])[0])  # the cache holds exactly what streaming decodes
    d = _pixel_diff(device, ref)
    # PIL resizes the centre crop once; the device pipeline resizes to the stored size (37 px), then crops:
    # two bilinear resamplings differ by well under one grey level on average (measured: 0.0015 mean, 0.009 p99)
    assert d.mean() < 0.005 and d.quantile(0.99) < 0.03 and d.max() < 0.15


@pytest.mark.parametrize("aug,names,flip,crop", [
    ("none", ["IntToFloatTensor", "Normalize"], False, None),
    ("default", ["IntToFloatTensor", "Warp", "Brightness", "Normalize"], True, 0.35),
    ("noflip", ["IntToFloatTensor", "Warp", "Brightness", "Normalize"], False, 0.35),
    ("rot=0,zoom=1,light=0,warp=0,crop=0.5", ["IntToFloatTensor", "Normalize"], True, 0.5),
    ("vflip=1,rot=0,zoom=1,light=0,warp=0", ["IntToFloatTensor", "Dihedral", "Normalize"], False, 0.35)])
def test_augmentation_settings_in_the_device_pipeline(aug, names, flip, crop, jpegs):
    """The crop and left-right flip move into the batch crop; fastai's other batch augmentations stay (vertical
    flips too: fastai's Dihedral); without augmentation two draws of the training set are identical."""
    d = folder_dls(jpegs, size=SIZE, bs=8, pipeline="device", aug=aug, verify=False)
    decoder = find_decoder(d)
    assert [type(t).__name__ for t in d.after_batch.fs] == ["DecodeCropResize"] + names
    assert (decoder.flip, decoder.min_scale) == (flip, crop) and d.info.pipeline_info["flip_in_crop"] == flip
    dl = d.train.new(shuffle=False)
    a, b = dl.one_batch()[0], dl.one_batch()[0]
    assert torch.equal(a, b) == (aug == "none")


def _fastai_boxes(w: int, h: int, n: int, min_scale: float) -> np.ndarray:
    """n crop boxes (area fraction, log aspect, centre x, centre y) drawn by fastai's RandomResizedCrop."""
    random.seed(0)
    tfm, im, out = RandomResizedCrop(8, min_scale=min_scale), Image.new("RGB", (w, h)), []
    for _ in range(n):
        tfm.before_call(im, split_idx=0)
        (cw, ch), (x0, y0) = tfm.cp_size, tfm.tl
        out.append((cw * ch / (w * h), np.log(cw / ch), (x0 + cw / 2) / w, (y0 + ch / 2) / h))
    return np.array(out)


def _box_stats(boxes: torch.Tensor, w: int, h: int) -> np.ndarray:
    """The same statistics from our boxes, back on the pixel grid (the same float for the same box as fastai's:
    KS compares exact values)."""
    b = boxes.double().numpy()
    x0, y0 = np.round(b[:, 0] * w), np.round(b[:, 1] * h)
    cw, ch = np.round(b[:, 2] * w) - x0, np.round(b[:, 3] * h) - y0
    return np.stack([cw * ch / (w * h), np.log(cw / ch), (x0 + cw / 2) / w, (y0 + ch / 2) / h], 1)


@pytest.mark.parametrize("w,h", [(60, 60), (90, 50), (40, 100), (300, 20)])
def test_random_resized_boxes_follow_fastais_distribution(w, h):
    """Area in [min_scale, 1], aspect ratio in [3/4, 4/3], position: the batch draw against fastai's own draws
    (two-sample Kolmogorov-Smirnov per statistic; (300, 20) never fits: fastai's centred fallback, exactly)."""
    n, min_scale = 2000, 0.35
    torch.manual_seed(0)
    ours = _box_stats(random_resized_boxes(torch.tensor([[w, h]] * n), min_scale), w, h)
    theirs = _fastai_boxes(w, h, n, min_scale)
    if (w, h) == (300, 20):
        assert np.allclose(ours, theirs[0]) and np.allclose(theirs, theirs[0])
        return
    for k, name in enumerate(("area", "log aspect", "centre x", "centre y")):
        assert ks_2samp(ours[:, k], theirs[:, k]).pvalue > 1e-3, name
    pixel = 1 / min(w, h)  # sides are whole pixels: the bounds hold up to one pixel of rounding
    assert ours[:, 0].min() > min_scale - 3 * pixel and ours[:, 0].max() <= 1
    assert np.abs(ours[:, 1]).max() < np.log(4 / 3) + 3 * pixel


def _ramp(side: int) -> torch.Tensor:
    """A coordinate image: red = x, green = y (0-255 across the image), blue 128."""
    r = torch.linspace(0, 255, side)
    planes = [r.expand(side, side), r[:, None].expand(side, side), torch.full((side, side), 128.)]
    return torch.stack(planes).round().to(torch.uint8)


def test_the_batch_crop_applies_the_drawn_boxes_and_flips_half_the_images():
    """DecodeCropResize on the training split: each output image is its drawn box of the image, flipped when drawn
    (read back from a coordinate image), and about half are flipped."""
    n, s = 600, stored_size(SIZE)
    tfm = DecodeCropResize(SIZE, min_scale=0.35, flip=True)
    batch = ImageBatch([EncodedImage(pixels=_ramp(s)) for _ in range(n)])
    torch.manual_seed(1)
    out = tfm(batch, split_idx=0).as_subclass(torch.Tensor)
    torch.manual_seed(1)
    boxes = random_resized_boxes(torch.tensor([[s, s]] * n, dtype=torch.float32), 0.35)
    flips = draw_flips(n)
    left, right = out[:, 0, :, 0].mean(1), out[:, 0, :, -1].mean(1)
    assert torch.equal(left > right, flips)
    assert abs(flips.float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5
    # red at the first / last output column = the box's x-edges sampled half a pixel inside
    span = (right - left).abs() / 255 * (s - 1) / s * SIZE / (SIZE - 1)
    assert torch.allclose(span, boxes[:, 2] - boxes[:, 0], atol=0.02)
    top, bottom = out[:, 1, 0, :].mean(1), out[:, 1, -1, :].mean(1)
    assert torch.allclose((bottom - top) / 255 * (s - 1) / s * SIZE / (SIZE - 1), boxes[:, 3] - boxes[:, 1], atol=0.02)
    valid = tfm(batch, split_idx=1).as_subclass(torch.Tensor)  # validation: the whole (square) image, unflipped
    assert torch.equal(valid, valid[:1].expand_as(valid)) and valid[0, 0, 0, 0] < 10 and valid[0, 0, 0, -1] > 245


def _broken(root: Path) -> list[Path]:
    good = next((root / "train" / "face").glob("*.jpg"))
    truncated, junk = root / "train" / "face" / "truncated.jpg", root / "valid" / "non_face" / "junk.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk.write_bytes(np.random.default_rng(0).bytes(600))
    return [truncated, junk]


@pytest.mark.parametrize("pipeline", PIPES)
def test_a_corrupt_or_truncated_jpeg_is_named_before_training(pipeline, jpegs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(jpegs, root)
    bad = _broken(root)
    with pytest.raises(ValueError, match=r"2 image\(s\) cannot be read") as e:
        folder_dls(root, size=SIZE, bs=8, pipeline=pipeline, cache_dir=tmp_path / "cache")
    assert all(f.name in str(e.value) for f in bad)
    if pipeline == "cached":  # without the up-front check, the cache's single decode names them too
        with pytest.raises(ValueError, match=r"2 image\(s\) cannot be decoded") as e:
            folder_dls(root, size=SIZE, bs=8, pipeline=pipeline, verify=False)
        assert all(f.name in str(e.value) for f in bad)


def test_the_check_is_remembered_by_path_size_and_mtime(jpegs, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(jpegs, root)
    files = sorted(root.rglob("*.jpg"))
    memory = memory_file(tmp_path / "cache", root)
    opened: list[str] = []
    real_open = image_data.Image.open
    monkeypatch.setattr(image_data.Image, "open",
                        lambda f, *a, **k: opened.append(Path(f).name) or real_open(f, *a, **k))
    check_images(files, memory)
    assert len(opened) == 40 and len(json.loads(memory.read_text())["files"]) == 40
    opened.clear()
    check_images(files, memory)
    assert opened == []  # nothing decoded again
    changed = files[3]
    changed.write_bytes(files[4].read_bytes())
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    check_images(files, memory)
    assert opened == [changed.name]
    opened.clear()
    bad = _broken(root)
    for _ in range(2):  # a bad file is never remembered: named at every run
        with pytest.raises(ValueError, match="truncated.jpg"):
            check_images(files + bad, memory)
    assert sorted(opened) == sorted([f.name for f in bad] * 2)


def _mixed_folder(root: Path) -> None:
    """Real 25 px LFW images as JPEG (RGB, grey, CMYK) and PNG (RGB, grey, RGBA, palette, 16-bit grey)."""
    from skimage.data import lfw_subset

    faces = (lfw_subset() * 255).round().astype(np.uint8)
    kinds = ("jpg:RGB", "jpg:L", "jpg:CMYK", "png:RGB", "png:L", "png:RGBA", "png:P", "png:I;16")
    for split, start, per in (("train", 0, 2), ("valid", 50, 1)):
        for c, offset in (("face", 0), ("non_face", 100)):
            (root / split / c).mkdir(parents=True)
            for k, kind in enumerate(kinds):
                ext, mode = kind.split(":")
                for j in range(per):
                    g = faces[offset + start + k * per + j]
                    im = (Image.fromarray(g.astype(np.uint16) * 257) if mode == "I;16" else
                          Image.fromarray(g).convert("RGB").quantize(64) if mode == "P" else
                          Image.fromarray(g).convert(mode))
                    im.save(root / split / c / f"{c}_{k}_{j}_{mode.replace(';', '')}.{ext}")


def test_decoding_routes_every_mode_to_todays_conversion(tmp_path):
    _mixed_folder(tmp_path)
    files = sorted(tmp_path.rglob("*.*"))
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    kinds = {f.stem.split("_")[-1] for f in files}
    assert kinds == {"RGB", "L", "CMYK", "RGBA", "P", "I16"}
    got = decode_images(data, [None] * len(files), [str(f) for f in files], torch.device("cpu"))
    for f, d, im in zip(files, data, got):
        want = np.array(RGBImage.create(f))  # today's PIL + to_rgb
        assert im.dtype == torch.uint8 and torch.equal(im.permute(1, 2, 0), torch.from_numpy(want)), f.name
        comps = jpeg_components(memoryview(d.numpy()))
        assert comps == ({"L": 1, "CMYK": 4}.get(f.stem.split("_")[-1], 3) if f.suffix == ".jpg" else None)


@pytest.mark.parametrize("pipeline", ["device", "cached"])
def test_a_folder_mixing_jpeg_png_16bit_palette_and_rgba_trains(pipeline, tmp_path):
    from tp3_fastai.transfer.learner import resnet_learner

    _mixed_folder(tmp_path / "mixed")
    pil = folder_dls(tmp_path / "mixed", size=SIZE, bs=8, pipeline="pil", aug="none", cache_dir=tmp_path)
    d = folder_dls(tmp_path / "mixed", size=SIZE, bs=8, pipeline=pipeline, aug="none", cache_dir=tmp_path)
    diff = _pixel_diff(_valid(d)[0], _valid(pil)[0])
    # 25 px images are upsampled (to 37, then cropped to 32): softer than PIL's single resize, same picture
    assert diff.mean() < 0.01 and diff.quantile(0.99) < 0.1
    learn = resnet_learner(d, "test_resnet", progress=False, log=None, path=tmp_path)
    learn.fit(1, 1e-3)
    assert len(learn.curves.history) == 1 and np.isfinite(learn.curves.history[0]["train_loss"])


def test_a_budget_smaller_than_the_data_streams_the_rest(jpegs, dls):
    s = stored_size(SIZE)
    part = folder_dls(jpegs, size=SIZE, bs=8, pipeline="cached", cache_budget=5 * image_bytes(s), verify=False)
    info = part.info.pipeline_info
    assert (info["cached"], info["streamed"]) == (5, 35)
    assert torch.equal(_valid(part)[0], _valid(dls["device"])[0])
    assert sum(len(x) for x, _ in part.train) == 32  # an epoch streams the rest without error
    none = folder_dls(jpegs, size=SIZE, bs=8, pipeline="cached", cache_budget=0, verify=False)
    assert none.info.pipeline_info["cached"] == 0 and torch.equal(_valid(none)[0], _valid(dls["device"])[0])
    auto = folder_dls(jpegs, size=SIZE, bs=8, pipeline="auto", cache_budget=39 * image_bytes(s), verify=False)
    assert auto.info.pipeline == "device" and "over the budget" in auto.info.pipeline_info["reason"]


def test_the_cache_notices_a_changed_file(jpegs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(jpegs, root)
    d = folder_dls(root, size=SIZE, bs=8, pipeline="cached", aug="none", verify=False)
    cache = find_decoder(d).cache
    before = _valid(d)[0]
    target, other = d.valid_ds.items[2], d.valid_ds.items[5]
    target.write_bytes(other.read_bytes())
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    after = _valid(d)[0]
    assert cache.info()["refreshed"] == 1
    assert torch.equal(after[2], after[5]) and not torch.equal(after[2], before[2])
    assert torch.equal(torch.cat([after[:2], after[3:]]), torch.cat([before[:2], before[3:]]))
    misses = cache.info()["misses"]
    assert torch.equal(_valid(d)[0], after) and cache.info()["misses"] == misses  # the new image is cached now


@pytest.mark.parametrize("pipeline", ["pil", "device"])
def test_workers_persist_across_epochs_and_give_the_same_batches(pipeline, jpegs, dls):
    d = folder_dls(jpegs, size=SIZE, bs=8, pipeline=pipeline, aug="none", num_workers=1, verify=False)
    assert d.info.pipeline_info["persistent_workers"] is True
    zero = folder_dls(jpegs, size=SIZE, bs=8, pipeline=pipeline, aug="none", num_workers=0, verify=False)
    assert torch.equal(_valid(d)[0], _valid(zero)[0])
    for dl in (d.train, zero.train):
        dl.rng = random.Random(7)
    orders = [[torch.cat([y for _, y in dl]) for _ in range(2)] for dl in (d.train, zero.train)]
    assert all(torch.equal(a, b) for a, b in zip(*orders))  # fastai's shuffled order, epoch after epoch
    pids = [w.pid for w in d.train._workers_loader._iterator._workers]
    for _ in d.train:
        pass
    assert [w.pid for w in d.train._workers_loader._iterator._workers] == pids


@pytest.mark.parametrize("pipeline", PIPES)
def test_export_and_predict_work_from_a_learner_trained_on_each_pipeline(pipeline, jpegs, dls, tmp_path):
    from tp3_fastai.transfer.finetune import export_learner, load_model, predict, valid_predictions
    from tp3_fastai.data.images import show_batch_png
    from tp3_fastai.transfer.learner import resnet_learner

    d = dls[pipeline]
    learn = resnet_learner(d, "test_resnet", progress=False, log=None, path=tmp_path)
    learn.fit(1, 1e-3)
    probs, _ = valid_predictions(learn)
    assert probs.shape == (8, 2)
    show_batch_png(d, tmp_path / "batch.png", n=8)
    image = d.valid_ds.items[0]
    model = export_learner(learn, tmp_path / "model.pkl")  # (also removes the curves callback, as for predict)
    in_memory = learn.get_preds(dl=d.test_dl([image]))[0][0]
    assert torch.allclose(in_memory, probs[0], atol=1e-5)  # test_dl uses the validation transforms
    from fastai.interpret import ClassificationInterpretation

    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == 8 and len(interp.top_losses(k=3)[0]) == 3
    assert "Input shape: 8 x 3 x 32 x 32" in learn.summary()
    loaded = load_model(model)
    decoder = find_decoder(loaded.dls)
    if decoder is not None and decoder.cache is not None:  # the decoded images stay behind (an empty cache)
        assert decoder.cache.images.untyped_storage().nbytes() == 0 and find_decoder(d).cache.images.numel() > 0
    label, p = predict(loaded, image)
    assert label == d.vocab[int(in_memory.argmax())] and p == pytest.approx(float(in_memory.max()), abs=1e-5)
    rgba = tmp_path / "new.png"
    Image.open(image).convert("RGBA").save(rgba)  # a new image in another mode
    label, p = predict(loaded, rgba)
    assert label in ("face", "non_face") and 0.5 <= p <= 1


def test_auto_and_unknown_pipelines():
    cpu = torch.device("cpu")
    assert choose_pipeline("auto", cpu, 100, 64, budget=10**9)[0] == "cached"
    assert choose_pipeline("auto", cpu, 100, 64, budget=10)[0] == "device"
    assert choose_pipeline("pil", cpu, 10**9, 64) == ("pil", "asked for")
    with pytest.raises(ValueError, match="unknown pipeline 'gpu': choose from pil, device, cached, auto"):
        folder_dls("/nonexistent", pipeline="gpu")


def test_finetune_records_the_pipeline_and_the_commands_take_it(jpegs, tmp_path):
    from fastcore.script import anno_parser

    from tp3_fastai import cli
    from tp3_fastai.transfer.finetune import finetune_experiment

    for command in (cli.finetune, cli.run, cli.bench_freeze):
        assert "--pipeline" in anno_parser(command).format_help()
    s = finetune_experiment(data=str(jpegs), arch="test_resnet", size=SIZE, bs=8, epochs=1, modes=["scratch"],
                            pipeline="cached", out=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False,
                            log=lambda m: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["pipeline"], config["pipeline_ran"]) == ("cached", "cached")
    assert s["data"]["pipeline"] == "cached" and s["data"]["pipeline_info"]["cached"] == 40


def test_the_bench_compares_every_pipeline_side_by_side(jpegs, dls):
    """The bench's pipeline section: a loader row per pipeline (ratio to the first, spread, cache fill), the plain
    loop on synthetic batches once per mode, and plain / package (lean) / stock fastai loops fed by each pipeline."""
    from fastai.data.core import DataLoaders

    from tp3_fastai.bench import BatchLoader, bench_pipeline, synthetic_batches
    from tp3_fastai.bench.report import pipeline_markdown

    cpu = torch.device("cpu")
    small = {p: folder_dls(jpegs, size=SIZE, bs=4, pipeline=p, verify=False) for p in PIPES}
    syn = DataLoaders(BatchLoader(synthetic_batches(1, 4, SIZE, 2, cpu, 0), 1), BatchLoader([], 0), device=cpu)
    syn.c = 2
    r = bench_pipeline(small, syn, "test_resnet", ["frozen"], cpu, "fp32", 0, 1, 1, 2, 4, SIZE, 1e-3, log=None)
    assert [l["pipeline"] for l in r["loaders"]] == list(PIPES) and r["loader"] == r["loaders"][0]
    assert r["loaders"][0]["ratio_vs_first"] == 1 and all(l["images_per_s"] > 0 for l in r["loaders"])
    assert all(l["max_over_min"] >= 1 and l["step_ms"]["n"] == 2 for l in r["loaders"])
    assert r["loaders"][2]["cached"] == 40 and r["loaders"][2]["fill_s"] > 0 and r["loaders"][1]["cached"] is None
    cells = [(row["loop"], row["data"], row["pipeline"]) for row in r["rows"]]
    assert cells == [("plain", "synthetic", None)] + [(lp, "real", p) for p in PIPES
                                                        for lp in ("plain", "package", "stock")]
    assert all(row["ratio_vs_plain_real"] == 1 for row in r["rows"] if row["loop"] == "plain" and row["pipeline"])
    assert r["memory_format"] == "contiguous" and r["aug"] == "default"
    md = "\n".join(pipeline_markdown(r))
    for text in ("| pipeline | workers | images/s |", "| cached | 0 |", "| frozen | stock | real | device |",
                 "**device**: workers read bytes"):
        assert text in md
