"""The online paths users take first, run against local stand-ins of the real services, through the package's own
code: hub weights from a Hugging Face cache laid out as huggingface_hub lays it out (HF_HUB_OFFLINE), and the named
downloads from an HTTP server on 127.0.0.1 serving archives laid out like the real ones. Then bad input (weights,
resume folders, learning rate, batch size) refused before any work, leaving no run folder behind.

No test here (nor anywhere in the suite) may reach an address outside 127.0.0.1: `offline_guard`, installed by
conftest.py for the whole run, refuses it in this process and in every script the tests start."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fastai.data.transforms import Normalize
from fastai.learner import load_learner
from PIL import Image

import offline_guard
from conftest import write_mnist_folder
from tp3_fastai.data.mnist import DownloadError, load_mnist, mnist_dls, read_image_folder
from tp3_fastai.transfer.finetune import export_learner, finetune_experiment
from tp3_fastai.data.images import image_dls, image_source
from tp3_fastai.mnist.train import train_mnist
from tp3_fastai.transfer.learner import resnet_learner
from tp3_fastai.transfer.weights import IMAGENET_MEAN, IMAGENET_STD, normalization

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"  # timm's smallest ResNet; its pretrained config normalises with mean = std = 0.5
REVISION = "a3f1c0de" * 5  # a commit hash, as refs/main holds one
FAST = dict(size=32, bs=16, epochs=1, aug="none", device="cpu", progress=False)


# ---------------------------------------------------------------- archives laid out like the real ones

def _tar(path: Path, folder: Path) -> bytes:
    with tarfile.open(path, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return path.read_bytes()


def _zip(path: Path, folder: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            z.write(f, f.relative_to(folder.parent))
    return path.read_bytes()


def _lfw_jpegs(folder: Path, names: dict[int, str], split: dict[str, range] | None = None, ext: str = ".jpg") -> None:
    """The embedded LFW images as RGB JPEGs of class `names[label]` (faces 0, non-faces 1): in
    `folder/<split>/<class>/` when `split` is given, else flat as `folder/<class>_<n>.jpg` (the pets layout)."""
    from skimage.data import lfw_subset

    for i, img in enumerate(lfw_subset()):
        label = names[i // 100]
        rgb = Image.fromarray((img * 255).round().astype(np.uint8)).convert("RGB")
        if split is None:
            dest = folder / f"{label}_{i % 100 + 1}{ext}"
        else:
            dest = folder / next(s for s, r in split.items() if i % 100 in r) / label / f"{i:03d}{ext}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(dest, format="JPEG", quality=95)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    """URL path -> bytes of small stand-ins for MNIST, hymenoptera, pets and imagenette, from embedded real images."""
    base = tmp_path_factory.mktemp("archives")
    halves = {"train": range(0, 75), "val": range(75, 100)}
    write_mnist_folder(base / "mnist_png", per_class=12)  # training/<digit>/*.png + testing/<digit>/*.png
    _lfw_jpegs(base / "hymenoptera_data", {0: "ants", 1: "bees"}, halves)
    _lfw_jpegs(base / "oxford-iiit-pet" / "images", {0: "Abyssinian", 1: "basset_hound"})
    (base / "oxford-iiit-pet" / "annotations").mkdir()
    (base / "oxford-iiit-pet" / "annotations" / "README").write_text("stand-in\n")
    _lfw_jpegs(base / "imagenette2-160", {0: "n01440764", 1: "n02102040"}, halves, ext=".JPEG")
    return {"/mnist_png.tgz": _tar(base / "mnist_png.tgz", base / "mnist_png"),
            "/hymenoptera_data.zip": _zip(base / "hymenoptera_data.zip", base / "hymenoptera_data"),
            "/oxford-iiit-pet.tgz": _tar(base / "oxford-iiit-pet.tgz", base / "oxford-iiit-pet"),
            "/imagenette2-160.tgz": _tar(base / "imagenette2-160.tgz", base / "imagenette2-160")}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state = self.server.state
        state.requests[self.path] += 1
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in state.drop:  # half the file, then the connection goes away
            state.drop.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Mirror:
    """An HTTP server on 127.0.0.1 serving `files`, counting requests per path; paths in `drop` are cut mid-file."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.drop = dict(files), Counter(), set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.state = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)


@pytest.fixture
def mirror(archives):
    m = _Mirror(archives)
    m.thread.start()
    yield m
    m.httpd.shutdown()
    m.httpd.server_close()


def _leftovers(cache: Path) -> list[str]:
    """Everything under <cache>/data, hidden temporary files and folders included."""
    data = cache / "data"
    return sorted(str(p.relative_to(data)) for p in data.rglob("*")) if data.exists() else []


def _digests(x: torch.Tensor) -> Counter:
    return Counter(hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in x)


# ---------------------------------------------------------------- downloads

def test_full_mnist_downloads_once_and_part_one_trains_on_its_layout(mirror, tmp_path):
    cache, lines = tmp_path / "cache", []
    s = train_mnist(source="full", archs=["mlp"], epochs=3, bs=32, out=tmp_path / "run", cache_dir=cache,
                    mirror=mirror.url, device="cpu", progress=False, log=lines.append)
    assert mirror.requests["/mnist_png.tgz"] == 1
    assert any(line.startswith(f"downloading MNIST from {mirror.url}/mnist_png.tgz") for line in lines)
    root = cache / "data" / "mnist_png"
    assert [p.name for p in (cache / "data").iterdir()] == ["mnist_png"]  # no archive, no temporary files
    # validation comes from training/ only (20% of it, 2 of each digit's 12); testing/ is the test set, whole
    assert s["split_sizes"] == {"train": 100, "valid": 20, "test": 120}
    splits = load_mnist("full", cache_dir=cache, mirror=mirror.url)
    x_training, _, _ = read_image_folder(root / "training")
    x_testing, _, _ = read_image_folder(root / "testing")
    assert _digests(torch.cat([splits.x_train, splits.x_valid])) == _digests(torch.from_numpy(x_training))
    assert _digests(splits.x_test) == _digests(torch.from_numpy(x_testing))
    assert Counter(splits.y_valid.tolist()) == {d: 2 for d in range(10)}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mirror"] == mirror.url
    assert s["models"][0]["test_accuracy"] > 0.3  # 100 real digits, 3 epochs: 0.458 measured (seed 42); chance 0.1
    # the second run finds the extracted folder: no request
    train_mnist(source="full", archs=["mlp"], epochs=1, out=tmp_path / "run2", cache_dir=cache, mirror=mirror.url,
                device="cpu", progress=False, log=lines.append)
    assert mirror.requests["/mnist_png.tgz"] == 1


def test_the_command_line_reads_the_mirror_from_the_environment(mirror, tmp_path, monkeypatch, capsys):
    from tp3_fastai import cli

    monkeypatch.setenv("TP3_MIRROR", mirror.url)
    args = dict(source="full", archs="mlp", epochs=1, device="cpu")  # what scripts/train_mnist.py passes
    cli.mnist(**args, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "r"))
    assert mirror.requests["/mnist_png.tgz"] == 1
    assert "split sizes {'train': 100, 'valid': 20, 'test': 120}" in capsys.readouterr().out
    # a corrupt archive: one line on stderr naming the file and what to do, exit code 2, nothing left behind
    mirror.files["/mnist_png.tgz"] = b"this is not a gzip file" * 100
    with pytest.raises(SystemExit) as e:
        cli.mnist(**args, cache_dir=str(tmp_path / "c2"), out=str(tmp_path / "r2"))
    err, archive = capsys.readouterr().err, tmp_path / "c2" / "data" / "mnist_png.tgz"
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {archive} is not a readable archive (ReadError")
    assert "it was deleted, run again to download it anew" in err and "source='sample'" in err
    assert _leftovers(tmp_path / "c2") == [] and not (tmp_path / "r2").exists()


def test_hymenoptera_downloads_extracts_and_trains_then_is_not_downloaded_again(mirror, tmp_path):
    cache = tmp_path / "cache"
    s = finetune_experiment(data="hymenoptera", arch=ARCH, modes=["scratch"], out=tmp_path / "run", cache_dir=cache,
                            mirror=mirror.url, log=lambda line: None, **FAST)
    assert mirror.requests["/hymenoptera_data.zip"] == 1
    assert s["data"]["layout"] == "train/ + val/" and s["data"]["classes"] == ["ants", "bees"]
    assert (s["data"]["n_train"], s["data"]["n_valid"]) == (150, 50)
    assert s["data"]["path"] == str(cache / "data" / "hymenoptera_data")
    assert [p.name for p in (cache / "data").iterdir()] == ["hymenoptera_data"]  # no archive, no temporary files
    assert len((tmp_path / "run" / "metrics_scratch.csv").read_text().splitlines()) == 2  # header + 1 epoch
    assert (tmp_path / "run" / "model.pkl").is_file()
    finetune_experiment(data="hymenoptera", arch=ARCH, modes=["scratch"], out=tmp_path / "run2", cache_dir=cache,
                        mirror=mirror.url, log=lambda line: None, **FAST)
    assert mirror.requests["/hymenoptera_data.zip"] == 1


@pytest.mark.parametrize("name, archive, folder, classes, layout, sizes", [
    ("pets", "oxford-iiit-pet.tgz", "oxford-iiit-pet/images", ["Abyssinian", "basset_hound"],
     r"flat folder, label from file name (^(.*)_\d+\.jpg$)", (160, 40)),
    ("imagenette", "imagenette2-160.tgz", "imagenette2-160", ["n01440764", "n02102040"], "train/ + val/", (150, 50)),
])
def test_pets_and_imagenette_extract_to_the_layout_their_loaders_expect(mirror, tmp_path, name, archive, folder,
                                                                        classes, layout, sizes):
    cache = tmp_path / "cache"
    assert image_source(name, cache, mirror=mirror.url) == cache / "data" / folder
    dls = image_dls(name, size=32, bs=16, cache_dir=cache)  # finds the extracted folder
    assert (dls.info.classes, dls.info.layout, (dls.info.n_train, dls.info.n_valid)) == (classes, layout, sizes)
    assert dls.info.path == str(cache / "data" / folder) and mirror.requests[f"/{archive}"] == 1


def test_a_dropped_connection_leaves_nothing_and_the_next_call_completes(mirror, tmp_path):
    cache = tmp_path / "cache"
    mirror.drop.add("/mnist_png.tgz")
    with pytest.raises(DownloadError, match=r"could not download MNIST .*the connection dropped after [\d,]+ of "
                                            r"[\d,]+ bytes\); nothing was kept") as e:
        load_mnist("full", cache_dir=cache, mirror=mirror.url)
    assert "\n" not in str(e.value)
    assert _leftovers(cache) == []  # no partial archive, no half-extracted folder
    splits = load_mnist("full", cache_dir=cache, mirror=mirror.url)
    assert splits.sizes() == {"train": 100, "valid": 20, "test": 120} and mirror.requests["/mnist_png.tgz"] == 2


def test_a_silent_mirror_is_said_in_seconds_and_leaves_nothing(tmp_path):
    import time

    server = socket.socket()  # accepts connections (the kernel does), never answers: a black hole on 127.0.0.1
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    mirror = f"http://127.0.0.1:{server.getsockname()[1]}"
    t0 = time.perf_counter()
    try:
        with pytest.raises(DownloadError, match=rf"could not download MNIST from {mirror}/mnist_png.tgz "
                                                r"\(ConnectionError: no answer within 3 s\); nothing was kept"):
            load_mnist("full", cache_dir=tmp_path / "cache", mirror=mirror)
    finally:
        server.close()
    assert time.perf_counter() - t0 < 5  # the download's own timeout would wait 60 s
    assert _leftovers(tmp_path / "cache") == []


def test_a_failed_download_on_rank_0_stops_every_rank_of_a_launch(tmp_path):
    # torchrun, 2 processes (gloo): rank 0 downloads while rank 1 waits; a refused mirror must stop both with the
    # error, rank 1 too, instead of leaving it waiting for rank 0 until the launcher kills it
    env = offline_guard.guard_env(dict(os.environ, OMP_NUM_THREADS="1"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "train_mnist.py"), "--source", "full", "--mirror", "http://127.0.0.1:9",
           "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode != 0
    assert p.stderr.count("error: could not download MNIST from http://127.0.0.1:9/mnist_png.tgz") == 2, p.stderr
    assert not (tmp_path / "run").exists()


# A process killed mid-extraction (os._exit: no `finally` runs, as with SIGKILL or a power cut) after 40 files.
KILLED_MID_EXTRACTION = """
import os, sys, tarfile
from tp3_fastai.data.download import download
extract, done = tarfile.TarFile._extract_member, []
def dying(self, *args, **kwargs):
    done.append(1)
    if len(done) > 40:
        os._exit(9)
    return extract(self, *args, **kwargs)
tarfile.TarFile._extract_member = dying
download("MNIST", "https://example.org/mnist_png.tgz", "-", cache_dir=sys.argv[1], mirror=sys.argv[2])
"""


def test_a_kill_mid_extraction_leaves_no_dataset_folder_and_the_next_call_completes(mirror, tmp_path):
    cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-c", KILLED_MID_EXTRACTION, str(cache), mirror.url], capture_output=True,
                       text=True, timeout=120, env=offline_guard.guard_env())
    assert p.returncode == 9, p.stderr
    left = [e.name for e in (cache / "data").iterdir()]
    assert "mnist_png" not in left and any(n.startswith(".mnist_png-") for n in left)  # only the temporary folder
    assert sum(1 for _ in next((cache / "data").glob(".mnist_png-*")).rglob("*.png")) > 0  # it was half-extracted
    splits = load_mnist("full", cache_dir=cache, mirror=mirror.url)
    assert splits.sizes() == {"train": 100, "valid": 20, "test": 120} and mirror.requests["/mnist_png.tgz"] == 2


@pytest.mark.parametrize("path, name", [("/mnist_png.tgz", "full"), ("/hymenoptera_data.zip", "hymenoptera")])
def test_a_corrupt_archive_gives_one_line_naming_it_and_leaves_nothing(mirror, tmp_path, path, name):
    cache = tmp_path / "cache"
    mirror.files[path] = mirror.files[path][:2000]  # cut short upstream (its length says 2,000): a damaged archive
    with pytest.raises(DownloadError) as e:
        load_mnist(name, cache_dir=cache, mirror=mirror.url) if name == "full" else \
            image_source(name, cache, mirror=mirror.url)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{cache / 'data' / path[1:]} is not a readable archive")
    assert "it was deleted, run again to download it anew" in msg and f"{mirror.url}{path} is damaged" in msg
    assert _leftovers(cache) == []


# ---------------------------------------------------------------- hub weights through timm's own path

def make_hub_cache(hub: Path, arch: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """A Hugging Face cache holding `arch`'s default pretrained tag, laid out as huggingface_hub lays it out
    (models--timm--<name>/{blobs/<sha256>, refs/main, snapshots/<rev>/model.safetensors -> blob}), with a state
    dict made here (random values, classifier included, as timm's files hold); returns it and the hub id."""
    from safetensors.torch import save_file

    hub_id = timm.get_pretrained_cfg(arch).hf_hub_id
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    sd = {k: (torch.randn_like(v) * 0.1 if v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items()}
    repo = hub / f"models--{hub_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    tmp = repo / "blobs" / "incoming"
    save_file(sd, str(tmp))
    blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    tmp.rename(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return sd, hub_id


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> tuple[Path, dict[str, tuple[dict, str]]]:
    home = tmp_path_factory.mktemp("hf_home")
    return home, {arch: make_hub_cache(home / "hub", arch) for arch in ("resnet18", ARCH)}


@pytest.fixture
def offline_hub(hf_home, monkeypatch):
    """This process reads the hub from the cache above, offline (huggingface_hub reads its variables at import)."""
    import huggingface_hub.constants as hf

    home, made = hf_home
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return made


@pytest.fixture(scope="module")
def lfw_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lfw_cache")


def _body_matches(body: torch.nn.Module, made: dict[str, torch.Tensor], adapted: str = "") -> None:
    own = body.state_dict()
    assert set(own) == {k for k in made if not k.startswith("fc.")}  # the classifier was dropped
    for k, v in own.items():
        expected = made[k].sum(dim=1, keepdim=True) if k == adapted else made[k]  # timm's in_chans=1 adaptation
        assert torch.equal(v, expected), k


def test_resnet_learner_loads_the_hub_tensors_through_timm(offline_hub, lfw_cache, tmp_path):
    made, hub_id = offline_hub["resnet18"]
    norm = normalization(True, "resnet18")
    assert (norm["mean"], norm["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    dls = image_dls("lfw", size=32, bs=16, cache_dir=lfw_cache, stats=(norm["mean"], norm["std"]))
    learn = resnet_learner(dls, "resnet18", pretrained=True, path=tmp_path, progress=False, log=None)
    assert learn.weights == f"timm hub: {hub_id}" == "timm hub: timm/resnet18.a1_in1k" and learn.pretrained
    _body_matches(learn.model[0].model, made)
    assert learn.model[1][-1].out_features == 2  # fastai's new head for the two classes
    # one input channel: timm sums the first convolution over its three input channels; the digits are normalised
    # with the weights' statistics averaged over the channels (MNIST's own are refused, naming the fix)
    with pytest.raises(ValueError, match=r"normalise with mean \(0\.1307\).*normalization\(True, 'resnet18', "
                                         r"n_in=1\), e.g. mnist_dls\(\.\.\., stats=\.\.\.\)"):
        resnet_learner(mnist_dls(bs=64)[0], "resnet18", pretrained=True, n_in=1, path=tmp_path, progress=False,
                       log=None)
    gray = normalization(True, "resnet18", n_in=1)
    mdls, _ = mnist_dls(bs=64, stats=(gray["mean"][0], gray["std"][0]))
    learn1 = resnet_learner(mdls, "resnet18", pretrained=True, n_in=1, path=tmp_path, progress=False, log=None)
    _body_matches(learn1.model[0].model, made, adapted="conv1.weight")
    assert learn1.model(mdls.one_batch()[0]).shape == (64, 10)


def test_hub_weights_bring_their_normalisation_into_the_run(offline_hub, lfw_cache, tmp_path):
    made, hub_id = offline_hub[ARCH]
    plain = image_dls("lfw", size=32, bs=16, cache_dir=lfw_cache)  # ImageNet statistics
    with pytest.raises(ValueError, match=r"normalise with mean \(0\.485, 0\.456, 0\.406\).*"
                                         r"timm/test_resnet\.r160_in1k was pretrained on inputs normalised with "
                                         r"mean \(0\.5, 0\.5, 0\.5\) and std \(0\.5, 0\.5, 0\.5\)"):
        resnet_learner(plain, ARCH, pretrained=True, path=tmp_path, progress=False, log=None)
    lines = []
    s = finetune_experiment(arch=ARCH, pretrained=True, modes=["frozen"], out=tmp_path / "run",
                            cache_dir=lfw_cache, log=lines.append, **FAST)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["normalize"] == s["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                       "source": f"timm pretrained config of {hub_id}"}
    assert config["weights"] == s["weights"] == s["modes"]["frozen"]["weights"] == f"timm hub: {hub_id}"
    assert f"weights: timm hub: {hub_id}" in (run / "summary.md").read_text()
    assert f"frozen: timm hub: {hub_id}" in lines
    learn = load_learner(run / "model.pkl", cpu=True)  # what ran: the exported learner's own transforms
    norm = next(t for t in learn.dls.after_batch.fs if isinstance(t, Normalize))
    assert norm.mean.flatten().tolist() == [0.5] * 3 and norm.std.flatten().tolist() == [0.5] * 3
    _body_matches(learn.model[0].model, made)  # frozen with BatchNorm frozen: the body is the hub's, untouched


def test_finetune_script_pretrained_loads_exactly_the_hub_tensors(hf_home, tmp_path):
    home, made = hf_home
    sd, hub_id = made["resnet18"]
    env = offline_guard.guard_env()
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--arch", "resnet18", "--pretrained", "--modes",
           "frozen", "--epochs", "1", "--size", "32", "--bs", "16", "--aug", "none", "--device",
           "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr
    assert f"frozen: timm hub: {hub_id}" in p.stdout and "WARNING: no pretrained weights" not in p.stdout
    assert json.loads((run / "config.json").read_text())["weights"] == f"timm hub: {hub_id}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights"] == f"timm hub: {hub_id}" and summary["normalize"]["mean"] == list(IMAGENET_MEAN)
    assert f"| frozen | timm hub: {hub_id} |" in (run / "summary.md").read_text()
    _body_matches(load_learner(run / "model.pkl", cpu=True).model[0].model, sd)


# ---------------------------------------------------------------- bad input: refused before any work

def _no_training(lines: list[str], out: Path) -> None:
    assert not any(" epoch " in line for line in lines), lines  # no epoch ran
    assert not out.exists()  # no run folder was made


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory, lfw_cache) -> dict[str, Path]:
    """Files that `--weights` must refuse: pickles weights_only refuses, another architecture, a missing file."""
    folder = tmp_path_factory.mktemp("weights")
    model = timm.create_model(ARCH, pretrained=False, num_classes=0)
    torch.save(model, folder / "whole_model.pth")  # a pickled nn.Module
    torch.save({"state_dict": model.state_dict(), "path": Path("made/here")}, folder / "with_object.pth")
    dls = image_dls("lfw", size=32, bs=16, cache_dir=lfw_cache)
    export_learner(resnet_learner(dls, ARCH, progress=False, log=None), folder / "fastai_export.pkl")
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), folder / "resnet18.pth")
    return {"whole model": folder / "whole_model.pth", "pickled object": folder / "with_object.pth",
            "fastai export": folder / "fastai_export.pkl", "another arch": folder / "resnet18.pth",
            "missing": folder / "missing.safetensors"}


@pytest.mark.parametrize("kind, error, message", [
    ("whole model", ValueError, "is a pickled object .*ResNet.*weights_only=True refuses"),
    ("pickled object", ValueError, "is a pickled object .*weights_only=True refuses"),
    ("fastai export", ValueError, "is a fastai export .*Learner.*weights_only=True refuses"),
    ("another arch", ValueError, "does not match this ResNet body.*same timm architecture"),
    ("missing", FileNotFoundError, "does not exist"),
])
def test_bad_weights_stop_before_the_first_mode_trains(bad_weights, lfw_cache, tmp_path, kind, error, message):
    lines = []
    with pytest.raises(error, match=message) as e:
        finetune_experiment(arch=ARCH, pretrained=bad_weights[kind], modes=["scratch", "frozen"],
                            out=tmp_path / "run", cache_dir=lfw_cache, log=lines.append, **FAST)
    _no_training(lines, tmp_path / "run")
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)  # torch's bold codes are not passed on


def test_the_command_line_refuses_a_pickled_model_in_one_line_before_training(bad_weights, tmp_path, capsys):
    from tp3_fastai import cli

    with pytest.raises(SystemExit) as e:  # what `scripts/finetune.py --weights whole_model.pth ...` runs
        cli.finetune(weights=str(bad_weights["whole model"]), arch=ARCH, size=32, epochs=1, modes="scratch,frozen",
                     device="cpu", cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {bad_weights['whole model']} is a pickled object (timm.models.resnet.ResNet")
    assert "torch.save(torch.load(" in err and ".state_dict()" in err and "\x1b" not in err
    _no_training(out.splitlines(), tmp_path / "run")


def test_offline_pretrained_stops_before_scratch_trains(lfw_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    lines = []
    with pytest.raises(DownloadError, match=r"could not download ImageNet weights for test_resnet "
                                            r"\(timm/test_resnet\.r160_in1k\).*--weights PATH"):
        finetune_experiment(arch=ARCH, pretrained=True, modes=["scratch", "frozen"], out=tmp_path / "run",
                            cache_dir=lfw_cache, log=lines.append, **FAST)
    _no_training(lines, tmp_path / "run")


@pytest.mark.parametrize("kind", ["whole model", "fastai export"])
def test_a_pickled_model_is_refused_with_the_one_line_that_makes_it_load(bad_weights, tmp_path, kind):
    import re
    import shlex

    from tp3_fastai.transfer.weights import check_weights

    with pytest.raises(ValueError) as e:
        check_weights(bad_weights[kind], ARCH)
    line = re.search(r"(python -c .*)$", str(e.value)).group(1)
    out = re.search(r"then pass (\S+):", str(e.value)).group(1)
    p = subprocess.run(shlex.split(line), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=offline_guard.guard_env(dict(os.environ, PYTHONPATH=str(ROOT))))
    assert p.returncode == 0, p.stderr
    check_weights(tmp_path / out, ARCH)  # the file it wrote loads


def test_a_fastai_learners_whole_model_state_dict_gives_its_body(lfw_cache, tmp_path):
    from tp3_fastai.transfer.weights import load_body_weights

    dls = image_dls("lfw", size=32, bs=16, cache_dir=lfw_cache)
    torch.manual_seed(3)
    learn = resnet_learner(dls, ARCH, progress=False, log=None)
    torch.save(learn.model.state_dict(), tmp_path / "learner.pth")  # keys 0.model.* (body) and 1.* (head)
    body = timm.create_model(ARCH, pretrained=False, num_classes=0)
    info = load_body_weights(body, tmp_path / "learner.pth")
    assert info["ignored_keys"] == sorted(k for k in learn.model.state_dict() if k.startswith("1."))
    for k, v in body.state_dict().items():
        assert torch.equal(v, learn.model[0].model.state_dict()[k]), k


# The hub client retries a refused connection for 46 s before it gives up (measured here with the address below,
# huggingface_hub 2.4): one connection check says it at once. A closed port refuses; a server that accepts and never
# answers is silence (the check waits PROBE_TIMEOUT, 3 s).
@pytest.fixture(params=["refused", "silent"])
def unreachable_hub(request, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    if request.param == "silent":
        server.listen(8)  # the kernel completes connections; nobody reads or answers
    port = server.getsockname()[1]  # "refused": bound, never listening, so connecting is refused
    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    yield request.param, f"http://127.0.0.1:{port}"
    server.close()


def test_offline_pretrained_is_said_in_seconds_against_an_unreachable_hub(unreachable_hub, lfw_cache, tmp_path):
    import time

    kind, endpoint = unreachable_hub
    lines = []
    t0 = time.perf_counter()
    with pytest.raises(DownloadError) as e:
        finetune_experiment(arch=ARCH, pretrained=True, modes=["scratch", "frozen"], out=tmp_path / "run",
                            cache_dir=lfw_cache, log=lines.append, **FAST)
    seconds = time.perf_counter() - t0
    assert seconds < 5, seconds
    why = "Connection refused" if kind == "refused" else "no answer within 3 s"
    assert f"hub ({endpoint}) is not reachable (" in str(e.value) and why in str(e.value)
    assert "does not hold them. Are you offline?" in str(e.value) and "--weights PATH" in str(e.value)
    _no_training(lines, tmp_path / "run")


def test_an_unreachable_hub_still_gives_the_weights_of_the_cache(hf_home, lfw_cache, monkeypatch):
    import huggingface_hub.constants as hf

    from tp3_fastai.transfer.weights import hub_state_dict

    home, made = hf_home
    monkeypatch.setattr(hf, "ENDPOINT", "http://127.0.0.1:9")  # refused
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hub"))
    sd, hub_id = hub_state_dict("resnet18", 3)
    assert hub_id == made["resnet18"][1] and hf.HF_HUB_OFFLINE is False  # offline for that read only
    assert all(torch.equal(v, made["resnet18"][0][k]) for k, v in sd.items())


def test_the_command_line_says_an_unreachable_hub_in_one_line_without_retries(lfw_cache, tmp_path):
    env = offline_guard.guard_env(dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9",
                                                           HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1"))
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--arch", ARCH, "--pretrained", "--size", "32",
           "--device", "cpu", "--cache-dir", str(lfw_cache), "--out", str(tmp_path / "run")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: could not download ImageNet weights for test_resnet") and "Retrying" not in p.stderr
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_that_is_not_a_finetune_run_changes_nothing(lfw_cache, tmp_path):
    mnist_run = tmp_path / "mnist_run"
    mnist_run.mkdir()
    (mnist_run / "config.json").write_text(json.dumps({"source": "sample", "archs": ["mlp"], "epochs": 1, "bs": 64,
                                                       "lr": 0.003, "seed": 42}))
    empty = tmp_path / "empty"
    empty.mkdir()
    finetune_run = tmp_path / "finetune_run"
    finetune_run.mkdir()
    (finetune_run / "config.json").write_text(json.dumps({"data": "lfw", "arch": ARCH}))
    for folder, message in ((empty, r"config\.json does not exist: .* is not a run folder"),
                            (mnist_run, r"lacks data, arch, .*: not the run folder of a finetune run")):
        before = sorted(p.name for p in folder.iterdir())
        lines = []
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            finetune_experiment(resume=folder, out=tmp_path / "run", cache_dir=lfw_cache, log=lines.append,
                                device="cpu", progress=False)
        assert sorted(p.name for p in folder.iterdir()) == before
        _no_training(lines, tmp_path / "run")
    with pytest.raises(ValueError, match="lacks source, archs, .*: not the run folder of a train_mnist run"):
        train_mnist(resume=finetune_run, out=tmp_path / "m", device="cpu", progress=False, log=lambda line: None)
    assert not (tmp_path / "m").exists()


def test_train_mnist_lr_0_and_a_batch_larger_than_the_training_set_leave_no_run_folder(lfw_cache, tmp_path):
    lines = []
    with pytest.raises(ValueError, match="lr must be positive, got .*lr=0"):
        train_mnist(lr=0, out=tmp_path / "mnist", device="cpu", progress=False, log=lines.append)
    _no_training(lines, tmp_path / "mnist")
    with pytest.raises(ValueError, match=r"batch size 256 is larger than the 150 training images of lfw.*lower "
                                         r"--bs to 150 or less"):
        finetune_experiment(arch=ARCH, modes=["scratch"], out=tmp_path / "run", cache_dir=lfw_cache,
                            log=lines.append, **dict(FAST, bs=256))
    _no_training(lines, tmp_path / "run")


# ---------------------------------------------------------------- the commands' online flags

def test_finetune_reads_a_named_source_from_a_file_mirror(archives, tmp_path):
    """`--mirror file:///folder`: the archives of a folder (a closed network's share), through `tp3 finetune`."""
    from tp3_fastai.cli import main as tp3

    folder = tmp_path / "share"
    folder.mkdir()
    (folder / "hymenoptera_data.zip").write_bytes(archives["/hymenoptera_data.zip"])
    cache, run = tmp_path / "cache", tmp_path / "run"
    tp3(["finetune", "--data", "hymenoptera", "--mirror", folder.as_uri(), "--cache-dir", str(cache), "--arch", ARCH,
         "--size", "32", "--bs", "16", "--epochs", "1", "--modes", "scratch", "--aug", "none", "--device", "cpu",
         "--no-checkpoints", "--out", str(run)])
    s = json.loads((run / "summary.json").read_text())
    assert s["data"]["path"] == str(cache / "data" / "hymenoptera_data") and s["data"]["classes"] == ["ants", "bees"]
    assert (s["data"]["n_train"], s["data"]["n_valid"]) == (150, 50)
    assert json.loads((run / "config.json").read_text())["mirror"] == folder.as_uri()
    assert [p.name for p in (cache / "data").iterdir()] == ["hymenoptera_data"]  # extracted, the archive gone


def test_run_pretrained_takes_the_hub_weights(offline_hub, tmp_path):
    from tp3_fastai.cli import main as tp3

    made, hub_id = offline_hub[ARCH]
    out = tmp_path / "report"
    tp3(["run", "--parts", "transfer", "--pretrained", "--arch", ARCH, "--transfer-epochs", "1", "--modes", "frozen",
         "--device", "cpu", "--out", str(out)])
    s = json.loads((out / "part2_transfer" / "summary.json").read_text())
    assert s["weights"] == f"timm hub: {hub_id}" and s["data"]["source"].startswith("lfw")
    assert f"**Where the weights came from: timm hub: {hub_id}.**" in (out / "report.md").read_text()
    _body_matches(load_learner(out / "part2_transfer" / "model.pkl", cpu=True).model[0].model, made)
