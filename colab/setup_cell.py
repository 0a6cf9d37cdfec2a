"""The Colab setup cell: the one place its code lives, and the script that writes it into notebooks.

Every notebook in colab/ opens (after its title) with this cell; the copies differ only in the NEEDS
line. The cell has to be self-contained code: it installs the project, so nothing it could import
from the project exists yet when it runs.

    python colab/setup_cell.py                                 # rewrite the cell in every colab/*.ipynb, keeping each NEEDS
    python colab/setup_cell.py colab/think.ipynb               # add (or refresh) it in one notebook (NEEDS kept, or [])
    python colab/setup_cell.py colab/char.ipynb tinyshakespeare  # ... with NEEDS = ["tinyshakespeare"]

To fetch a new kind of data, add an entry to DATA below, rerun the first command, then list its
name in that notebook's NEEDS.
"""
import ast
import pathlib
import sys

import nbformat

COLAB = pathlib.Path(__file__).resolve().parent
NEEDS_PREFIX = "NEEDS = "

CELL = '''\
REPO_URL = "https://github.com/YOUR-GITHUB-OWNER/rlsoft"  # PLACEHOLDER: set to the project's GitHub URL (and in colab/README.md)
NEEDS = []
# Colab setup (colab/setup_cell.py writes it; NEEDS aside, the same in every notebook): in Colab it
# installs the project and fetches the data in NEEDS; elsewhere (local Jupyter, CI) it does nothing.
import sys
if "google.colab" in sys.modules:
    import hashlib, importlib.metadata as md, subprocess, urllib.request
    assert "YOUR-GITHUB-OWNER" not in REPO_URL, "set REPO_URL at the top of this cell"
    # pip from git, no clone: the notebooks only import the packages (data comes below). Colab's jax has CUDA
    # plugins made for its version; pip keeps an installed jax that satisfies jax>=0.4.35, but a dependency (a
    # recent mctx) may ask for a newer jax, which would run on CPU only: requiring the installed versions stops that.
    keep = [f"{p}=={md.version(p)}" for p in ("jax", "jaxlib")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}", *keep], check=True)
    DATA = {  # name: (url, file the notebook reads, sha256); tinyshakespeare: what TFDS tiny_shakespeare downloads
        "tinyshakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                            "tinyshakespeare.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")}
    for url, path, sha in (DATA[name] for name in NEEDS):
        urllib.request.urlretrieve(url, path)
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha, f"{url}: unexpected content"'''


def cell_source(needs=()) -> str:
    """The cell's code with NEEDS = list(needs)."""
    line = NEEDS_PREFIX + repr(list(needs)).replace("'", '"')
    return "\n".join(line if l.startswith(NEEDS_PREFIX) else l for l in CELL.splitlines())


def is_setup_cell(cell) -> bool:
    return cell.cell_type == "code" and '"google.colab" in sys.modules' in cell.source and "REPO_URL = " in cell.source


def needs_of(source: str) -> list:
    """The NEEDS list that a setup cell's source assigns."""
    line = next(l for l in source.splitlines() if l.startswith(NEEDS_PREFIX))
    return ast.literal_eval(line[len(NEEDS_PREFIX):])


def write(path, needs=None) -> None:
    """Put the setup cell into notebook `path`: it replaces an existing one (keeping its NEEDS unless
    `needs` is given), or goes in as the first code cell, after the leading markdown cells."""
    nb = nbformat.read(path, as_version=4)
    old = next((i for i, c in enumerate(nb.cells) if is_setup_cell(c)), None)
    if needs is None:
        needs = needs_of(nb.cells[old].source) if old is not None else []
    if old is not None:
        nb.cells[old].source = cell_source(needs)
    else:
        at = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
        nb.cells.insert(at, nbformat.v4.new_code_cell(cell_source(needs)))
    nbformat.validate(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write(sys.argv[1], sys.argv[2:] or None)
    else:
        for p in sorted(COLAB.glob("*.ipynb")):
            write(p)
