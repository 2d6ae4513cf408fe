"""The package's layer order (README and docs/architecture.md): a module imports only from its
own layer or the ones below it, checked on the source itself, lazy imports inside functions
included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embryo_ml"

# lowest first; a module's layer is its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("embryo_ml", "embryo_ml.errors", "embryo_ml.fileio", "embryo_ml.numeric",
              "embryo_ml.versions", "embryo_ml.config", "embryo_ml.config_text",
              "embryo_ml.extras")),
    ("data", ("embryo_ml.data",)),
    ("evaluation", ("embryo_ml.evaluation",)),
    ("train", ("embryo_ml.train",)),
    ("export", ("embryo_ml.export",)),
    ("score", ("embryo_ml.score",)),
    ("serving and report", ("embryo_ml.serving", "embryo_ml.report")),
    ("cli", ("embryo_ml.cli", "embryo_ml.demo", "embryo_ml.train.__main__")),
]


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, (f"{module} is in no layer: add it to LAYERS "
                                "(docs/architecture.md reads them)")
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(
        ".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> set[str]:
    """Every embryo_ml module `source` (a module of `package`) imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "embryo_ml")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "embryo_ml":
                continue
            for alias in node.names:  # `from embryo_ml.score import explain` is a module
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(
                    ".py").is_file() or (PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                found.add(candidate if is_module else base)
    return found


def test_every_import_points_to_the_same_or_a_lower_layer() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in sorted(imported_modules(path)):
            if layer_of(imported) > layer_of(importer):
                upward.append(f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import() -> None:
    """The parser finds lazy, relative and `from package import module` imports."""
    source = ("def f():\n    from embryo_ml.score import scorer\n    import embryo_ml.cli\n"
              "    from ..export.bundle import read_bundle\n")
    found = imports_in(source, "embryo_ml.data")
    assert {"embryo_ml.score.scorer", "embryo_ml.cli", "embryo_ml.export.bundle"} <= found
    assert layer_of("embryo_ml.score.scorer") > layer_of("embryo_ml.data.images")


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))
