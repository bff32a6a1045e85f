"""Image folders for transfer learning: layouts, errors, augmentation, the embedded LFW set, named sources."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.data.transforms import Normalize
from PIL import Image

from tp3_fastai.data import images as image_data
from tp3_fastai.data.mnist import DownloadError
from tp3_fastai.data.pipeline.pil import CropResize, RGBImage
from tp3_fastai.data.images import (folder_dls, image_dls, image_source, lfw_folder, parse_aug, reseed,
                                   scan_folder, show_batch_png)
from figures import image_area, pixels


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _write(path: Path, seed: int, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _class_tree(root: Path, classes=("ants", "bees"), n=6, offset=0) -> None:
    for c in classes:
        for i in range(n):
            _write(root / c / f"{c}_{i}.png", offset + i + 100 * len(c))


def test_lfw_folder_has_200_images_in_two_balanced_classes(cache):
    root = lfw_folder(cache)
    counts = {(s, c): len(list((root / s / c).glob("*.png"))) for s in ("train", "valid") for c in ("face", "non_face")}
    assert sum(counts.values()) == 200
    assert counts == {("train", "face"): 75, ("train", "non_face"): 75, ("valid", "face"): 25,
                      ("valid", "non_face"): 25}
    info = json.loads((root / "info.json").read_text())
    assert info["n_images"] == 200 and info["classes"] == ["face", "non_face"]
    with Image.open(next((root / "train" / "face").iterdir())) as im:
        assert im.size == (25, 25)
    stamp = (root / "info.json").stat().st_mtime_ns
    assert lfw_folder(cache) == root and (root / "info.json").stat().st_mtime_ns == stamp  # written once
    assert not [p for p in Path(cache).iterdir() if p.name.startswith(".lfw-")]  # no temporary folder left


def test_lfw_interrupted_copy_is_rebuilt(tmp_path):
    (tmp_path / "lfw" / "train" / "face").mkdir(parents=True)  # a half-written folder has no info.json
    root = lfw_folder(tmp_path)
    assert len(list(root.rglob("*.png"))) == 200


def test_lfw_loads_through_folder_dls(cache):
    dls = image_dls("lfw", size=32, bs=8, cache_dir=cache)
    assert list(dls.vocab) == ["face", "non_face"]
    assert dls.info.sizes() == {"train": 150, "valid": 50}
    assert dls.info.layout == "train/ + valid/"
    x, y = dls.one_batch()
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)
    norms = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    assert len(norms) == 1  # explicit ImageNet normalisation, once
    assert torch.allclose(norms[0].mean.flatten().cpu(), torch.tensor([0.485, 0.456, 0.406]))


@pytest.mark.parametrize("valid_name", ["valid", "val"])
def test_train_valid_layouts(tmp_path, valid_name):
    _class_tree(tmp_path / "train", n=6)
    _class_tree(tmp_path / valid_name, n=2, offset=50)
    dls = folder_dls(tmp_path, size=24, bs=4)
    assert dls.info.layout == f"train/ + {valid_name}/"
    assert list(dls.vocab) == ["ants", "bees"]
    assert dls.info.sizes() == {"train": 12, "valid": 4}
    assert all(p.parent.parent.name == valid_name for p in dls.valid_ds.items)
    x, _ = dls.one_batch()
    assert x.shape == (4, 3, 24, 24)


def test_single_folder_gets_seeded_stratified_split(tmp_path):
    _class_tree(tmp_path, n=10)
    a = folder_dls(tmp_path, size=16, bs=4, valid_pct=0.2, seed=1)
    b = folder_dls(tmp_path, size=16, bs=4, valid_pct=0.2, seed=1)
    c = folder_dls(tmp_path, size=16, bs=4, valid_pct=0.2, seed=2)
    assert a.info.sizes() == {"train": 16, "valid": 4}
    assert sorted(p.parent.name for p in a.valid_ds.items) == ["ants", "ants", "bees", "bees"]
    assert a.valid_ds.items == b.valid_ds.items != c.valid_ds.items
    assert "valid_pct" in a.info.layout


def test_flat_folder_labelled_by_file_name(tmp_path):
    for i in range(6):
        _write(tmp_path / "images" / f"Abyssinian_{i}.jpg", i)
        _write(tmp_path / "images" / f"great_pyrenees_{i}.jpg", 10 + i)
    with pytest.raises(ValueError, match="label_re"):
        folder_dls(tmp_path / "images", size=16)
    dls = folder_dls(tmp_path / "images", size=16, bs=4, valid_pct=0.34, label_re=image_data.PETS_LABEL_RE)
    assert list(dls.vocab) == ["Abyssinian", "great_pyrenees"]
    assert dls.info.sizes() == {"train": 8, "valid": 4}


def test_missing_folder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        folder_dls(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a named source"):
        image_source(str(tmp_path / "nope"))


def test_empty_class_folder_is_named(tmp_path):
    _class_tree(tmp_path / "train")
    _class_tree(tmp_path / "valid", n=1)
    (tmp_path / "train" / "wasps").mkdir()
    with pytest.raises(ValueError, match="wasps holds no images"):
        folder_dls(tmp_path)


def test_corrupt_image_is_named_before_training(tmp_path):
    _class_tree(tmp_path / "train")
    _class_tree(tmp_path / "valid", n=1)
    (tmp_path / "train" / "ants" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        folder_dls(tmp_path)


def test_valid_class_missing_from_train(tmp_path):
    _class_tree(tmp_path / "train")
    _class_tree(tmp_path / "valid", classes=("ants", "bees", "wasps"), n=1)
    with pytest.raises(ValueError, match="wasps"):
        scan_folder(tmp_path)


def test_parse_aug():
    assert parse_aug("none").min_scale is None and parse_aug("none").batch_tfms() == []
    assert parse_aug("default").batch == {}
    assert parse_aug("noflip").batch == {"do_flip": False}
    a = parse_aug("flip=0,rot=10,zoom=1.1,light=0.2,crop=0")
    assert a.batch == {"do_flip": False, "max_rotate": 10.0, "max_zoom": 1.1, "max_lighting": 0.2}
    assert a.min_scale is None
    assert parse_aug("crop=0.5").min_scale == 0.5
    for bad, message in (("sometimes", "unknown augmentation 'sometimes': use none, default, noflip or a list like "
                                        "'flip=0,rot=10,zoom=1.1,light=0.2' (keys: crop, flip, vflip, rot, zoom, "
                                        "light, warp)"),
                         ("rot=ten", "augmentation item 'rot=ten' is not key=number (e.g. rot=10)"),
                         ("flip=0,rot", "augmentation item 'rot' is not key=number (e.g. rot=10)"),
                         ("spin=3", "unknown augmentation key 'spin': use crop, flip, vflip, rot, zoom, light, warp"),
                         ("zoom=0.5", "zoom=0.5 is out of range (zoom >= 1, the others >= 0)"),
                         ("light=-1", "light=-1 is out of range (zoom >= 1, the others >= 0)"),
                         ("crop=2", "crop=2 must lie in [0, 1] (minimum area of the random crop)")):
        with pytest.raises(ValueError) as e:
            parse_aug(bad)
        assert str(e.value) == message


def _two_draws(dls):
    dl = dls.train.new(shuffle=False)
    return dl.one_batch()[0], dl.one_batch()[0]


def test_augmentation_on_and_off(cache):
    torch.manual_seed(0)
    off = image_dls("lfw", size=32, bs=8, aug="none", cache_dir=cache, pipeline="pil")
    names = [type(t).__name__ for t in off.after_batch.fs]
    assert names == ["IntToFloatTensor", "Normalize"]
    a, b = _two_draws(off)
    assert torch.equal(a, b)  # deterministic centre crop, no batch augmentation
    on = image_dls("lfw", size=32, bs=8, aug="default", cache_dir=cache, pipeline="pil")
    names = [type(t).__name__ for t in on.after_batch.fs]
    assert names == ["IntToFloatTensor", "AffineWarp", "Lighting", "Normalize"]  # aug_transforms, no host reads
    assert [s.kind for s in on.after_batch.fs[1].spec.steps] == ["flip", "rotate", "zoom"]
    a, b = _two_draws(on)
    assert not torch.equal(a, b)
    noflip = image_dls("lfw", size=32, bs=8, aug="noflip", cache_dir=cache, pipeline="pil")
    assert [s.kind for s in noflip.after_batch.fs[1].spec.steps] == ["rotate", "zoom"]


def test_reseed_repeats_the_batch_order(cache):
    dls = image_dls("lfw", size=16, bs=8, aug="none", cache_dir=cache)
    first = reseed(dls, 3).train.one_batch()[1]
    assert not all(torch.equal(first, dls.train.one_batch()[1]) for _ in range(3))  # shuffled between epochs
    assert torch.equal(first, reseed(dls, 3).train.one_batch()[1])


def test_validation_crop_is_central_and_keeps_aspect():
    im = Image.new("RGB", (60, 20))
    im.paste((255, 0, 0), (20, 0, 40, 20))  # red centre square, black sides
    tfm = CropResize(10, augment=True)
    out = np.asarray(tfm(im, split_idx=1))
    assert out.shape == (10, 10, 3)
    assert (out[..., 0] > 200).all() and (out[..., 1] < 50).all()


def test_named_download_offline_gives_clear_error(tmp_path):
    refused = "http://127.0.0.1:9"  # a mirror that refuses at once: a real failed download, without waiting on DNS
    with pytest.raises(DownloadError, match="hymenoptera.*127.0.0.1:9/hymenoptera_data.zip.*Offline.*lfw"):
        image_source("hymenoptera", cache_dir=tmp_path, mirror=refused)
    with pytest.raises(DownloadError, match="pets"):
        image_source("pets", cache_dir=tmp_path, mirror=refused)


def test_show_batch_png(cache, tmp_path):
    dls = image_dls("lfw", size=32, bs=8, cache_dir=cache)
    path = show_batch_png(dls, tmp_path / "batch.png", n=8)
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 100
    assert image_area(pixels(path))[0] > 0.4  # eight photographs fill the grid (bare axes ink a few %)


def _mixed_folder(root: Path) -> dict[str, Path]:
    """A train/valid folder of real LFW faces and non-faces saved in every PIL mode a user's folder may hold."""
    from skimage.data import lfw_subset

    faces = (lfw_subset() * 255).round().astype(np.uint8)  # 100 faces, then 100 non-faces, 25 x 25
    written = {}
    for split, start in (("train", 0), ("valid", 40)):
        for c, offset in (("face", 0), ("non_face", 100)):
            for j in range(40 if split == "train" else 10):
                g = faces[offset + start + j]
                kind = ("L", "RGBA", "P", "I;16", "RGB")[j % 5]
                path = root / split / c / f"{c}_{start + j:03d}_{kind.replace(';', '')}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                if kind == "I;16":
                    im = Image.fromarray(g.astype(np.uint16) * 257)  # the full 16-bit range
                else:
                    im = Image.fromarray(g).convert(kind if kind != "P" else "RGB")
                    if kind == "P":
                        im = im.quantize(64)
                im.save(path)
                written.setdefault(kind, path)
    assert Image.open(written["I;16"]).mode == "I;16" and Image.open(written["P"]).mode == "P"
    return written


def test_mixed_modes_load_as_rgb_and_bad_files_stop_before_training(tmp_path):
    written = _mixed_folder(tmp_path)
    (tmp_path / "train" / "face" / "notes.txt").write_text("not an image, skipped and listed")
    good = folder_dls(tmp_path, size=32, bs=16, aug="none")
    assert good.info.skipped == [str(tmp_path / "train" / "face" / "notes.txt")]
    for kind, path in written.items():
        assert RGBImage.create(path).mode == "RGB", kind
    as_rgb = {k: np.asarray(RGBImage.create(written[k]))[..., 0] for k in ("L", "I;16")}
    assert np.array_equal(as_rgb["L"], np.asarray(Image.open(written["L"])))
    # 16-bit grayscale is scaled to 8 bits (Pillow's own conversion would clip it to white)
    assert np.array_equal(as_rgb["I;16"], np.asarray(Image.open(written["I;16"])) // 257)
    x, y = good.one_batch()
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    from tp3_fastai.transfer.learner import resnet_learner

    learn = resnet_learner(good, "test_resnet", progress=False, log=None, path=tmp_path)
    learn.fit(1, 1e-3)  # one epoch over every mode
    assert len(learn.curves.history) == 1
    # broken files: a truncated JPEG, random bytes named .jpg, an empty .png, all named in one error, before training
    jpg = tmp_path / "train" / "face" / "truncated.jpg"
    Image.open(written["L"]).convert("RGB").resize((200, 200)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])
    (tmp_path / "train" / "non_face" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "valid" / "face" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"3 image\(s\) cannot be read") as e:
        folder_dls(tmp_path, size=32, bs=16)
    assert all(n in str(e.value) for n in ("truncated.jpg", "random.jpg", "empty.png"))
    for f in (jpg, tmp_path / "train" / "non_face" / "random.jpg", tmp_path / "valid" / "face" / "empty.png"):
        f.unlink()
    (tmp_path / "train" / "cats").mkdir()
    with pytest.raises(ValueError, match="cats holds no images"):
        folder_dls(tmp_path, size=32, bs=16)


def test_single_class_is_refused(tmp_path):
    _class_tree(tmp_path, classes=("ants",))
    with pytest.raises(ValueError, match="single class"):
        scan_folder(tmp_path)
