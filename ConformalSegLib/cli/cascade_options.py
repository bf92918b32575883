"""``--cascade CONFIG`` (and ``--cascade-lungs DIR``): predict probability maps with the coarse-to-fine
cascade (:mod:`ConformalSegLib.cascade`) instead of a single network.

For the ``infer``, ``calibrate`` and ``evaluate`` commands:

* :func:`add_cascade_argument` adds the options to a parser;
* :func:`cascade_predictor_from_args` turns the parsed arguments into a :class:`CascadePredictor`
  (None without ``--cascade``). It duck-types :class:`~ConformalSegLib.inference.InferenceEngine`
  for the code that drives engines: ``predict(volume, mc_dropout=0, tta_flips=False)`` returns a
  :class:`~ConformalSegLib.inference.Prediction` (the cascade probability; with
  ``stage2_mc_passes`` the stage-2 variance; the component table in ``info["cascade"]``), and
  ``card``, ``seed``, ``device``, ``amp`` are those of the stage-1 engine;
* :func:`cascade_provenance` is the record to store in calibration profiles / ``inference.json``
  (the config's SHA-256 fingerprint, both cards' pipeline fingerprints, MC passes and seed).
  Calibrate and apply only with identical records: the guarantee covers the cascade as a whole.

Models: ``stage1_model``/``stage2_model`` of the config (relative to the config file); a missing
``stage1_model`` falls back to ``--model``; a missing ``stage2_model`` refines with the stage-1 model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cascade import CascadeConfig, CascadeResult, load_cascade_config, run_cascade
from ..common.errors import ConformalSegError
from ..io.volumes import Volume

__all__ = [
    "CascadeCard",
    "CascadePredictor",
    "add_cascade_argument",
    "cascade_predictor_from_args",
    "cascade_provenance",
]


def add_cascade_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--cascade CONFIG`` and ``--cascade-lungs DIR`` to ``parser``."""
    g = parser.add_argument_group("coarse-to-fine cascade (Isler et al.)")
    g.add_argument(
        "--cascade",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="cascade config JSON (see ConformalSegLib/cascade/config.py): coarse model, anatomy-aware "
        "component filters, ROI refinement; replaces the single-model prediction",
    )
    g.add_argument(
        "--cascade-lungs",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of lung label maps (CASE.nii.gz, same case ids as the images) for a config with "
        "lung_source 'labels'",
    )


class CascadePredictor:
    """The cascade with its engines, usable where an :class:`InferenceEngine` is (see module docstring)."""

    def __init__(self, config: CascadeConfig, stage1: Any, stage2: Any = None, *, lungs_dir: Path | None = None):
        self.config = config
        self.stage1 = stage1
        self.stage2 = stage2
        self.lungs_dir = lungs_dir
        self._lung_files: dict[str, Path] | None = None
        if config.lung_source == "labels" and config.min_lung_overlap is not None and lungs_dir is None:
            raise ConformalSegError(
                "the cascade config has lung_source 'labels' but no lung label folder was given",
                path=config.path,
                fix="pass --cascade-lungs DIR, or use lung_source 'hu'",
            )

    # engine-like attributes (of the stage-1 engine, except the card: see CascadeCard)
    @property
    def card(self) -> CascadeCard:
        return CascadeCard(self)

    @property
    def seed(self):
        return getattr(self.stage2 or self.stage1, "seed", 0)

    @property
    def device(self):
        return self.stage1.device

    @property
    def amp(self):
        return self.stage1.amp

    def lung_labels_for(self, volume: Volume) -> Volume | None:
        """The lung label map of ``volume``'s case from ``--cascade-lungs`` (None when not needed)."""
        if self.lungs_dir is None or self.config.lung_source != "labels":
            return None
        from ..io.dataset import case_id, scan_folder
        from ..io.volumes import load_label_map

        if self._lung_files is None:
            self._lung_files = scan_folder(self.lungs_dir, probability=False)
        cid = case_id(volume.path) if volume.path else None
        if cid is None:
            raise ConformalSegError(
                "cannot tell the case id of an in-memory image to find its lung label map",
                fix="give images from files, or use lung_source 'hu'",
            )
        candidates = [cid] + ([cid[:-5]] if cid.endswith("_0000") else [])
        path = next((self._lung_files[c] for c in candidates if c in self._lung_files), None)
        if path is None:
            raise ConformalSegError(
                f"no lung label map for case {cid!r}",
                path=self.lungs_dir,
                fix=f"add {candidates[-1]}.nii.gz to the folder",
            )
        return load_label_map(path)

    def __call__(self, volume: Volume, *, progress=None, cancel=None) -> CascadeResult:
        return run_cascade(
            volume,
            self.config,
            self.stage1,
            self.stage2,
            lung_labels=self.lung_labels_for(volume),
            progress=progress,
            cancel=cancel,
        )

    def predict(self, volume: Volume, *, mc_dropout: int = 0, tta_flips: bool | int | None = False):
        """Engine-compatible: the cascade as a ``Prediction``. MC passes come from the config
        (``mc_dropout`` must be 0 or equal ``stage2_mc_passes``); flip TTA is not supported."""
        import time

        from ..inference import Prediction
        from ..inference.mc_passes import flip_count

        if flip_count(tta_flips) > 1:
            raise ConformalSegError("--tta is not supported with --cascade", fix="drop --tta")
        if mc_dropout not in (0, self.config.stage2_mc_passes):
            raise ConformalSegError(
                f"--mc-dropout {mc_dropout} differs from stage2_mc_passes "
                f"{self.config.stage2_mc_passes} of the cascade config",
                path=self.config.path,
                fix="set the MC passes in the cascade config (stage2_mc_passes) only",
            )
        start = time.perf_counter()
        result = self(volume)
        return Prediction(
            probability=result.probability,
            geometry=volume.geometry,
            variance=result.variance,
            mc_passes=self.config.stage2_mc_passes,
            seconds=time.perf_counter() - start,
            device=str(self.device),
            info={"cascade": result.table(), **result.info},
        )

    def provenance(self) -> dict[str, Any]:
        return cascade_provenance(self.config, self.stage1, self.stage2)


class CascadeCard:
    """The stage-1 model card as seen by code written for single engines, except that
    :meth:`pipeline_sha256` fingerprints the **whole cascade** (config fingerprint, both cards'
    pipeline fingerprints, the MC seed) and :attr:`name` says it is a cascade. So probability caches,
    profiles and ``inference.json`` records of a cascade never match those of its stage-1 model alone."""

    def __init__(self, predictor: CascadePredictor):
        self._predictor = predictor
        self._card = predictor.stage1.card

    def __getattr__(self, name: str) -> Any:
        return getattr(self._card, name)

    @property
    def name(self) -> str:
        return f"cascade({self._card.name})"

    def pipeline_sha256(self) -> str:
        import hashlib
        import json

        record = cascade_provenance(self._predictor.config, self._predictor.stage1, self._predictor.stage2)["cascade"]
        record.pop("config")  # the file's location does not change the maps
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cascade_provenance(config: CascadeConfig, stage1: Any = None, stage2: Any = None) -> dict[str, Any]:
    """The cascade's identity: config fingerprint and parameters, and the cards' pipeline fingerprints
    (when the stages are engines) and the MC seed."""
    record: dict[str, Any] = {
        "config": str(config.path.resolve()) if config.path else None,
        "sha256": config.fingerprint(),
        "parameters": config.parameters(),
    }
    for name, stage in (("stage1", stage1), ("stage2", stage2 if stage2 is not None else stage1)):
        card = getattr(stage, "card", None)
        if card is not None:
            record[name] = {"name": card.name, "pipeline_sha256": card.pipeline_sha256()}
    refine = stage2 if stage2 is not None else stage1
    record["mc_seed"] = getattr(refine, "seed", None) if config.stage2_mc_passes else None
    return {"cascade": record}


def cascade_predictor_from_args(args: argparse.Namespace) -> CascadePredictor | None:
    """The :class:`CascadePredictor` of ``--cascade`` (None without it), with engines built from the
    config's models (or ``--model``), ``--device``, ``--no-amp``, ``--sw-batch-size`` and the dropout
    seed (``--seed`` or ``--dropout-seed``) where the command has them."""
    path = getattr(args, "cascade", None)
    if path is None:
        return None
    config = load_cascade_config(path)
    from ..inference import InferenceEngine, resolve_model

    first = config.model_path(1) or getattr(args, "model", None)
    if first is None:
        raise ConformalSegError(
            "the cascade config has no stage1_model and no --model was given",
            path=config.path,
            fix="set stage1_model in the cascade config or pass --model",
        )
    seed = getattr(args, "dropout_seed", None)
    seed = getattr(args, "seed", 0) if seed is None else seed
    options: dict[str, Any] = {
        "device": getattr(args, "device", "auto"),
        "amp": not getattr(args, "no_amp", False),
        "sw_batch_size": getattr(args, "sw_batch_size", None),
        "seed": seed,
    }
    stage1 = InferenceEngine(resolve_model(first), **options)
    second = config.model_path(2)
    stage2 = InferenceEngine(resolve_model(second), **options) if second is not None else None
    lungs = getattr(args, "cascade_lungs", None)
    return CascadePredictor(config, stage1, stage2, lungs_dir=lungs)
