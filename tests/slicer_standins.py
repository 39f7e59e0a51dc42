"""Stand-ins for the parts of 3D Slicer that cannot exist in a test process, to run SaliencyMaps.py
as Slicer runs it.

Real here: the MRML scene, its nodes and the module logics of ``slicer-core`` (segmentations,
colours), ``slicer.util`` (the application's own Python helpers, shipped in ``slicer-core``), the
SaliencyMaps module's code and the monai-sal server it talks to.

Stand-ins, because no 3D Slicer application can be installed here (it is not on PyPI nor in
Debian, and cannot be built offline):

- ``qt`` and the CTK/MRML widgets (``ctkSliderWidget``, ``qMRMLNodeComboBox``, ...): Python
  objects with PythonQt's ways (properties as attributes, ``signal.connect(slot)``, a slot called
  with as many of the signal's arguments as it takes, a disabled button that ignores clicks,
  values clamped into their range, signals emitted on change unless blocked). Widgets are made
  from the module's own ``.ui`` file, by class name, so a name or class the file lacks fails.
- ``slicer.app``: the event loop (timers fired by :meth:`Application.process_events`), cursors,
  the module manager's unload signal.
- ``slicer.ScriptedLoadableModule``: the base classes with the constructors of Slicer 5.6, 5.8
  and 5.10 (Base/Python/slicer/ScriptedLoadableModule.py): each ``__init__`` starts with a
  cooperative ``super().__init__()``, the widget sets ``parent``, ``layout`` and
  ``developerMode``, ``resourcePath`` is the module folder's ``Resources``.
- ``slicer.parameterNodeWrapper``: typed properties over a real ``vtkMRMLScriptedModuleNode``,
  stored as Slicer's serializers store them (``str(value)``; ``"True"``/``"False"``), so what a
  saved scene holds is what Slicer writes.
- ``slicer.i18n.tr``: returns the text and records it (the application translates it).
- ``slicer.util.errorDisplay``: records the dialog's text and details instead of showing it.
- ``slicer.modules``: the module logics of ``slicer-core`` on the scene, and a plots logic that
  records the chart it was asked to show (the layout needs the application).
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import slicer
import vtk

# --------------------------------------------------------------------------------------- signals


class Signal:
    """A Qt signal as PythonQt exposes it: ``connect``, ``disconnect``; ``emit`` calls each slot with
    as many leading arguments as it accepts."""

    def __init__(self, owner=None) -> None:
        self.owner = owner
        self.slots: list = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def disconnect(self, slot=None) -> None:
        self.slots = [s for s in self.slots if slot is not None and s != slot]

    def emit(self, *args) -> None:
        if self.owner is not None and self.owner.signalsBlocked():
            return
        for slot in list(self.slots):
            slot(*args[: _accepted(slot, len(args))])


def _accepted(slot, available: int) -> int:
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


# --------------------------------------------------------------------------------------- widgets


class QObject:
    """Attributes as PythonQt properties; ``NOTIFY`` maps a property to the signal its change emits."""

    SIGNALS: typing.ClassVar[tuple[str, ...]] = ()
    NOTIFY: typing.ClassVar[dict[str, str]] = {}

    def __init__(self, name: str = "") -> None:
        object.__setattr__(self, "_blocked", False)
        object.__setattr__(self, "_values", {})
        self.objectName = name
        self.name = name
        for signal in self.SIGNALS:
            object.__setattr__(self, signal, Signal(self))

    def signalsBlocked(self) -> bool:
        return self._blocked

    def blockSignals(self, block: bool) -> bool:
        was = self._blocked
        object.__setattr__(self, "_blocked", bool(block))
        return was

    def __setattr__(self, key, value) -> None:
        if key in self.NOTIFY:
            value = self._coerce(key, value)
            changed = self._values.get(key) != value
            self._values[key] = value
            if changed:
                getattr(self, self.NOTIFY[key]).emit(value)
            return
        object.__setattr__(self, key, value)

    def __getattr__(self, key):
        values = object.__getattribute__(self, "_values")
        if key in values:
            return values[key]
        raise AttributeError(f"{type(self).__name__} {self.objectName!r} has no attribute {key!r}")

    def _coerce(self, key, value):
        return value


class QWidget(QObject):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._layout = None
        self.mrmlScene = None

    def layout(self):
        return self._layout

    def setLayout(self, layout) -> None:
        self._layout = layout

    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene

    def show(self) -> None:
        self.visible = True


class QLayout(QObject):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.widgets: list = []

    def addWidget(self, widget, *args) -> None:
        self.widgets.append(widget)


class QFormLayout(QLayout):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.rows: list[tuple] = []

    def addRow(self, label, widget=None) -> None:
        self.rows.append((label, widget))

    def rowCount(self) -> int:
        return len(self.rows)

    def removeRow(self, row: int) -> None:
        del self.rows[row]


class QLabel(QWidget):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.text = ""
        self.wordWrap = False


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled")
    NOTIFY: typing.ClassVar = {"checked": "toggled"}

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.text = ""
        self.checkable = False
        self.checked = False

    def click(self) -> None:
        """As Qt: a disabled button ignores the click."""
        if self.enabled:
            if self.checkable:
                self.checked = not self.checked
            self.clicked.emit(self.checked)


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.checkable = True


class QLineEdit(QWidget):
    SIGNALS = ("textChanged", "editingFinished")
    NOTIFY: typing.ClassVar = {"text": "textChanged"}

    def __init__(self, text: str = "", name: str = "") -> None:
        super().__init__(name)
        self.text = str(text)
        self.placeholderText = ""

    def _coerce(self, key, value):
        return str(value)


class _Ranged(QWidget):
    """A value kept in [minimum, maximum], as QSpinBox, QDoubleSpinBox and ctkSliderWidget do."""

    SIGNALS = ("valueChanged",)
    NOTIFY: typing.ClassVar = {"value": "valueChanged"}
    integer = False

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        object.__setattr__(self, "minimum", 0)
        object.__setattr__(self, "maximum", 99)
        self.singleStep = 1
        self.decimals = 2
        self.suffix = ""
        self.value = 0

    def __setattr__(self, key, value) -> None:
        if key in ("minimum", "maximum"):
            object.__setattr__(self, key, int(value) if self.integer else float(value))
            if "value" in self._values:
                self.value = self._values["value"]  # re-clamped, signalled when it moves
            return
        super().__setattr__(key, value)

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def setDecimals(self, decimals: int) -> None:
        self.decimals = decimals

    def _coerce(self, key, value):
        value = min(max(value, self.minimum), self.maximum)
        return int(round(value)) if self.integer else float(value)


class QSpinBox(_Ranged):
    integer = True


class QDoubleSpinBox(_Ranged):
    pass


class ctkSliderWidget(_Ranged):
    pass


class QProgressBar(QWidget):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.minimum, self.maximum, self.value = 0, 100, 0
        self.textVisible = True
        self.format = "%p%"


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged",)

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.items: list[tuple[str, object]] = []
        object.__setattr__(self, "_index", -1)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    def setCurrentIndex(self, index: int) -> None:
        index = index if 0 <= index < len(self.items) else -1
        if index != self._index:
            object.__setattr__(self, "_index", index)
            self.currentIndexChanged.emit(index)

    def __setattr__(self, key, value) -> None:
        if key == "currentIndex":
            self.setCurrentIndex(value)
        else:
            super().__setattr__(key, value)

    @property
    def currentText(self) -> str:
        return self.items[self._index][0] if self._index >= 0 else ""

    @property
    def currentData(self):
        return self.items[self._index][1] if self._index >= 0 else None

    @property
    def count(self) -> int:
        return len(self.items)

    def addItem(self, text: str, data=None) -> None:
        self.items.append((str(text), data))
        if self._index < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self.items = []
        self.setCurrentIndex(-1)

    def findData(self, data) -> int:
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def findText(self, text: str) -> int:
        return next((i for i, (t, _) in enumerate(self.items) if t == text), -1)

    def itemText(self, index: int) -> str:
        return self.items[index][0]

    def itemData(self, index: int):
        return self.items[index][1]


class qMRMLSortFilterProxyModel(QObject):
    def __init__(self) -> None:
        super().__init__("")
        self.hiddenNodeIDs: list[str] = []


class qMRMLNodeComboBox(QWidget):
    """The nodes offered follow qMRMLSortFilterProxyModel's rules: of a class in ``nodeTypes`` (exactly
    that class unless ``showChildNodeTypes``), not of ``hideChildNodeTypes``, not hidden from
    editors, not in ``hiddenNodeIDs``. Selecting a node it does not offer fails."""

    SIGNALS = ("currentNodeChanged", "currentNodeIDChanged")

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.nodeTypes: list[str] = []
        self.showChildNodeTypes = True
        self.hideChildNodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self._proxy = qMRMLSortFilterProxyModel()
        self._node = None

    def sortFilterProxyModel(self):
        return self._proxy

    def offered(self) -> list:
        if self.mrmlScene is None:
            return []
        found = []
        for index in range(self.mrmlScene.GetNumberOfNodes()):
            node = self.mrmlScene.GetNthNode(index)
            if not any(node.IsA(t) for t in self.nodeTypes):
                continue
            if not self.showChildNodeTypes and node.GetClassName() not in self.nodeTypes:
                continue
            if any(node.IsA(t) for t in self.hideChildNodeTypes) or node.GetHideFromEditors():
                continue
            if node.GetID() in self._proxy.hiddenNodeIDs:
                continue
            found.append(node)
        return found

    def currentNode(self):
        if self._node is not None and self.mrmlScene is not None and self.mrmlScene.IsNodePresent(self._node):
            return self._node
        return None

    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def setCurrentNode(self, node) -> None:
        if node is not None and node not in self.offered():
            raise AssertionError(f"{self.objectName} does not offer {node.GetName()}")
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)


class qMRMLSegmentSelectorWidget(QWidget):
    SIGNALS = ("currentNodeChanged", "currentSegmentChanged")

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._node, self._segment = None, ""

    def currentNode(self):
        return self._node

    def currentSegmentID(self) -> str:
        return self._segment

    def setCurrentNode(self, node) -> None:
        self._node = node
        self.currentNodeChanged.emit(node)

    def setCurrentSegmentID(self, segment_id: str) -> None:
        self._segment = segment_id
        self.currentSegmentChanged.emit(segment_id)


class qMRMLTableView(QWidget):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._table = None

    def setMRMLTableNode(self, node) -> None:
        self._table = node

    def mrmlTableNode(self):
        return self._table


class ctkCollapsibleButton(QWidget):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.text = ""
        self.collapsed = False


class ctkCollapsibleGroupBox(QWidget):
    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.title = ""
        self.collapsed = False


class qMRMLWidget(QWidget):
    pass


# ------------------------------------------------------------------------------ timers, settings


class QTimer(QObject):
    """Fired by :meth:`Application.process_events`, never by wall time."""

    SIGNALS = ("timeout",)

    def __init__(self, parent=None) -> None:
        super().__init__("")
        self.interval = 0
        self.singleShot = False
        self.active = False

    def start(self, msec: int | None = None) -> None:
        if msec is not None:
            self.interval = msec
        self.active = True
        slicer.app.timers.add(self)

    def stop(self) -> None:
        self.active = False
        slicer.app.timers.discard(self)

    def isActive(self) -> bool:
        return self.active

    @staticmethod
    def singleShot(msec: int, slot) -> None:
        timer = QTimer()
        object.__setattr__(timer, "singleShot", True)
        timer.timeout.connect(slot)
        timer.start(msec)


class QSettings:
    store: typing.ClassVar[dict[str, object]] = {}

    def value(self, key: str, default=None):
        return self.store.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.store[key] = value

    def contains(self, key: str) -> bool:
        return key in self.store


class QUrl:
    def __init__(self, text: str = "") -> None:
        self.text = text

    @staticmethod
    def fromLocalFile(path: str) -> QUrl:
        return QUrl(Path(path).as_uri())

    def toString(self) -> str:
        return self.text


class QFileDialog:
    answer = ""  # what the next "Save as" dialog returns (a test sets it)

    @staticmethod
    def getSaveFileName(*args) -> str:
        return QFileDialog.answer


# ---------------------------------------------------------------------------------- .ui loading

WIDGETS = {
    cls.__name__: cls
    for cls in (
        QWidget,
        QLabel,
        QPushButton,
        QCheckBox,
        QLineEdit,
        QSpinBox,
        QDoubleSpinBox,
        QComboBox,
        QProgressBar,
        ctkSliderWidget,
        ctkCollapsibleButton,
        ctkCollapsibleGroupBox,
        qMRMLNodeComboBox,
        qMRMLSegmentSelectorWidget,
        qMRMLTableView,
        qMRMLWidget,
    )
}
LAYOUTS = {"QVBoxLayout": QLayout, "QHBoxLayout": QLayout, "QGridLayout": QLayout, "QFormLayout": QFormLayout}


def _property_value(element):
    value = element[0]
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "number":
        return int(value.text)
    if value.tag == "double":
        return float(value.text)
    if value.tag == "stringlist":
        return [item.text for item in value]
    return value.text or ""


def load_ui(path: str):
    """The fake widget tree of a Qt Designer file: every ``<widget>`` made by its class name
    (KeyError for a class without a stand-in) with its properties; ``named``: name -> widget."""
    root = ElementTree.parse(path).getroot().find("widget")
    named = []

    def build(element):
        widget = WIDGETS[element.get("class")](name=element.get("name"))
        named.append(widget)
        for prop in element.findall("property"):
            name, value = prop.get("name"), _property_value(prop)
            if name in ("minimum", "maximum"):  # Designer writes them before "value"
                object.__setattr__(widget, name, value)
            else:
                setattr(widget, name, value)
        layout = element.find("layout")
        if layout is not None:
            widget.setLayout(LAYOUTS[layout.get("class")](layout.get("name")))
            add_items(layout, widget)
        return widget

    def add_items(layout, widget) -> None:
        for item in layout.findall("item"):
            if item.find("widget") is not None:
                widget.layout().addWidget(build(item.find("widget")))
            if item.find("layout") is not None:
                add_items(item.find("layout"), widget)

    top = build(root)
    top.named = {widget.objectName: widget for widget in named}
    return top


def child_widget_variables(widget):
    return types.SimpleNamespace(**widget.named)


# ------------------------------------------------------------------------------------ application


class ModuleManager:
    def __init__(self) -> None:
        self.signals: dict[str, Signal] = {}

    def connect(self, signal: str, slot) -> None:
        self.signals.setdefault(signal, Signal()).connect(slot)

    def disconnect(self, signal: str, slot) -> None:
        self.signals.setdefault(signal, Signal()).disconnect(slot)

    def emit(self, signal: str, *args) -> None:
        self.signals.setdefault(signal, Signal()).emit(*args)


class Application:
    """``slicer.app``: :meth:`process_events` is one turn of the event loop (every active timer fires)."""

    def __init__(self) -> None:
        self.timers: set[QTimer] = set()
        self.cursor_overrides = 0
        self.manager = ModuleManager()

    def process_events(self) -> None:
        for timer in sorted(self.timers, key=id):
            if timer.active:
                if timer.singleShot:
                    timer.stop()
                timer.timeout.emit()

    processEvents = process_events

    def setOverrideCursor(self, cursor) -> None:
        self.cursor_overrides += 1

    def restoreOverrideCursor(self) -> None:
        self.cursor_overrides -= 1

    def testingEnabled(self) -> bool:
        return False

    def moduleManager(self) -> ModuleManager:
        return self.manager


class PlotsLogic:
    def __init__(self) -> None:
        self.shown: list = []

    def ShowChartInLayout(self, chart) -> None:
        self.shown.append(chart)


# ------------------------------------------------------------------- slicer.ScriptedLoadableModule


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
        parent.helpText = "This module was created from a template and the help section has not yet been updated."
        parent.acknowledgementText = "This work is supported by NA-MIC, NAC, BIRN, NCIGT, and the Slicer Community."
        module_dir = os.path.dirname(self.parent.path)
        for extension in (".svg", ".png"):
            icon = os.path.join(module_dir, "Resources/Icons", self.moduleName + extension)
            if os.path.isfile(icon):
                parent.icon = icon
                break
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def runTest(self, msec: int = 100, **kwargs) -> None:
        module = sys.modules[self.__module__]
        test = getattr(module, self.moduleName + "Test")()
        test.messageDelay = msec
        test.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        if not parent:
            self.parent = qMRMLWidget()
            self.parent.setLayout(QLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()
        slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

    def cleanup(self) -> None:
        pass

    def _onModuleAboutToBeUnloaded(self, moduleName: str) -> None:
        if moduleName == self.moduleName:
            self.cleanup()
            slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def setup(self) -> None:
        pass  # Slicer adds its "Reload & Test" section here in developer mode (off)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        super(unittest.TestCase, self).__init__()
        self.messages: list[str] = []

    def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
        self.messages.append(message)


# ---------------------------------------------------------------------- slicer.parameterNodeWrapper


def _read(node, name: str, kind):
    text = node.GetParameter(name)
    return text == "True" if kind is bool else kind(text)


def _write(node, name: str, kind, value) -> None:
    if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
        raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")
    node.SetParameter(name, ("True" if value else "False") if kind is bool else str(value))


def parameterNodeWrapper(cls):
    """Typed properties over the node's parameters for ``str``, ``int``, ``float`` and ``bool``
    members; a member missing from the node gets its default written, as Slicer's wrapper does."""
    members = typing.get_type_hints(cls)
    defaults = {
        name: getattr(cls, name, {str: "", int: 0, float: 0.0, bool: False}[kind]) for name, kind in members.items()
    }
    for name, kind in members.items():
        setattr(
            cls,
            name,
            property(
                lambda self, n=name, k=kind: _read(self.parameterNode, n, k),
                lambda self, value, n=name, k=kind: _write(self.parameterNode, n, k, value),
            ),
        )

    def __init__(self, parameterNode) -> None:
        self.parameterNode = parameterNode
        for name, kind in members.items():
            if not parameterNode.HasParameter(name):
                _write(parameterNode, name, kind, defaults[name])

    cls.__init__ = __init__
    cls.allParameters = dict(members)
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
        event, callback, priority
    )
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    return cls


# --------------------------------------------------------------------------------------- install


class SlicerStandIns:
    """What the stand-ins recorded: ``errors`` (dialog text, details), ``translated`` strings, the
    plots logic's ``plots.shown`` charts, and the application (``app``)."""

    def __init__(self, scene, color_logic, module_file: Path) -> None:
        self.scene = scene
        self.module_file = module_file
        self.app = Application()
        self.errors: list[tuple[str, str]] = []
        self.translated: list[str] = []
        self.plots = PlotsLogic()
        segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations.SetMRMLScene(scene)
        colors = color_logic
        self.modules = types.SimpleNamespace(
            segmentations=types.SimpleNamespace(logic=lambda: segmentations),
            colors=types.SimpleNamespace(logic=lambda: colors),
            plots=types.SimpleNamespace(logic=lambda: self.plots),
        )

    def install(self, monkeypatch) -> None:
        qt = types.ModuleType("qt")
        for name, value in globals().items():
            if name.startswith("Q") and isinstance(value, type):
                setattr(qt, name, value)
        qt.Qt = types.SimpleNamespace(WaitCursor=3)
        monkeypatch.setitem(sys.modules, "qt", qt)
        monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
        modules = {
            "slicer.ScriptedLoadableModule": {
                "ScriptedLoadableModule": ScriptedLoadableModule,
                "ScriptedLoadableModuleWidget": ScriptedLoadableModuleWidget,
                "ScriptedLoadableModuleLogic": ScriptedLoadableModuleLogic,
                "ScriptedLoadableModuleTest": ScriptedLoadableModuleTest,
            },
            "slicer.parameterNodeWrapper": {"parameterNodeWrapper": parameterNodeWrapper},
            "slicer.i18n": {"tr": self.tr},
        }
        for name, members in modules.items():
            module = types.ModuleType(name)
            for key, value in members.items():
                setattr(module, key, value)
            monkeypatch.setitem(sys.modules, name, module)
            monkeypatch.setattr(slicer, name.split(".")[1], module, raising=False)
        QSettings.store = {}
        monkeypatch.setattr(slicer, "app", self.app, raising=False)
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        monkeypatch.setattr(slicer, "modules", self.modules, raising=False)
        monkeypatch.setattr(slicer, "qMRMLWidget", qMRMLWidget, raising=False)
        monkeypatch.setattr(slicer.util, "loadUI", load_ui)
        monkeypatch.setattr(slicer.util, "childWidgetVariables", child_widget_variables)
        monkeypatch.setattr(slicer.util, "modulePath", lambda name: str(self.module_file))
        monkeypatch.setattr(slicer.util, "errorDisplay", self.error_display)

    def tr(self, text: str) -> str:
        self.translated.append(text)
        return text

    def error_display(self, text, windowTitle=None, parent=None, standardButtons=None, **kwargs) -> None:
        self.errors.append((text, kwargs.get("detailedText", "")))

    def run_until(self, done, timeout: float = 60.0, step: float = 0.02) -> None:
        """Turn the event loop until ``done()`` is true; AssertionError after ``timeout`` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not done within {timeout} s")
            self.app.process_events()
            time.sleep(step)


def module_panel(module_file: Path):
    """The ``parent`` Slicer gives a scripted module (its ``path``) and its widget (a panel with a
    layout; ``isEntered`` while the module is shown)."""
    module_parent = types.SimpleNamespace(path=str(module_file))
    panel = qMRMLWidget("panel")
    panel.setLayout(QLayout())
    panel.isEntered = False
    return module_parent, panel


__all__ = ["SlicerStandIns", "module_panel", "vtk"]
