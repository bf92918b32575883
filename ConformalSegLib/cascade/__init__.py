"""The coarse-to-fine cascade of Isler et al. (uncertainty-guided, anatomy-aware post-processing).

Modules: :mod:`.components` (connected components and the filters), :mod:`.lungs` (lung masks),
:mod:`.roi` (ROI boxes, crops, paste-back), :mod:`.config` (:class:`CascadeConfig`, JSON),
:mod:`.pipeline` (:func:`run_cascade`), :mod:`.evaluation` (the paper's tables on phantoms).
Nothing here imports torch: models enter as :class:`~ConformalSegLib.inference.InferenceEngine`
objects or predictor callables.
"""

from __future__ import annotations

from .components import (
    ComponentInfo,
    filter_lung_overlap,
    filter_min_volume,
    label_components,
    lung_distances_mm,
    lung_overlap_fractions,
    merge_components,
    select_components,
    top_k,
)
from .config import CascadeConfig, CascadeConfigError, load_cascade_config
from .lungs import classical_lung_mask, lung_mask_from_labels
from .pipeline import CascadeCancelled, CascadeResult, StageOutput, as_predictor, compute_lung_mask, run_cascade
from .roi import crop_geometry, margin_voxels, paste_max, roi_box

__all__ = [
    "CascadeCancelled",
    "CascadeConfig",
    "CascadeConfigError",
    "CascadeResult",
    "ComponentInfo",
    "StageOutput",
    "as_predictor",
    "classical_lung_mask",
    "compute_lung_mask",
    "crop_geometry",
    "filter_lung_overlap",
    "filter_min_volume",
    "label_components",
    "load_cascade_config",
    "lung_distances_mm",
    "lung_mask_from_labels",
    "lung_overlap_fractions",
    "margin_voxels",
    "merge_components",
    "paste_max",
    "roi_box",
    "run_cascade",
    "select_components",
    "top_k",
]
