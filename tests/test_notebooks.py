"""Colab notebooks: committed without outputs, and they run end to end with small settings."""
import os
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {"bandit.ipynb", "char.ipynb", "think.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.slow  # a kernel per notebook and a tiny training run each: ~1-2 min apiece (CI's slow pass runs them)
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


# The Colab setup cell (colab/setup_cell.py writes it): the first code cell of every notebook.
COLAB_GUARD = '"google.colab" in sys.modules'


def _setup_cell(path):
    nb = nbformat.read(path, as_version=4)
    return next(c for c in nb.cells if c.cell_type == "code").source


def _without_needs(source):
    return "\n".join(line for line in source.splitlines() if not line.startswith("NEEDS = "))


def _setup_cell_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("colab_setup_cell", ROOT / "colab" / "setup_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_colab_setup(path):
    import ast

    source = _setup_cell(path)
    assert COLAB_GUARD in source, f"{path.name}: the first code cell must be the Colab setup cell"
    assignments = [n for n in ast.parse(source).body if isinstance(n, ast.Assign)]
    assert [t.id for t in assignments[0].targets] == ["REPO_URL"], f"{path.name}: REPO_URL first"
    assert isinstance(assignments[0].value, ast.Constant) and assignments[0].value.value.startswith("https://")
    assert sum(line.startswith("NEEDS = ") for line in source.splitlines()) == 1
    # The same code as colab/setup_cell.py writes, with this notebook's NEEDS.
    module = _setup_cell_module()
    assert source == module.cell_source(module.needs_of(source)), f"{path.name}: run python colab/setup_cell.py"


def test_setup_cell_is_the_same_in_every_notebook_but_needs():
    cells = {p.name: _without_needs(_setup_cell(p)) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, f"setup cells differ beyond NEEDS: {sorted(cells)}"
    assert _setup_cell_module().needs_of(_setup_cell(ROOT / "colab" / "char.ipynb")) == ["tinyshakespeare"]


def _trap_side_effects(monkeypatch):
    """subprocess, os.system and downloads record their calls instead of running."""
    import subprocess
    import urllib.request

    calls = []
    for module, name in [(subprocess, "run"), (subprocess, "call"), (subprocess, "check_call"),
                         (subprocess, "Popen"), (os, "system"), (urllib.request, "urlretrieve")]:
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append((_n, a, k)))
    return calls


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_setup_cell_does_nothing_outside_colab(path, monkeypatch, tmp_path):
    import sys

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(tmp_path)
    calls = _trap_side_effects(monkeypatch)
    namespace = {}
    exec(_setup_cell(path), namespace)
    assert calls == [] and list(tmp_path.iterdir()) == []
    assert {k for k in namespace if not k.startswith("__")} == {"REPO_URL", "NEEDS", "sys"}


def test_setup_cell_in_colab_installs_from_repo_url_keeps_jax_and_fetches_tfds_text(monkeypatch, tmp_path):
    """The Colab path with a stand-in google.colab: one pip call from REPO_URL that requires the
    installed jax/jaxlib, and tinyshakespeare fetched and checked against the TFDS checksum."""
    import importlib.metadata
    import shutil
    import sys
    import types

    text = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not text.exists():
        pytest.skip("needs ../shared/data/tinyshakespeare.txt as the stand-in download")
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path)
    calls = _trap_side_effects(monkeypatch)
    import urllib.request

    def fake_download(url, dest):
        calls.append(("urlretrieve", (url, dest), {}))
        shutil.copy(text, dest)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_download)
    source = _setup_cell(ROOT / "colab" / "char.ipynb")
    placeholder = next(line for line in source.splitlines() if line.startswith("REPO_URL = "))
    if "YOUR-GITHUB-OWNER" in placeholder:  # an unset placeholder stops before pip
        with pytest.raises(AssertionError, match="set REPO_URL"):
            exec(source, {})
        assert calls == []
    exec(source.replace(placeholder, 'REPO_URL = "https://github.com/example/rlsoft"'), {})
    v = importlib.metadata.version
    assert calls == [
        ("run", ([sys.executable, "-m", "pip", "install", "-q", "git+https://github.com/example/rlsoft",
                  f"jax=={v('jax')}", f"jaxlib=={v('jaxlib')}"],), {"check": True}),
        ("urlretrieve", ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                         "tinyshakespeare.txt"), {}),
    ]
    assert (tmp_path / "tinyshakespeare.txt").read_bytes() == text.read_bytes()
