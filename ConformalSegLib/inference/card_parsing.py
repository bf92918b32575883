"""Checking a model card: every key, type and range, with errors that name the card file, the key and the fix."""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..io.guards import check_allocation
from .bundle_preprocessing import inference_from_bundle, preprocessing_from_bundle
from .card_format import (
    ACTIVATIONS,
    BLEND_MODES,
    CARD_FIX,
    FORMAT,
    FORMAT_VERSION,
    INTENSITY_KINDS,
    QUANTILE_ACTIVATION,
    REQUIRED_KEYS,
    SOURCE_KINDS,
    TOP_KEYS,
    InferenceSettings,
    Intensity,
    ModelSource,
    OutputSpec,
    Preprocessing,
)
from .networks import bundle_config, network_class

__all__ = ["parse_card"]

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
BUNDLE = "bundle"  #: "preprocessing"/"inference" read from the bundle's config (inference/bundle_preprocessing.py)


class _Checker:
    """Small helpers that raise ConformalSegError naming the card file and the key."""

    def __init__(self, path: Path | None):
        self.path = path

    def fail(self, message: str, fix: str = CARD_FIX) -> ConformalSegError:
        return ConformalSegError(f"invalid model card: {message}", path=self.path, fix=fix)

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{key!r} must be a JSON object, got {type(value).__name__}")
        return value

    def keys(self, value: dict[str, Any], key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
        unknown = [k for k in value if k not in allowed]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise self.fail(f"unknown key(s) in {key}: {', '.join(hints)}; allowed: {', '.join(allowed)}")
        missing = [k for k in required if k not in value]
        if missing:
            raise self.fail(f"{key} is missing the key(s) {', '.join(repr(m) for m in missing)}")

    def number(self, value: Any, key: str, *, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{key!r} must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(f"{key!r} must be positive, got {value!r}")
        return float(value)

    def integer(self, value: Any, key: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"{key!r} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{key!r} must be a non-empty string, got {value!r}")
        return value

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(f"{key!r} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def triple(self, value: Any, key: str, *, integer: bool) -> tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise self.fail(f"{key!r} must be a list of 3 numbers [x, y, z] (network axis order), got {value!r}")
        if integer:
            return tuple(self.integer(v, key, minimum=1) for v in value)
        return tuple(self.number(v, key, positive=True) for v in value)


def parse_card(data: Any, path: Path | None, base: Path) -> dict[str, Any]:
    """Check a parsed card JSON; return the keyword arguments of :class:`~.model_card.ModelCard` (but ``path``).
    Relative source paths resolve against ``base``; errors name ``path``."""
    c = _Checker(path)
    data = c.mapping(data, "the card")
    if data.get("format") != FORMAT:
        raise c.fail(
            f"'format' must be {FORMAT!r}, got {data.get('format')!r}",
            fix="give a ConformalSegLib model card JSON file",
        )
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise c.fail(
            f"format_version {version} is newer than this ConformalSegLib understands ({FORMAT_VERSION})",
            fix="upgrade ConformalSegLib",
        )
    if version != FORMAT_VERSION:
        raise c.fail(f"'format_version' must be {FORMAT_VERSION}, got {version!r}")
    c.keys(data, "the card", TOP_KEYS, REQUIRED_KEYS)
    name = c.string(data["name"], "name")
    source = _parse_source(c, data["source"], base)
    config = _bundle_sections(c, data, source, path)
    if config is not None and data["preprocessing"] == BUNDLE:
        preprocessing = preprocessing_from_bundle(config)
    else:
        preprocessing = _parse_preprocessing(c, data["preprocessing"])
    if config is not None and data["inference"] == BUNDLE:
        inference = inference_from_bundle(config)
    else:
        inference = _parse_inference(c, data["inference"])
    output = _parse_output(c, data["output"])
    training = data.get("training", {})
    if training is None:
        training = {}
    c.mapping(training, "training")
    return {
        "name": name,
        "source": source,
        "preprocessing": preprocessing,
        "inference": inference,
        "output": output,
        "training": copy.deepcopy(training),
    }


def _bundle_sections(c: _Checker, data: dict[str, Any], source: ModelSource, path: Path | None) -> Path | None:
    """The bundle's inference config when the card takes its preprocessing or inference from it."""
    if BUNDLE not in (data["preprocessing"], data["inference"]):
        return None
    if source.kind != "bundle":
        raise c.fail('"bundle" preprocessing or inference needs a MONAI bundle source ({"bundle": FOLDER})')
    return bundle_config(source.path, path)


def _parse_source(c: _Checker, value: Any, base: Path) -> ModelSource:
    value = c.mapping(value, "source")
    if len(value) != 1 or next(iter(value)) not in SOURCE_KINDS:
        raise c.fail(
            f"'source' must have exactly one key among {', '.join(SOURCE_KINDS)}, got "
            f"{', '.join(map(repr, value)) or 'none'}"
        )
    kind, spec = next(iter(value.items()))
    if kind == "state_dict":
        spec = c.mapping(spec, "source.state_dict")
        c.keys(spec, "source.state_dict", ("network", "args", "weights"), ("network", "weights"))
        network = c.string(spec["network"], "source.state_dict.network")
        try:
            network_class(network)
        except LookupError as exc:
            raise c.fail(str(exc)) from exc
        args = spec.get("args", {}) or {}
        c.mapping(args, "source.state_dict.args")
        relative = c.string(spec["weights"], "source.state_dict.weights")
        return ModelSource(kind, _inside(c, base, relative, "weights"), relative, network, copy.deepcopy(args))
    relative = c.string(spec, f"source.{kind}")
    return ModelSource(kind, _inside(c, base, relative, kind), relative)


def _inside(c: _Checker, base: Path, relative: str, what: str) -> Path:
    """``base / relative`` resolved; for a card read from a file it must stay inside the model folder (the
    card's folder, or the bundle root for a card in a bundle's ``configs/``): a shared model folder is
    self-contained and cannot make the program read other local files."""
    resolved = (base / relative).resolve()
    if c.path is None:  # a card built in memory by this program (training), not read from a file
        return resolved
    root = base.resolve()
    roots = (root, root.parent) if root.name == "configs" else (root,)
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise c.fail(
            f"the {what} path {relative!r} points outside the model folder {roots[-1]}",
            fix="keep the model files inside the model's folder and name them relative to the card",
        )
    return resolved


def _parse_preprocessing(c: _Checker, value: Any) -> Preprocessing:
    value = c.mapping(value, "preprocessing")
    c.keys(value, "preprocessing", ("orientation", "spacing_mm", "intensity"))
    orientation = value.get("orientation")
    if orientation is not None:
        if not isinstance(orientation, str):
            raise c.fail(f"'orientation' must be axis codes such as 'RAS' or null, got {orientation!r}")
        orientation = orientation.upper()
        if len(orientation) != 3 or any(sum(ch in pair for ch in orientation) != 1 for pair in _AXIS_PAIRS):
            raise c.fail(
                f"'orientation' {orientation!r} is not valid: use 3 letters with one of L/R, one of "
                "A/P and one of S/I (RAS convention, e.g. 'RAS' or 'LPS'), or null"
            )
    spacing = value.get("spacing_mm")
    if spacing is not None:
        spacing = c.triple(spacing, "spacing_mm", integer=False)
    intensity = _parse_intensity(c, value.get("intensity", {"kind": "none"}))
    return Preprocessing(orientation, spacing, intensity)


def _parse_intensity(c: _Checker, value: Any) -> Intensity:
    value = c.mapping(value, "preprocessing.intensity")
    kind = c.choice(value.get("kind"), "intensity.kind", INTENSITY_KINDS)
    if kind == "window":
        c.keys(
            value,
            "intensity",
            ("kind", "a_min", "a_max", "b_min", "b_max", "clip"),
            ("a_min", "a_max", "b_min", "b_max"),
        )
        a_min, a_max, b_min, b_max = (
            c.number(value[k], f"intensity.{k}") for k in ("a_min", "a_max", "b_min", "b_max")
        )
        if a_min == a_max:
            raise c.fail("intensity window has a_min == a_max")
        clip = value.get("clip", True)
        if not isinstance(clip, bool):
            raise c.fail(f"'intensity.clip' must be true or false, got {clip!r}")
        return Intensity("window", a_min, a_max, b_min, b_max, clip)
    if kind == "zscore":
        c.keys(value, "intensity", ("kind", "mean", "std"))
        if ("mean" in value) != ("std" in value):
            raise c.fail("zscore intensity needs both 'mean' and 'std' or neither")
        if "mean" in value:
            return Intensity(
                "zscore",
                mean=c.number(value["mean"], "intensity.mean"),
                std=c.number(value["std"], "intensity.std", positive=True),
            )
        return Intensity("zscore")
    c.keys(value, "intensity", ("kind",))
    return Intensity("none")


def _parse_inference(c: _Checker, value: Any) -> InferenceSettings:
    value = c.mapping(value, "inference")
    c.keys(value, "inference", ("patch_size", "overlap", "blend", "sw_batch_size"), ("patch_size",))
    patch = c.triple(value["patch_size"], "patch_size", integer=True)
    overlap = c.number(value.get("overlap", 0.25), "overlap")
    if not 0 <= overlap < 1:
        raise c.fail(f"'overlap' must be in [0, 1), got {overlap}")
    blend = c.choice(value.get("blend", "gaussian"), "blend", BLEND_MODES)
    batch = c.integer(value.get("sw_batch_size", 4), "sw_batch_size", minimum=1)
    check_allocation((batch, *patch), 4, c.path, "model card's patch_size x sw_batch_size (float32 input)")
    return InferenceSettings(patch, overlap, blend, batch)


def _parse_output(c: _Checker, value: Any) -> OutputSpec:
    value = c.mapping(value, "output")
    if "quantiles" in value or value.get("activation") == QUANTILE_ACTIVATION:
        return _parse_quantile_output(c, value)
    c.keys(value, "output", ("activation", "lesion_channel"), ("activation", "lesion_channel"))
    activation = c.choice(value["activation"], "output.activation", ACTIVATIONS)
    channel = c.integer(value["lesion_channel"], "output.lesion_channel", minimum=0)
    return OutputSpec(activation, channel)


def _parse_quantile_output(c: _Checker, value: dict[str, Any]) -> OutputSpec:
    fix = 'write e.g. "output": {"activation": "none", "quantiles": [0.1, 0.9]}'
    c.keys(value, "output", ("activation", "quantiles"), ("activation", "quantiles"))
    if value["activation"] != QUANTILE_ACTIVATION:
        raise c.fail(
            f"quantile outputs need 'output.activation' {QUANTILE_ACTIVATION!r} (no activation), got "
            f"{value['activation']!r}",
            fix=fix,
        )
    levels = value["quantiles"]
    if not isinstance(levels, (list, tuple)) or len(levels) < 2:
        raise c.fail(f"'output.quantiles' must list at least two quantile levels, got {levels!r}", fix=fix)
    levels = tuple(c.number(q, "output.quantiles") for q in levels)
    if any(not 0.0 < q < 1.0 for q in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
        raise c.fail(f"'output.quantiles' must be strictly increasing levels in (0, 1), got {list(levels)}", fix=fix)
    return OutputSpec(QUANTILE_ACTIVATION, None, levels)
