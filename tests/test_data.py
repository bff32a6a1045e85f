from pathlib import Path

import numpy as np
import pytest
import torch

from tp3_fastai.data import mnist as data
from tp3_fastai.data.mnist import DownloadError, TensorLoader, load_mnist, mnist_dls, stratified_split


@pytest.fixture(scope="module")
def sample():
    return load_mnist("sample", seed=42)


def _keys(x: torch.Tensor) -> set[bytes]:
    return {bytes(row.numpy().tobytes()) for row in x.reshape(len(x), -1)}


def test_sample_split_sizes_are_stratified_over_all_ten_classes(sample):
    assert sample.sizes() == {"train": 3200, "valid": 800, "test": 1000}
    for y, per_class in ((sample.y_train, 320), (sample.y_valid, 80), (sample.y_test, 100)):
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10


def test_sample_splits_are_disjoint(sample):
    tr, va, te = _keys(sample.x_train), _keys(sample.x_valid), _keys(sample.x_test)
    # the sample has a few duplicate images; compare image sets, which the union size bounds from below
    assert len(tr & va) + len(tr & te) + len(va & te) <= 2
    idx = stratified_split(np.repeat(np.arange(10), 500), [0.2, 0.16], seed=42)
    assert sum(len(i) for i in idx) == 5000 and len(np.unique(np.concatenate(idx))) == 5000


def test_same_seed_same_split_other_seed_other_split(sample):
    again = load_mnist("sample", seed=42)
    assert torch.equal(again.x_test, sample.x_test) and torch.equal(again.y_train, sample.y_train)
    other = load_mnist("sample", seed=7)
    assert not torch.equal(other.x_test, sample.x_test)


def test_train_split_is_shuffled_not_sorted_by_label(sample):
    assert len(torch.unique(sample.y_train[:64])) >= 8


def test_dls_normalise_with_mnist_statistics_and_batch_shapes():
    dls, test = mnist_dls(bs=32)
    x, y = dls.train.one_batch()
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (32,)
    full = dls.train.x
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1) < 0.05
    assert len(test.y) == 1000 and len(dls.valid) == 800 // 64 + (800 % 64 > 0)


def test_tensor_loader_shuffles_reproducibly_and_covers_every_item():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    a = torch.cat([b[1] for b in TensorLoader(x, y, bs=3, shuffle=True, seed=1)])
    b = torch.cat([b[1] for b in TensorLoader(x, y, bs=3, shuffle=True, seed=1)])
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(10)) and a.tolist() != list(range(10))
    assert len(TensorLoader(x, y, bs=3)) == 4 and len(TensorLoader(x, y, bs=3, drop_last=True)) == 3
    with pytest.raises(ValueError, match="batch size must be positive"):
        TensorLoader(x, y, bs=0)


def test_folder_source_uses_testing_as_test_set(mnist_folder):
    s = load_mnist(mnist_folder, valid_pct=0.25, seed=0)
    assert s.sizes() == {"train": 90, "valid": 30, "test": 120}
    assert s.classes == [str(i) for i in range(10)] and s.x_train.shape[1:] == (1, 28, 28)


def test_missing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'sample', 'full' nor an existing folder"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="lacks a training/ folder"):
        load_mnist(tmp_path)


def test_corrupt_image_is_named_in_the_error(tmp_path, mnist_folder):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(mnist_folder, root)
    (root / "training" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_mnist(root)


def test_offline_full_download_names_the_sample_as_alternative(tmp_path):
    # a mirror that refuses at once: a real failed download, without waiting on DNS
    with pytest.raises(DownloadError, match=r"could not download MNIST.*source='sample'"):
        load_mnist("full", mirror="http://127.0.0.1:9", cache_dir=tmp_path)


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="valid_pct and test_pct"):
        load_mnist("sample", valid_pct=1.5)


@pytest.mark.parametrize("data_filter", [True, False], ids=["tarfile's data filter", "older Python, checked here"])
def test_archives_extract_inside_their_folder_and_members_that_leave_it_are_refused(data_filter, tmp_path, monkeypatch):
    """Python 3.11.2 (Debian 12) has no `filter=` in TarFile.extractall: the same refusals then come from untar."""
    import io
    import tarfile

    from tp3_fastai.data.download import untar

    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")

    def archive(name: str, *members: tarfile.TarInfo) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as t:
            for m in members:
                t.addfile(m, io.BytesIO(b"digit") if m.isfile() else None)
        return path

    def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
        m = tarfile.TarInfo(name)
        m.type, m.linkname, m.size = kind, link, 5 if kind == tarfile.REGTYPE else 0
        return m

    good = archive("good.tgz", member("mnist_png/0/a.png"), member("mnist_png/1/b.png"))
    with tarfile.open(good) as t:
        untar(t, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "mnist_png/0/a.png", "mnist_png/1/b.png"]
    assert (tmp_path / "out" / "mnist_png" / "0" / "a.png").read_bytes() == b"digit"
    outside = tmp_path / "evil.png"
    for bad in (member("../evil.png"), member("mnist_png/x", tarfile.SYMTYPE, "../../etc"),
                member("mnist_png/y", tarfile.LNKTYPE, "../outside")):
        with tarfile.open(archive("bad.tgz", bad)) as t, pytest.raises((ValueError, tarfile.TarError)):
            untar(t, tmp_path / "bad")
        assert not outside.exists() and not (tmp_path / "bad" / "mnist_png").exists()
    # an absolute name: refused here, or stripped of its '/' by tarfile's filter; never written at that path
    absolute = tmp_path / "abs" / "evil.png"
    with tarfile.open(archive("abs.tgz", member(str(absolute)))) as t:
        try:
            untar(t, tmp_path / "inside")
        except (ValueError, tarfile.TarError):
            pass
    assert not absolute.exists()
