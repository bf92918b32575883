"""The model card's format: its constants and its sections, as immutable values.

What each key means is written once, in :mod:`~ConformalSegLib.inference.model_card`; the sections
are parsed and checked by :mod:`~ConformalSegLib.inference.card_parsing`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ACTIVATIONS",
    "BLEND_MODES",
    "BUNDLE_CONFIGS",
    "BUNDLE_WEIGHTS",
    "CARD_FILE",
    "CARD_FIX",
    "FORMAT",
    "FORMAT_VERSION",
    "INTENSITY_KINDS",
    "QUANTILE_ACTIVATION",
    "REQUIRED_KEYS",
    "SOURCE_KINDS",
    "STATE_DICT_WRAPPERS",
    "TOP_KEYS",
    "InferenceSettings",
    "Intensity",
    "ModelSource",
    "OutputSpec",
    "Preprocessing",
]

FORMAT = "conformalseg-model-card"
FORMAT_VERSION = 1
CARD_FILE = "model_card.json"
SOURCE_KINDS = ("state_dict", "torchscript", "bundle")
INTENSITY_KINDS = ("window", "zscore", "none")
ACTIVATIONS = ("softmax", "sigmoid")
QUANTILE_ACTIVATION = "none"  #: the activation of quantile regression outputs (identity)
BLEND_MODES = ("gaussian", "constant")
TOP_KEYS = ("format", "format_version", "name", "source", "preprocessing", "inference", "output", "training")
REQUIRED_KEYS = ("format", "format_version", "name", "source", "preprocessing", "inference", "output")
BUNDLE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
BUNDLE_WEIGHTS = "models/model.pt"
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "network")
CARD_FIX = "correct the model card (see ConformalSegLib/inference/model_card.py for the format)"


@dataclass(frozen=True)
class Intensity:
    """Intensity normalisation (see :mod:`~ConformalSegLib.inference.model_card`)."""

    kind: str = "none"
    a_min: float | None = None
    a_max: float | None = None
    b_min: float | None = None
    b_max: float | None = None
    clip: bool = True
    mean: float | None = None
    std: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "window":
            return {
                "kind": "window",
                "a_min": self.a_min,
                "a_max": self.a_max,
                "b_min": self.b_min,
                "b_max": self.b_max,
                "clip": self.clip,
            }
        if self.kind == "zscore":
            out: dict[str, Any] = {"kind": "zscore"}
            if self.mean is not None:
                out.update(mean=self.mean, std=self.std)
            return out
        return {"kind": "none"}


@dataclass(frozen=True)
class Preprocessing:
    orientation: str | None = None
    spacing_mm: tuple[float, float, float] | None = None
    intensity: Intensity = field(default_factory=Intensity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "orientation": self.orientation,
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "intensity": self.intensity.to_dict(),
        }


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings. ``patch_size`` is in network axis order ``[d0, d1, d2]`` = ``[x, y, z]``."""

    patch_size: tuple[int, int, int]
    overlap: float = 0.25
    blend: str = "gaussian"
    sw_batch_size: int = 4

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch_size": list(self.patch_size),
            "overlap": self.overlap,
            "blend": self.blend,
            "sw_batch_size": self.sw_batch_size,
        }


@dataclass(frozen=True)
class OutputSpec:
    """What the output channels mean: a lesion probability (``activation`` softmax/sigmoid and
    ``lesion_channel``) or regression quantiles (``activation`` ``"none"`` and ``quantiles``, the
    levels of the channels in order; ``lesion_channel`` is then None)."""

    activation: str
    lesion_channel: int | None = None
    quantiles: tuple[float, ...] | None = None

    @property
    def is_quantile(self) -> bool:
        """True for a quantile regression card (see :mod:`~ConformalSegLib.inference.model_card`)."""
        return self.quantiles is not None

    def to_dict(self) -> dict[str, Any]:
        if self.quantiles is not None:
            return {"activation": QUANTILE_ACTIVATION, "quantiles": [float(q) for q in self.quantiles]}
        return {"activation": self.activation, "lesion_channel": self.lesion_channel}


@dataclass(frozen=True)
class ModelSource:
    """Where the network comes from. ``path`` is absolute (resolved against the card's folder)."""

    kind: str  # "state_dict" | "torchscript" | "bundle"
    path: Path  # weights file, TorchScript file or bundle folder
    relative: str  # the path as written in the card
    network: str | None = None  # state_dict only
    args: dict[str, Any] = field(default_factory=dict)  # state_dict only

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "state_dict":
            return {"state_dict": {"network": self.network, "args": copy.deepcopy(self.args), "weights": self.relative}}
        return {self.kind: self.relative}

    @property
    def weights_path(self) -> Path:
        """The file holding the weights (the bundle's ``models/model.pt`` for bundles)."""
        return self.path / BUNDLE_WEIGHTS if self.kind == "bundle" else self.path
