"""Training data for the cascade's ROI (stage-2) model: crops around the stage-1 components of phantoms.

Isler et al. train the fine model on regions of interest cut around the coarse model's detections.
:func:`roi_training_cases` does exactly what :func:`~ConformalSegLib.cascade.pipeline.run_cascade`
does before stage 2, on labelled phantoms:

1. the stage-1 model predicts the full volume (no dropout), ``coarse >= stage1_threshold``;
2. the lung mask and the component selection of the cascade configuration
   (:func:`~ConformalSegLib.cascade.pipeline.select_rois`; by default every component that passes the
   lung filter, ``top_k`` None, so that the ROI model also sees the false-positive components it must
   suppress);
3. for every ROI margin (default 0 and 16 voxels, the paper's two settings) each kept component's box
   (margin included, clipped to the volume) cuts the image and the label map: one training case per
   component and margin, with the crop's own geometry (as stage 2 receives it).

The ROI cases are then ordinary :class:`~ConformalSegLib.training.data.TrainingCase` objects: the
trainer preprocesses them with the ROI model's own card and zero-pads crops smaller than the patch
(as the sliding window pads them at inference). The truth of a crop is the lesion label inside it.
The stage-1 model should not have seen these phantoms (use a phantom seed of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..cascade.config import CascadeConfig
from ..cascade.pipeline import as_predictor, compute_lung_mask, select_rois
from ..cascade.roi import crop_geometry
from ..io.volumes import Volume
from .data import TrainingCase

DEFAULT_MARGINS = (0, 16)


def roi_training_cases(
    stage1: Any,
    cases: Iterable[TrainingCase],
    *,
    margins: Sequence[int] = DEFAULT_MARGINS,
    config: CascadeConfig | None = None,
    lesion_labels: Sequence[int] = (6,),
    progress: Callable[[int, int, str], None] | None = None,
    total: int | None = None,
) -> tuple[list[TrainingCase], dict[str, Any]]:
    """ROI crops of ``cases`` (see the module docstring) and a summary of what was cut.

    ``stage1``: an :class:`~ConformalSegLib.inference.InferenceEngine` or a cascade predictor.
    Returns ``(crops, info)``; crop ids are ``CASE_c{component}_m{margin}``.
    """
    base = (config or CascadeConfig()).replace(top_k=None)
    predict = as_predictor(stage1)
    crops: list[TrainingCase] = []
    n_phantoms = with_truth = 0
    for done, case in enumerate(cases, start=1):
        image, labels = case.volumes()
        coarse = np.asarray(predict(image, 0)[0], dtype=np.float32)
        lung = compute_lung_mask(image, base)
        for margin in margins:
            setting = base.replace(roi_margin_voxels=int(margin), roi_margin_mm=None)
            _, boxes = select_rois(coarse, image.geometry, setting, lung)
            for cid, box in boxes.items():
                geometry = crop_geometry(image.geometry, box)
                label_crop = np.ascontiguousarray(np.asarray(labels.array)[box])
                crops.append(
                    TrainingCase(
                        f"{case.case_id}_c{cid}_m{margin}",
                        Volume(np.ascontiguousarray(np.asarray(image.array)[box]), geometry, None),
                        Volume(label_crop, geometry, None),
                    )
                )
        n_phantoms += 1
        if progress is not None:
            progress(done, total or done, case.case_id)
    for crop in crops:
        labels_crop = crop.labels
        assert isinstance(labels_crop, Volume)  # crops are built in memory above
        with_truth += int(np.isin(np.asarray(labels_crop.array), np.asarray(list(lesion_labels))).any())
    info = {
        "phantoms": n_phantoms,
        "crops": len(crops),
        "margins_voxels": [int(m) for m in margins],
        "component_selection": base.parameters(),
        "crops_with_lesion": with_truth,
    }
    return crops, info
