"""Release checks of the Slicer module that run without Slicer.

* The version message: ``ConformalSeg.py`` parses with Python 3.9 grammar, imports nothing of
  ConformalSeg before its version check, and on Python 3.9 (Slicer 5.8) defines a module and a panel
  that show one message naming the Slicer it needs (loaded here with stand-in ``slicer`` modules).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "ConformalSeg" / "ConformalSeg.py"


# ----------------------------------------------------------------------------- version message


def _statements_before_version_check(tree: ast.Module) -> list[ast.stmt]:
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.If) and "UNSUPPORTED" in ast.unparse(node.test):
            return tree.body[:i]
    raise AssertionError("ConformalSeg.py has no `if not UNSUPPORTED:` version check")


def test_module_file_parses_with_python39_grammar_and_imports_nothing_of_ours_before_the_check():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    imported = []
    for node in _statements_before_version_check(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
    ours = [name for name in imported if name.startswith("ConformalSeg")]
    assert not ours, f"imported before the version check: {ours}"
    # every file that could be imported before the check is stdlib or Slicer's: nothing more to parse
    assert {name.split(".")[0] for name in imported} <= {"os", "sys", "pathlib", "typing", "slicer"}


def _stand_in_slicer(monkeypatch) -> None:
    """Minimal ``slicer`` modules: enough to execute ConformalSeg.py's top level."""

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    slicer = types.ModuleType("slicer")
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    for name in ("Choice", "Decimals", "SingleStep", "WithinRange"):
        setattr(wrapper, name, lambda *args: None)
    wrapper.parameterNodeWrapper = lambda cls: cls
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    for module in (slicer, i18n, wrapper, scripted):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_on_python39_the_module_loads_and_shows_one_message(monkeypatch):
    _stand_in_slicer(monkeypatch)
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    spec = importlib.util.spec_from_file_location("ConformalSeg_py39", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "5.10" in module.UNSUPPORTED and "3.9" in module.UNSUPPORTED and "3.12" in module.UNSUPPORTED
    assert hasattr(module, "ConformalSegWidget") and not hasattr(module, "ConformalSegLogic")
    assert not hasattr(module, "Logic")  # the helpers were not imported
    parent = types.SimpleNamespace()
    module.ConformalSeg(parent)
    assert parent.helpText == module.UNSUPPORTED and parent.title == "ConformalSeg"


@pytest.mark.parametrize(
    ("version", "supported"), [((3, 9, 10), False), ((3, 11, 9), False), ((3, 12, 10), True), ((3, 13, 0), True)]
)
def test_version_message_only_below_python312(monkeypatch, version, supported):
    _stand_in_slicer(monkeypatch)
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))  # load the light branch only
    spec = importlib.util.spec_from_file_location("ConformalSeg_py39b", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.unsupportedMessage(version) == "") is supported
