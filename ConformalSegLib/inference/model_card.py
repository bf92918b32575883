"""Model cards: one versioned JSON file that fixes everything about how a network turns a CT into a
probability map.

Why a card
----------
Conformal guarantees hold when calibration cases and test cases are *exchangeable*: their
probability maps must come out of the **identical** pipeline (same weights, same resampling, same
intensity window, same patch size, overlap and blending, same activation and channel). The card is
that pipeline, written down once; :class:`~ConformalSegLib.inference.engine.InferenceEngine` reads
nothing else, and :meth:`ModelCard.pipeline_sha256` fingerprints it (recorded next to every
prediction) so a calibration profile and a later test-time prediction can be checked to match.

Format (``conformalseg-model-card``, ``format_version`` 1)
-----------------------------------------------------------
.. code-block:: json

    {
      "format": "conformalseg-model-card", "format_version": 1,
      "name": "kidney-tumour-unet-v3",
      "source": {"state_dict": {"network": "UNet",
                                 "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                          "channels": [16, 32, 64], "strides": [2, 2], "dropout": 0.1},
                                 "weights": "unet.pt"}},
      "preprocessing": {"orientation": "RAS", "spacing_mm": [1.0, 1.0, 2.5],
                        "intensity": {"kind": "window", "a_min": -200, "a_max": 300,
                                      "b_min": 0.0, "b_max": 1.0, "clip": true}},
      "inference": {"patch_size": [96, 96, 64], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 4},
      "output": {"activation": "softmax", "lesion_channel": 1},
      "training": {"data": "KiTS23 folds 0-3", "commit": "abc123"}
    }

``source`` is exactly one of

* ``{"state_dict": {"network": NAME, "args": {...}, "weights": FILE}}``: ``NAME`` a class of
  :mod:`monai.networks.nets` built with ``args``; ``FILE`` a state dict (a bare one, or wrapped in a
  dict under ``state_dict``/``model``/``network``/``model_state_dict``; a ``module.`` prefix from
  DataParallel is removed) loaded with ``torch.load(weights_only=True)`` (no code is executed);
* ``{"torchscript": FILE}``: a TorchScript archive (it contains code: load only trusted files);
* ``{"bundle": FOLDER}``: a MONAI bundle; the network is ``network_def`` of
  ``configs/inference.json`` (or ``.yaml``) built with :class:`monai.bundle.ConfigParser` (config
  expressions are Python code: load only trusted bundles) and its weights are the state dict
  ``models/model.pt``.

Relative paths are relative to the folder holding the card.

Axis orders (the one place they are defined)
--------------------------------------------
The network sees tensors ``(batch, channel, d0, d1, d2)`` in **MONAI's order**: ``d0, d1, d2`` are
the image's ITK index axes ``(i, j, k)`` = ``(x, y, z)`` -- the numpy ``(z, y, x)`` array transposed,
exactly what ``monai.transforms.LoadImage`` gives -- after the optional reorientation.

* ``preprocessing.orientation``: MONAI axis codes in **RAS** convention (nibabel/MONAI world space;
  ITK/DICOM world space is LPS, see :mod:`ConformalSegLib.inference.engine`), e.g. ``"RAS"``: then
  ``d0`` runs from left to Right, ``d1`` from posterior to Anterior and ``d2`` from inferior to
  Superior. ``null`` keeps the file's own axes.
* ``preprocessing.spacing_mm`` and ``inference.patch_size``: per network axis ``[d0, d1, d2]``,
  i.e. ``[x, y, z]`` (for ``"RAS"``: left-right, posterior-anterior, inferior-superior).
* Intensity: ``window`` = :class:`monai.transforms.ScaleIntensityRange` (``a_min..a_max`` to
  ``b_min..b_max``, ``clip`` default true); ``zscore`` = :class:`monai.transforms.NormalizeIntensity`
  over the whole (resampled) volume, or with fixed ``mean`` and ``std`` when both are given;
  ``none``. Order: orientation, spacing (trilinear), intensity -- as in MONAI's CT bundles.
* ``output``: ``activation`` ``softmax`` (over the channels; needs >= 2) or ``sigmoid`` (per
  channel); ``lesion_channel`` is the output channel whose probability is the lesion probability.

Quantile regression outputs
---------------------------
``"output": {"activation": "none", "quantiles": [0.1, 0.9]}`` declares a regression network (e.g. a
denoiser) whose output channel ``c`` is the estimated ``quantiles[c]``-level quantile of the clean
image given the input, voxel by voxel, in the units of the **preprocessed** input (for the
phantom denoiser: HU windowed -175..250 to [0, 1] *before* the card's pipeline, see
:mod:`ConformalSegLib.semcrc.phantom_denoising`). No activation is applied; the levels are
strictly increasing in (0, 1), at least two (the first and last give the interval ``[lower,
upper]``). Such a card has no ``lesion_channel``; use
:meth:`~ConformalSegLib.inference.engine.InferenceEngine.predict_quantiles` (``predict`` refuses it).
Cards without ``quantiles`` are read, written and fingerprinted exactly as before.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..io.json_file import read_json_file
from ..io.checksums import sha256_file

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
_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


# ----------------------------------------------------------------------------- card sections


@dataclass(frozen=True)
class Intensity:
    """Intensity normalisation (see the module docstring)."""

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
            return {"kind": "window", "a_min": self.a_min, "a_max": self.a_max, "b_min": self.b_min,
                    "b_max": self.b_max, "clip": self.clip}
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
        return {"orientation": self.orientation,
                "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
                "intensity": self.intensity.to_dict()}


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings. ``patch_size`` is in network axis order ``[d0, d1, d2]`` = ``[x, y, z]``."""

    patch_size: tuple[int, int, int]
    overlap: float = 0.25
    blend: str = "gaussian"
    sw_batch_size: int = 4

    def to_dict(self) -> dict[str, Any]:
        return {"patch_size": list(self.patch_size), "overlap": self.overlap, "blend": self.blend,
                "sw_batch_size": self.sw_batch_size}


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
        """True for a quantile regression card (see the module docstring)."""
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
            return {"state_dict": {"network": self.network, "args": copy.deepcopy(self.args),
                                   "weights": self.relative}}
        return {self.kind: self.relative}

    @property
    def weights_path(self) -> Path:
        """The file holding the weights (the bundle's ``models/model.pt`` for bundles)."""
        return self.path / BUNDLE_WEIGHTS if self.kind == "bundle" else self.path


# ----------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class ModelCard:
    """A validated model card (see the module docstring); build it with :func:`load_model_card`."""

    name: str
    source: ModelSource
    preprocessing: Preprocessing
    inference: InferenceSettings
    output: OutputSpec
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the card file (None for cards built in memory)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                "source": self.source.to_dict(), "preprocessing": self.preprocessing.to_dict(),
                "inference": self.inference.to_dict(), "output": self.output.to_dict(),
                "training": copy.deepcopy(self.training)}

    def save(self, path: str | PathLike[str], *, force: bool = False) -> Path:
        """Write the card as JSON (atomically). Relative source paths stay relative to the new file."""
        from ..io.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", force=force)

    @classmethod
    def from_dict(cls, data: Any, path: str | PathLike[str] | None = None, *,
                  base_dir: str | PathLike[str] | None = None) -> ModelCard:
        """Validate a parsed card; ``path`` names the file in errors, relative paths resolve against
        ``base_dir`` (default: the card's folder, or the working directory)."""
        return _parse_card(data, None if path is None else Path(path),
                           Path(base_dir) if base_dir is not None else (Path(path).parent if path else Path.cwd()))

    # ------------------------------------------------------------------ hashes

    def sha256(self) -> str:
        """SHA-256 of the weights file (state dict, TorchScript archive, or the bundle's models/model.pt)."""
        weights = self.source.weights_path
        if not weights.is_file():
            raise ConformalSegError("the model weights file does not exist", path=weights,
                                    fix=f"check the source paths in the model card {self.path or ''}".rstrip())
        return _cached_sha256(weights)

    def pipeline_sha256(self) -> str:
        """Fingerprint of everything that changes the probabilities: the weights' SHA-256, the network
        definition, preprocessing, patch size, overlap, blending and output. Not the name, the
        training notes or ``sw_batch_size`` (which only changes speed). Two runs with the same
        fingerprint (and the same MC/TTA settings) put their cases through the identical pipeline."""
        source = self.source.to_dict()
        if self.source.kind == "state_dict":
            source["state_dict"].pop("weights")
        elif self.source.kind == "bundle":
            source = {"bundle": {"config_sha256": _bundle_config_hash(self.source.path)}}
        else:
            source = {"torchscript": True}
        inference = self.inference.to_dict()
        inference.pop("sw_batch_size")
        payload = {"weights_sha256": self.sha256(), "source": source,
                   "preprocessing": self.preprocessing.to_dict(), "inference": inference,
                   "output": self.output.to_dict()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ the network

    def load_network(self):  # -> torch.nn.Module
        """Build the network on the CPU, in eval mode (see the module docstring for each source kind)."""
        return _load_network(self)

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"model {self.name!r}{where}"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _bundle_config_hash(folder: Path) -> str | None:
    config = _bundle_config(folder, None, required=False)
    return None if config is None else _cached_sha256(config)


# ----------------------------------------------------------------------------- validation


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

    def keys(self, value: dict[str, Any], key: str, allowed: tuple[str, ...],
             required: tuple[str, ...] = ()) -> None:
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


def _parse_card(data: Any, path: Path | None, base: Path) -> ModelCard:
    c = _Checker(path)
    data = c.mapping(data, "the card")
    if data.get("format") != FORMAT:
        raise c.fail(f"'format' must be {FORMAT!r}, got {data.get('format')!r}",
                     fix="give a ConformalSegLib model card JSON file")
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise c.fail(f"format_version {version} is newer than this ConformalSegLib understands "
                     f"({FORMAT_VERSION})", fix="upgrade ConformalSegLib")
    if version != FORMAT_VERSION:
        raise c.fail(f"'format_version' must be {FORMAT_VERSION}, got {version!r}")
    c.keys(data, "the card", TOP_KEYS, REQUIRED_KEYS)
    name = c.string(data["name"], "name")
    source = _parse_source(c, data["source"], base)
    preprocessing = _parse_preprocessing(c, data["preprocessing"])
    inference = _parse_inference(c, data["inference"])
    output = _parse_output(c, data["output"])
    training = data.get("training", {})
    if training is None:
        training = {}
    c.mapping(training, "training")
    return ModelCard(name=name, source=source, preprocessing=preprocessing, inference=inference, output=output,
                     training=copy.deepcopy(training), path=path)


def _parse_source(c: _Checker, value: Any, base: Path) -> ModelSource:
    value = c.mapping(value, "source")
    if len(value) != 1 or next(iter(value)) not in SOURCE_KINDS:
        raise c.fail(f"'source' must have exactly one key among {', '.join(SOURCE_KINDS)}, got "
                     f"{', '.join(map(repr, value)) or 'none'}")
    kind, spec = next(iter(value.items()))
    if kind == "state_dict":
        spec = c.mapping(spec, "source.state_dict")
        c.keys(spec, "source.state_dict", ("network", "args", "weights"), ("network", "weights"))
        network = c.string(spec["network"], "source.state_dict.network")
        _network_class(network, c)
        args = spec.get("args", {}) or {}
        c.mapping(args, "source.state_dict.args")
        relative = c.string(spec["weights"], "source.state_dict.weights")
        return ModelSource(kind, (base / relative).resolve(), relative, network, copy.deepcopy(args))
    relative = c.string(spec, f"source.{kind}")
    return ModelSource(kind, (base / relative).resolve(), relative)


def _parse_preprocessing(c: _Checker, value: Any) -> Preprocessing:
    value = c.mapping(value, "preprocessing")
    c.keys(value, "preprocessing", ("orientation", "spacing_mm", "intensity"))
    orientation = value.get("orientation")
    if orientation is not None:
        if not isinstance(orientation, str):
            raise c.fail(f"'orientation' must be axis codes such as 'RAS' or null, got {orientation!r}")
        orientation = orientation.upper()
        if len(orientation) != 3 or any(sum(ch in pair for ch in orientation) != 1 for pair in _AXIS_PAIRS):
            raise c.fail(f"'orientation' {orientation!r} is not valid: use 3 letters with one of L/R, one of "
                         "A/P and one of S/I (RAS convention, e.g. 'RAS' or 'LPS'), or null")
    spacing = value.get("spacing_mm")
    if spacing is not None:
        spacing = c.triple(spacing, "spacing_mm", integer=False)
    intensity = _parse_intensity(c, value.get("intensity", {"kind": "none"}))
    return Preprocessing(orientation, spacing, intensity)


def _parse_intensity(c: _Checker, value: Any) -> Intensity:
    value = c.mapping(value, "preprocessing.intensity")
    kind = c.choice(value.get("kind"), "intensity.kind", INTENSITY_KINDS)
    if kind == "window":
        c.keys(value, "intensity", ("kind", "a_min", "a_max", "b_min", "b_max", "clip"),
               ("a_min", "a_max", "b_min", "b_max"))
        a_min, a_max, b_min, b_max = (c.number(value[k], f"intensity.{k}") for k in ("a_min", "a_max", "b_min", "b_max"))
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
            return Intensity("zscore", mean=c.number(value["mean"], "intensity.mean"),
                             std=c.number(value["std"], "intensity.std", positive=True))
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
        raise c.fail(f"quantile outputs need 'output.activation' {QUANTILE_ACTIVATION!r} (no activation), got "
                     f"{value['activation']!r}", fix=fix)
    levels = value["quantiles"]
    if not isinstance(levels, (list, tuple)) or len(levels) < 2:
        raise c.fail(f"'output.quantiles' must list at least two quantile levels, got {levels!r}", fix=fix)
    levels = tuple(c.number(q, "output.quantiles") for q in levels)
    if any(not 0.0 < q < 1.0 for q in levels) or any(b <= a for a, b in zip(levels, levels[1:])):
        raise c.fail(f"'output.quantiles' must be strictly increasing levels in (0, 1), got {list(levels)}", fix=fix)
    return OutputSpec(QUANTILE_ACTIVATION, None, levels)


def _network_class(name: str, c: _Checker):
    import torch
    from monai.networks import nets

    cls = getattr(nets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        available = sorted(n for n in dir(nets) if isinstance(getattr(nets, n), type)
                           and issubclass(getattr(nets, n), torch.nn.Module))
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(available[:8])} ..."
        raise c.fail(f"network {name!r} is not a class of monai.networks.nets ({hint})")
    return cls


# ----------------------------------------------------------------------------- loading cards


def load_model_card(path: str | PathLike[str]) -> ModelCard:
    """Read and validate a model card JSON file; every problem raises ConformalSegError naming it."""
    path = Path(path)
    data = read_json_file(path, "model card", CARD_FIX, ConformalSegError)
    return _parse_card(data, path, path.parent)


def resolve_model(path: str | PathLike[str]) -> ModelCard:
    """The model card for ``path``, which may be

    * a card ``.json`` file;
    * a folder holding ``model_card.json`` (also a MONAI bundle folder; there
      ``configs/model_card.json`` works too);
    * a TorchScript file ``X.ts`` / ``X.pt`` with its card ``X.json`` beside it.
    """
    path = Path(path)
    if not path.exists():
        raise ConformalSegError("model not found", path=path,
                                fix="give a model card .json, a folder with model_card.json, or a "
                                    "TorchScript file with its .json card beside it")
    if path.is_dir():
        for candidate in (path / CARD_FILE, path / "configs" / CARD_FILE):
            if candidate.is_file():
                return load_model_card(candidate)
        bundle = " (it looks like a MONAI bundle: put the card at model_card.json or configs/model_card.json)" \
            if (path / "configs").is_dir() else ""
        raise ConformalSegError(f"the model folder has no {CARD_FILE}{bundle}", path=path,
                                fix=f"write a model card {CARD_FILE} into the folder")
    if path.suffix.lower() == ".json":
        return load_model_card(path)
    if path.suffix.lower() in (".ts", ".pt", ".pth"):
        sibling = path.with_suffix(".json")
        if not sibling.is_file():
            raise ConformalSegError(f"no model card {sibling.name} beside the model file", path=path,
                                    fix=f"write the model card to {sibling} (a bare network file does not say "
                                        "how to preprocess and patch the images)")
        card = load_model_card(sibling)
        if card.source.weights_path.resolve() != path.resolve():
            raise ConformalSegError(f"the model card {sibling.name} describes {card.source.weights_path}, not "
                                    f"this file", path=path, fix=f"correct the source in {sibling}")
        return card
    raise ConformalSegError("unsupported model path", path=path,
                            fix="give a model card .json, a folder with model_card.json, or a TorchScript "
                                ".ts/.pt file with its .json card beside it")


# ----------------------------------------------------------------------------- networks


def _read_state_dict(path: Path, card: ModelCard) -> dict[str, Any]:
    import pickle

    import torch

    if not path.is_file():
        raise ConformalSegError("model weights file not found", path=path,
                                fix=f"check the weights path in the model card {card.path or ''}".rstrip())
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConformalSegError(f"cannot read the weights as a plain state dict ({reason})", path=path,
                                fix="save the weights with torch.save(model.state_dict(), path); "
                                    "pickled whole models are not loaded") from exc

    def is_state(obj: Any) -> bool:
        return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())

    if not is_state(loaded) and isinstance(loaded, dict):
        loaded = next((loaded[k] for k in STATE_DICT_WRAPPERS if is_state(loaded.get(k))), loaded)
    if not is_state(loaded):
        raise ConformalSegError("the weights file does not hold a state dict (name -> tensor)", path=path,
                                fix="save the weights with torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return loaded


def _apply_state_dict(net, state: dict[str, Any], weights: Path, card: ModelCard) -> None:
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise ConformalSegError(f"the weights do not match the network of the model card ({detail[:300]})",
                                path=weights, fix=f"check the network and args in {card.path or 'the model card'}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise ConformalSegError(f"the weights do not match the network of the model card: {'; '.join(problems)}",
                                path=weights, fix=f"check the network and args in {card.path or 'the model card'}")


def _bundle_config(folder: Path, card: ModelCard | None, *, required: bool = True) -> Path | None:
    for name in BUNDLE_CONFIGS:
        if (folder / name).is_file():
            return folder / name
    if required:
        raise ConformalSegError("the MONAI bundle has no configs/inference.json", path=folder,
                                fix=f"check the bundle path in {card.path if card and card.path else 'the model card'}")
    return None


def _load_network(card: ModelCard):
    import torch

    source = card.source
    where = card.path or "the model card"
    if source.kind == "torchscript":
        if not source.path.is_file():
            raise ConformalSegError("TorchScript model file not found", path=source.path,
                                    fix=f"check the torchscript path in {where}")
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; it still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(source.path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConformalSegError(f"cannot load the TorchScript model ({reason})", path=source.path,
                                    fix="export it with torch.jit.script(model).save(path)") from exc
        return net.eval()
    if source.kind == "state_dict":
        cls = _network_class(source.network, _Checker(card.path))
        try:
            net = cls(**source.args)
        except (TypeError, ValueError, AssertionError, KeyError) as exc:
            raise ConformalSegError(f"cannot build {source.network}(**args): {exc}", path=card.path,
                                    fix=f"correct source.state_dict.args for monai.networks.nets.{source.network}") from exc
        _apply_state_dict(net, _read_state_dict(source.path, card), source.path, card)
        return net.eval()
    # bundle
    if not source.path.is_dir():
        raise ConformalSegError("MONAI bundle folder not found", path=source.path,
                                fix=f"check the bundle path in {where}")
    config = _bundle_config(source.path, card)
    from monai.bundle import ConfigParser

    try:
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(source.path)
        if "network_def" not in parser.get():
            raise KeyError("network_def")
        net = parser.get_parsed_content("network_def", instantiate=True)
    except KeyError as exc:
        raise ConformalSegError(f"the bundle config has no usable 'network_def' ({exc})", path=config,
                                fix="define the network under 'network_def' in configs/inference.json") from exc
    except Exception as exc:  # noqa: BLE001 - config instantiation raises anything
        raise ConformalSegError(f"cannot build the bundle's network_def ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})", path=config,
                                fix="check network_def in the bundle's configs/inference.json") from exc
    if not isinstance(net, torch.nn.Module):
        raise ConformalSegError(f"the bundle's network_def is a {type(net).__name__}, not a torch network",
                                path=config, fix="define the network under 'network_def'")
    weights = source.path / BUNDLE_WEIGHTS
    _apply_state_dict(net, _read_state_dict(weights, card), weights, card)
    return net.eval()
