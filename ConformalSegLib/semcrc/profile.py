"""Interval profiles: a calibrated CRC / K-CRC / sem-CRC / per-organ sem-CRC result on disk.

``PROFILE.json`` (format ``conformalseg-interval-profile``, ``format_version`` 1), top-level keys:

* ``method`` (``crc`` | ``k-crc`` | ``sem-crc`` | ``sem-crc-organ``), ``epsilon``, ``guarantee``
  (one sentence), ``coverage`` (the convention: ``y`` covered iff ``q_lo - lambda <= y <= q_hi + lambda``);
* ``lambda``: mapping group name -> lambda (for sem-CRC the organ names and ``"body"``; ``"all"`` for
  CRC; ``"q1".."qK"`` for K-CRC), ``anchor``, ``omega``, ``status`` (``controlled`` |
  ``uncontrollable`` | ``no-calibration-data``) and ``n_cal`` with the same keys; infinite values are
  the string ``"inf"`` (JSON has no infinity);
* ``n_opt``, ``gamma``, ``lambda_max``; ``organ_labels`` (label value -> organ name, as strings),
  ``body`` (``all`` | ``nonzero``); ``provenance`` (input folders, case ids of S_opt and S_cal,
  package version, UTC time);
* K-CRC only: ``partition`` = ``{"file": "PROFILE.npz", "sha256": ..., "shape": [z, y, x]}``; the
  ``.npz`` holds ``partition`` (group index per flat voxel position).
* ``record`` (profiles calibrated by ``conformalseg calibrate``): ``{"file", "sha256", "gammas",
  "from_anchor", "anchor_sample"}``; the ``.npz`` holds the per-scan coverage thresholds of ``S_cal`` and the
  anchor sample of ``S_opt`` (:mod:`.recalibrate`), so ``apply --epsilon`` recalibrates without the volumes.

Both files are written atomically (the ``.npz`` first; the JSON carries its SHA-256); existing files
are never overwritten without ``force``. Loading validates format, keys, values and checksum.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import __version__
from ..conformal.profile_fields import decode_float as _decode  # same JSON float convention
from ..conformal.profile_fields import encode_float as _encode
from ..io.atomic import FileWriter, NpzWriter, atomic_write_files, check_can_write
from ..io.checksums import sha256_file
from ..io.guards import LazyNpz
from ..io.json_file import read_bounded_json, sibling_file, verify_content_checksum, with_content_checksum
from .errors import IntervalProfileError
from .memberships import OrganMap
from .procedures import CONTROLLED, METHODS, NO_DATA, UNCONTROLLABLE, IntervalCalibration
from .recalibrate import IntervalRecord, recalibrate_interval

FORMAT = "conformalseg-interval-profile"
FORMAT_VERSION = 1
COVERAGE = "y covered iff q_lo - lambda <= y <= q_hi + lambda (closed interval; lambda >= need)"
RERUN_FIX = "re-create it with `conformalseg calibrate --method crc-interval|k-crc|sem-crc|sem-crc-organ`"


@dataclass(frozen=True)
class IntervalProfile:
    """A calibration plus what is needed to apply it: organ labels, body-mask rule, provenance."""

    calibration: IntervalCalibration
    organs: OrganMap
    body: str = "all"
    provenance: dict[str, Any] = field(default_factory=dict)
    record: IntervalRecord | None = None  #: per-scan coverage thresholds for recalibration (:mod:`.recalibrate`)

    def recalibrate(self, epsilon: float) -> IntervalProfile:
        """The profile at a new ``epsilon``, from the stored record only (bit-identical to calibrating anew)."""
        if self.record is None:
            raise IntervalProfileError(
                "this interval profile stores no per-scan coverage thresholds, so it cannot be recalibrated",
                fix=RERUN_FIX + " at the new --epsilon",
            )
        return replace(self, calibration=recalibrate_interval(self.calibration, self.record, epsilon))

    @property
    def lambdas(self) -> dict[str, float]:
        return dict(zip(self.calibration.groups, self.calibration.lam.tolist()))

    def to_json_dict(self, npz_name: str | None, npz_sha256: str | None) -> dict[str, Any]:
        c = self.calibration
        by_group = lambda values: {g: _encode(v) for g, v in zip(c.groups, np.asarray(values).tolist())}  # noqa: E731
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": c.method,
            "epsilon": c.epsilon,
            "guarantee": c.guarantee,
            "coverage": COVERAGE,
            "groups": list(c.groups),
            "organs": list(c.organs),
            "lambda": by_group(c.lam),
            "shrink_floor": c.shrink_floor,  # shrinkable CRC: lambda >= this (< 0), voxel-wise >= -width/2
            "anchor": by_group(c.anchor),
            "omega": by_group(c.omega),
            "status": dict(zip(c.groups, c.status)),
            "n_cal": dict(zip(c.groups, (int(v) for v in c.n_cal))),
            "n_opt": c.n_opt,
            "gamma": c.gamma,
            "lambda_max": _encode(c.lambda_max),
            "organ_labels": {str(k): v for k, v in sorted(self.organs.labels.items())},
            "body": self.body,
            "seconds": {k: round(float(v), 6) for k, v in c.seconds.items()},
            "provenance": {
                "package_version": __version__,
                "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "opt_cases": list(c.opt_cases),
                "cal_cases": list(c.cal_cases),
                **self.provenance,
            },
        }
        if c.method == "k-crc":
            doc["partition"] = {"file": npz_name, "sha256": npz_sha256, "shape": list(c.shape or ())}
        if self.record is not None:
            doc["record"] = {"file": npz_name, "sha256": npz_sha256, **self.record.to_json()}
        return doc

    def save(self, path: str | PathLike[str], *, force: bool = False) -> list[Path]:
        """Write ``PATH.json`` (and ``PATH.npz`` for K-CRC) atomically; return the written paths."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise IntervalProfileError(
                "an interval profile file name must end in .json", path=path, fix="e.g. --out intervals.json"
            )
        check_can_write(path, force=force)
        files: list[tuple[Path, NpzWriter | FileWriter]] = []
        npz: NpzWriter | None = None
        if self.calibration.method == "k-crc" or self.record is not None:
            npz_path = path.with_suffix(".npz")
            check_can_write(npz_path, force=force)
            arrays = {} if self.record is None else self.record.to_arrays()
            if self.calibration.method == "k-crc":
                arrays["partition"] = np.asarray(self.calibration.partition, dtype=np.int32)
            npz = NpzWriter(arrays)  # compressed straight into the temporary file
            files.append((npz_path, npz))

        def write_json(handle: IO[bytes]) -> None:
            npz_name, sha = (None, None) if npz is None else (path.with_suffix(".npz").name, npz.sha256)
            doc = with_content_checksum(self.to_json_dict(npz_name, sha))  # any hand edit is refused on load
            handle.write((json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8"))

        files.append((path, write_json))
        atomic_write_files(files, force=force)  # the .npz first, the JSON naming it last: one unit
        return [path] + [p for p, _ in files[:-1]]


def is_interval_profile(path: str | PathLike[str]) -> bool:
    """True when ``path`` is a JSON file with ``"format": "conformalseg-interval-profile"``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # load_interval_profile says why
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def _mapping(doc: dict[str, Any], key: str, groups: list[str], path: Path) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict) or list(value) != groups:
        raise IntervalProfileError(
            f"{key!r} must map every group {groups} (in order), got {value!r}", path=path, fix=RERUN_FIX
        )
    return value


def _check_header(doc: Any, path: Path) -> tuple[str, list[str]]:
    """Format, version, method and group names of a parsed profile."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise IntervalProfileError(f"not an interval profile (no 'format': '{FORMAT}')", path=path, fix=RERUN_FIX)
    if doc.get("format_version") != FORMAT_VERSION:
        raise IntervalProfileError(
            f"format version {doc.get('format_version')!r} is not supported (this is {FORMAT_VERSION})",
            path=path,
            fix=RERUN_FIX,
        )
    method = doc.get("method")
    if method not in METHODS:
        raise IntervalProfileError(f"unknown method {method!r}", path=path, fix=RERUN_FIX)
    groups = doc.get("groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        raise IntervalProfileError("'groups' must be a non-empty list of names", path=path, fix=RERUN_FIX)
    return method, groups


def _read_partition(doc: dict[str, Any], path: Path, n_groups: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The K-CRC partition stored beside the profile (checksum verified) and its grid shape."""
    info = doc.get("partition") or {}
    if not isinstance(info, dict):
        raise IntervalProfileError("'partition' must be a JSON object", path=path, fix=RERUN_FIX)
    npz_path = sibling_file(path, info.get("file"), "partition file", RERUN_FIX, IntervalProfileError)
    if not npz_path.is_file():
        raise IntervalProfileError(
            f"the partition file {npz_path.name} is missing beside the profile",
            path=path,
            fix="keep the .npz next to the .json (copy both), or re-calibrate",
        )
    if sha256_file(npz_path) != info.get("sha256"):
        raise IntervalProfileError(
            "partition file does not match the profile's checksum",
            path=npz_path,
            fix="restore the matching .npz or re-calibrate",
        )
    with LazyNpz(npz_path, "partition file") as arrays:  # only the partition is read, its size checked first
        if "partition" not in arrays:
            raise IntervalProfileError("the partition file has no 'partition' array", path=npz_path, fix=RERUN_FIX)
        partition = np.asarray(arrays["partition"], dtype=np.int32)
    shape = tuple(int(s) for s in info.get("shape", ()))
    if int(np.prod(shape)) != partition.size or partition.max(initial=0) >= n_groups:
        raise IntervalProfileError("partition does not fit the stored grid / groups", path=npz_path, fix=RERUN_FIX)
    return partition, shape


def load_interval_profile(path: str | PathLike[str]) -> IntervalProfile:
    """Load and validate an interval profile (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise IntervalProfileError("interval profile not found", path=path, fix="check the path, or " + RERUN_FIX)
    doc = read_bounded_json(path, "interval profile", RERUN_FIX, IntervalProfileError)
    method, groups = _check_header(doc, path)
    try:
        profile = _read_profile(doc, path, method, groups)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        raise IntervalProfileError(
            f"the profile has a malformed field ({type(exc).__name__}: {str(exc)[:120]}; edited by hand?)",
            path=path,
            fix=RERUN_FIX,
        ) from exc
    verify_content_checksum(doc, path, RERUN_FIX, IntervalProfileError)  # lambdas, epsilon, method...
    return profile


def _read_profile(doc: dict[str, Any], path: Path, method: str, groups: list[str]) -> IntervalProfile:
    """The fields of a parsed profile whose header :func:`_check_header` accepted."""
    lam = np.array([_decode(v, f"lambda[{g}]", path) for g, v in _mapping(doc, "lambda", groups, path).items()])
    anchor = np.array([_decode(v, f"anchor[{g}]", path) for g, v in _mapping(doc, "anchor", groups, path).items()])
    omega = np.array([_decode(v, f"omega[{g}]", path) for g, v in _mapping(doc, "omega", groups, path).items()])
    status = tuple(_mapping(doc, "status", groups, path).values())
    if not set(status) <= {CONTROLLED, UNCONTROLLABLE, NO_DATA}:
        raise IntervalProfileError(f"unknown status in {status}", path=path, fix=RERUN_FIX)
    floor = doc.get("shrink_floor")
    if floor is not None and not (isinstance(floor, (int, float)) and -math.inf < floor <= 0):
        raise IntervalProfileError(f"'shrink_floor' must be a number <= 0, got {floor!r}", path=path, fix=RERUN_FIX)
    if (lam < (0 if floor is None else floor)).any() or any(
        s != CONTROLLED and v != math.inf for s, v in zip(status, lam)
    ):
        raise IntervalProfileError(
            "lambda must be >= 0, and 'inf' for every group that is not controlled", path=path, fix=RERUN_FIX
        )
    n_cal = np.array(list(_mapping(doc, "n_cal", groups, path).values()), dtype=np.int64)
    epsilon = _decode(doc.get("epsilon"), "epsilon", path)
    try:
        organs = OrganMap({int(k): str(v) for k, v in dict(doc.get("organ_labels") or {}).items()})
    except (TypeError, ValueError) as exc:
        raise IntervalProfileError(f"'organ_labels' is malformed ({exc})", path=path, fix=RERUN_FIX) from exc
    partition, shape = _read_partition(doc, path, len(groups)) if method == "k-crc" else (None, None)
    provenance = dict(doc.get("provenance") or {})
    lambda_max = doc.get("lambda_max")
    calibration = IntervalCalibration(
        method=method,
        epsilon=epsilon,
        groups=tuple(groups),
        lam=lam,
        anchor=anchor,
        omega=omega,
        status=status,
        n_cal=n_cal,
        n_opt=int(doc.get("n_opt", 0)),
        organs=tuple(doc.get("organs") or groups),
        gamma=doc.get("gamma"),
        partition=partition,
        shape=shape,
        lambda_max=None if lambda_max is None else _decode(lambda_max, "lambda_max", path),
        seconds=dict(doc.get("seconds") or {}),
        opt_cases=tuple(provenance.pop("opt_cases", ()) or ()),
        cal_cases=tuple(provenance.pop("cal_cases", ()) or ()),
        shrink_floor=None if floor is None else float(floor),
    )
    if method != "k-crc" and method != "crc" and tuple(groups) != organs.groups:
        raise IntervalProfileError(
            f"groups {groups} do not match the organ labels {organs.groups}", path=path, fix=RERUN_FIX
        )
    return IntervalProfile(calibration, organs, str(doc.get("body", "all")), provenance, _read_record(doc, path))


def _read_record(doc: dict[str, Any], path: Path) -> IntervalRecord | None:
    """The stored record (checksum verified), or None for a profile without one."""
    info = doc.get("record")
    if info is None:
        return None
    if not isinstance(info, dict):
        raise IntervalProfileError("'record' must be a JSON object", path=path, fix=RERUN_FIX)
    npz_path = sibling_file(path, info.get("file"), "record file", RERUN_FIX, IntervalProfileError)
    if not npz_path.is_file() or sha256_file(npz_path) != info.get("sha256"):
        raise IntervalProfileError(
            "the .npz beside the profile is missing or does not match its checksum",
            path=npz_path,
            fix="keep the .npz next to the .json (copy both), or re-calibrate",
        )
    try:
        with LazyNpz(npz_path, "record file") as arrays:  # only the expected members, sizes checked first
            return IntervalRecord.from_stored(arrays, info)
    except (KeyError, ValueError, TypeError) as exc:
        raise IntervalProfileError(f"the stored record is malformed ({exc})", path=npz_path, fix=RERUN_FIX) from exc
