"""The preprocessing and sliding window of a MONAI bundle, read from its own inference config.

A card whose source is a bundle may say ``"preprocessing": "bundle"`` and/or ``"inference": "bundle"``
instead of restating them: they are then read from the bundle's ``configs/inference.json`` (the standard
``monai.bundle`` layout; YAML configs when PyYAML is installed), from its ``preprocessing`` (a
``Compose`` of dictionary transforms) and ``inferer`` (a ``SlidingWindowInferer``) sections, and
translated into the card's own :class:`~ConformalSegLib.inference.card_format.Preprocessing` and
:class:`~ConformalSegLib.inference.card_format.InferenceSettings`, so that the engine, the trainer and the
fingerprint (:meth:`~ConformalSegLib.inference.model_card.ModelCard.pipeline_sha256`) work as for any card.

Translated (``d`` suffix or not, with or without a ``monai.transforms.`` prefix): ``Orientation``
(``axcodes``), ``Spacing`` (``pixdim``; linear interpolation), ``ScaleIntensityRange`` (a window) and
``NormalizeIntensity`` (z-score, whole volume). Loading and typing steps (``LoadImage``,
``EnsureChannelFirst``, ``EnsureType``, ``ToTensor``, ``CastToType``...) are what the engine does itself
and are skipped. Anything else, an intensity step before a spatial one (the engine resamples first),
a second step of one kind, or a ``$`` expression is **refused** with the transform named, because the
card could not reproduce it and the calibration would silently be of another pipeline. ``@name``
references to top-level config entries are followed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from .card_format import InferenceSettings, Intensity, Preprocessing

__all__ = ["inference_from_bundle", "preprocessing_from_bundle", "read_bundle_config"]

SKIPPED = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "CastToType", "Identity"}
RESTATE_FIX = 'restate the preprocessing (or inference) in the model card instead of "bundle"'


def read_bundle_config(config: Path) -> dict[str, Any]:
    """The bundle's inference config as a dict (JSON, or YAML with PyYAML)."""
    try:
        text = config.read_text(encoding="utf-8")
        if config.suffix.lower() == ".json":
            doc = json.loads(text)
        else:
            import yaml  # a YAML bundle needs PyYAML, as MONAI itself does

            doc = yaml.safe_load(text)
    except ImportError as exc:
        raise ConformalSegError("a YAML bundle config needs PyYAML", path=config, fix="pip install pyyaml") from exc
    except (OSError, ValueError) as exc:
        raise ConformalSegError(f"cannot read the bundle config ({exc})", path=config, fix="check the file") from exc
    if not isinstance(doc, dict):
        raise ConformalSegError("the bundle config is not a mapping", path=config, fix="check the file")
    return doc


def _resolve(value: Any, config: dict[str, Any], where: Path, depth: int = 0) -> Any:
    """Follow ``@name`` references to top-level entries; refuse ``$`` expressions."""
    if isinstance(value, str) and value.startswith("@") and depth < 10:
        key = value[1:]
        if key not in config:
            raise ConformalSegError(f"the bundle config refers to {value}, which it does not define", path=where)
        return _resolve(config[key], config, where, depth + 1)
    if isinstance(value, str) and value.startswith("$"):
        raise ConformalSegError(
            f"the bundle config computes a value with an expression ({value[:60]})", path=where, fix=RESTATE_FIX
        )
    if isinstance(value, list):
        return [_resolve(v, config, where, depth) for v in value]
    return value


def _transform_name(item: dict[str, Any]) -> str:
    name = str(item.get("_target_", "")).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in _KNOWN else name


_KNOWN = SKIPPED | {"Orientation", "Spacing", "ScaleIntensityRange", "NormalizeIntensity"}


def _section(config: dict[str, Any], key: str, where: Path) -> Any:
    if key not in config:
        raise ConformalSegError(f"the bundle config has no {key!r} section", path=where, fix=RESTATE_FIX)
    return _resolve(config[key], config, where)


def preprocessing_from_bundle(config_path: Path) -> Preprocessing:
    """The bundle's ``preprocessing`` translated into the card's (see the module docstring)."""
    config = read_bundle_config(config_path)
    section = _section(config, "preprocessing", config_path)
    items = section.get("transforms") if isinstance(section, dict) else section
    if not isinstance(items, list):
        raise ConformalSegError("the bundle's preprocessing is not a list of transforms", path=config_path)
    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    intensity: Intensity | None = None
    for raw in items:
        item = {k: _resolve(v, config, config_path) for k, v in _resolve(raw, config, config_path).items()}
        name = _transform_name(item)
        if name in SKIPPED:
            continue
        seen_spatial = name in ("Orientation", "Spacing")
        if name not in _KNOWN or (seen_spatial and intensity is not None):
            reason = "comes after the intensity step" if name in _KNOWN else "has no counterpart in a model card"
            raise ConformalSegError(
                f"the bundle's preprocessing step {item.get('_target_')} {reason}", path=config_path, fix=RESTATE_FIX
            )
        if name == "Orientation" and orientation is None:
            orientation = str(item["axcodes"]).upper()
        elif name == "Spacing" and spacing is None:
            mode = item.get("mode", "bilinear")
            if (mode[0] if isinstance(mode, list) else mode) not in ("bilinear", 1, "linear"):
                raise ConformalSegError(f"the bundle resamples with mode {mode!r}", path=config_path, fix=RESTATE_FIX)
            spacing = tuple(float(v) for v in item["pixdim"])  # type: ignore[assignment]
        elif name == "ScaleIntensityRange" and intensity is None:
            a_min, a_max, b_min, b_max = (float(item[k]) for k in ("a_min", "a_max", "b_min", "b_max"))
            intensity = Intensity("window", a_min, a_max, b_min, b_max, clip=bool(item.get("clip", False)))
        elif name == "NormalizeIntensity" and intensity is None:
            if item.get("nonzero") or item.get("channel_wise"):
                raise ConformalSegError(
                    "the bundle normalises nonzero or per channel", path=config_path, fix=RESTATE_FIX
                )
            mean, std = item.get("subtrahend"), item.get("divisor")
            if (mean is None) != (std is None):
                raise ConformalSegError(
                    "the bundle gives only one of subtrahend and divisor", path=config_path, fix=RESTATE_FIX
                )
            intensity = Intensity(
                "zscore", mean=None if mean is None else float(mean), std=None if std is None else float(std)
            )
        else:
            raise ConformalSegError(f"the bundle's preprocessing repeats {name}", path=config_path, fix=RESTATE_FIX)
    return Preprocessing(orientation, spacing, intensity or Intensity())


def inference_from_bundle(config_path: Path) -> InferenceSettings:
    """The bundle's ``inferer`` (a ``SlidingWindowInferer``) as the card's sliding-window settings."""
    config = read_bundle_config(config_path)
    item = _section(config, "inferer", config_path)
    item = {k: _resolve(v, config, config_path) for k, v in item.items()} if isinstance(item, dict) else {}
    if str(item.get("_target_", "")).rsplit(".", 1)[-1] != "SlidingWindowInferer":
        raise ConformalSegError(
            f"the bundle's inferer is {item.get('_target_')!r}, not a SlidingWindowInferer",
            path=config_path,
            fix=RESTATE_FIX,
        )
    roi = item.get("roi_size")
    if not isinstance(roi, list) or len(roi) != 3 or any(not isinstance(v, int) or v < 1 for v in roi):
        raise ConformalSegError(f"the bundle's roi_size {roi!r} is not three sizes", path=config_path, fix=RESTATE_FIX)
    blend = item.get("mode", "constant")
    if blend not in ("gaussian", "constant"):
        raise ConformalSegError(f"the bundle blends windows with {blend!r}", path=config_path, fix=RESTATE_FIX)
    return InferenceSettings(
        (int(roi[0]), int(roi[1]), int(roi[2])),
        float(item.get("overlap", 0.25)),
        blend,
        int(item.get("sw_batch_size", 1)),
    )
