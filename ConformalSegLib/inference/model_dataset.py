"""Calibration and evaluation data straight from a model: images + labels in, probability maps out.

``conformalseg calibrate/evaluate --model M --images DIR --labels DIR`` use
:class:`InferenceDataset`, a :class:`~ConformalSegLib.io.dataset.CalibrationDataset` whose
probability maps are predicted by the model card's pipeline when a case is first loaded.

* **Inference runs once per case.** Each prediction is written (float32, atomically) to a cache
  folder as ``CACHE/CASE.nii.gz`` and read back from there on later passes (the evaluation reads
  every case twice). The cache is keyed by :func:`inference_fingerprint`: a cache folder written
  with another model, pipeline, number of MC passes, flips or seed is refused, never mixed in; and each
  cached map is used only for the image it was predicted from (the manifest keeps every image's SHA-256:
  an image replaced under the same name is predicted again).
* **Identical pipeline.** Every case goes through the same engine, MC passes, flips and seed; with
  MC dropout the probability is the *mean* over the passes (what calibration and test time must
  both use). :meth:`InferenceDataset.provenance` records this for the calibration profile.
* Images are matched to label files by case id: the image's file name without its extension and
  without an nnU-Net channel suffix ``_0000`` (see :mod:`ConformalSegLib.inference.datasets`); the
  label folder follows :mod:`ConformalSegLib.io.dataset`'s rule. Shapes and geometry of each image
  and label map are checked (the prediction is on the image's grid).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..io.atomic import atomic_write_text
from ..io.dataset import CalibrationDataset, Case, ProgressCallback, _listing, scan_folder
from ..io.volumes import (
    Volume,
    check_same_geometry,
    label_values,
    load_label_map,
    load_probability_map,
    mask_from_labels,
    save_volume,
)
from .datasets import ImageCase, find_images
from .engine import InferenceEngine
from .mc_passes import flip_count
from .model_card import ModelCard

CACHE_MANIFEST = "conformalseg-inference-cache.json"
#: What to do when a model is not the profile's pipeline (shared by ``apply --image`` and ``infer --profile``).
PROFILE_FIX = "use the model card, weights (and cascade config) recorded in the profile's provenance"


def inference_fingerprint(card: ModelCard, *, mc_dropout: int, tta_flips: bool | int, seed: int) -> dict[str, Any]:
    """What makes two probability maps of one image comparable: pipeline (weights, card), MC passes,
    flips and the dropout seed (only meaningful with MC dropout)."""
    return {
        "pipeline_sha256": card.pipeline_sha256(),
        "mc_passes": int(mc_dropout),
        "tta_flips": flip_count(tta_flips),
        "seed": int(seed) if mc_dropout else None,
    }


def inference_provenance(
    card: ModelCard, engine: InferenceEngine, *, mc_dropout: int, tta_flips: bool | int, seed: int
) -> dict[str, Any]:
    """The record of how probability maps were made, for profiles and ``inference.json``."""
    return {
        "model": {
            "name": card.name,
            "card": str(card.path.resolve()) if card.path else None,
            "source": card.source.kind,
            "sha256": card.sha256(),
        },
        **inference_fingerprint(card, mc_dropout=mc_dropout, tta_flips=tta_flips, seed=seed),
        "probability": ("mean over MC dropout passes" if mc_dropout else "deterministic (dropout off)"),
        "device": str(engine.device),
        "amp": engine.amp,
    }


def match_images_to_labels(
    images: str | PathLike[str], labels_dir: str | PathLike[str], *, series_uid: str | None = None
) -> dict[str, tuple[Path, Path]]:
    """``case_id -> (image, label)``; every image needs a label and every label an image. An image is a file
    or a DICOM series folder (``series_uid``: the series of a single series folder holding several)."""
    image_cases = {case.case_id: case.path for case in find_images(images, dicom=True, series_uid=series_uid)}
    label_files = scan_folder(labels_dir, probability=False)
    only_images = sorted(set(image_cases) - set(label_files))
    only_labels = sorted(set(label_files) - set(image_cases))
    problems = []
    if only_images:
        problems.append(
            f"{len(only_images)} image(s) in {images} have no label file in {labels_dir}: {_listing(only_images)}"
        )
    if only_labels:
        problems.append(
            f"{len(only_labels)} label file(s) in {labels_dir} have no image in {images}: {_listing(only_labels)}"
        )
    if problems:
        raise ConformalSegError(
            "; ".join(problems) + ".",
            fix="give every case an image and a label file with the same case id (an nnU-Net "
            "channel suffix _0000 on image names is ignored)",
        )
    return {cid: (image_cases[cid], label_files[cid]) for cid in sorted(image_cases)}


class InferenceDataset(CalibrationDataset):
    """Images + labels whose probability maps come from ``engine`` (see the module docstring).

    ``paths(case_id)`` returns ``(image_path, label_path)``; ``probs_dir`` is the cache folder
    (created; it must be empty or an earlier cache of the same :func:`inference_fingerprint`).
    """

    def __init__(
        self,
        engine: InferenceEngine,
        images: str | PathLike[str],
        labels_dir: str | PathLike[str],
        lesion_labels: Sequence[int] | None,
        cache_dir: str | PathLike[str],
        *,
        mc_dropout: int = 0,
        tta_flips: bool | int = False,
        progress: ProgressCallback | None = None,
        series_uid: str | None = None,
    ):
        if mc_dropout < 0:
            raise ConformalSegError(
                f"the number of MC dropout passes must be >= 0, got {mc_dropout}",
                fix="pass --mc-dropout 0 (deterministic) or a positive number",
            )
        super().__init__(
            cache_dir,
            labels_dir,
            lesion_labels,
            None,
            progress=progress,
            pairs=match_images_to_labels(images, labels_dir, series_uid=series_uid),
        )
        self.images = Path(images)
        self.series_uid = series_uid
        self.engine = engine
        self.mc_dropout = int(mc_dropout)
        self.tta_flips = flip_count(tta_flips)
        self.fingerprint = inference_fingerprint(
            engine.card,
            mc_dropout=self.mc_dropout,
            tta_flips=self.tta_flips,
            seed=engine.seed if engine.seed is not None else 0,
        )
        self.inference_seconds: dict[str, float] = {}
        self._image_sha256: dict[str, str] = {}
        self._open_cache()

    def _open_cache(self) -> None:
        manifest = self.probs_dir / CACHE_MANIFEST
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                raise ConformalSegError(
                    f"unreadable inference cache manifest ({exc})",
                    path=manifest,
                    fix="delete the cache folder or choose another one",
                ) from exc
            if stored.get("fingerprint") != self.fingerprint:
                raise ConformalSegError(
                    "this probability cache was written by another model, pipeline, number of "
                    f"MC passes, flips or seed (cache: {stored.get('fingerprint')}, now: "
                    f"{self.fingerprint})",
                    path=self.probs_dir,
                    fix="choose an empty cache folder or delete this one",
                )
            images = stored.get("images")
            self._image_sha256 = dict(images) if isinstance(images, dict) else {}
            return
        if self.probs_dir.exists() and any(self.probs_dir.iterdir()):
            raise ConformalSegError(
                "the probability cache folder is not empty and has no cache manifest",
                path=self.probs_dir,
                fix="choose an empty or new folder for the cache",
            )
        self.probs_dir.mkdir(parents=True, exist_ok=True)
        self._write_manifest(force=False)

    def _write_manifest(self, *, force: bool) -> None:
        """The cache's fingerprint and the SHA-256 of the image each cached map was predicted from."""
        doc = {"fingerprint": self.fingerprint, "images": self._image_sha256}
        atomic_write_text(self.probs_dir / CACHE_MANIFEST, json.dumps(doc, indent=2) + "\n", force=force)

    def provenance(self) -> dict[str, Any]:
        """How the probability maps were made (recorded in calibration profiles)."""
        record = {
            "images": str(self.images.resolve()),
            **inference_provenance(
                self.engine.card,
                self.engine,
                mc_dropout=self.mc_dropout,
                tta_flips=self.tta_flips,
                seed=self.fingerprint["seed"] or 0,
            ),
        }
        if hasattr(self.engine, "provenance"):  # a cascade: its config and both stages
            record.update(self.engine.provenance())
        return record

    def cache_path(self, case_id: str) -> Path:
        return self.probs_dir / f"{case_id}.nii.gz"

    def load(self, case_id: str) -> Case:
        """Predict (or read the cached prediction of) one case and load its label map."""
        image_path, label_path = self.paths(case_id)
        cached = self.cache_path(case_id)
        case = ImageCase(case_id, image_path, series_uid=self.series_uid if image_path.is_dir() else None)
        image_sha256 = case.sha256()  # the cache is keyed on the image's content, not its name
        if cached.is_file() and self._image_sha256.get(case_id) == image_sha256:
            probability = load_probability_map(cached)
            label_map = load_label_map(label_path, probability.geometry, self.seg_segments)  # a SEG: on the grid
        else:
            image = case.load()  # a file, or a DICOM series folder (its own geometry)
            label_map = load_label_map(label_path, image.geometry, self.seg_segments)  # checked before predicting
            check_same_geometry(image, label_map, what=f"image and label map of case {case_id!r}")
            prediction = self.engine.predict(image, mc_dropout=self.mc_dropout, tta_flips=self.tta_flips)
            self.inference_seconds[case_id] = prediction.seconds
            save_volume(prediction.probability, image.geometry, cached, force=True)  # a stale map is replaced
            self._image_sha256[case_id] = image_sha256
            self._write_manifest(force=True)
            probability = Volume(prediction.probability, image.geometry, cached)
            del image, prediction
        check_same_geometry(probability, label_map, what=f"probability map and label map of case {case_id!r}")
        self.labels_seen[case_id] = frozenset(label_values(label_map.array))
        lesion = Volume(
            mask_from_labels(label_map.array, self.lesion_labels),
            label_map.geometry,
            label_map.path,
            geometry_known=label_map.geometry_known,
        )
        return Case(case_id, probability, lesion)


def engine_for_profile(
    inference_record: dict[str, Any] | None,
    model: str | PathLike[str] | None,
    *,
    device: str = "auto",
    profile_path: str | PathLike[str] | None = None,
    engine: Any = None,
) -> tuple[Any, dict]:
    """An engine that predicts exactly like the calibration did, and the ``predict`` keyword arguments.

    ``inference_record`` is ``profile.provenance["inference"]`` (written when the profile was
    calibrated with ``--model --images``). ``engine`` (e.g. a cascade predictor) is used instead of
    building one from ``model``. Its pipeline fingerprint must equal the recorded one: a different
    network, card, preprocessing or cascade would break exchangeability, so it is an error.
    """
    from .model_card import resolve_model

    if not inference_record:
        raise ConformalSegError(
            "this profile was calibrated on precomputed probability maps, so the way they were predicted is unknown",
            path=profile_path,
            fix="predict the new scan with the same pipeline yourself and pass --prob, or "
            "calibrate with --model --images",
        )
    if engine is None and "cascade" in inference_record:
        raise ConformalSegError(
            "this profile was calibrated on the output of a cascade",
            path=profile_path,
            fix="pass the same --cascade CONFIG",
        )
    passes = int(inference_record.get("mc_passes", 0))
    if engine is None:
        engine = InferenceEngine(
            resolve_model(model),  # type: ignore[arg-type]  # None fails there, as it always did
            device=device,
            seed=inference_record.get("seed") or 0,
        )
    card = engine.card
    if card.pipeline_sha256() != inference_record.get("pipeline_sha256"):
        raise ConformalSegError(
            f"model {card.name!r} is not the pipeline the profile was calibrated with "
            f"(pipeline SHA-256 {card.pipeline_sha256()[:12]}... != "
            f"{str(inference_record.get('pipeline_sha256'))[:12]}...)",
            path=model or profile_path,
            fix=PROFILE_FIX,
        )
    return engine, {"mc_dropout": passes, "tta_flips": flip_count(int(inference_record.get("tta_flips", 1)))}
