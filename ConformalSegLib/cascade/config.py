"""``CascadeConfig``: every parameter of the coarse-to-fine cascade, loadable from one JSON file.

Format (``conformalseg-cascade``, ``format_version`` 1); every key but ``format`` and
``format_version`` is optional and defaults to the value shown (the paper's best setting: Top-1,
ROI-0margin, 80 % lung overlap with the borderline rescue):

.. code-block:: json

    {
      "format": "conformalseg-cascade", "format_version": 1,
      "stage1_model": "coarse/model_card.json",
      "stage2_model": "roi/model_card.json",
      "stage1_threshold": 0.5,
      "connectivity": 26,
      "merge_radius_mm": 2.0,
      "min_volume_mm3": 0.0,
      "lung_source": "hu",
      "lung_labels": [2],
      "lung_fill_holes": true,
      "min_lung_overlap": 0.8,
      "rescue_distance_mm": 5.0,
      "rescue_min_volume_mm3": 100.0,
      "top_k": 1,
      "roi_margin_voxels": 0,
      "roi_margin_mm": null,
      "stage2_mc_passes": 0,
      "outside_roi_scale": 0.0
    }

* ``stage1_model`` / ``stage2_model``: anything :func:`ConformalSegLib.inference.resolve_model`
  accepts; relative paths are relative to the config file. ``null`` when the predictors are given
  in code. ``stage2_model`` null with a model for stage 1 in the CLI means "refine with the coarse
  model on the ROI".
* Switches: ``merge_radius_mm`` 0 or null = no merging; ``min_volume_mm3`` 0 or null = no minimum;
  ``lung_source`` ``"none"`` (or ``min_lung_overlap`` null) = no lung filter; ``rescue_distance_mm``
  null = no rescue; ``top_k`` null = all valid components.
* ``lung_source``: ``"hu"`` (:func:`~ConformalSegLib.cascade.lungs.classical_lung_mask` on the
  image), ``"labels"`` (a label map handed to the cascade, lung = ``lung_labels``), ``"none"``.
* ROI margin: exactly one of ``roi_margin_voxels`` (paper: 0 or 16) and ``roi_margin_mm``.
* ``outside_roi_scale`` in [0, 1): the cascade probability outside every ROI is this factor times
  the coarse probability (default 0: zero outside the ROIs); see :mod:`ConformalSegLib.cascade.pipeline`.

:meth:`CascadeConfig.fingerprint` is the SHA-256 of the canonical JSON (sorted keys, all parameters,
model paths as written); record it in calibration profiles next to the model cards' fingerprints.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..io.json_file import read_json_file
from .components import CONNECTIVITIES

__all__ = ["FORMAT", "FORMAT_VERSION", "LUNG_SOURCES", "CascadeConfig", "CascadeConfigError", "load_cascade_config"]

FORMAT = "conformalseg-cascade"
FORMAT_VERSION = 1
LUNG_SOURCES = ("hu", "labels", "none")
CONFIG_FIX = "correct the cascade config (see ConformalSegLib/cascade/config.py for the format)"


class CascadeConfigError(ConformalSegError):
    """An invalid cascade configuration (the message names the file and the key)."""


@dataclass(frozen=True)
class CascadeConfig:
    """All cascade parameters (see the module docstring for meanings, units and switches)."""

    stage1_model: str | None = None
    stage2_model: str | None = None
    stage1_threshold: float = 0.5
    connectivity: int = 26
    merge_radius_mm: float | None = 2.0
    min_volume_mm3: float | None = 0.0
    lung_source: str = "hu"
    lung_labels: tuple[int, ...] = (2,)
    lung_fill_holes: bool = True
    min_lung_overlap: float | None = 0.8
    rescue_distance_mm: float | None = 5.0
    rescue_min_volume_mm3: float = 100.0
    top_k: int | None = 1
    roi_margin_voxels: int | None = 0
    roi_margin_mm: float | None = None
    stage2_mc_passes: int = 0
    outside_roi_scale: float = 0.0
    path: Path | None = field(default=None, compare=False)  # the file it was read from

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ serialisation

    def parameters(self) -> dict[str, Any]:
        """All parameters as a JSON-ready dict (without ``path``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        out["lung_labels"] = list(self.lung_labels)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.parameters()}

    def save(self, path: str | PathLike[str], *, force: bool = False) -> Path:
        from ..io.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", force=force)

    @classmethod
    def from_dict(cls, data: Any, path: str | PathLike[str] | None = None) -> CascadeConfig:
        """Validate a parsed config; ``path`` names the file in errors."""
        where = None if path is None else Path(path)
        if not isinstance(data, dict):
            raise CascadeConfigError(
                f"the cascade config must be a JSON object, got {type(data).__name__}", path=where, fix=CONFIG_FIX
            )
        if data.get("format") != FORMAT:
            raise CascadeConfigError(
                f"'format' must be {FORMAT!r}, got {data.get('format')!r}",
                path=where,
                fix=f'add "format": "{FORMAT}", "format_version": {FORMAT_VERSION}',
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise CascadeConfigError(
                f"unsupported format_version {data.get('format_version')!r}",
                path=where,
                fix=f"use format_version {FORMAT_VERSION}",
            )
        names = [f.name for f in dataclasses.fields(cls) if f.name != "path"]
        unknown = [k for k in data if k not in names and k not in ("format", "format_version")]
        if unknown:
            hints = [
                repr(k)
                + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(k), names, 1)) else "")
                for k in unknown
            ]
            raise CascadeConfigError(
                f"unknown key(s) {', '.join(hints)}", path=where, fix=f"use only: {', '.join(names)}"
            )
        values = {k: data[k] for k in names if k in data}
        if isinstance(values.get("lung_labels"), list):
            values["lung_labels"] = tuple(values["lung_labels"])
        try:
            return cls(**values, path=where)
        except CascadeConfigError as exc:
            raise CascadeConfigError(exc.message, path=where, fix=exc.fix) from None

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of all parameters (sorted keys; model paths as written)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def model_path(self, stage: int) -> Path | None:
        """The stage's model path resolved against the config file's folder (None when not set)."""
        value = self.stage1_model if stage == 1 else self.stage2_model
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() or self.path is None else self.path.parent / p

    def replace(self, **changes: Any) -> CascadeConfig:
        """A copy with some parameters changed (validated again), e.g. ``config.replace(top_k=2)``."""
        return dataclasses.replace(self, **changes)


def _fail(message: str) -> CascadeConfigError:
    return CascadeConfigError(message, fix=CONFIG_FIX)


def _number(
    value: Any,
    key: str,
    *,
    optional: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(f"{key!r} must be a finite number{' or null' if optional else ''}, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise _fail(f"{key!r} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise _fail(f"{key!r} must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def _integer(value: Any, key: str, *, optional: bool = False, minimum: int = 0) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(f"{key!r} must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")


def _validate(c: CascadeConfig) -> None:
    for key in ("stage1_model", "stage2_model"):
        value = getattr(c, key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _fail(f"{key!r} must be a path string or null, got {value!r}")
    _number(c.stage1_threshold, "stage1_threshold", lo=0.0, hi=1.0, lo_open=True)
    if c.connectivity not in CONNECTIVITIES or isinstance(c.connectivity, bool):
        raise _fail(f"'connectivity' must be 6, 18 or 26, got {c.connectivity!r}")
    _number(c.merge_radius_mm, "merge_radius_mm", optional=True, lo=0.0)
    _number(c.min_volume_mm3, "min_volume_mm3", optional=True, lo=0.0)
    if c.lung_source not in LUNG_SOURCES:
        close = difflib.get_close_matches(str(c.lung_source), LUNG_SOURCES, 1)
        raise _fail(
            f"'lung_source' must be one of {', '.join(LUNG_SOURCES)}, got {c.lung_source!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    if (
        not isinstance(c.lung_labels, tuple)
        or not c.lung_labels
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in c.lung_labels)
    ):
        raise _fail(f"'lung_labels' must be a non-empty list of label values >= 1, got {c.lung_labels!r}")
    if not isinstance(c.lung_fill_holes, bool):
        raise _fail(f"'lung_fill_holes' must be true or false, got {c.lung_fill_holes!r}")
    _number(c.min_lung_overlap, "min_lung_overlap", optional=True, lo=0.0, hi=1.0)
    _number(c.rescue_distance_mm, "rescue_distance_mm", optional=True, lo=0.0)
    _number(c.rescue_min_volume_mm3, "rescue_min_volume_mm3", lo=0.0)
    _integer(c.top_k, "top_k", optional=True, minimum=1)
    if (c.roi_margin_voxels is None) == (c.roi_margin_mm is None):
        raise _fail(
            "give exactly one of 'roi_margin_voxels' and 'roi_margin_mm' (the other null), got "
            f"{c.roi_margin_voxels!r} and {c.roi_margin_mm!r}"
        )
    _integer(c.roi_margin_voxels, "roi_margin_voxels", optional=True)
    _number(c.roi_margin_mm, "roi_margin_mm", optional=True, lo=0.0)
    _integer(c.stage2_mc_passes, "stage2_mc_passes")
    if c.stage2_mc_passes == 1:
        raise _fail("'stage2_mc_passes' must be 0 (no MC dropout) or >= 2 (a variance needs two passes), got 1")
    _number(c.outside_roi_scale, "outside_roi_scale", lo=0.0, hi=1.0, hi_open=True)


def load_cascade_config(path: str | PathLike[str]) -> CascadeConfig:
    """Read and validate a cascade config JSON file; every problem raises :class:`CascadeConfigError`
    naming the file and the fix."""
    path = Path(path)
    data = read_json_file(path, "cascade config", CONFIG_FIX, CascadeConfigError)
    return CascadeConfig.from_dict(data, path)
