"""Colab notebooks: committed without outputs, and they run end to end with small settings."""
import os
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {"bandit.ipynb", "char.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    if path.name == "char.ipynb" and not (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").exists():
        pytest.skip("the char notebook needs ../shared/data/tinyshakespeare.txt (no TFDS download here)")
    monkeypatch.setenv("RLSOFT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("RLSOFT_ROOT", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports the repository's packages from the checkout.
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
