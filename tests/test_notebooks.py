"""Every notebook runs top to bottom on the embedded data, so that none of them rots."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import needs_kernel

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_are_there_each_with_a_parameters_cell():
    assert [p.stem for p in NOTEBOOKS] == ["00_layers_and_architectures", "01_mnist_from_scratch",
                                           "02_transfer_learning", "03_receptive_fields"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{path.name}: one code cell tagged 'parameters'"


# Smaller runs for the suite, injected after the notebook's "parameters" cell as papermill does: every cell still
# runs, on less work (the functions behind them are tested at full size in their own test modules)
SMALLER = {"00": "MNIST_EPOCHS = 1\nPRETRAIN_EPOCHS = 1",
           "02": "KS = (5,)\nSIZE = 32\nTARGET_EPOCHS = 2\nPRETRAIN_EPOCHS = 1"}


def with_parameters(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    """`nb` with a code cell holding `source` after its cell tagged 'parameters'."""
    (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source))
    return nb


@needs_kernel
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_error(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    if path.name[:2] in SMALLER:
        nb = with_parameters(nb, SMALLER[path.name[:2]])
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    expected = {"00": "PyTorch (8, 16, 2551), slide (8, 16, 2501)", "01": "cnn: test accuracy", "02": "body pretrained here on MNIST digits 0,1,2,3,4", "03": "agrees: True"}[path.name[:2]]
    assert expected in printed
