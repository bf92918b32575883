"""Folder-level calibrate / apply for interval methods (what the CLI and the Slicer module call).

Inputs are matched by case id (file name without extension, as for probability maps) across four
folders: lower quantile maps, upper quantile maps, ground-truth images and organ label maps (the
segmentation model's output ``s(y)``). Volumes may be any format :mod:`ConformalSegLib.io` reads
(``.nii.gz``, ``.nrrd``, ``.mha``, ... or ``.npy``); the four volumes of a case must share one grid.

:func:`apply_interval` returns the conformalised bounds, the interval length map and a per-group
table; voxels outside the body mask keep their raw interval (``lambda = 0``) and are outside every
guarantee. The bounds are written as float32 rounded *outward* (lower down, upper up), so the written
interval always contains the calibrated one. Memory: :func:`calibrate_interval` streams (:mod:`.streaming`):
one scan's volumes at a time, plus per calibration scan its group sizes and the coverage thresholds of the
voxels its raw interval misses (12 bytes each); ``stream=False`` and :func:`load_interval_data` keep every
scan's counted voxels (about 28 bytes each) in RAM.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.jsonable import jsonable
from ..io.atomic import atomic_write_text, check_can_write
from ..io.dataset import scan_folder
from ..io.volumes import IMAGE_EXTENSIONS, Volume, check_same_geometry, load_image, load_label_map, volume_extension
from .errors import IntervalCalibrationError, IntervalInputError
from .intervals import EXCLUDED, IntervalData, IntervalScan, make_interval_scan, scan_loss
from .memberships import OrganMap, organ_memberships
from .procedures import METHODS, calibrate_interval_method
from .profile import IntervalProfile
from .recalibrate import interval_record
from .shrinkable import voxel_lambdas
from .spill import spill_scan
from .streaming import ScanMap, can_stream, stream_calibration

if TYPE_CHECKING:
    from ..inference.model_card import ModelCard

PathLikeStr = str | PathLike[str]
ProgressCallback = Callable[[int, int, str], None]
#: CLI spelling -> library method name
CLI_METHODS: dict[str, str] = {
    "crc-interval": "crc",
    "k-crc": "k-crc",
    "sem-crc": "sem-crc",
    "sem-crc-organ": "sem-crc-organ",
}


def load_float_volume(path: PathLikeStr, what: str) -> Volume:
    """A float volume from an image file or a bare ``.npy`` array (identity geometry)."""
    path = Path(path)
    if volume_extension(path) == ".npy":
        if not path.is_file():
            raise IntervalInputError(f"{what} not found", path=path, fix="check the file name and folder")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise IntervalInputError(f"cannot read the {what} ({exc})", path=path, fix="re-export the file") from exc
        from ..common.geometry import Geometry

        if array.ndim != 3:
            raise IntervalInputError(
                f"{what} must be 3D, got shape {array.shape}", path=path, fix="save one 3D volume per file"
            )
        return Volume(
            array.astype(np.float32, copy=False), Geometry(shape=tuple(array.shape)), str(path), geometry_known=False
        )
    if volume_extension(path) not in IMAGE_EXTENSIONS:
        raise IntervalInputError(
            f"unsupported {what} format", path=path, fix=f"use one of {' '.join(IMAGE_EXTENSIONS + ('.npy',))}"
        )
    return load_image(path)


def as_organ_map(organs: OrganMap | Mapping[int, str] | str | None) -> OrganMap:
    if organs is None:
        return OrganMap({})
    if isinstance(organs, OrganMap):
        return organs
    if isinstance(organs, str):
        return OrganMap.parse(organs)
    return OrganMap(dict(organs))


def discover_interval_cases(
    lower_dir: PathLikeStr, upper_dir: PathLikeStr, truth_dir: PathLikeStr, organs_dir: PathLikeStr | None
) -> list[tuple[str, dict[str, Path]]]:
    """``(case_id, {"lower", "upper", "truth", "organs"} -> path)`` for every case, sorted by case id."""
    folders = {"lower": lower_dir, "upper": upper_dir, "truth": truth_dir}
    if organs_dir is not None:
        folders["organs"] = organs_dir
    files = {role: scan_folder(folder, probability=False) for role, folder in folders.items()}
    ids = set.intersection(*(set(f) for f in files.values()))
    missing = {role: sorted(set(f) - ids) for role, f in files.items() if set(f) - ids}
    if missing:
        detail = "; ".join(
            f"{len(v)} case(s) only partly present, e.g. {v[0]!r} in the {role} folder" for role, v in missing.items()
        )
        raise IntervalInputError(
            f"the input folders do not hold the same case ids: {detail}",
            fix="give every case a lower, upper, truth (and organ) file with the same name",
        )
    return [(cid, {role: files[role][cid] for role in files}) for cid in sorted(ids)]


def load_interval_scan(paths: Mapping[str, Path], organs: OrganMap, body: str, case_id: str) -> IntervalScan:
    lower = load_float_volume(paths["lower"], "lower quantile map")
    upper = load_float_volume(paths["upper"], "upper quantile map")
    truth = load_float_volume(paths["truth"], "ground-truth image")
    check_same_geometry(lower, upper, what="lower and upper quantile maps")
    check_same_geometry(lower, truth, what="lower quantile map and ground truth")
    if "organs" in paths:
        labels = load_label_map(paths["organs"])
        check_same_geometry(lower, labels, what="lower quantile map and organ label map")
        label_array = labels.array
    else:
        label_array = np.zeros(lower.array.shape, dtype=np.int32)
    membership = organ_memberships(label_array, organs, body)
    try:
        return make_interval_scan(lower.array, upper.array, truth.array, membership, case_id=case_id)
    except IntervalInputError as exc:
        raise IntervalInputError(exc.message, path=paths["lower"], fix=exc.fix) from exc


def load_case(cases: Sequence[tuple[str, Mapping[str, Path]]], organs: OrganMap, body: str, i: int) -> IntervalScan:
    """Scan ``i`` of ``cases`` (``(case_id, paths)``), read and checked (:func:`load_interval_scan`)."""
    return load_interval_scan(cases[i][1], organs, body, cases[i][0])


def load_interval_data(
    lower_dir: PathLikeStr,
    upper_dir: PathLikeStr,
    truth_dir: PathLikeStr,
    organs_dir: PathLikeStr | None,
    organs: OrganMap | Mapping[int, str] | str | None = None,
    body: str = "all",
    *,
    progress: ProgressCallback | None = None,
    spill_to: Path | None = None,
    map_scans: ScanMap | None = None,
) -> IntervalData:
    """Every scan of the four folders (matched by case id) as :class:`IntervalData`; with ``spill_to`` (an
    existing folder) each scan's arrays are written there and read back as memory maps (:mod:`.spill`).

    ``map_scans`` (needs ``spill_to``) reads, checks and spills the scans on an executor's workers
    (:func:`load_and_spill`, one task per scan): only the spilled scans' folder names come back. It may leave
    out scans that failed (``--keep-going``); the others keep their case order.
    """
    organ_map = as_organ_map(organs)
    cases = discover_interval_cases(lower_dir, upper_dir, truth_dir, organs_dir)
    if map_scans is not None:
        if spill_to is None:
            raise IntervalInputError("reading interval scans on an executor needs a spill folder", fix="pass spill_to")
        shared = (cases, organ_map, body, Path(spill_to))
        spilled = map_scans(load_and_spill, shared, list(range(len(cases))), [cid for cid, _ in cases])
        return IntervalData(spilled, organ_map.groups)
    scans: list[IntervalScan] = []
    for i, (cid, paths) in enumerate(cases):
        scan = load_interval_scan(paths, organ_map, body, cid)
        scans.append(scan if spill_to is None else spill_scan(scan, Path(spill_to) / f"scan{i:06d}"))
        if progress is not None:
            progress(i + 1, len(cases), cid)
    return IntervalData(scans, organ_map.groups)


def load_and_spill(shared: tuple[Any, ...], i: int) -> IntervalScan:
    """Read and check scan ``i`` of ``cases`` and spill it into ``spill_to/scanNNNNNN`` (``shared`` is ``(cases,
    organs, body, spill_to)``). Module level: the task of ``map_scans`` in :func:`load_interval_data`."""
    cases, organ_map, body, spill_to = shared
    return spill_scan(load_case(cases, organ_map, body, i), Path(spill_to) / f"scan{i:06d}")


def calibrate_interval(
    method: str,
    lower_dir: PathLikeStr,
    upper_dir: PathLikeStr,
    truth_dir: PathLikeStr,
    organs_dir: PathLikeStr | None,
    epsilon: float,
    *,
    organs: OrganMap | Mapping[int, str] | str | None = None,
    body: str = "all",
    progress: ProgressCallback | None = None,
    anchor_progress: ProgressCallback | None = None,
    stream: bool = True,
    map_scans: ScanMap | None = None,
    **options: Any,
) -> IntervalProfile:
    """Calibrate ``method`` (library or CLI spelling, see :data:`CLI_METHODS`) on folders of volumes.

    ``options`` go to the procedure (``n_opt``, ``d_opt``, ``d_min``, ``k``, ``gammas``, ``lambda_max``,
    ``from_anchor``, ``seed``, ``shrinkable``). sem-CRC methods need ``organs_dir`` and ``organs``. ``stream``
    (default): one scan at a time (:mod:`.streaming`; bit-identical lambdas and record); ``stream=False``: every
    scan in memory first (the reference path). ``progress`` after
    every scan read, ``anchor_progress`` after every gamma of the anchor problem (streaming path).
    ``map_scans``: the calibration split on an executor (:func:`~.streaming.stream_calibration`, bit-identical).
    """
    method = CLI_METHODS.get(method, method)
    if method not in METHODS:
        raise IntervalInputError(f"unknown interval method {method!r}", fix=f"use one of {', '.join(CLI_METHODS)}")
    organ_map = as_organ_map(organs)
    if method.startswith("sem-crc") and (organs_dir is None or not organ_map.labels):
        raise IntervalInputError(
            f"{method} needs organ label maps and organ names",
            fix="pass --organs DIR and --organ-labels 1=liver,2=spleen,...",
        )
    provenance = {
        "lower_dir": str(Path(lower_dir).resolve()),
        "upper_dir": str(Path(upper_dir).resolve()),
        "truth_dir": str(Path(truth_dir).resolve()),
        "organs_dir": None if organs_dir is None else str(Path(organs_dir).resolve()),
    }
    if options.get("shrinkable", False) and method not in ("crc", "sem-crc-organ"):
        raise IntervalInputError(
            f"--shrinkable is implemented for crc-interval and sem-crc-organ, not {method}",
            fix="leave out --shrinkable, or use --method crc-interval / sem-crc-organ",
        )
    _check_executor(method, stream, map_scans, options)
    if stream and can_stream(method, options):  # one scan at a time (:mod:`.streaming`), bit-identical
        cases = discover_interval_cases(lower_dir, upper_dir, truth_dir, organs_dir)
        ids = [cid for cid, _ in cases]
        load = functools.partial(load_case, cases, organ_map, body)  # picklable: sent to executor workers
        per_method = _method_options(method, options)
        calibration, record = stream_calibration(
            method,
            ids,
            load,
            organ_map.groups,
            epsilon,
            progress=progress,
            anchor_progress=anchor_progress,
            map_scans=map_scans,
            **per_method,
        )
        return IntervalProfile(calibration, organ_map, body, provenance, record)
    data = load_interval_data(lower_dir, upper_dir, truth_dir, organs_dir, organ_map, body, progress=progress)
    if options.pop("shrinkable", False):
        if method not in ("crc", "sem-crc-organ"):
            raise IntervalInputError(
                f"--shrinkable is implemented for crc-interval and sem-crc-organ, not {method}",
                fix="leave out --shrinkable, or use --method crc-interval / sem-crc-organ",
            )
        from .shrinkable import calibrate_crc_interval_shrinkable

        calibration = (
            calibrate_crc_interval_shrinkable(data, epsilon, lambda_max=options.get("lambda_max"))
            if method == "crc"
            else calibrate_interval_method(method, data, epsilon, shrinkable=True, **options)
        )
    else:
        calibration = calibrate_interval_method(method, data, epsilon, **options)
    return IntervalProfile(calibration, organ_map, body, provenance, interval_record(calibration, data, **options))


def _check_executor(method: str, stream: bool, map_scans: ScanMap | None, options: Mapping[str, Any]) -> None:
    """An executor (``map_scans``) needs the streaming path (``stream=True``, a method that streams)."""
    if map_scans is not None and not (stream and can_stream(method, dict(options))):
        raise IntervalCalibrationError(
            f"{method}{' shrinkable' if options.get('shrinkable') else ''} without streaming (stream=False) runs on "
            "one process only",
            fix="calibrate with stream=True, or without an executor",
        )


def _method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options :func:`~.procedures.calibrate_interval_method` passes on to ``method``."""
    drop = {
        "crc": {"n_opt", "k", "d_opt", "d_min", "gammas", "seed", "from_anchor"},
        "k-crc": {"from_anchor"},
        "sem-crc": {"k", "from_anchor"},
        "sem-crc-organ": {"k"},
    }[method]
    return {key: value for key, value in options.items() if key not in drop}


@dataclass(frozen=True)
class IntervalApplication:
    """Conformalised bounds, the length map and one table row per group of the profile."""

    lower: np.ndarray
    upper: np.ndarray
    length: np.ndarray
    table: list[dict[str, Any]]

    def __iter__(self):
        """Unpack as ``lower, upper, length, table = apply_interval(...)``."""
        return iter((self.lower, self.upper, self.length, self.table))


def apply_interval(
    profile: IntervalProfile,
    lower: np.ndarray,
    upper: np.ndarray,
    organs: np.ndarray | None,
    *,
    truth: np.ndarray | None = None,
) -> IntervalApplication:
    """Widen ``[lower, upper]`` by the profile's lambdas (module docstring).

    The table has per group: ``group``, ``lambda``, ``status``, ``voxels`` and ``mean_length``;
    for sem-CRC profiles the groups are the organs; with ``truth`` also ``risk`` (fraction of the
    group's voxels outside their interval in this scan).
    """
    lo = np.asarray(lower, dtype=np.float64)
    hi = np.asarray(upper, dtype=np.float64)
    labels = np.zeros(lo.shape, dtype=np.int32) if organs is None else np.asarray(organs)
    membership = organ_memberships(labels, profile.organs, profile.body)
    y = lo if truth is None else truth
    scan = make_interval_scan(lo, hi, y, membership, case_id="applied")
    calib = profile.calibration
    groups = calib.voxel_groups(scan)
    lam_voxel = voxel_lambdas(calib, scan)  # clamped at -width/2 for shrinkable profiles
    lam_map: np.ndarray = np.zeros(lo.size, dtype=np.float64)
    lam_map[scan.index] = lam_voxel
    lam_map = lam_map.reshape(lo.shape)
    out_lo, out_hi = _round_outward(lo - lam_map, hi + lam_map)
    table = []
    for k, name in enumerate(calib.groups):
        inside = groups == k
        row: dict[str, Any] = {
            "group": name,
            "lambda": float(calib.lam[k]),
            "status": calib.status[k],
            "voxels": int(inside.sum()),
            "mean_length": float(np.mean(scan.width[inside] + 2 * lam_voxel[inside])) if inside.any() else None,
        }
        if truth is not None:
            row["risk"] = scan_loss(scan.need[inside], lam_voxel[inside]) if inside.any() else None
        table.append(row)
    return IntervalApplication(out_lo, out_hi, (out_hi.astype(np.float64) - out_lo).astype(np.float32), table)


def _round_outward(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 bounds rounded outward, so the written interval contains the calibrated one."""
    lo32, hi32 = lower.astype(np.float32), upper.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) > lower, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) < upper, np.nextafter(hi32, np.float32(np.inf)), hi32)
    return lo32, hi32


def write_interval_table(
    rows: list[dict[str, Any]],
    csv_path: PathLikeStr,
    json_path: PathLikeStr,
    *,
    force: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the per-group table as CSV and JSON (atomically; infinite values as ``"inf"``)."""
    check_can_write(csv_path, force=force)
    check_can_write(json_path, force=force)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ("" if row.get(k) is None else jsonable(row.get(k), non_finite="inf-string")) for k in columns}
        )
    atomic_write_text(csv_path, buffer.getvalue(), force=force)
    doc = jsonable({**(extra or {}), "groups": rows}, non_finite="inf-string")
    atomic_write_text(json_path, json.dumps(doc, indent=2, allow_nan=False) + "\n", force=force)
    return Path(csv_path), Path(json_path)


def excluded_fraction(membership: np.ndarray) -> float:
    """Fraction of voxels outside the body mask (for reports)."""
    return float(np.mean(np.asarray(membership) == EXCLUDED))


def predict_quantile_folder(
    model: ModelCard | str | PathLike[str], images: Path, out: Path, *, device: str = "cpu", force: bool = False
) -> list[str]:
    """Write ``out/lower/CASE.nii.gz`` and ``out/upper/CASE.nii.gz`` for every image in ``images``."""
    from ..inference import InferenceEngine, find_images
    from ..io.volumes import load_image, save_volume

    engine = InferenceEngine(model, device=device)
    if not engine.card.output.is_quantile:
        raise ConformalSegError(
            f"{engine.card.describe()} is not a quantile regression model",
            path=engine.card.path,
            fix="give a model card with output.quantiles",
        )
    ids = []
    for case in find_images(images):
        volume = load_image(case.path)
        prediction = engine.predict_quantiles(volume)
        save_volume(prediction.lower, volume.geometry, out / "lower" / f"{case.case_id}.nii.gz", force=force)
        save_volume(prediction.upper, volume.geometry, out / "upper" / f"{case.case_id}.nii.gz", force=force)
        ids.append(case.case_id)
    return ids
