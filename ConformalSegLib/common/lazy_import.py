"""Import a heavy dependency when it is first used, not when a module that may use it is imported.

SimpleITK (about 270 MB installed) is what reads and writes image files. Most of the library imports the
modules that wrap it (``io.volumes``, ``io.dicom_series``) without touching a file: training on phantoms
generated in memory, calibrating from summaries, the Slicer panel's slider. :func:`lazy_module` lets those
modules name SimpleITK at the top as before while the import happens at the first attribute access (a
module proxy, not ``importlib.util.LazyLoader``, whose first use is not thread-safe on Python 3.11), so a
machine that only trains (a GPU machine that takes the repository and a few small wheels,
``scripts/device_train.sh``) needs no SimpleITK, and a command that reads no image file skips its import
(0.14 s on the 2-core machine of ``benchmarks/RESULTS.md``).

Where the package is not installed at all, the first use raises :class:`ConformalSegError` naming the
package, what needed it and the ``pip install`` that fixes it, instead of an ``AttributeError`` deep inside.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any

from .errors import ConformalSegError


class _Deferred(ModuleType):
    """Stands for module ``name``: the first attribute read imports it (once, under a lock); every read is
    then passed on to the real module, so what the module holds now is what is read (a test's
    ``monkeypatch`` of the real module reaches the proxy and is undone for it too)."""

    def __init__(self, name: str, purpose: str, pip_name: str):
        super().__init__(name)
        self._deferred_purpose, self._deferred_pip = purpose, pip_name
        self._deferred_lock = threading.Lock()
        self._deferred_module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # introspection (copy, pickle, doctest) must not import
            raise AttributeError(attribute)
        module = self._deferred_module
        if module is None:
            with self._deferred_lock:
                try:
                    module = importlib.import_module(self.__name__)
                except ImportError as exc:
                    raise ConformalSegError(
                        f"{self.__name__} is not installed; it is needed to {self._deferred_purpose}",
                        fix=f"pip install {self._deferred_pip} (bash scripts/setup_env.sh installs everything)",
                    ) from exc
                self._deferred_module = module
        return getattr(module, attribute)


def lazy_module(name: str, *, purpose: str, pip_name: str | None = None) -> ModuleType:
    """Module ``name``, imported on its first attribute access (see the module docstring); ``purpose``
    ends the sentence "it is needed to ..." of the error raised when it is not installed."""
    return _Deferred(name, purpose, pip_name or name)
