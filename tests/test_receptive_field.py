"""Receptive fields: exact values from the recurrence, merges, 1D/3D, measured == analytic, reports and the script."""
from __future__ import annotations

import csv
import json
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tp3_fastai.mnist.models import MLP, SmallCNN
from tp3_fastai.receptive_field import (
    LargeActivationWarning, effective_receptive_field, layer_report, layer_report_markdown, measure_receptive_field,
    parse_input_shape, plot_erf, plot_rf_box, receptive_fields, rf_table_markdown, select_rows, write_rf_table,
)
from figures import colormap_pixels, drawn_box, pixels

ROOT = Path(__file__).resolve().parents[1]


def recurrence(layers):
    """Reference: (R, J, start) after each (k, s, p, d) layer, from the course's formulas (start_0 = 0)."""
    R, J, start, out = 1, 1, 0.0, []
    for k, s, p, d in layers:
        k_eff = d * (k - 1) + 1
        R, start, J = R + (k_eff - 1) * J, start + ((k_eff - 1) / 2 - p) * J, J * s
        out.append((R, J, start))
    return out


def by_name(rows):
    return {r.name: r for r in rows}


def assert_measured(model, nodes, shape):
    for node in nodes:
        m = measure_receptive_field(model, node, shape)
        assert m.agrees, m
        assert m.R == m.R_analytic and m.start == m.start_analytic, m
        assert all(j == ja for j, ja in zip(m.J, m.J_analytic) if j is not None), m


# ----------------------------------------------------------------------------------- hand-made nets
def test_sequential_net_matches_recurrence():
    layers = [(3, 1, 1, 1), (3, 2, 0, 1), (2, 2, 0, 1), (5, 1, 4, 2), (3, 2, 1, 1)]
    net = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 2, 0), nn.MaxPool2d(2, 2),
                        nn.Conv2d(4, 4, 5, 1, 4, dilation=2), nn.AvgPool2d(3, 2, 1))
    rows = by_name(receptive_fields(net, (1, 1, 64, 64)))
    for name, (R, J, start) in zip(["0", "2", "3", "4", "5"], recurrence(layers)):
        assert rows[name].R == (R, R) and rows[name].J == (J, J) and rows[name].start == (start, start), name
    assert rows["1"].R == rows["0"].R   # ReLU keeps the field
    assert (rows["5"].R, rows["5"].J, rows["5"].start) == ((47, 47), (8, 8), (2, 2))   # worked by hand
    assert_measured(net, ["2", "5"], (1, 1, 64, 64))


def test_asymmetric_kernels_strides_and_padding_per_axis():
    net = nn.Sequential(nn.Conv2d(1, 2, (3, 7), stride=(1, 2), padding=(0, 3)), nn.MaxPool2d((2, 3), (2, 1)),
                        nn.Conv2d(2, 2, (5, 1), dilation=(2, 1), padding=(1, 0)))
    row = receptive_fields(net, (1, 1, 40, 40))[-1]
    h = recurrence([(3, 1, 0, 1), (2, 2, 0, 1), (5, 1, 1, 2)])[-1]
    w = recurrence([(7, 2, 3, 1), (3, 1, 0, 1), (1, 1, 0, 1)])[-1]
    assert row.R == (h[0], w[0]) and row.J == (h[1], w[1]) and row.start == (h[2], w[2])
    assert row.R != (row.R[0], row.R[0])
    assert_measured(net, [row.name], (1, 1, 40, 40))


def test_small_cnn_exact_fields_and_measured():
    rows = by_name(receptive_fields(SmallCNN(), (1, 1, 28, 28)))
    expected = {"conv1": (5, 1, 0), "pool1": (6, 2, 0.5), "conv2": (14, 2, 0.5), "pool2": (16, 4, 1.5)}
    for name, (R, J, start) in expected.items():
        assert (rows[name].R, rows[name].J, rows[name].start) == ((R, R), (J, J), (start, start)), name
    for name in ("flatten", "fc1", "fc2"):   # flatten / linear: the whole 28x28 image
        assert rows[name].R == (28, 28) and rows[name].whole == (True, True) and rows[name].J == (None, None)
    assert rows["fc1"].params == 490 * 50 + 50
    assert_measured(SmallCNN(), ["conv1", "pool1", "conv2", "pool2", "fc2"], (1, 1, 28, 28))


def test_mlp_sees_the_whole_image_everywhere():
    rows = receptive_fields(MLP(), (1, 1, 28, 28))
    assert all(r.R == (28, 28) and all(r.whole) for r in rows[1:])


# ------------------------------------------------------------------------------------------- merges
class TwoBranch(nn.Module):
    """a: 1x5 conv, b: 5x1 conv -> sum; c: 3x3 padded conv, d: unpadded 3x3 conv shifted by F.pad -> cat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, (1, 5), padding=(0, 2))
        self.b = nn.Conv2d(1, 2, (5, 1), padding=(2, 0))
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.d = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        y = self.a(x)
        y += self.b(x)   # in-place residual-style merge
        return torch.cat([self.c(y), F.pad(self.d(y), (2, 0, 2, 0))], dim=1)


def test_merge_is_the_union_of_branch_fields():
    rows = by_name(receptive_fields(TwoBranch(), (1, 1, 24, 24)))
    assert rows["a"].R == (1, 5) and rows["b"].R == (5, 1)
    assert rows["add"].R == (5, 5) and rows["add"].inputs == ("a", "b")   # neither branch alone
    assert rows["c"].R == (7, 7) and rows["c"].start == (0, 0)
    assert rows["pad"].R == (7, 7) and rows["pad"].start == (-1, -1)     # d starts at +1, shifted by -2
    assert rows["cat"].R == (8, 8) and rows["cat"].start == (-0.5, -0.5)  # union of [-3, 3] and [-4, 2]
    assert_measured(TwoBranch(), ["add", "pad", "cat"], (1, 1, 24, 24))


class FunctionalNet(nn.Module):
    """F.max_pool2d, a data-dependent branch (torch.fx cannot trace it), x + identity, view and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.res = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), 2)
        if x.mean() > -1e9:
            x = F.relu(self.res(x)) + x
        return self.fc(x.view(x.shape[0], -1))


def test_functional_ops_and_untraceable_model():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(FunctionalNet())
    rows = by_name(receptive_fields(FunctionalNet(), (2, 1, 16, 16)))
    assert rows["max_pool2d"].R == (4, 4) and rows["max_pool2d"].J == (2, 2)
    assert rows["add"].R == (8, 8)   # relu(res(x)) + x: the larger branch
    assert rows["view"].whole == (True, True) and rows["fc"].R == (16, 16)
    assert_measured(FunctionalNet(), ["max_pool2d", "add", "fc"], (1, 1, 16, 16))


# ------------------------------------------------------------------------------------------ 1D and 3D
def test_1d_dilation_stride_same_padding():
    net = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.MaxPool1d(3, 2, dilation=2),
                        nn.Conv1d(4, 4, 5, dilation=3, padding="same"), nn.AvgPool1d(2, 2))
    rows = receptive_fields(net, (1, 2, 100))
    expected = recurrence([(3, 2, 1, 1), (3, 2, 0, 2), (5, 1, 6, 3), (2, 2, 0, 1)])
    assert [(r.R[0], r.J[0], r.start[0]) for r in rows[1:]] == expected
    assert_measured(net, ["1", "3"], (1, 2, 100))


def test_3d_layers_and_global_pool():
    net = nn.Sequential(nn.Conv3d(1, 2, (3, 1, 5), stride=(1, 2, 2), padding=(1, 0, 2)), nn.ReLU(),
                        nn.MaxPool3d((2, 2, 1)), nn.Conv3d(2, 2, 3, dilation=(1, 2, 1)),
                        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 3))
    rows = by_name(receptive_fields(net, (1, 1, 16, 20, 24)))
    axes = [[(3, 1, 1, 1), (2, 2, 0, 1), (3, 1, 0, 1)], [(1, 2, 0, 1), (2, 2, 0, 1), (3, 1, 0, 2)],
            [(5, 2, 2, 1), (1, 1, 0, 1), (3, 1, 0, 1)]]
    ref = [recurrence(a)[-1] for a in axes]
    assert rows["3"].R == tuple(r[0] for r in ref) and rows["3"].J == tuple(r[1] for r in ref)
    assert rows["3"].start == tuple(r[2] for r in ref)
    assert rows["4"].whole == (True, True, True) and rows["6"].whole == (True, True, True)
    assert_measured(net, ["2", "3", "6"], (1, 1, 16, 20, 24))


def test_adaptive_pool_to_a_grid_is_a_pool():
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.AdaptiveAvgPool2d(2))
    row = receptive_fields(net, (1, 1, 8, 8))[-1]
    assert row.R == (6, 6) and row.J == (4, 4) and not any(row.whole)   # 8 -> 2: kernel 4, stride 4


def test_unsupported_op_names_the_op_and_module():
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2))
    with pytest.raises(ValueError, match=r"interpolate.*module '1'"):
        receptive_fields(net, (1, 1, 8, 8))


def test_bad_input_shape_and_unknown_node():
    with pytest.raises(ValueError, match="input shape"):
        parse_input_shape("1,3,abc")
    with pytest.raises(ValueError, match="close names"):
        measure_receptive_field(SmallCNN(), "conv3", (1, 1, 28, 28))
    with pytest.raises(ValueError, match="conv1"):
        select_rows(receptive_fields(SmallCNN(), (1, 1, 28, 28)), "conv_1")


# ----------------------------------------------------------------------------------- real networks
def test_torchvision_resnet18_analytic_and_measured_at_several_depths():
    from torchvision.models import resnet18

    model = resnet18()
    rows = receptive_fields(model, (1, 3, 224, 224))
    ends = {e: r for r in rows for e in (r.name, *r.ends)}
    expected = {"conv1": (7, 2), "maxpool": (11, 4), "layer1.0": (27, 4), "layer1": (43, 4), "layer2": (99, 8),
                "layer3": (211, 16), "layer4": (435, 32)}
    for name, (R, J) in expected.items():
        assert ends[name].R == (R, R) and ends[name].J == (J, J) and ends[name].start == (0, 0), name
    assert ends["fc"].R == (224, 224) and ends["fc"].whole == (True, True)
    assert_measured(model, ["maxpool", "layer1.0", "layer2.0", "layer3.0"], (1, 3, 64, 64))


def test_timm_resnet50_stem_first_bottleneck_and_stages():
    import timm

    model = timm.create_model("resnet50", pretrained=False)
    ends = {e: r for r in receptive_fields(model, (1, 3, 224, 224)) for e in (r.name, *r.ends)}
    expected = {"maxpool": (11, 4), "layer1.0": (19, 4), "layer1": (35, 4), "layer2": (91, 8), "layer3": (267, 16),
                "layer4": (427, 32)}
    for name, (R, J) in expected.items():
        assert ends[name].R == (R, R) and ends[name].J == (J, J), name
    assert ends["fc"].whole == (True, True) and ends["fc"].R == (224, 224)


def test_timm_zero_init_blocks_are_measured_through_the_residual_branch():
    import timm

    model = timm.create_model("resnet18", pretrained=False)   # last BN of every block starts at zero
    assert float(model.layer1[0].bn2.weight.detach().abs().sum()) == 0
    m = measure_receptive_field(model, "layer1.0", (1, 3, 48, 48))
    assert m.agrees and m.R == (27, 27)   # the shortcut alone would give 11


def test_fastai_learner_body_and_head():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.vision.learner import create_timm_model

    model, _ = create_timm_model("resnet18", n_out=3, pretrained=False)
    data = [(torch.zeros(3, 32, 32), 0)] * 4
    learn = Learner(DataLoaders.from_dsets(data, data, bs=2), model, loss_func=nn.CrossEntropyLoss())
    rows = receptive_fields(learn, (1, 3, 64, 64))
    ends = {e: r for r in rows for e in (r.name, *r.ends)}
    assert ends["0"].R == (435, 435) and ends["0"].J == (32, 32)                    # body
    assert ends["1.0"].op == "cat" and ends["1.0"].whole == (True, True)           # AdaptiveConcatPool2d
    assert rows[-1].name == "1.8" and rows[-1].R == (64, 64) and all(rows[-1].whole)  # head


# ------------------------------------------------------------------------- reports, ERF and plots
def test_layer_report_counts_and_memory():
    (inp, conv) = layer_report(nn.Conv2d(3, 16, 5), (2, 3, 32, 32))
    assert conv.out_shape == (2, 16, 28, 28) and conv.weights == 3 * 16 * 25 and conv.biases == 16
    assert conv.params == 1216 and conv.activations == 2 * 16 * 28 * 28 and conv.bytes == 4 * conv.activations
    assert "| **total** |" in layer_report_markdown([inp, conv])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = layer_report(nn.Conv3d(1, 64, 3, padding=1), (1, 1, 256, 256, 256))   # shapes only: no 4 GiB
    assert infos[-1].bytes == 64 * 256 ** 3 * 4
    assert any(issubclass(w.category, LargeActivationWarning) and "GiB" in str(w.message) for w in caught)


def test_effective_field_lies_inside_the_theoretical_field(tmp_path):
    torch.manual_seed(0)
    erf = effective_receptive_field(SmallCNN(), "pool2", (1, 1, 28, 28), n_samples=4)
    assert erf.map.shape == (28, 28) and erf.theoretical_pixels == 16 * 16
    assert erf.mass_inside == pytest.approx(1.0)
    assert 0 < erf.area_fraction[0.5] < erf.area_fraction[0.9] <= 1
    # the heat map (and its colour bar) in viridis, a whole range of its colours
    area, colours = colormap_pixels(pixels(plot_erf(erf, tmp_path / "erf.png")), "viridis")
    assert area > 50_000 and colours > 100, (area, colours)  # measured 167,728 and 387


def test_tables_and_box(tmp_path):
    rows = receptive_fields(SmallCNN(), (1, 1, 28, 28))
    files = write_rf_table(rows, tmp_path)
    with open(files["csv"]) as fh:
        table = list(csv.DictReader(fh))
    pool2 = next(r for r in table if r["name"] == "pool2")
    assert (pool2["R0"], pool2["J1"], pool2["start0"]) == ("16", "4", "1.5")
    assert "| `pool2` | max_pool2d 2x2/2 | 1x10x7x7 | 0 | 16x16 | 4x4 | (1.5, 1.5) |" in rf_table_markdown(rows)
    row = next(r for r in rows if r.name == "pool2")
    assert row.box() == ((-6, 9), (-6, 9)) and row.box((3, 3)) == ((6, 21), (6, 21))   # start 1.5 +- 7.5, + 3*4
    img = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    drawn = pixels(plot_rf_box(img, row, tmp_path / "box.png"))
    # the red box on the (black) image is the field of the centre unit (3, 3): pixels 6 to 21 on both axes
    assert drawn_box(drawn, (28, 28), "red", "black") == pytest.approx((5.5, 21.5, 5.5, 21.5), abs=0.25)


# ---------------------------------------------------------------------------------------- the script
def test_script_writes_the_run_folder(tmp_path, monkeypatch, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["receptive_field.py", "--arch", "cnn", "--layers", "conv?,pool?,fc2",
                                      "--verify", "--erf", "--image", str(image), "--out", str(out)])
    runpy.run_path(str(ROOT / "scripts" / "receptive_field.py"), run_name="__main__")
    for f in ("receptive_field.csv", "receptive_field.md", "erf.png", "rf_box.png", "summary.json", "config.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_agree"] is True and summary["shown"] == 5 and summary["rf_box_node"] == "pool2"
    assert "| `pool2` |" in capsys.readouterr().out


def test_script_unknown_arch_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["receptive_field.py", "--arch", "resnet5O"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "scripts" / "receptive_field.py"), run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resnet50" in err
