"""The layout stays what ARCHITECTURE.md says: layers only import downwards, and nothing grows too long.

* every import in ``ConformalSegLib`` (module level, inside functions, under ``TYPE_CHECKING``) goes to
  the same package or to a lower layer of the table in ``ARCHITECTURE.md``; every package is in it;
* nothing but ``__init__.py`` and ``__main__.py`` at the top of ``ConformalSegLib``;
* the library never imports the Slicer module or Slicer;
* no function of the library or the Slicer module is longer than :data:`MAX_FUNCTION_LINES`, and no file
  longer than :data:`MAX_FILE_LINES` unless its docstring says why (:data:`LONG_FILE_REASON`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "ConformalSegLib"
SLICER_MODULE = ROOT / "ConformalSeg"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500
LONG_FILE_REASON = "This file is long because"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*?)\|")


def layers(text: str | None = None) -> dict[str, int]:
    """Package -> layer, from the table of ARCHITECTURE.md (the Slicer module as ``ConformalSeg``)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8") if text is None else text
    table = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            for name in re.findall(r"`([A-Za-z_]+)`", match.group(2)):
                table[name] = int(match.group(1))
    return table


def imported_modules(text: str, path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the source ``text`` of ``module`` (``from X import
    name`` counts as ``X.name``, so that importing a submodule by name is seen)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def library_sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(LIB.rglob("*.py"))}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def package_of(module: str) -> str | None:
    """The top package of a ConformalSegLib module (None for the package root and ``__main__``)."""
    parts = module.split(".")
    if parts[0] != "ConformalSegLib" or len(parts) < 2 or parts[1] in ("__version__", "__main__"):
        return None
    return parts[1]


def layer_violations(table: dict[str, int], sources: dict[Path, str]) -> list[str]:
    problems = []
    for path, text in sources.items():
        module = module_name(path)
        source = package_of(module)
        if source is None:
            continue
        for line, target in imported_modules(text, path, module):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target.split(".")[0] in ("ConformalSeg", "ConformalSegSlicer", "slicer", "qt", "vtk"):
                problems.append(f"{where}: the library imports {target}")
                continue
            dest = package_of(target)
            if dest is None or dest == source:
                continue
            if dest not in table:
                problems.append(f"{where}: {target} is in no layer of ARCHITECTURE.md")
            elif table[dest] >= table[source]:
                problems.append(
                    f"{where}: {source} (layer {table[source]}) imports {target} "
                    f"(layer {table[dest]}): imports go down only"
                )
    return problems


def test_the_table_is_found():
    table = layers()
    assert table["common"] == 0 and table["cli"] > table["demo"] > table["conformal"] > table["io"]
    assert table["ConformalSeg"] == max(table.values())


def test_every_package_has_a_layer():
    packages = {p.name for p in LIB.iterdir() if (p / "__init__.py").is_file()}
    missing = packages - set(layers())
    assert not missing, f"packages missing from the layer table of ARCHITECTURE.md: {sorted(missing)}"


def test_nothing_but_the_package_files_at_the_top():
    top = sorted(p.name for p in LIB.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], f"modules belong in a package: {top}"


def test_imports_only_go_down():
    problems = layer_violations(layers(), library_sources())
    assert not problems, "\n".join(problems)


def test_upward_and_sideways_imports_are_caught():
    """The check itself: planted imports (one inside a function) are reported."""
    sources = library_sources()
    planted = LIB / "conformal" / "exact.py"
    sources[planted] += "\n\ndef _planted():\n    from ..cli import main\n"
    sources[LIB / "io" / "atomic.py"] += "\nimport ConformalSegSlicer.slider\n"
    problems = layer_violations(layers(), sources)
    assert any("conformal (layer 2) imports ConformalSegLib.cli.main" in p for p in problems), problems
    assert any("the library imports ConformalSegSlicer.slider" in p for p in problems), problems
    sideways = layer_violations({**layers(), "conformal": 3}, library_sources())  # beside evaluation
    assert any("evaluation (layer 3) imports ConformalSegLib.conformal" in p for p in sideways), sideways


def python_sources() -> list[Path]:
    return sorted(LIB.rglob("*.py")) + sorted(SLICER_MODULE.rglob("*.py"))


@pytest.mark.parametrize("path", python_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_long_functions_or_unexplained_long_files(path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: split them by concept: {long}"
    n_lines = len(text.splitlines())
    if n_lines > MAX_FILE_LINES:
        assert LONG_FILE_REASON in (ast.get_docstring(tree) or ""), (
            f"{n_lines} lines: split the file by concept, or say at its top why not ('{LONG_FILE_REASON} ...')"
        )
