"""Network inference: model cards, the sliding-window engine and input discovery.

Needs the ``inference`` extra (``torch`` and ``monai``). Typical use::

    from ConformalSegLib.inference import InferenceEngine, resolve_model
    from ConformalSegLib.io import load_image

    engine = InferenceEngine(resolve_model("models/kidney"), device="auto")
    prediction = engine.predict(load_image("ct.nii.gz"), mc_dropout=10)
    prediction.probability  # float32 (z, y, x) on the CT's grid: the mean over the 10 MC passes

Calibration and test cases must go through the same card, MC passes, flips and seed
(:meth:`ModelCard.pipeline_sha256` fingerprints the card). Modules:

* :mod:`.model_card` (+ :mod:`.card_parsing`, :mod:`.networks`, :mod:`.bundle_preprocessing`): the card format,
  its validation (a MONAI bundle's preprocessing and sliding window read from its own config) and
  building the network it names;
* :mod:`.engine`: :class:`InferenceEngine`, running the steps below on a volume;
* :mod:`.preprocessing`: axes, world space and the card's transforms;
* :mod:`.sliding_window`: windows, blending and the CUDA out-of-memory fallback;
* :mod:`.mc_passes`: MC dropout (seeded per-pass masks) and flip TTA;
* :mod:`.outputs`: the maps back on the input grid, :class:`Prediction` / :class:`QuantilePrediction`;
* :mod:`.datasets`: input discovery (files, folders, MSD / nnU-Net roots);
* :mod:`.model_dataset`: a calibration dataset whose probability maps a model predicts (cached).
"""

from __future__ import annotations

from .card_format import (
    CARD_FILE,
    FORMAT,
    FORMAT_VERSION,
    InferenceSettings,
    Intensity,
    ModelSource,
    OutputSpec,
    Preprocessing,
)
from .datasets import ImageCase, find_images, is_dataset_root
from .engine import DeviceFallbackWarning, InferenceCancelled, InferenceEngine, predict_volume, resolve_device
from .mc_passes import ALL_FLIPS, MCDropoutInactiveWarning
from .model_card import ModelCard, load_model_card, resolve_model
from .outputs import Prediction, QuantilePrediction
from .preprocessing import from_network_axes, geometry_from_affine, network_affine, to_network_axes
from .sliding_window import count_windows

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
