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

Relative paths are relative to the folder holding the card. With a bundle source, ``"preprocessing":
"bundle"`` and ``"inference": "bundle"`` take them from the bundle's own ``configs/inference.json``
(its ``preprocessing`` transforms and ``SlidingWindowInferer``) instead of restating them
(:mod:`ConformalSegLib.inference.bundle_preprocessing`; steps a card cannot reproduce are refused).

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
import hashlib
import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from ..io.checksums import sha256_file
from ..io.json_file import read_json_file
from .card_format import (
    CARD_FILE,
    CARD_FIX,
    FORMAT,
    FORMAT_VERSION,
    InferenceSettings,
    ModelSource,
    OutputSpec,
    Preprocessing,
)
from .card_parsing import parse_card
from .networks import bundle_config, load_network

__all__ = ["ModelCard", "load_model_card", "resolve_model"]


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
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "source": self.source.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "inference": self.inference.to_dict(),
            "output": self.output.to_dict(),
            "training": copy.deepcopy(self.training),
        }

    def save(self, path: str | PathLike[str], *, force: bool = False) -> Path:
        """Write the card as JSON (atomically). Relative source paths stay relative to the new file."""
        from ..io.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", force=force)

    @classmethod
    def from_dict(
        cls, data: Any, path: str | PathLike[str] | None = None, *, base_dir: str | PathLike[str] | None = None
    ) -> ModelCard:
        """Validate a parsed card; ``path`` names the file in errors, relative paths resolve against
        ``base_dir`` (default: the card's folder, or the working directory)."""
        fields = parse_card(
            data,
            None if path is None else Path(path),
            Path(base_dir) if base_dir is not None else (Path(path).parent if path else Path.cwd()),
        )
        return cls(**fields, path=None if path is None else Path(path))

    # ------------------------------------------------------------------ hashes

    def sha256(self) -> str:
        """SHA-256 of the weights file (state dict, TorchScript archive, or the bundle's models/model.pt)."""
        weights = self.source.weights_path
        if not weights.is_file():
            raise ConformalSegError(
                "the model weights file does not exist",
                path=weights,
                fix=f"check the source paths in the model card {self.path or ''}".rstrip(),
            )
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
        payload = {
            "weights_sha256": self.sha256(),
            "source": source,
            "preprocessing": self.preprocessing.to_dict(),
            "inference": inference,
            "output": self.output.to_dict(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ the network

    def load_network(self):  # -> torch.nn.Module
        """Build the network on the CPU, in eval mode (see the module docstring for each source kind)."""
        return load_network(self.source, self.path)

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
    config = bundle_config(folder, required=False)
    return None if config is None else _cached_sha256(config)


def load_model_card(path: str | PathLike[str]) -> ModelCard:
    """Read and validate a model card JSON file; every problem raises ConformalSegError naming it."""
    path = Path(path)
    data = read_json_file(path, "model card", CARD_FIX, ConformalSegError)
    return ModelCard(**parse_card(data, path, path.parent), path=path)


def resolve_model(path: str | PathLike[str]) -> ModelCard:
    """The model card for ``path``, which may be

    * a card ``.json`` file;
    * a folder holding ``model_card.json`` (also a MONAI bundle folder; there
      ``configs/model_card.json`` works too);
    * a TorchScript file ``X.ts`` / ``X.pt`` with its card ``X.json`` beside it.
    """
    path = Path(path)
    if not path.exists():
        raise ConformalSegError(
            "model not found",
            path=path,
            fix="give a model card .json, a folder with model_card.json, or a "
            "TorchScript file with its .json card beside it",
        )
    if path.is_dir():
        for candidate in (path / CARD_FILE, path / "configs" / CARD_FILE):
            if candidate.is_file():
                return load_model_card(candidate)
        bundle = (
            " (it looks like a MONAI bundle: put the card at model_card.json or configs/model_card.json)"
            if (path / "configs").is_dir()
            else ""
        )
        raise ConformalSegError(
            f"the model folder has no {CARD_FILE}{bundle}",
            path=path,
            fix=f"write a model card {CARD_FILE} into the folder",
        )
    if path.suffix.lower() == ".json":
        return load_model_card(path)
    if path.suffix.lower() in (".ts", ".pt", ".pth"):
        sibling = path.with_suffix(".json")
        if not sibling.is_file():
            raise ConformalSegError(
                f"no model card {sibling.name} beside the model file",
                path=path,
                fix=f"write the model card to {sibling} (a bare network file does not say "
                "how to preprocess and patch the images)",
            )
        card = load_model_card(sibling)
        if card.source.weights_path.resolve() != path.resolve():
            raise ConformalSegError(
                f"the model card {sibling.name} describes {card.source.weights_path}, not this file",
                path=path,
                fix=f"correct the source in {sibling}",
            )
        return card
    raise ConformalSegError(
        "unsupported model path",
        path=path,
        fix="give a model card .json, a folder with model_card.json, or a TorchScript "
        ".ts/.pt file with its .json card beside it",
    )
