"""Network inference: model cards, the sliding-window engine and input discovery.

Needs the ``inference`` extra (``torch`` and ``monai``). Typical use::

    from ConformalSegLib.inference import InferenceEngine, resolve_model
    from ConformalSegLib.io import load_image

    engine = InferenceEngine(resolve_model("models/kidney"), device="auto")
    prediction = engine.predict(load_image("ct.nii.gz"), mc_dropout=10)
    prediction.probability  # float32 (z, y, x) on the CT's grid: the mean over the 10 MC passes

Calibration and test cases must go through the same card, MC passes, flips and seed
(:meth:`ModelCard.pipeline_sha256` fingerprints the card).
"""

from __future__ import annotations

from .datasets import ImageCase, find_images, is_dataset_root
from .engine import (ALL_FLIPS, DeviceFallbackWarning, InferenceCancelled, InferenceEngine, MCDropoutInactiveWarning,
                     Prediction, QuantilePrediction, count_windows, from_network_axes, geometry_from_affine, network_affine,
                     predict_volume, resolve_device, to_network_axes)
from .model_card import (CARD_FILE, FORMAT, FORMAT_VERSION, InferenceSettings, Intensity, ModelCard, ModelSource,
                         OutputSpec, Preprocessing, load_model_card, resolve_model)

__all__ = [
    "ALL_FLIPS",
    "CARD_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "DeviceFallbackWarning",
    "ImageCase",
    "InferenceCancelled",
    "InferenceEngine",
    "InferenceSettings",
    "Intensity",
    "MCDropoutInactiveWarning",
    "ModelCard",
    "ModelSource",
    "OutputSpec",
    "Prediction",
    "Preprocessing",
    "QuantilePrediction",
    "count_windows",
    "find_images",
    "from_network_axes",
    "geometry_from_affine",
    "is_dataset_root",
    "load_model_card",
    "network_affine",
    "predict_volume",
    "resolve_device",
    "resolve_model",
    "to_network_axes",
]
