"""The profile drives inference: which pipeline the panel runs, and whether the guarantee may be shown.

A profile calibrated with ``conformalseg calibrate --model --images`` records how its probability maps
were predicted in ``provenance["inference"]`` (:func:`ConformalSegLib.inference.model_dataset.inference_fingerprint`:
the pipeline SHA-256 of the model card and weights, MC passes, flips, dropout seed). The guarantee
assumes the new scan's map is predicted by exactly that pipeline (exchangeability), so:

* :func:`profile_to_drive`: the profile whose record the panel's model run uses (``conformalseg infer
  --profile``: the child takes the MC passes, flips and seed from it and refuses a model whose
  fingerprint differs, with the library's own check,
  :func:`~ConformalSegLib.inference.model_dataset.engine_for_profile`);
* :func:`read_run_record`: the fingerprint the child wrote to ``OUT/inference.json``, stored on the
  probability volume node (``ConformalSeg.Inference`` attribute);
* :func:`guarantee_blocker`: the text that replaces the guarantee when the map's pipeline and a
  profile's record differ (None when they match, or when the map was not predicted in the panel).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

#: The keys that make two probability maps of one image exchangeable (inference_fingerprint's keys).
FINGERPRINT_KEYS = ("pipeline_sha256", "mc_passes", "tta_flips", "seed")
#: Attribute of the probability volume node holding the fingerprint of the run that made it (JSON).
NODE_ATTRIBUTE = "ConformalSeg.Inference"


def fingerprint(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The comparable part of an inference record (profile provenance or ``inference.json``), or None."""
    if not record or not record.get("pipeline_sha256"):
        return None
    passes = int(record.get("mc_passes", 0) or 0)
    return {
        "pipeline_sha256": str(record["pipeline_sha256"]),
        "mc_passes": passes,
        "tta_flips": int(record.get("tta_flips", 1) or 1),
        "seed": int(record.get("seed") or 0) if passes else None,
    }


def profile_to_drive(profiles: Sequence[tuple[str, Mapping[str, Any] | None]]) -> str | None:
    """Of ``(profile path, provenance["inference"])`` pairs, the path whose pipeline the model run must use;
    None when no profile recorded one (calibrated on precomputed maps). Two profiles recorded with
    different pipelines cannot both hold for one map: ValueError."""
    recorded = [(path, fingerprint(record)) for path, record in profiles if fingerprint(record) is not None]
    if not recorded:
        return None
    first_path, first = recorded[0]
    for path, other in recorded[1:]:
        if other != first:
            raise ValueError(
                f"the two profiles were calibrated with different inference pipelines ({Path(first_path).name}: "
                f"{describe(first)}; {Path(path).name}: {describe(other)}): load profiles made with one pipeline"
            )
    return first_path


def describe(record: Mapping[str, Any] | None) -> str:
    f = fingerprint(record)
    if f is None:
        return "unknown pipeline"
    flips = f"{f['tta_flips']} flips" if f["tta_flips"] > 1 else "no flips"
    mc = f"{f['mc_passes']} MC passes, seed {f['seed']}" if f["mc_passes"] else "no MC dropout"
    return f"pipeline {f['pipeline_sha256'][:12]}..., {mc}, {flips}"


def read_run_record(out_dir: str | PathLike[str]) -> dict[str, Any] | None:
    """The fingerprint of a ``conformalseg infer`` run from its ``inference.json`` (None when absent)."""
    path = Path(out_dir) / "inference.json"
    if not path.is_file():
        return None
    return fingerprint(json.loads(path.read_text(encoding="utf-8")))


def read_run_device(out_dir: str | PathLike[str]) -> str | None:
    """The device the child ran the model on (``inference.json``'s ``device``: ``cpu``, ``cuda:0``...)."""
    path = Path(out_dir) / "inference.json"
    if not path.is_file():
        return None
    device = json.loads(path.read_text(encoding="utf-8")).get("device")
    return str(device) if device else None


def node_value(record: Mapping[str, Any] | None) -> str:
    """The run record as the node attribute's value (``""``: not predicted in the panel)."""
    return json.dumps(fingerprint(record), sort_keys=True) if fingerprint(record) else ""


def from_node_value(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        return fingerprint(json.loads(value))
    except (ValueError, TypeError, AttributeError):
        return None


def guarantee_blocker(
    profile_records: Sequence[tuple[str, Mapping[str, Any] | None]], run: Mapping[str, Any] | None
) -> tuple[str | None, str | None]:
    """``(blocker, note)`` for a probability map made by the panel's model run ``run`` (None: a loaded map).

    ``blocker`` (replaces the guarantee) when a profile's recorded pipeline differs from the run's;
    ``note`` (shown under the guarantee) when a profile recorded no pipeline, so the match cannot be
    checked. A map loaded from a file (``run`` None) is the user's responsibility: neither."""
    run_print = fingerprint(run)
    if run_print is None:
        return None, None
    unknown = []
    for path, record in profile_records:
        recorded = fingerprint(record)
        if recorded is None:
            unknown.append(Path(path).name)
        elif recorded != run_print:
            return (
                f"No guarantee for this map: it was predicted with {describe(run_print)}, but "
                f"{Path(path).name} was calibrated with {describe(recorded)}. Run the model the profile "
                "records (Apply uses the profile's pipeline when the profile is loaded first).",
                None,
            )
    if unknown:
        return None, (
            f"{', '.join(unknown)} was calibrated on precomputed probability maps: the guarantee holds only if "
            "they were predicted exactly as this map was (same model, MC passes, flips and seed)."
        )
    return None, None
