"""Python requirements, the PyTorch device choice and module reloading (no Slicer here).

* Requirements: ``Resources/requirements.txt`` lists what the CLI needs beyond Slicer's own Python
  (numpy, scipy and SimpleITK ship with Slicer; torch comes from the PyTorch extension). Those
  packages are never (re)installed by the module: :data:`PROTECTED_PACKAGES` is both refused in
  the requirements file and passed to ``slicer.packaging.pip_ensure(skip_packages=...)`` so that a
  dependency (MONAI needs torch and numpy) cannot pull in a replacement.
* Device: "auto" uses CUDA when Slicer's PyTorch sees a GPU; "cuda" without one falls back to the
  CPU, and the panel says so and why.
* Reload: the developer "Reload" button re-imports this package (and the library) from source with
  :mod:`importlib` before Slicer reloads ``ConformalSeg.py``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

#: Packages that Slicer (or the PyTorch extension) provides; never installed or replaced by this module.
PROTECTED_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "SimpleITK", "torch", "vtk")
#: Packages the inference needs in addition to torch.
INFERENCE_PACKAGES: tuple[str, ...] = ("monai",)

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


_GROUP = re.compile(r"^#\s*\[([A-Za-z0-9_-]+)\]")


def read_requirements(path: str | PathLike[str], features: Iterable[str] | None = None) -> list[str]:
    """Requirement lines of a requirements file (comments, blanks and ``-`` options skipped): those before
    the first ``# [group]`` line plus the groups in ``features`` (every group when ``features`` is None).
    A protected package in it is an error (it would replace Slicer's own)."""
    wanted = None if features is None else set(features)
    requirements, group = [], None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        header = _GROUP.match(raw.strip())
        if header:
            group = header.group(1)
            continue
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if group is None or wanted is None or group in wanted:
            requirements.append(line)
    protected = {canonical(p) for p in PROTECTED_PACKAGES}
    bad = [r for r in requirements if canonical(requirement_name(r)) in protected]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} must not be installed by the module (Slicer provides it)")
    return requirements


def constraints(version_of: Callable[[str], str | None] | None = None) -> str:
    """A pip constraints file pinning the installed :data:`PROTECTED_PACKAGES` (``numpy==1.26.4``...): with
    ``pip install -c`` a dependency cannot upgrade or replace them (Slicer before 5.12 has no
    ``pip_ensure(skip_packages=)``)."""
    version_of = version_of or _installed_version
    pins = [f"{name}=={version}" for name in PROTECTED_PACKAGES if (version := version_of(name))]
    return "".join(pin + "\n" for pin in pins)


#: PyTorch version the model code needs (passed to the PyTorch extension's installer).
TORCH_REQUIREMENT = ">=2.1"


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(
    requirements: Iterable[str], version_of: Callable[[str], str | None] = _installed_version
) -> list[str]:
    """The requirements that are not installed, or installed in a version outside their specifier."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip and with Slicer
        Requirement = None
    missing = []
    for text in requirements:
        installed = version_of(requirement_name(text))
        if installed is None:
            missing.append(text)
        elif Requirement is not None:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            if not requirement.specifier.contains(installed, prereleases=True):
                missing.append(text)
    return missing


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # what is passed to `conformalseg infer --device`
    message: str  # one sentence for the panel
    fallback: bool  # True when the requested device cannot be used


def resolve_device(
    requested: str,
    *,
    torch_version: str | None,
    cuda_available: bool,
    cuda_version: str | None = None,
    gpu_name: str | None = None,
) -> DeviceChoice:
    """Which device inference will use, and the message that explains it."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    if torch_version is None:
        return DeviceChoice(
            "cpu" if requested == "cpu" else requested,
            "PyTorch is not installed yet: it will be installed (PyTorch extension) before the model runs.",
            False,
        )
    gpu = f" ({gpu_name})" if gpu_name else ""
    if requested == "cpu":
        return DeviceChoice("cpu", f"Running on the CPU (PyTorch {torch_version}).", False)
    if cuda_available:
        return DeviceChoice(
            "cuda",
            f"Running on the GPU{gpu} with CUDA {cuda_version or ''} (PyTorch {torch_version}).".replace("  ", " "),
            False,
        )
    why = (
        "this PyTorch build has no CUDA support (CPU-only build)"
        if not cuda_version
        else "no CUDA GPU is visible (driver missing or no NVIDIA GPU)"
    )
    if requested == "auto":
        return DeviceChoice("cpu", f"Running on the CPU: {why}.", False)
    return DeviceChoice(
        "cpu",
        f"CUDA was requested but {why}: falling back to the CPU (slower). Reinstall PyTorch "
        "with CUDA from the PyTorch Utils module to use the GPU.",
        True,
    )


def describe_unprobed(requested: str) -> str:
    """The device message before PyTorch is imported (importing it takes seconds: done at Apply)."""
    requested = (requested or "auto").lower()
    if requested == "cpu":
        return "The model will run on the CPU."
    if requested == "cuda":
        return (
            "The model will run on the GPU; if PyTorch sees no CUDA GPU it falls back to the CPU "
            "(checked when the model starts)."
        )
    return "The model will run on the GPU when PyTorch sees one, else on the CPU (checked when the model starts)."


def reload_packages(
    prefixes: Iterable[str],
    modules: MutableMapping[str, object] | None = None,
    import_module: Callable[[str], object] = importlib.import_module,
) -> list[str]:
    """Re-import every loaded module of the given packages from source; return their names.

    The modules are first dropped from ``modules`` (``sys.modules``), then imported again with
    :func:`importlib.import_module`, packages first: each fresh import loads its own dependencies
    fresh, so no module keeps a reference into a stale one (which an in-place ``importlib.reload``
    in the wrong order would leave behind).
    """
    modules = sys.modules if modules is None else modules
    prefixes = tuple(prefixes)
    names = [n for n in list(modules) if any(n == p or n.startswith(p + ".") for p in prefixes)]
    names.sort(key=lambda n: (n.count("."), n))
    for name in names:
        modules.pop(name, None)
    for name in names:
        if name not in modules:
            import_module(name)
    return names
