"""Every notebook runs top to bottom on the embedded data, so that none of them rots."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import needs_kernel

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_to_run():
    assert {p.name[:2] for p in NOTEBOOKS} >= {"01", "03"}


@needs_kernel
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_error(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    expected = {"00": "PyTorch (8, 16, 2551), slide (8, 16, 2501)", "01": "cnn: test accuracy", "02": "body pretrained here on MNIST digits 0,1,2,3,4", "03": "agrees: True"}[path.name[:2]]
    assert expected in printed
