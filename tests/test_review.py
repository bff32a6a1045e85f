"""Part 0 beyond the layer and architecture tables: activations and softmax, first-layer kernel grids (one tile per
filter, each saying where its weights came from), and the `layers` part of the main job."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from tp3_fastai.review.activations import ACTIVATIONS, activation_curves, plot_activations, softmax_steps
from tp3_fastai.data.mnist import DownloadError
from tp3_fastai.review.kernels import first_conv, imagenet_grid, kernel_grid, kernel_tiles, plot_kernel_grid
from tp3_fastai.mnist.models import SmallCNN
from tp3_fastai.practical import run_practical
from figures import assert_series, count_tiles, pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_activation_derivatives_are_the_textbook_formulas(tmp_path):
    x = torch.linspace(-4, 4, 161, dtype=torch.float64)
    curves = activation_curves(x)
    assert list(curves) == list(ACTIVATIONS)
    s = torch.sigmoid(x)
    expected = {"ReLU": (x > 0).double(), "Leaky ReLU (0.1)": torch.where(x > 0, 1.0, 0.1).double(),
                "ELU (1)": torch.where(x > 0, torch.ones_like(x), torch.exp(x)), "Softplus": s,
                "sigmoid": s * (1 - s), "tanh": 1 - torch.tanh(x) ** 2}
    for name, (y, dy) in curves.items():
        assert torch.allclose(y, ACTIVATIONS[name](x)), name
        assert torch.allclose(dy, expected[name], atol=1e-12), name
    assert_series(plot_activations(tmp_path / "a.png"), len(ACTIVATIONS))  # a curve colour per activation


def test_softmax_written_out_equals_torch_and_sums_to_one():
    rows = softmax_steps([2.0, 1.0, 0.1])
    probs = torch.tensor([r["probability"] for r in rows], dtype=torch.float64)
    assert torch.allclose(probs, torch.softmax(torch.tensor([2.0, 1.0, 0.1], dtype=torch.float64), 0))
    assert probs.sum().item() == pytest.approx(1.0) and rows[0]["exp_z"] == pytest.approx(7.389056)
    big = softmax_steps([1000.0, 0.0])   # no overflow for large logits
    assert big[0]["probability"] == pytest.approx(1.0) and big[1]["probability"] == pytest.approx(0.0)


def test_kernel_grid_has_one_tile_per_filter_scaled_to_its_own_range(tmp_path):
    torch.manual_seed(0)
    cnn = SmallCNN()
    grid = kernel_grid(cnn, "cnn", "random init (test)")
    assert grid.layer == "conv1" and grid.shape == (10, 1, 5, 5) and len(grid.tiles) == 10
    w = cnn.conv1.weight.detach()
    for i, tile in enumerate(grid.tiles):
        assert tile.shape == (1, 5, 5) and tile.min() == 0 and tile.max() == pytest.approx(1)
        expected = (w[i] - w[i].min()) / (w[i].max() - w[i].min())
        assert torch.allclose(tile, expected)
    assert count_tiles(pixels(plot_kernel_grid(grid, tmp_path / "k.png"))) == 10  # a tile per filter
    rgb = kernel_tiles(torch.randn(64, 3, 7, 7))
    assert len(rgb) == 64 and rgb[0].shape == (3, 7, 7)
    with pytest.raises(ValueError, match="2-D convolution"):
        kernel_tiles(torch.randn(4, 1, 5))
    with pytest.raises(ValueError, match="has no convolution"):
        first_conv(torch.nn.Linear(2, 2))


def test_imagenet_grid_from_a_weights_file_shows_that_files_first_layer(tmp_path):
    torch.manual_seed(1)
    body = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(path))
    grid = imagenet_grid(path, "resnet18")
    assert len(grid.tiles) == 64 and grid.shape == (64, 3, 7, 7)
    w = body.conv1.weight.detach()
    assert torch.allclose(grid.tiles[5], (w[5] - w[5].min()) / (w[5].max() - w[5].min()))
    assert str(path.resolve()) in grid.source and "sha256" in grid.source and "r18.safetensors" in grid.title


@pytest.fixture(scope="module")
def part0(tmp_path_factory, monkeypatch_module):
    def offline(arch, n_in):
        raise DownloadError("could not download ImageNet weights (test: offline)")

    monkeypatch_module.setattr("tp3_fastai.transfer.weights.hub_state_dict", offline)
    tmp = tmp_path_factory.mktemp("part0")
    return run_practical(parts=("layers",), weights=True, study_options=dict(cache_dir=tmp / "no_bodies"),
                         out=tmp / "run", log=PART0_LOG.append)


PART0_LOG: list[str] = []


def test_the_layers_part_alone_says_why_it_trains_a_cnn_before_it_does(part0):
    from tp3_fastai.practical import PART0_TRAINS

    lines = [one for line in PART0_LOG for one in str(line).splitlines()]
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("cnn epoch 1/2"))
    assert lines.index(PART0_TRAINS) < first_epoch and lines.index(PART0_TRAINS) == 1  # right after the part's title
    assert "Part I does not run" in PART0_TRAINS and "2 epochs" in PART0_TRAINS


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_layers_part_alone_writes_its_report_section(part0):
    md = (part0 / "report.md").read_text()
    summary = json.loads((part0 / "part0_layers" / "summary.json").read_text())
    for title in ("## Part 0: layers, shapes and weights", "## Part 0: VGG and ResNet",
                  "## Part 0: activations and softmax", "## Part 0: what a first layer learns"):
        assert title in md
    assert "## Part I" not in md and md.index("## Part 0: layers") < md.index("## Run")
    # the tables hold the package's values
    assert "| nn.Conv1d(2, 16, kernel_size=5, padding=2, stride=4, bias=False) | (8, 2, 10201) | (8, 16, 2551) | " \
           "(8, 16, 2551) | (8, 16, 2501) | 160 | 0 | 160 |" in md
    r50 = next(r for r in summary["architectures"] if r["arch"] == "resnet50")
    assert f"| resnet50 | {r50['params']:,} | 50 | {r50['gmacs']:.4g} | {r50['stage 1']} |" in md
    assert "| maxpool (3x3/2) | R 9, J 4 | R 11, J 4 | R 11, J 4 |" in md
    # Part I did not run: its CNN was trained here, and the grid says so; no cached body; the hub was offline
    (k,) = summary["kernels"]
    assert k["filters"] == 10 and k["shape"] == [10, 1, 5, 5]
    assert "trained from scratch here for Part 0 (Part I did not run): 2 epochs" in k["source"] and k["source"] in md
    assert any("No body pretrained offline in the cache" in n for n in summary["kernel_notes"])
    assert any("ImageNet weights not available" in n and "offline" in n for n in summary["kernel_notes"])
    html = (part0 / "report.html").read_text()
    for fig in ("part0_layers/architectures.png", "part0_layers/activations.png", "part0_layers/kernels_mnist_cnn.png"):
        assert "![" in md and f"({fig})" in md and f'src="{fig}"' in html
    # what each figure shows: the seven networks, the six activations, a tile per filter of the CNN's first layer
    assert_series(part0 / "part0_layers/architectures.png", 7)
    assert_series(part0 / "part0_layers/activations.png", 6)
    assert count_tiles(pixels(part0 / "part0_layers/kernels_mnist_cnn.png")) == 10
    assert html.count("<table") == 4


def test_a_missing_weights_file_is_refused_before_any_part_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_practical(parts=("layers",), weights=tmp_path / "nope.safetensors", out=tmp_path / "r",
                      log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_kernel_review_shows_a_weights_files_first_layer_or_says_why_not(part0, tmp_path):
    from tp3_fastai.review.run import kernel_review

    torch.manual_seed(2)
    body = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "r18.pth"
    torch.save(body.state_dict(), path)
    cnn_run = part0 / "part0_layers" / "mnist_cnn"   # trained by the fixture's run
    ok = kernel_review(tmp_path / "ok", mnist_run=cnn_run, weights=path, arch="resnet18",
                       cache_dir=tmp_path / "none", log=lambda s: None)
    assert [k["filters"] for k in ok["kernels"]] == [10, 64] and str(path.resolve()) in ok["kernels"][1]["source"]
    img = pixels(tmp_path / "ok" / "kernels_imagenet.png")  # 64 tiles of the weights' 3 colour channels
    coloured = img.max(axis=-1) - img.min(axis=-1) > 12
    assert count_tiles(img) == 64 and coloured.mean() > 0.3
    bad = kernel_review(tmp_path / "bad", mnist_run=cnn_run, weights=path, arch="resnet50",
                        cache_dir=tmp_path / "none", log=lambda s: None)
    assert len(bad["kernels"]) == 1 and any("do not load into resnet50" in n for n in bad["kernel_notes"])
