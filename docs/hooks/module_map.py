"""The module-by-module map of `docs/architecture.md`, read from the source tree at build time.

Each module's line is the first paragraph of its own docstring, and its layer is the one
`tests/test_layers.py` assigns it (that test's `LAYERS` is the one statement of the layer order),
so the map lists exactly the modules that exist, in layer order, in the words of their authors.
Nothing of the package is imported: docstrings are read with `ast`, so the map builds without
torch or mlflow.
"""

from __future__ import annotations

import ast
import html
import importlib.util
from pathlib import Path
from types import ModuleType

from markup import inline_html

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "embryo_ml"
LAYER_TEST = REPO / "tests" / "test_layers.py"


def layer_rules() -> ModuleType:
    """tests/test_layers.py, loaded by path (it needs only the standard library)."""
    spec = importlib.util.spec_from_file_location("_layer_rules", LAYER_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_paragraph(path: Path) -> str:
    """The first paragraph of a module's docstring, on one line ("" when it has none)."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(docstring.split("\n\n")[0].split())


def modules_by_layer() -> list[tuple[str, list[Path]]]:
    """(layer name, its module files) lowest layer first; every file of the package once."""
    rules = layer_rules()
    grouped: list[tuple[str, list[Path]]] = [(name, []) for name, _ in rules.LAYERS]
    for path in sorted(PACKAGE.rglob("*.py")):
        grouped[rules.layer_of(rules.module_name(path))][1].append(path)
    return [(name, paths) for name, paths in grouped if paths]


def render_map() -> str:
    sections = []
    for layer, paths in modules_by_layer():
        rows = [f"<tr><td><code>{html.escape(path.relative_to(REPO).as_posix())}</code></td>"
                f"<td>{inline_html(first_paragraph(path))}</td></tr>" for path in paths]
        sections.append(f"### {layer}\n\n<table>\n<thead><tr><th>module</th><th>what it owns"
                        "</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>")
    return "\n\n".join(sections)
