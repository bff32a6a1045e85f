"""The main job, reduced to small sizes: every part runs, and report.md / report.html show what the parts wrote."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tp3_fastai.practical import run_practical
from figures import CYCLE, assert_series, colormap_pixels, count_colour, image_area, pixels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("practical")
    run = run_practical(mnist_epochs=1, ks=(5,), seeds=(0,),
                        study_options=dict(arch="test_resnet", epochs=3, pretrain_epochs=1, cache_dir=tmp / "bodies"),
                        rf_arch="timm:resnet18", rf_size=64, out=tmp / "report", log=lambda s: None)
    return run


def test_the_report_shows_every_part_with_the_numbers_the_parts_wrote(report):
    md = (report / "report.md").read_text()
    for title in ("## Part 0: layers, shapes and weights", "## Part 0: what a first layer learns",
                  "## Part I: MLP vs CNN on MNIST", "## Part II: transfer learning with few labels",
                  "## Part III: receptive fields of timm:resnet18", "## Run"):
        assert title in md
    assert md.index("## Part 0: layers") < md.index("## Part I:")  # the review comes first
    part1 = json.loads((report / "part1_mnist" / "summary.json").read_text())
    for m in part1["models"]:  # the table holds the test accuracy each model reached
        assert re.search(rf"\| {m['model']} \| {m['params']:,} \|.*\| {m['test_accuracy']:.4g} \|\n", md), m
    study = json.loads((report / "part2_transfer" / "summary.json").read_text())
    assert "pretrained here on MNIST digits 0,1,2,3,4" in md and study["body"]["sha256"][:16] in md
    acc = study["accuracy"]["finetune"]["5"][0]
    assert f"| 5 | {study['accuracy']['scratch']['5'][0]:.3f} ± 0.000 (1) |" in md and f"{acc:.3f}" in md
    depth = json.loads((report / "part2_depth" / "summary.json").read_text())
    assert depth["config"]["ks"] == [5] and depth["config"]["arch"] == "test_resnet"  # the study's smallest k, body
    assert depth["body"]["sha256"] == study["body"]["sha256"]  # the same cached body
    for p in depth["points"]:  # the depth table holds each mode's accuracy, as the depth study measured it
        assert f"| {p['mode']} | 5 |" in md and f"{p['accuracy']:.3f} ± 0.000 (1)" in md
    assert md.count("does a depth strictly between 0 and 5 beat both ends") == 1
    rf = json.loads((report / "part3_rf" / "summary.json").read_text())
    # resnet18's last stage sees 435 px with a jump of 32, analytic and measured (64 px input, grown to measure)
    assert "| layer4.1.act2 | 435x435 | 32x32 | 435x435 | yes |" in md and "| maxpool | 11x11 | 4x4 | 11x11 | yes |" in md
    assert all(m["agrees"] for m in rf["measurements"]) and len(rf["measurements"]) == md.count(" | yes |")
    # Part 0 shows the first layers of Part I's CNN and of Part II's body, saying where each came from
    kernels = json.loads((report / "part0_layers" / "summary.json").read_text())["kernels"]
    assert len(kernels) == 2 and kernels[0]["shape"] == [10, 1, 5, 5] and kernels[0]["filters"] == 10
    assert "trained from scratch in Part I: 1 epoch on" in kernels[0]["source"] and kernels[0]["source"] in md
    assert study["body"]["sha256"][:16] in kernels[1]["source"] and kernels[1]["source"] in md


def test_every_figure_of_the_report_exists_and_the_html_embeds_it(report):
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(figures) == 10  # Part 0 architectures, activations, 2 kernel grids; Part I curves; Part II label
    # efficiency, curves, predictions, depth trade-off; Part III ERF
    # each shows what it is named for: curves in a colour per model or mode, images, the effective-field heat map
    kernel_tiles = lambda img: image_area(img)[0] > 0.15 and image_area(img)[1] > 20  # grey tiles, many levels
    drawn = {"architectures.png": lambda img: min(count_colour(img, c) for c in CYCLE[:7]) > 40,  # 7 networks
             "activations.png": lambda img: min(count_colour(img, c) for c in CYCLE[:6]) > 40,  # 6 activations
             "kernels_mnist_cnn.png": kernel_tiles, "kernels_body.png": kernel_tiles,
             "curves.png": lambda img: min(count_colour(img, c) for c in CYCLE[:2]) > 40,  # mlp, cnn
             "label_efficiency.png": lambda img: min(count_colour(img, c) for c in CYCLE[:4]) > 40,  # 4 modes
             "comparison.png": lambda img: min(count_colour(img, c) for c in CYCLE[:4]) > 40,
             "predictions.png": lambda img: image_area(img)[0] > 0.3,
             "tradeoff.png": lambda img: count_colour(img, CYCLE[0]) > 40,  # the frozen_to:K points and line
             "erf.png": lambda img: colormap_pixels(img, "viridis")[0] > 10_000}  # measured 22,122
    assert sorted(Path(f).name for f in figures) == sorted(drawn)
    for f in figures:
        assert drawn[Path(f).name](pixels(report / f)), f
        assert f'src="{f}"' in html
    assert html.count("<table") == md.count("\n|---|") == 9


def test_part_two_runs_the_image_folder_experiment_when_given_images(tmp_path):
    run = run_practical(parts=("transfer",), images="lfw", arch="test_resnet", transfer_epochs=2,
                        out=tmp_path / "r", log=lambda s: None)
    md = (run / "report.md").read_text()
    assert "## Part II: transfer learning, scratch vs finetune vs frozen" in md and "random init" in md
    assert "## Part I:" not in md
    assert_series(run / "part2_transfer" / "comparison.png", 3)  # a curve colour per mode


def test_run_command_rejects_a_bad_part_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_all.py"), "--parts", "mnist,transfr",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: unknown part 'transfr'. Did you mean: "
                                                                   "transfer? Known: layers, mnist, transfer, rf."]
    assert not (tmp_path / "r").exists()
