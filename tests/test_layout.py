"""The package's layering: the app layer lives in packages, and imports only point down the layer list (the README's
layout, top to bottom), so a lower layer never depends on one above it. Checked on the source with ``ast``."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "hclsm"
# top to bottom: a layer may import the layers below it, never one above
LAYERS = ["cli", "demo", "bench", "planning", "eval", "runs", "viz", "train", "assets", "models", "nn", "data",
          "metrics", "config", "utils", "keys", "errors"]
ROOT_MODULES = {"__init__.py", "__main__.py", "keys.py", "errors.py"}


def _imports(path: Path) -> set[str]:
    """The hclsm sub-packages or root modules ``path`` imports (``hclsm.X...`` -> X)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hclsm":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {n.name for n in node.names}
        elif isinstance(node, ast.Import):
            found |= {n.name.split(".")[1] for n in node.names if n.name.startswith("hclsm.")}
    return found


def test_only_the_package_entry_points_and_shared_names_sit_at_the_root():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES
    layers = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() or
              (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))}
    assert layers == set(LAYERS)  # every package has its place in the order


def test_imports_only_point_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if len(rel) == 1 and rel[0] in ("__init__.py", "__main__.py"):
            continue  # the package's entry points may reach any layer
        layer = rel[0].removesuffix(".py")
        rank = LAYERS.index(layer)
        upward += [f"{path.relative_to(PACKAGE)} imports hclsm.{m}" for m in _imports(path)
                   if m in LAYERS and LAYERS.index(m) < rank]
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from hclsm.cli import main\nimport hclsm.demo.evaluate\nfrom hclsm import keys\n")
    assert _imports(bad) == {"cli", "demo", "keys"}
