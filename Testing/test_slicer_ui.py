"""The module's Qt Designer file ``ConformalSeg/Resources/UI/ConformalSeg.ui``, checked without Slicer.

* It loads with PySide6's ``QUiLoader`` (offscreen); Slicer/CTK widgets fall back to the base class
  their ``<customwidget>`` declares.
* Every ``self.ui.NAME`` (and every widget name the code builds from string constants) exists in the
  .ui with the class its name promises (``...Selector`` a ``qMRMLNodeComboBox``, ``...SliderWidget`` a
  ``ctkSliderWidget``, ...), and every attribute the code uses on it exists on that class (Qt classes:
  PySide6; Slicer/CTK classes: the static API index in ``../shared/slicer-api``, when present).
* The ``SlicerParameterName`` properties and the ``@parameterNodeWrapper`` members match one to one.
* The sem-CRC section has its widgets, node types, parameters and table columns.
* The panel renders to a PNG with stand-ins for the Slicer/CTK widgets, filled with real outputs of
  the library on synthetic data. ``python Testing/test_slicer_ui.py --screenshot`` writes the
  README screenshot ``Resources/Screenshots/panel.png``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "ConformalSeg" / "ConformalSeg.py"  # the parameter node
#: The files that use ``self.ui``: the module glue and the panel (widget) it binds.
PANEL_SOURCES = (MODULE, ROOT / "ConformalSeg" / "ConformalSegSlicer" / "widget.py")
UI = ROOT / "ConformalSeg" / "Resources" / "UI" / "ConformalSeg.ui"
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "panel.png"
INDEX = Path(__file__).resolve().parents[2] / "shared" / "slicer-api" / "slicer_api.json"

#: Name suffix -> the widget class the code relies on (first match wins).
CLASS_BY_SUFFIX = (
    ("CollapsibleButton", "ctkCollapsibleButton"),
    ("Selector", "qMRMLNodeComboBox"),
    ("PathLineEdit", "ctkPathLineEdit"),
    ("LineEdit", "QLineEdit"),  # after PathLineEdit: the first matching suffix wins
    ("SliderWidget", "ctkSliderWidget"),
    ("ProgressBar", "QProgressBar"),
    ("TextEdit", "QPlainTextEdit"),
    ("CheckBox", "QCheckBox"),
    ("ComboBox", "QComboBox"),
    ("SpinBox", "QSpinBox"),
    ("Button", "QPushButton"),
    ("Label", "QLabel"),
    ("Table", "QTableWidget"),
)
WIDGET_NAME = re.compile(r"^[a-z][A-Za-z0-9]*(" + "|".join(s for s, _ in CLASS_BY_SUFFIX) + r")$", re.IGNORECASE)
#: Attributes every PythonQt object has (connect / disconnect signals by signature).
PYTHONQT_COMMON = {"connect", "disconnect"}


def expected_class(name: str) -> str | None:
    for suffix, cls in CLASS_BY_SUFFIX:
        if name.lower().endswith(suffix.lower()):  # "progressBar" is a ...ProgressBar
            return cls
    return None


def ui_widgets() -> dict[str, str]:
    """object name -> class of every widget in the .ui."""
    root = ET.parse(UI).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_base_classes() -> dict[str, str]:
    root = ET.parse(UI).getroot()
    return {cw.findtext("class"): cw.findtext("extends") for cw in root.iter("customwidget")}


def ui_parameter_names() -> dict[str, str]:
    """SlicerParameterName -> widget name."""
    root = ET.parse(UI).getroot()
    names = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                value = prop.findtext("string")
                assert value not in names, f"parameter {value} bound to two widgets"
                names[value] = widget.get("name")
    return names


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def panel_tree() -> ast.Module:
    """The panel's sources as one module (each file's statements, in order)."""
    body = [node for path in PANEL_SOURCES for node in ast.parse(path.read_text(encoding="utf-8")).body]
    return ast.Module(body=body, type_ignores=[])


def parameter_node_members() -> set[str]:
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.ClassDef) and any(
            getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {st.target.id for st in node.body if isinstance(st, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in ConformalSeg.py")


def ui_uses() -> dict[str, set[str]]:
    """Widget name -> attributes the module uses on it: ``self.ui.NAME.ATTR``, ``getattr(self.ui,
    NAME_EXPR).ATTR`` (NAME_EXPR a string, or ``name + "Suffix"`` in a loop over a tuple of strings),
    and ``widget = <either>; widget.ATTR`` within one function. String constants that look like
    widget names count as uses too (with no attribute)."""
    tree = panel_tree()
    uses: dict[str, set[str]] = {}
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def names_of(expr) -> list[str]:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value]
        if isinstance(expr, ast.Name):  # a loop variable over a tuple of strings
            loop = parents.get(expr)
            while loop is not None and not (isinstance(loop, ast.For) and getattr(loop.target, "id", None) == expr.id):
                loop = parents.get(loop)
            if loop is not None and isinstance(loop.iter, ast.Tuple):
                return [e.value for e in loop.iter.elts if isinstance(e, ast.Constant)]
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add) and isinstance(expr.right, ast.Constant):
            return [left + expr.right.value for left in names_of(expr.left)]
        return []

    def widget_names(expr) -> list[str]:
        """Names of the widgets an expression evaluates to (self.ui.X or getattr(self.ui, ...))."""
        if (
            isinstance(expr, ast.Attribute)
            and isinstance(expr.value, ast.Attribute)
            and expr.value.attr == "ui"
            and isinstance(expr.value.value, ast.Name)
            and expr.value.value.id == "self"
        ):
            return [expr.attr]
        if (
            isinstance(expr, ast.Call)
            and getattr(expr.func, "id", None) == "getattr"
            and len(expr.args) >= 2
            and isinstance(expr.args[0], ast.Attribute)
            and expr.args[0].attr == "ui"
        ):
            return names_of(expr.args[1])
        return []

    for node in ast.walk(tree):
        for name in widget_names(node):
            attrs = uses.setdefault(name, set())
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.value is node:
                attrs.add(parent.attr)
            if isinstance(parent, ast.Assign) and len(parent.targets) == 1 and isinstance(parent.targets[0], ast.Name):
                function = parent
                while function is not None and not isinstance(function, ast.FunctionDef):
                    function = parents.get(function)
                variable = parent.targets[0].id
                for sub in ast.walk(function):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == variable:
                        attrs.add(sub.attr)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and WIDGET_NAME.match(node.value):
            uses.setdefault(node.value, set())
    return uses


# ----------------------------------------------------------------------------- static checks


def test_every_ui_name_the_code_uses_exists_with_the_right_class():
    widgets = ui_widgets()
    uses = ui_uses()
    assert len(uses) > 20  # the extraction found the panel's widgets
    for name in uses:
        assert name in widgets, f"self.ui.{name} is used but not in {UI.name}"
        expected = expected_class(name)
        assert expected is not None, f"{name}: unknown widget-name suffix (extend CLASS_BY_SUFFIX)"
        assert widgets[name] == expected, f"{name} is a {widgets[name]} in the .ui, the code expects {expected}"


def test_every_named_widget_follows_the_naming_rule():
    for name, cls in ui_widgets().items():
        if name.startswith("label_") or name == "ConformalSeg":
            continue
        assert expected_class(name) == cls, f"{name} ({cls}): its name does not say its class"


def test_parameter_names_match_the_parameter_node():
    bound = ui_parameter_names()
    members = parameter_node_members()
    assert set(bound) == members, f"unbound members {members - set(bound)}, unknown names {set(bound) - members}"


def _index():
    if not INDEX.is_file():
        pytest.skip(f"no Slicer API index at {INDEX}")
    return json.loads(INDEX.read_text(encoding="utf-8"))


def _slicer_class_members(index, cls: str) -> tuple[set[str], list[str]]:
    """Members of a Slicer/CTK class and its indexed bases, and the Qt base classes it ends on."""
    members, qt_bases, stack, seen = set(), [], [cls], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        record = index["cpp_classes"].get(name) or index["ctk_classes"].get(name)
        if record is None:
            qt_bases.append(name)
            continue
        for key in ("methods", "slots", "signals", "invokables", "decorator_methods", "properties"):
            members |= set(record.get(key, []))
        stack += [re.sub(r"<.*>", "", b).split("::")[-1] for b in record.get("bases", [])]
    return members, qt_bases


def _qt_has(cls_name: str, attr: str) -> bool:
    from PySide6 import QtWidgets

    cls = getattr(QtWidgets, cls_name)
    return hasattr(cls, attr) or cls.staticMetaObject.indexOfProperty(attr) >= 0


def test_attributes_used_on_widgets_exist_on_their_classes():
    pytest.importorskip("PySide6.QtWidgets")
    index = _index()
    widgets = ui_widgets()
    for name, attrs in ui_uses().items():
        cls = widgets[name]
        for attr in attrs - PYTHONQT_COMMON:
            if cls.startswith(("ctk", "qMRML")):
                members, qt_bases = _slicer_class_members(index, cls)
                ok = attr in members or any(_qt_has(b, attr) for b in qt_bases if b.startswith("Q"))
            else:
                ok = _qt_has(cls, attr)
            assert ok, f"self.ui.{name}.{attr}: {cls} has no {attr!r}"


# ----------------------------------------------------------------------------- loading and rendering


@pytest.fixture(scope="module")
def app():
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    pytest.importorskip("PySide6.QtUiTools")
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def ui_element(name: str) -> ET.Element:
    return next(w for w in ET.parse(UI).getroot().iter("widget") if w.get("name") == name)


def test_interval_section():
    """The sem-CRC section: its widgets, node types, parameters and the table's columns."""
    sys.path.insert(0, str(ROOT / "ConformalSeg"))
    from ConformalSegSlicer import display, intervals

    widgets = ui_widgets()
    section = ui_element("intervalsCollapsibleButton")
    assert section.find("property[@name='text']/string").text == "Organ-dependent uncertainty (sem-CRC)"
    inside = {w.get("name"): w.get("class") for w in section.iter("widget")}
    volume, segmentation = "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"
    selectors = {
        "lowerVolumeSelector": volume,
        "upperVolumeSelector": volume,
        "organSegmentationSelector": segmentation,
        "truthVolumeSelector": volume,
        "intervalLengthVolumeSelector": volume,
    }
    for name in list(selectors) + [
        "intervalProfilePathLineEdit",
        "applyIntervalsButton",
        "intervalsStatusLabel",
        "intervalsTable",
    ]:
        assert name in inside, f"{name} is not in the sem-CRC section"
        assert widgets[name] == expected_class(name)
    for name, node_type in selectors.items():
        types = [e.text for e in ui_element(name).findall("property[@name='nodeTypes']/stringlist/string")]
        assert types == [node_type], (name, types)
    bound = ui_parameter_names()
    for parameter in (
        "intervalProfilePath",
        "lowerVolume",
        "upperVolume",
        "organSegmentation",
        "truthVolume",
        "intervalLengthVolume",
    ):
        suffix = "PathLineEdit" if parameter.endswith("Path") else "Selector"
        assert bound[parameter] == parameter.removesuffix("Path") + suffix
    headers = [c.find("property/string").text for c in ui_element("intervalsTable").findall("column")]
    assert tuple(headers) == intervals.TABLE_COLUMNS
    assert "interval" in display.OVERLAYS
    # every node selector is given the scene
    receivers = {
        c.findtext("receiver")
        for c in ET.parse(UI).getroot().iter("connection")
        if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"} <= receivers


def test_ui_loads_with_quiloader(app):
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QWidget

    loader = QUiLoader()
    widget = loader.load(str(UI))
    assert widget is not None, loader.errorString()
    found = {child.objectName(): child for child in widget.findChildren(QWidget)}
    bases = ui_base_classes()
    for name, cls in ui_widgets().items():
        if name == "ConformalSeg":
            continue
        assert name in found, f"{name} was not created"
        expected = bases.get(cls, cls)  # Slicer/CTK classes fall back to their declared base class
        assert found[name].inherits(expected), f"{name}: {found[name].metaObject().className()} is not a {expected}"
    # dynamic properties survive: connectGui finds widgets by them in Slicer
    assert found["epsilonSliderWidget"].property("SlicerParameterName") == "epsilon"


def test_panel_renders(app, tmp_path):
    path = render_panel(tmp_path / "panel.png")
    from PySide6.QtGui import QImage

    image = QImage(str(path))
    assert image.width() >= 400 and image.height() >= 600
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colours) > 20  # text, frames and widgets, not a blank canvas


def test_readme_screenshot_is_committed():
    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size > 10_000, (
        "run: .venv/bin/python Testing/test_slicer_ui.py --screenshot"
    )


# ----------------------------------------------------------------------------- stand-ins


def _standins():
    """Plain-Qt stand-ins for the Slicer/CTK widgets, so that the screenshot shows them."""
    from PySide6.QtCore import Property, Qt
    from PySide6.QtWidgets import (
        QComboBox,
        QDoubleSpinBox,
        QGroupBox,
        QHBoxLayout,
        QLineEdit,
        QSlider,
        QToolButton,
        QWidget,
    )

    class CollapsibleButton(QGroupBox):
        def _get_text(self):
            return self.title()

        def _set_text(self, text):
            self.setTitle(f"\u25be {text}")

        text = Property(str, _get_text, _set_text)

    class SliderWidget(QWidget):
        def __init__(self, parent=None):
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.slider = QSlider(Qt.Horizontal)
            self.spin = QDoubleSpinBox()
            layout.addWidget(self.slider, 1)
            layout.addWidget(self.spin)
            self._min, self._max = 0.0, 1.0

        def _sync(self):
            span = (self._max - self._min) or 1.0
            self.slider.setRange(0, 1000)
            self.slider.setValue(int(round(1000 * (self.spin.value() - self._min) / span)))

        def _get_min(self):
            return self._min

        def _set_min(self, value):
            self._min = float(value)
            self.spin.setMinimum(self._min)
            self._sync()

        def _get_max(self):
            return self._max

        def _set_max(self, value):
            self._max = float(value)
            self.spin.setMaximum(self._max)
            self._sync()

        def _get_value(self):
            return self.spin.value()

        def _set_value(self, value):
            self.spin.setValue(float(value))
            self._sync()

        def _get_decimals(self):
            return self.spin.decimals()

        def _set_decimals(self, value):
            self.spin.setDecimals(int(value))

        minimum = Property(float, _get_min, _set_min)
        maximum = Property(float, _get_max, _set_max)
        value = Property(float, _get_value, _set_value)
        decimals = Property(int, _get_decimals, _set_decimals)

    class PathLineEdit(QWidget):
        def __init__(self, parent=None):
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.edit = QLineEdit()
            button = QToolButton()
            button.setText("...")
            layout.addWidget(self.edit, 1)
            layout.addWidget(button)

        def _get_path(self):
            return self.edit.text()

        def _set_path(self, path):
            self.edit.setText(path)

        currentPath = Property(str, _get_path, _set_path)

    class NodeComboBox(QComboBox):
        pass

    return {
        "ctkCollapsibleButton": CollapsibleButton,
        "ctkSliderWidget": SliderWidget,
        "ctkPathLineEdit": PathLineEdit,
        "qMRMLNodeComboBox": NodeComboBox,
        "qMRMLWidget": QWidget,
    }


def load_with_standins():
    from PySide6.QtUiTools import QUiLoader

    standins = _standins()

    class Loader(QUiLoader):
        def createWidget(self, class_name, parent=None, name=""):
            if class_name in standins:
                widget = standins[class_name](parent)
                widget.setObjectName(name)
                return widget
            return super().createWidget(class_name, parent, name)

    return Loader().load(str(UI))


def demo_content():
    """Real library outputs on synthetic data for the screenshot (guarantees, segment sizes)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "ConformalSeg"))
    from ConformalSegSlicer import environment, fixtures, segments
    from ConformalSegSlicer.slider import SliderSettings, SliderState

    with tempfile.TemporaryDirectory() as folder:
        fixture = fixtures.make_slider_fixture(folder, methods=("cls", "sets"))
        state = SliderState.from_files(fixture.profile_paths, fixture.case.probability, fixture.case.geometry)
        settings = SliderSettings(epsilon=0.1, alpha=0.2, alpha_inner=0.2, alpha_outer=0.2, include_threshold=True)
        result = state.update(settings)
    rows = [
        (
            name,
            f"{result.segments[name].voxels:,}",
            f"{result.segments[name].volume_ml:.2f}",
            result.segments[name].rule,
        )
        for name in segments.sort_names(result.segments)
    ]
    device = environment.resolve_device("auto", torch_version="2.x", cuda_available=False).message
    return settings, result.text, rows, device


def interval_demo_content():
    """The sem-CRC section's status text and table: the library applied to a synthetic scan through the
    panel's own segment matching (None when cvxpy, needed to calibrate the fixture, is missing)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "ConformalSeg"))
    from ConformalSegSlicer import fixtures, intervals

    if fixtures.interval_fixture_unavailable_reason():
        return None
    with tempfile.TemporaryDirectory() as folder:
        fixture = fixtures.make_interval_fixture(folder)
        profile = intervals.load_profile(fixture.profile_path)
        ids = {f"segment_{i}": name for i, name in enumerate(fixture.segments)}
        match = intervals.match_segments(ids, intervals.profile_organs(profile))
        masks = {sid: fixture.segments[ids[sid]] for sid in match.segment_ids}
        outcome = intervals.apply_profile(profile, fixture.lower, fixture.upper, match, masks, fixture.truth)
    return outcome.text, outcome.rows


def render_panel(path: Path) -> Path:
    from PySide6.QtWidgets import (
        QApplication,
        QCheckBox,
        QComboBox,
        QLabel,
        QProgressBar,
        QPushButton,
        QTableWidget,
        QTableWidgetItem,
        QWidget,
    )

    QApplication.instance() or QApplication([])
    panel = load_with_standins()
    find = {child.objectName(): child for child in panel.findChildren(QWidget)}
    settings, guarantee, rows, device = demo_content()
    for name, text in (
        ("inputVolumeSelector", "synth_019 CT"),
        ("probabilityVolumeSelector", "synth_019 CT lesion probability"),
        ("outputSegmentationSelector", "ConformalSeg"),
        ("uncertaintyVolumeSelector", "synth_019 CT MC-dropout variance"),
        ("lowerVolumeSelector", "case_030 q05"),
        ("upperVolumeSelector", "case_030 q95"),
        ("organSegmentationSelector", "case_030 organs"),
        ("truthVolumeSelector", "case_030 CT"),
        ("intervalLengthVolumeSelector", "case_030 q05 interval length"),
    ):
        find[name].addItem(text)
    from ConformalSegSlicer import display

    for name, items in (
        ("deviceComboBox", ["auto", "cuda", "cpu"]),
        ("overlayComboBox", list(display.OVERLAYS)),
        ("calibrationMethodComboBox", ["cls", "crc", "sets"]),
        ("calibrationScoreComboBox", ["identity", "margin:0.5", "gaussian:2.0"]),
    ):
        combo: QComboBox = find[name]
        combo.addItems(items)
    find["overlayComboBox"].setCurrentIndex(1)
    for name, text in (
        ("modelPathLineEdit", "models/kidney-tumour-unet"),
        ("profilePathLineEdit", "profiles/cls.json"),
        ("secondProfilePathLineEdit", "profiles/sets.json"),
        ("datasetPathLineEdit", "data/calibration"),
        ("calibrationOutputPathLineEdit", "profiles"),
        ("evaluationResultsPathLineEdit", "profiles/evaluation/results.json"),
        ("intervalProfilePathLineEdit", "profiles/sem-crc-organ.json"),
    ):
        find[name].currentPath = text
    for name, value in (
        ("epsilonSliderWidget", settings.epsilon),
        ("alphaSliderWidget", settings.alpha),
        ("alphaInnerSliderWidget", settings.alpha_inner),
        ("alphaOuterSliderWidget", settings.alpha_outer),
    ):
        find[name].value = value
    find["showThresholdCheckBox"].setChecked(True)
    label: QLabel = find["guaranteeLabel"]
    label.setText(guarantee)
    find["deviceLabel"].setText(device)
    bar: QProgressBar = find["progressBar"]
    bar.setValue(100)
    find["applyButton"].setEnabled(True)
    table: QTableWidget = find["resultsTable"]
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            table.setItem(r, c, QTableWidgetItem(text))
    table.resizeColumnsToContents()
    intervals_content = interval_demo_content()
    if intervals_content is not None:
        text, interval_rows = intervals_content
        find["intervalsStatusLabel"].setText(text)
        find["applyIntervalsButton"].setEnabled(True)
        interval_table: QTableWidget = find["intervalsTable"]
        interval_table.setRowCount(len(interval_rows))
        for r, row in enumerate(interval_rows):
            for c, cell in enumerate(row):
                interval_table.setItem(r, c, QTableWidgetItem(cell))
        interval_table.resizeColumnsToContents()
    assert isinstance(find["show3DButton"], QPushButton) and isinstance(find["showLesionCheckBox"], QCheckBox)
    panel.resize(480, max(panel.sizeHint().height(), panel.minimumSizeHint().height()))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(path)):
        raise RuntimeError(f"could not write {path}")
    return path


if __name__ == "__main__":
    if "--screenshot" in sys.argv:
        print(render_panel(SCREENSHOT))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
