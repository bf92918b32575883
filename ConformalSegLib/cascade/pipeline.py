"""The coarse-to-fine cascade (Isler et al.): coarse full-volume prediction, anatomy-aware component
selection, ROI refinement with optional MC-dropout uncertainty, paste-back.

Steps of :func:`run_cascade`
----------------------------
1. **Stage 1** (deterministic, no dropout): ``stage1(volume, 0)`` gives the coarse probability on the
   volume's grid; the coarse mask is ``coarse >= stage1_threshold`` (``>=`` as everywhere in
   ConformalSeg).
2. **Lung mask** (``lung_source``): the classical HU algorithm on the image, a user label map, or none.
3. **Component selection** (:func:`~ConformalSegLib.cascade.components.select_components`): merging by
   dilation, minimum volume, lung overlap with the borderline rescue, Top-K.
4. **Stage 2**: for every kept component (in id order) the ROI is its bounding box grown by the margin
   and clipped to the volume; ``stage2(crop, stage2_mc_passes)`` runs on the crop (a
   :class:`~ConformalSegLib.io.volumes.Volume` with the crop's own geometry, so a model card's
   resampling and orientation work as on a full image) and its probability (the mean over the MC
   passes) and variance are pasted back. Without ``stage2`` the stage-1 predictor refines the ROIs.

Rule for probabilities outside the ROIs, and where ROIs overlap
---------------------------------------------------------------
* **Inside the union of the ROIs** the cascade probability is the stage-2 probability; where several
  ROIs cover a voxel it is the **maximum** over them (likewise the variance: the maximum of the
  covering ROIs' variances).
* **Outside every ROI** the cascade probability is ``outside_roi_scale * coarse probability`` --
  by default ``outside_roi_scale = 0``, i.e. **0 outside the ROIs** -- and the variance is 0.
  With no kept component there is no ROI and the whole map is that outside value.

What this means for conformal calibration (CLS / CRC)
-----------------------------------------------------
The cascade is one deterministic function from an image to a probability map (given its config,
models and MC seed), so calibrating on cascade outputs and applying the cutoff to a cascade output
of a new case keeps the exchangeability argument intact: **FNR control holds for the cascade's
output as a whole**, because calibration runs the identical cascade. Voxels outside every ROI are
*part of that output*: with the default rule they have probability 0, so for any cutoff
``c_hat > 0`` they are never in the mask -- a lesion the cascade dropped (filtered component, not in
the Top-K, never detected) counts as **missed** in the calibration cases' FNR, and CLS compensates
only by lowering the cutoff inside the ROIs or, when such cases are more than about ``alpha`` of the
calibration set, by falling to ``c_hat = 0``. Note that ``prob >= 0`` is the *whole volume*: at
``c_hat <= 0`` the guarantee holds trivially by selecting everything. With
``outside_roi_scale > 0`` a low enough cutoff can recover voxels outside the ROIs from the scaled
coarse probability (which stays below ``outside_roi_scale``, so the ROI probabilities above it
rank first). The guarantee is the same; only the sizes of the masks differ.

Predictors
----------
A predictor is any callable ``predict(volume, mc_passes) -> StageOutput`` (or a
``(probability, variance)`` pair) returning float maps on ``volume``'s grid. :func:`as_predictor`
wraps an :class:`~ConformalSegLib.inference.InferenceEngine` (``engine.predict(volume,
mc_dropout=mc_passes)``); tests and studies may pass cheap stand-ins through exactly the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..common.errors import ConformalSegError
from ..io.volumes import Volume
from .components import ComponentInfo, select_components
from .config import CascadeConfig
from .lungs import classical_lung_mask, lung_mask_from_labels
from .roi import Box, crop_geometry, margin_voxels, paste_max, roi_box

__all__ = [
    "CascadeCancelled",
    "CascadeResult",
    "Predictor",
    "StageOutput",
    "as_predictor",
    "compute_lung_mask",
    "run_cascade",
    "select_rois",
]

ProgressCallback = Callable[[int, int, str], None]
CancelToken = Callable[[], bool] | threading.Event


class StageOutput(NamedTuple):
    """One stage's maps on its input's grid: probability in [0, 1], variance (MC dropout) or None."""

    probability: np.ndarray
    variance: np.ndarray | None = None


Predictor = Callable[[Volume, int], Any]


class CascadeCancelled(Exception):
    """Raised by :func:`run_cascade` when its ``cancel`` token is set (checked before every model call)."""


def as_predictor(model: Any) -> Predictor:
    """A predictor from an :class:`~ConformalSegLib.inference.InferenceEngine` (anything with
    ``predict(volume, mc_dropout=...)`` returning a ``Prediction``) or from a callable predictor."""
    if hasattr(model, "predict") and hasattr(model, "card"):
        engine = model

        def predict(volume: Volume, mc_passes: int) -> StageOutput:
            prediction = engine.predict(volume, mc_dropout=int(mc_passes))
            return StageOutput(prediction.probability, prediction.variance)

        predict.engine = engine  # type: ignore[attr-defined]
        return predict
    if callable(model):
        return model
    raise ConformalSegError(
        f"a cascade stage needs an InferenceEngine or a callable predictor, got {type(model).__name__}"
    )


@dataclass
class CascadeResult:
    """Output of :func:`run_cascade`, all arrays numpy ``(z, y, x)`` on the input volume's grid.

    ``probability``: float32 cascade probability (see the module docstring for the outside-ROI rule).
    ``variance``: float32 MC-dropout variance of stage 2 (0 outside the ROIs), None without MC passes.
    ``coarse_probability``: stage 1's map. ``lung_mask``: the mask the filters used (None: no lung filter).
    ``components``: one :class:`ComponentInfo` per candidate (after merging), with its fate.
    ``roi_boxes``: ``{component id: (z, y, x) slices}`` of the refined ROIs (margin included, clipped).
    """

    probability: np.ndarray
    variance: np.ndarray | None
    coarse_probability: np.ndarray
    lung_mask: np.ndarray | None
    components: list[ComponentInfo]
    roi_boxes: dict[int, Box]
    geometry: Any
    config_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> list[ComponentInfo]:
        return [c for c in self.components if c.kept]

    def roi_mask(self) -> np.ndarray:
        """Boolean union of the ROI boxes."""
        out = np.zeros(self.probability.shape, dtype=bool)
        for box in self.roi_boxes.values():
            out[box] = True
        return out

    def table(self) -> list[dict[str, Any]]:
        """The components table as JSON-ready dicts (``roi`` = the box as ``[[z0, z1], [y0, y1], [x0, x1]]``)."""
        rows = []
        for c in self.components:
            box = self.roi_boxes.get(c.id)
            rows.append(
                {**c.to_dict(), "kept": c.kept, "roi": None if box is None else [[s.start, s.stop] for s in box]}
            )
        return rows


def _check_cancel(cancel: CancelToken | None) -> None:
    if cancel is None:
        return
    if cancel.is_set() if hasattr(cancel, "is_set") else bool(cancel()):
        raise CascadeCancelled("the cascade was cancelled")


def _stage_output(raw: Any, shape: tuple[int, ...], stage: str, with_variance: bool) -> StageOutput:
    if hasattr(raw, "probability"):
        raw = StageOutput(raw.probability, getattr(raw, "variance", None))
    elif isinstance(raw, tuple):
        raw = StageOutput(*raw)
    else:
        raw = StageOutput(raw, None)
    probability = np.asarray(raw.probability, dtype=np.float32)
    if probability.shape != shape:
        raise ConformalSegError(
            f"{stage} returned a probability map of shape {probability.shape} for an input of shape {shape}",
            fix="the predictor must return maps on its input's grid",
        )
    if not np.all(np.isfinite(probability)) or probability.min(initial=0) < 0 or probability.max(initial=0) > 1:
        raise ConformalSegError(
            f"{stage} returned probabilities outside [0, 1] (or NaN)",
            fix="return probabilities (apply the sigmoid/softmax)",
        )
    variance = None
    if with_variance:
        if raw.variance is None:
            raise ConformalSegError(
                f"{stage} returned no variance map although MC dropout passes were requested",
                fix="use a network with dropout, or set stage2_mc_passes to 0",
            )
        variance = np.asarray(raw.variance, dtype=np.float32)
        if variance.shape != shape:
            raise ConformalSegError(f"{stage} returned a variance map of shape {variance.shape} for {shape}")
    return StageOutput(probability, variance)


def compute_lung_mask(volume: Volume, config: CascadeConfig, lung_labels: Any = None) -> np.ndarray | None:
    """The lung mask the filters use, per ``config.lung_source`` (None for ``"none"``).

    ``lung_labels``: a label map (numpy array or :class:`Volume` on the image's grid) for ``"labels"``.
    """
    if config.lung_source == "none" or config.min_lung_overlap is None:
        return None
    if config.lung_source == "hu":
        return classical_lung_mask(np.asarray(volume.array, dtype=np.float32), volume.geometry.spacing_zyx)
    if lung_labels is None:
        raise ConformalSegError(
            "the cascade config asks for lung_source 'labels' but no lung label map was given",
            path=config.path,
            fix="pass the lung label map, or use lung_source 'hu'",
        )
    array = np.asarray(getattr(lung_labels, "array", lung_labels))
    if array.shape != volume.geometry.shape:
        raise ConformalSegError(
            f"the lung label map has shape {array.shape}, the image {volume.geometry.shape}",
            path=getattr(lung_labels, "path", None),
            fix="give a label map on the image's grid",
        )
    return lung_mask_from_labels(array, config.lung_labels, fill_holes=config.lung_fill_holes)


def _lung(volume: Volume, config: CascadeConfig, lung_mask: np.ndarray | None, lung_labels: Any) -> np.ndarray | None:
    """The given lung mask (checked to be on the image grid), else the one ``config.lung_source`` says."""
    if lung_mask is None:
        return compute_lung_mask(volume, config, lung_labels)
    given = np.asarray(lung_mask, dtype=bool)
    if given.shape != tuple(volume.geometry.shape):
        raise ConformalSegError(
            f"the lung mask has shape {given.shape}, the image {tuple(volume.geometry.shape)}",
            fix="give a lung mask on the image's grid",
        )
    return given


def _refine_rois(
    volume: Volume,
    boxes: dict[int, Box],
    predict2: Callable[[Volume, int], Any],
    mc: int,
    cancel: CancelToken | None,
    report: Callable[[int, int, str], None],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Stage 2 on each ROI, pasted by maximum: ``(probability, variance or None, covered)`` on the image grid."""
    shape = tuple(volume.geometry.shape)
    total = 2 + len(boxes)
    roi_probability = np.zeros(shape, dtype=np.float32)
    variance = np.zeros(shape, dtype=np.float32) if mc else None
    covered = np.zeros(shape, dtype=bool)
    for done, (cid, box) in enumerate(boxes.items(), start=2):
        _check_cancel(cancel)
        crop = Volume(np.asarray(volume.array)[box], crop_geometry(volume.geometry, box), volume.path)
        out = _stage_output(predict2(crop, mc), crop.geometry.shape, f"stage 2 (ROI of component {cid})", bool(mc))
        paste_max(roi_probability, out.probability, box)
        if variance is not None:
            assert out.variance is not None  # checked by _stage_output when mc
            paste_max(variance, out.variance, box)
        covered[box] = True
        report(done, total, f"stage 2: ROI {done - 1} of {len(boxes)}")
    return roi_probability, variance, covered


def select_rois(
    coarse: np.ndarray, geometry: Any, config: CascadeConfig, lung: np.ndarray | None
) -> tuple[list[ComponentInfo], dict[int, Box]]:
    """Step 3 and the ROI boxes of step 4: the component table of ``coarse >= stage1_threshold`` and
    ``{component id: box}`` of the kept components (margin included, clipped to the volume)."""
    spacing = geometry.spacing_zyx
    _, table = select_components(
        np.asarray(coarse) >= np.float32(config.stage1_threshold),
        spacing,
        lung=lung,
        connectivity=config.connectivity,
        merge_radius_mm=config.merge_radius_mm or None,
        min_volume_mm3=config.min_volume_mm3 or None,
        min_lung_overlap=config.min_lung_overlap if lung is not None else None,
        rescue_distance_mm=config.rescue_distance_mm,
        rescue_min_volume_mm3=config.rescue_min_volume_mm3,
        k=config.top_k,
    )
    margin = margin_voxels(spacing, voxels=config.roi_margin_voxels, mm=config.roi_margin_mm)
    return table, {c.id: roi_box(c.bbox, margin, tuple(geometry.shape)) for c in table if c.kept}


def run_cascade(
    volume: Volume,
    config: CascadeConfig,
    stage1: Any,
    stage2: Any = None,
    *,
    lung_labels: Any = None,
    lung_mask: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> CascadeResult:
    """Run the cascade on one volume (see the module docstring).

    ``stage1``/``stage2``: :class:`~ConformalSegLib.inference.InferenceEngine` or predictor callables
    (``stage2`` None: stage 1's predictor refines the ROIs). ``lung_mask`` (boolean, on the image grid)
    overrides ``config.lung_source``; ``lung_labels`` is the label map for ``lung_source == "labels"``.
    ``progress(done, total, label)`` is called after each step (``total`` = 2 + number of ROIs);
    ``cancel`` (callable or :class:`threading.Event`) raises :class:`CascadeCancelled` before a model call.
    """
    geometry = volume.geometry
    shape = tuple(geometry.shape)
    predict1 = as_predictor(stage1)
    predict2 = predict1 if stage2 is None else as_predictor(stage2)
    mc = int(config.stage2_mc_passes)

    def report(done: int, total: int, label: str) -> None:
        if progress is not None:
            progress(done, total, label)

    _check_cancel(cancel)
    coarse = _stage_output(predict1(volume, 0), shape, "stage 1", False).probability
    lung = _lung(volume, config, lung_mask, lung_labels)
    table, boxes = select_rois(coarse, geometry, config, lung)
    margin = margin_voxels(geometry.spacing_zyx, voxels=config.roi_margin_voxels, mm=config.roi_margin_mm)
    total = 2 + len(boxes)
    report(1, total, "stage 1 and component selection")

    roi_probability, variance, covered = _refine_rois(volume, boxes, predict2, mc, cancel, report)
    if config.outside_roi_scale > 0:
        outside = (np.float32(config.outside_roi_scale) * coarse).astype(np.float32)
        probability = np.where(covered, roi_probability, outside).astype(np.float32)
    else:
        probability = roi_probability
    report(total, total, "done")
    info = {
        "n_candidates": len(table),
        "n_kept": len(boxes),
        "roi_margin_voxels_zyx": list(margin),
        "stage2_mc_passes": mc,
        "roi_voxels": int(covered.sum()),
    }
    return CascadeResult(
        probability=probability,
        variance=variance,
        coarse_probability=coarse,
        lung_mask=lung,
        components=table,
        roi_boxes=boxes,
        geometry=geometry,
        config_fingerprint=config.fingerprint(),
        info=info,
    )
