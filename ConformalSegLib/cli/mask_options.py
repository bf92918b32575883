"""Mask-only tools on the command line: ``calibrate --masks DIR`` and ``apply --mask FILE``.

* ``calibrate --method sets --transform distance --masks PRED_DIR --labels TRUE_DIR [--structures 1=liver,2=spleen]``
  calibrates margins around the predicted masks of a tool that gives no probabilities
  (:mod:`ConformalSegLib.conformal.mask_sets`). Without ``--structures`` the structure is ``--lesion-label``'s
  value(s) and ``--out`` is an ordinary profile; with it, one profile per structure is written beside
  ``--out`` (``OUT.<name>.json``) and ``--out`` itself is an index naming them with their SHA-256
  (format ``conformalseg-structures``).
* ``apply --mask PRED`` applies such a profile (or index) to a new predicted label map and writes the inner
  and outer sets of every structure (NIfTI, ``.seg.nrrd``, optionally a DICOM SEG), named
  ``Inner set``/``Outer set`` or ``<name> inner set``/``<name> outer set``.
* Mismatches are refused with the fix: a probability method or the identity transform on masks, a
  mask-calibrated profile given ``--prob``, a probability profile given ``--mask``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.executors import MapReport, map_ordered
from ..common.geometry import Geometry
from ..conformal.mask_sets import (
    check_mask_request,
    check_structures_request,
    structure_map,
    structure_profiles,
    summarize_structures,
)
from ..conformal.profile import CalibrationProfile, load_profile
from ..io.atomic import atomic_write_text, check_can_write
from ..io.checksums import sha256_file
from ..io.dataset import DEFAULT_LESION_LABELS, scan_folder
from ..io.dicom_seg_input import is_dicom_seg_path
from ..io.segmentation import INNER_SET, OUTER_SET, slug, write_masks_nifti, write_seg_nrrd
from ..io.volumes import Volume, check_same_geometry, label_values, load_label_map

INDEX_FORMAT = "conformalseg-structures"
PER_STRUCTURE_NOTE = (
    "each structure's guarantee holds for that structure; for all K structures of a scan at once, calibrate "
    "each at alpha / K (union bound)"
)


def add_mask_calibrate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--masks",
        type=Path,
        default=None,
        help="sets: folder of PREDICTED label maps of a tool without probabilities (TotalSegmentator, nnU-Net "
        "without --save_probabilities), same case ids as --labels, NIfTI/NRRD or DICOM SEG CASE.dcm (segment "
        "number = label value); use with --transform distance",
    )
    p.add_argument(
        "--structures",
        default=None,
        metavar="V=NAME,...",
        help="with --masks: one calibration per structure, e.g. 1=liver,2=spleen (values sharing a name form one "
        "structure: 2=kidney,3=kidney); default: the --lesion-label value(s) as one structure",
    )


def parse_structures(text: str) -> dict[str, tuple[int, ...]]:
    """``"1=liver,2=spleen,3=kidney,4=kidney"`` -> ``{"liver": (1,), "spleen": (2,), "kidney": (3, 4)}``."""
    structures: dict[str, list[int]] = {}
    seen: set[int] = set()
    for item in str(text).split(","):
        value, _, name = item.strip().partition("=")
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not name.strip() or number in seen:
            raise ConformalSegError(
                f"cannot read --structures {text!r} at {item.strip()!r}",
                fix="give VALUE=NAME pairs separated by commas, each label value once, e.g. 1=liver,2=spleen",
            )
        seen.add(number)
        structures.setdefault(name.strip(), []).append(number)
    return {name: tuple(values) for name, values in structures.items()}


def structure_profile_path(out: Path, name: str) -> Path:
    return out.with_name(f"{out.stem}.{slug(name)}.json")


def _mask_pairs(masks_dir: Path, labels_dir: Path) -> list[tuple[str, Path, Path]]:
    predicted = scan_folder(masks_dir, probability=False)
    truth = scan_folder(labels_dir, probability=False)
    unmatched = sorted(set(predicted) ^ set(truth))
    if unmatched:
        raise ConformalSegError(
            f"{len(unmatched)} case id(s) are in only one of --masks and --labels: {', '.join(unmatched[:10])}",
            path=masks_dir,
            fix="give every case a predicted and a true label map with the same file name",
        )
    return [(cid, predicted[cid], truth[cid]) for cid in sorted(predicted)]


def load_label_pair(first: Path, second: Path, segments: dict[str, int] | None = None) -> tuple[Volume, Volume]:
    """Two label maps of one case; a DICOM SEG is placed on the other file's grid (both SEGs: the second's),
    its segments renumbered by ``segments`` (``--seg-segments``) when given."""
    if is_dicom_seg_path(first):
        b = load_label_map(second, None, segments)
        return load_label_map(first, b.geometry, segments), b
    a = load_label_map(first, None, segments)
    return a, load_label_map(second, a.geometry, segments)


def summarize_mask_case(
    shared: tuple[dict[str, tuple[int, ...]], Any, dict[str, int] | None], pair: tuple[str, Path, Path]
) -> tuple[dict[str, Any], frozenset[int]]:
    """One case of ``calibrate --masks`` on any worker: its two label maps read and checked, every structure
    summarized (:func:`~ConformalSegLib.conformal.mask_sets.summarize_structures`), and the label values seen.
    Module level, so that process and Dask workers import it by name."""
    structures, request, segments = shared
    cid, mask_path, label_path = pair
    predicted, truth = load_label_pair(mask_path, label_path, segments)
    check_same_geometry(predicted, truth, what=f"predicted and true label maps of case {cid!r}")
    seen = frozenset(label_values(truth.array) | label_values(predicted.array))
    return summarize_structures(cid, predicted.array, truth.array, truth.geometry, structures, request), seen


def run_mask_calibrate(args: argparse.Namespace, request_from_args: Any) -> int:
    """``calibrate --masks``: one profile (or an index of per-structure profiles); see the module docstring."""
    if args.probs is not None or args.data is not None or getattr(args, "images", None) is not None:
        raise ConformalSegError("give --masks or --probs/--data/--images, not both")
    if args.labels is None:
        raise ConformalSegError("--masks needs --labels (the true label maps)", fix="pass --labels DIR")
    check_mask_request(args.method, (args.inner_transform or args.transform, args.outer_transform or args.transform))
    lesion_label = tuple(args.lesion_label) if args.lesion_label else DEFAULT_LESION_LABELS
    structures = parse_structures(args.structures) if args.structures else {"structure": lesion_label}
    if args.out.suffix.lower() != ".json":
        raise ConformalSegError("the profile file name must end in .json", path=args.out, fix="e.g. --out sets.json")
    targets = [structure_profile_path(args.out, name) for name in structures] if args.structures else [args.out]
    if not args.force:
        for target in [args.out, *targets]:
            check_can_write(target)
            check_can_write(target.with_suffix(".npz"))
    from .common import progress_bar, segment_map
    from .executor_options import executor_spec

    segments = segment_map(args)
    provenance: dict[str, Any] = {"masks_dir": str(args.masks.resolve()), "labels_dir": str(args.labels.resolve())}
    provenance["seg_segments"] = segments
    request = request_from_args(args, provenance)
    check_structures_request(structures, request)
    pairs = _mask_pairs(args.masks, args.labels)
    spec, report = executor_spec(args), MapReport("serial", 1, [])
    parts = map_ordered(
        summarize_mask_case,
        ({name: tuple(values) for name, values in structures.items()}, request, segments),
        pairs,
        spec,
        labels=[cid for cid, _, _ in pairs],
        progress=progress_bar("calibrating"),
        keep_going=getattr(args, "keep_going", False),
        report=report,
    )
    seen: set[int] = set().union(*(part_seen for _, part_seen in parts))
    request = replace(request, provenance={**request.provenance, **report.provenance()})
    profiles = structure_profiles([summaries for summaries, _ in parts], structures, request)
    missing = sorted(v for values in structures.values() for v in values if v not in seen)
    if missing:
        raise ConformalSegError(
            f"label value(s) {', '.join(map(str, missing))} occur in no predicted or true label map "
            f"(values seen: {', '.join(map(str, sorted(seen)))})",
            path=args.labels,
            fix="check --structures (or --lesion-label)",
        )
    others = sorted(seen - {0} - set(lesion_label))
    if not args.structures and not args.lesion_label and others:  # which structure? the label maps hold several
        raise ConformalSegError(
            f"the label maps hold values {', '.join(map(str, sorted(seen - {0})))}: which one is the structure?",
            path=args.labels,
            fix="pass --lesion-label V (or --structures 1=liver,2=spleen for one calibration per structure)",
        )
    entries = []
    for (name, profile), target in zip(profiles.items(), targets):
        json_path, _ = profile.save(target, force=args.force)
        entries.append(_index_entry(name, structures[name], profile, json_path))
        print(f"{name}: {profile.guarantee} {margin_sentence(profile)}")
    if args.structures:
        index = {"format": INDEX_FORMAT, "format_version": 1, "method": "sets", "structures": entries}
        index["note"] = PER_STRUCTURE_NOTE
        atomic_write_text(args.out, json.dumps(index, indent=2) + "\n", force=args.force)
    print(f"wrote {args.out}" + (f" and {len(targets)} structure profile(s)" if args.structures else ""))
    return 0


def _index_entry(name: str, values: tuple[int, ...], profile: CalibrationProfile, path: Path) -> dict[str, Any]:
    return {
        "name": name,
        "label_values": list(values),
        "profile": path.name,
        "sha256": sha256_file(path),
        "guarantee": profile.guarantee,
    }


def margin_sentence(profile: CalibrationProfile) -> str:
    """The sets in mm around the predicted mask (distance transform) or in score units."""
    doc = profile.to_json_dict("", "")
    inner, outer = doc.get("inner_threshold"), doc.get("outer_threshold")
    units = "mm" if str(doc["transform"]["outer"]).startswith("distance") else "(score units)"
    return (
        f"Outer set: signed distance to the predicted boundary >= {outer} {units} (negative = outside the mask); "
        f"inner set: > {inner} {units}."
    )


# ----------------------------------------------------------------------------- apply --mask


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}  # load_profile gives the proper error
    return doc if isinstance(doc, dict) else {}


def is_mask_apply(args: argparse.Namespace) -> bool:
    """True when ``apply`` must run on a predicted mask; refuses a profile/input mismatch either way."""
    if not Path(args.profile).is_file():
        load_profile(args.profile)  # the usual error for a missing profile
    doc = _read_json(args.profile)
    mask_profile = doc.get("format") == INDEX_FORMAT or "mask_input" in (doc.get("provenance") or {})
    if mask_profile and args.mask is None:
        raise ConformalSegError(
            "this profile was calibrated on predicted masks (calibrate --masks), not on probability maps",
            path=args.profile,
            fix="pass --mask PREDICTED_LABEL_MAP",
        )
    if args.mask is not None and not mask_profile:
        raise ConformalSegError(
            "--mask needs a profile calibrated on predicted masks (calibrate --masks); this one was calibrated on "
            "probability maps, which a mask cannot stand in for",
            path=args.profile,
            fix="pass --prob PROBABILITY_MAP, or calibrate with --masks",
        )
    return mask_profile


def _structure_profiles(path: Path) -> list[tuple[str | None, tuple[int, ...], CalibrationProfile]]:
    """``(name or None for a single profile, label values, profile)`` of a profile or an index."""
    doc = _read_json(path)
    if doc.get("format") != INDEX_FORMAT:
        profile = load_profile(path)
        values = tuple(profile.provenance["mask_input"]["label_values"])
        return [(None, values, profile)]
    result: list[tuple[str | None, tuple[int, ...], CalibrationProfile]] = []
    for entry in doc.get("structures", []):
        target = path.with_name(str(entry["profile"]))
        if not target.is_file() or sha256_file(target) != entry.get("sha256"):
            raise ConformalSegError(
                f"the profile of structure {entry.get('name')!r} is missing or changed since calibration",
                path=target,
                fix="keep the files written by calibrate --structures together, unchanged",
            )
        result.append((str(entry["name"]), tuple(int(v) for v in entry["label_values"]), load_profile(target)))
    return result


def _reference_grid(args: argparse.Namespace) -> Geometry | None:
    """The ``--reference-dicom`` series' grid, on which an ``apply --mask`` DICOM SEG is placed (else its own)."""
    if not is_dicom_seg_path(args.mask) or getattr(args, "reference_dicom", None) is None:
        return None
    from .dicom_options import reference_headers

    return reference_headers(args).geometry


def run_mask_apply(args: argparse.Namespace, dicom_seg: Path | None) -> int:
    """``apply --mask``: the inner and outer sets of every structure of the profile (or index)."""
    from .dicom_options import check_dicom_reference, write_seg_output

    seg_path, summary_path = args.out / "segmentation.seg.nrrd", args.out / "apply.json"
    if not args.force:
        check_can_write(seg_path)
        check_can_write(summary_path)
    from .common import segment_map

    structures = _structure_profiles(args.profile)
    # the segment names of calibration by default: the same SEG numbering reads the same structures
    segments = segment_map(args) or next((p.provenance.get("seg_segments") for *_, p in structures), None)
    predicted = load_label_map(args.mask, _reference_grid(args), segments)
    masks: dict[str, np.ndarray] = {}
    report: dict[str, Any] = {"seg_segments": segments} if segments else {}
    for name, values, profile in structures:
        if any(v is not None for v in (args.alpha, args.alpha_inner, args.alpha_outer)):
            profile = profile.recalibrate(alpha=args.alpha, alpha_inner=args.alpha_inner, alpha_outer=args.alpha_outer)
        inner, outer = profile.masks(structure_map(predicted.array, values), predicted.geometry).values()
        prefix = "" if name is None else f"{name} "
        masks[prefix + (INNER_SET.lower() if name else INNER_SET)] = inner
        masks[prefix + (OUTER_SET.lower() if name else OUTER_SET)] = outer
        doc = profile.to_json_dict("", "")
        keep = ("method", "alpha", "alpha_inner", "alpha_outer", "n", "inner_threshold", "outer_threshold", "transform")
        report[name or "structure"] = {key: doc[key] for key in keep} | {"guarantee": profile.guarantee}
        print(f"{name + ': ' if name else ''}{profile.guarantee} {margin_sentence(profile)}")
    if dicom_seg is not None:
        check_dicom_reference(args, predicted.geometry)
    written = write_masks_nifti(masks, predicted.geometry, args.out, force=args.force)
    write_seg_nrrd(masks, predicted.geometry, seg_path, force=args.force)
    summary: dict[str, Any] = {"mask": str(args.mask), "structures": report, "note": PER_STRUCTURE_NOTE}
    summary["voxels"] = {name: int(mask.sum()) for name, mask in masks.items()}
    if dicom_seg is not None:
        first = next(iter(report.values()))
        sentence = " ".join(f"{key}: {entry['guarantee']}" for key, entry in report.items())
        seg_doc = {"method": "sets (mask)", "epsilon": None, "alpha": first["alpha"], "n": first["n"]}
        seg_doc["guarantee"] = sentence
        summary["dicom_seg"] = str(write_seg_output(args, dicom_seg, masks, predicted.geometry, seg_doc))
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n", force=args.force)
    print(f"wrote {seg_path}, {summary_path} and {len(written)} NIfTI mask(s) in {args.out}")
    return 0
