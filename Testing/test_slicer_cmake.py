"""The extension's CMake files list every file the installed extension needs (no globs).

``ConformalSeg/CMakeLists.txt`` keeps four explicit lists in ``# BEGIN GENERATED NAME`` /
``# END GENERATED NAME`` blocks: the module's Python scripts (``ConformalSeg.py`` and the
``ConformalSegSlicer`` package), its resources (everything under ``ConformalSeg/Resources``), and the
library ``ConformalSegLib``'s Python files and data files. These tests fail when a file on disk is
missing from a list or a listed file is gone (``slicerMacroBuildScriptedModule`` would stop the
configure step then). Regenerate the blocks with::

    .venv/bin/python Testing/test_slicer_cmake.py --update

With ``cmake`` on the PATH, the module's CMakeLists.txt is also run in script mode against stub
Slicer macros, to check that it parses and passes these lists to the macros.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ConformalSeg"
LIB_DIR = ROOT / "ConformalSegLib"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache"}


def _files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(
        p
        for p in folder.rglob(pattern)
        if p.is_file()
        and not SKIP_PARTS & set(p.relative_to(folder).parts)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix not in (".pyc", ".pyo")
    )


def expected_lists() -> dict[str, list[str]]:
    """The four lists as they must be, from the files on disk (paths relative to each source dir)."""
    scripts = [p.relative_to(MODULE_DIR).as_posix() for p in _files(MODULE_DIR, "*.py")]
    scripts.sort(key=lambda s: (s != "ConformalSeg.py", s))  # the module script first
    resources = [p.relative_to(MODULE_DIR).as_posix() for p in _files(MODULE_DIR / "Resources")]
    lib = _files(LIB_DIR)
    return {
        "MODULE_PYTHON_SCRIPTS": scripts,
        "MODULE_PYTHON_RESOURCES": resources,
        "CONFORMALSEGLIB_PYTHON_SCRIPTS": [p.relative_to(LIB_DIR).as_posix() for p in lib if p.suffix == ".py"],
        "CONFORMALSEGLIB_PYTHON_RESOURCES": [p.relative_to(LIB_DIR).as_posix() for p in lib if p.suffix != ".py"],
    }


def _block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(# BEGIN GENERATED {name}\n)(.*?)(# END GENERATED {name}\n)", re.DOTALL)


def listed(text: str, name: str) -> list[str]:
    """Entries of ``set(NAME ...)`` inside the generated block ``NAME``."""
    match = _block_pattern(name).search(text)
    assert match, f"no '# BEGIN GENERATED {name}' block in {MODULE_CMAKE}"
    body = re.search(rf"set\({name}\b(.*?)\)", match.group(2), re.DOTALL)
    assert body, f"the {name} block has no set({name} ...)"
    entries = [line.split("#", 1)[0].strip() for line in body.group(1).splitlines()]
    return [e.replace("${MODULE_NAME}", "ConformalSeg") for e in entries if e]


def render_block(name: str, entries: list[str]) -> str:
    lines = [f"set({name}"]
    for entry in entries:
        head, _, base = entry.rpartition("/")
        if name.startswith("MODULE_") and base.startswith("ConformalSeg."):  # ConformalSeg.py, .ui, .png
            entry = (head + "/" if head else "") + "${MODULE_NAME}" + base[len("ConformalSeg") :]
        lines.append(f"  {entry}")
    lines.append("  )")
    return "\n".join(lines) + "\n"


def update(path: Path = MODULE_CMAKE) -> bool:
    """Rewrite the generated blocks from the files on disk; return True when the file changed."""
    text = path.read_text(encoding="utf-8")
    new = text
    for name, entries in expected_lists().items():
        new = _block_pattern(name).sub(lambda m: m.group(1) + render_block(name, entries) + m.group(3), new)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


# ----------------------------------------------------------------------------- the lists


@pytest.mark.parametrize("name", list(expected_lists()))
def test_generated_list_is_current(name):
    entries = listed(MODULE_CMAKE.read_text(encoding="utf-8"), name)
    expected = expected_lists()[name]
    missing = sorted(set(expected) - set(entries))
    gone = sorted(set(entries) - set(expected))
    fix = "run: .venv/bin/python Testing/test_slicer_cmake.py --update"
    assert not missing, f"{name} lacks {missing}; {fix}"
    assert not gone, f"{name} lists files that do not exist: {gone}; {fix}"
    assert len(entries) == len(set(entries)), f"{name} lists a file twice"


def test_lists_cover_what_the_module_needs():
    lists = expected_lists()
    assert lists["MODULE_PYTHON_SCRIPTS"][0] == "ConformalSeg.py"
    assert "ConformalSegSlicer/slicer_adapter.py" in lists["MODULE_PYTHON_SCRIPTS"]
    assert {"Resources/UI/ConformalSeg.ui", "Resources/Icons/ConformalSeg.png", "Resources/requirements.txt"} <= set(
        lists["MODULE_PYTHON_RESOURCES"]
    )
    assert {"__init__.py", "__main__.py", "cli/__init__.py", "conformal/profile.py"} <= set(
        lists["CONFORMALSEGLIB_PYTHON_SCRIPTS"]
    )
    # Slicer loads every top-level .py of a scripted-module folder as a module: only ConformalSeg.py may be one
    assert [s for s in lists["MODULE_PYTHON_SCRIPTS"] if "/" not in s] == ["ConformalSeg.py"]


def test_update_writes_the_lists(tmp_path):
    copy = tmp_path / "CMakeLists.txt"
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    stale = _block_pattern("CONFORMALSEGLIB_PYTHON_SCRIPTS").sub(
        lambda m: m.group(1) + "set(CONFORMALSEGLIB_PYTHON_SCRIPTS\n  gone.py\n  )\n" + m.group(3), text
    )
    copy.write_text(stale, encoding="utf-8")
    assert update(copy)
    assert (
        listed(copy.read_text(encoding="utf-8"), "CONFORMALSEGLIB_PYTHON_SCRIPTS")
        == expected_lists()["CONFORMALSEGLIB_PYTHON_SCRIPTS"]
    )
    assert not update(copy)


# ----------------------------------------------------------------------------- the CMake content


def _code(path: Path) -> str:
    """The CMake code without comments (a '#' at a line start or after whitespace)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text(encoding="utf-8").splitlines())


def test_top_level_cmakelists():
    code = _code(TOP_CMAKE)
    for needle in (
        'set(EXTENSION_CATEGORY "Segmentation")',
        'set(EXTENSION_DEPENDS "PyTorch")',
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(ConformalSeg)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needle in code, needle
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert re.search(rf'set\({key} "[^"]+"\)', code), key
    assert "GLOB" not in code.upper()


def test_module_cmakelists():
    code = _code(MODULE_CMAKE)
    assert "GLOB" not in code.upper()
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", code, re.DOTALL).group(1).split()
    assert build[:2] == ["NAME", "${MODULE_NAME}"] and "WITH_GENERIC_TESTS" in build
    assert "${MODULE_PYTHON_SCRIPTS}" in build and "${MODULE_PYTHON_RESOURCES}" in build
    testing = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", code, re.DOTALL).group(1)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in testing


CMAKE_STUBS = """
set(PROJECT_SOURCE_DIR "{root}")
set(CMAKE_BINARY_DIR "/build")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.12/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.12/qt-scripted-modules")
set(BUILD_TESTING ON)
set(CMAKE_CURRENT_SOURCE_DIR "{module}")
macro(install)
  cmake_parse_arguments(MY "" "DESTINATION;COMPONENT" "FILES" ${{ARGN}})
  foreach(f ${{MY_FILES}})
    if(NOT EXISTS "${{f}}")
      message(FATAL_ERROR "install: nonexistent ${{f}}")
    endif()
  endforeach()
  message(STATUS "install files=${{MY_FILES}} destination=${{MY_DESTINATION}}")
endmacro()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(f ${{MY_SCRIPTS}} ${{MY_RESOURCES}})
    if(NOT EXISTS "{module}/${{f}}")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule: nonexistent ${{f}}")
    endif()
  endforeach()
  list(LENGTH MY_SCRIPTS n_scripts)
  list(LENGTH MY_RESOURCES n_resources)
  message(STATUS "module ${{MY_NAME}} generic_tests=${{MY_WITH_GENERIC_TESTS}} "
    "scripts=${{n_scripts}} resources=${{n_resources}}")
endmacro()
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
    "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(f ${{MY_SCRIPTS}} ${{MY_RESOURCES}})
    if(NOT EXISTS "${{MY_SOURCE_DIR}}/${{f}}")
      message(FATAL_ERROR "ctkMacroCompilePythonScript: nonexistent ${{MY_SOURCE_DIR}}/${{f}}")
    endif()
  endforeach()
  list(LENGTH MY_SCRIPTS n_scripts)
  message(STATUS "library ${{MY_TARGET_NAME}} scripts=${{n_scripts}} install=${{MY_INSTALL_DIR}}")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${{ARGN}})
  message(STATUS "unittest ${{MY_SCRIPT}}")
endmacro()
include("{module}/CMakeLists.txt")
"""


def test_module_cmakelists_runs_against_stub_macros(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    script = tmp_path / "check.cmake"
    script.write_text(CMAKE_STUBS.format(root=ROOT.as_posix(), module=MODULE_DIR.as_posix()), encoding="utf-8")
    proc = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    lists = expected_lists()
    assert (
        f"module ConformalSeg generic_tests=TRUE scripts={len(lists['MODULE_PYTHON_SCRIPTS'])} "
        f"resources={len(lists['MODULE_PYTHON_RESOURCES'])}"
    ) in output
    assert (
        f"library ConformalSegLib scripts={len(lists['CONFORMALSEGLIB_PYTHON_SCRIPTS'])} "
        "install=lib/Slicer-5.12/qt-scripted-modules/ConformalSegLib"
    ) in output
    assert "unittest ConformalSeg.py" in output
    # the shipped lesion network is installed into the module's resources (the sample data's model)
    from ConformalSegLib.common.shipped_models import LESION_MODEL

    assert f"destination=lib/Slicer-5.12/qt-scripted-modules/Resources/models/{LESION_MODEL}" in output
    assert f"{LESION_MODEL}/weights.pt" in output


if __name__ == "__main__":
    if "--update" in sys.argv:
        print("updated" if update() else "already current", MODULE_CMAKE)
    else:
        sys.exit(pytest.main([__file__, "-q"]))
