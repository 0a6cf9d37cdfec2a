"""The package's public names resolve, and the house's import rules hold."""
import ast
import pathlib

import rlsoft

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_public_name_resolves():
    for name in rlsoft.__all__:
        assert getattr(rlsoft, name) is not None, name


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_layering():
    # rlsoft knows no model and no task; models know no task; envs know no model.
    banned = {"rlsoft": ("models", "envs", "experiments"), "models": ("envs", "experiments"),
              "envs": ("models", "experiments")}
    for package, forbidden in banned.items():
        for path in (ROOT / package).rglob("*.py"):
            for module in _imports(path):
                assert module.split(".")[0] not in forbidden, f"{path.relative_to(ROOT)} imports {module}"


def test_no_module_reaches_into_another_modules_private_names():
    ours = {p.stem for pkg in ("rlsoft", "models", "envs") for p in (ROOT / pkg).glob("*.py")}
    for pkg in ("rlsoft", "models", "envs", "experiments"):
        for path in (ROOT / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                        and isinstance(node.value, ast.Name) and node.value.id in ours):
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
