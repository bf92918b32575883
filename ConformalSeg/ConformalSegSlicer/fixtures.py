"""Test data for the module's self-tests (in Slicer) and for pytest (outside): no Slicer here.

* :func:`make_slider_fixture`: synthetic CT-like cases (:mod:`ConformalSegLib.phantoms.simulated_maps`), CLS,
  expected-FNR and confidence-set profiles calibrated on all but the last case
  (:func:`ConformalSegLib.conformal.calibration.calibrate`), and that last case as the "new scan".
* :func:`make_interval_fixture`: a per-organ sem-CRC interval profile calibrated on synthetic
  interval scans (:mod:`ConformalSegLib.semcrc.synthetic`) and the next scan with its organs as
  named segment masks.
* :func:`make_tiny_model`: a tiny MONAI UNet state dict and its model card
  (``ConformalSegLib/inference/model_card.py`` format) for an end-to-end run on the CPU;
  :func:`tiny_model_unavailable_reason` says why it cannot run (library without ``inference``,
  no torch/MONAI, or a CLI without ``infer``).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from .slider import SliderSettings

#: Two slider settings the self-test checks segment by segment against the library. The second
#: asks for alpha = 0.04 on 19 scans (24 are needed): the CLS mask must be the whole image.
SLIDER_CHECKS: tuple[SliderSettings, ...] = (
    SliderSettings(epsilon=0.1, alpha=0.2, alpha_inner=0.2, alpha_outer=0.2, include_threshold=True),
    SliderSettings(epsilon=0.25, alpha=0.04, alpha_inner=0.1, alpha_outer=0.3, include_threshold=False),
)


@dataclass
class SliderFixture:
    case: object  # ConformalSegLib.phantoms.simulated_maps.SyntheticCase: image, probability, lesion, geometry
    profiles: dict[str, Path] = field(default_factory=dict)  # method -> profile JSON

    @property
    def profile_paths(self) -> list[Path]:
        return [self.profiles[m] for m in ("cls", "crc", "sets") if m in self.profiles]


def make_slider_fixture(
    out_dir: str | PathLike[str],
    *,
    n_calibration: int = 19,
    shape: tuple[int, int, int] = (20, 40, 40),
    seed: int = 7,
    methods: tuple[str, ...] = ("cls", "crc", "sets"),
) -> SliderFixture:
    """Calibrate ``methods`` on ``n_calibration`` synthetic cases; the next case is the test scan."""
    from ConformalSegLib.conformal.calibration import CalibrationRequest, calibrate
    from ConformalSegLib.phantoms.simulated_maps import make_cases

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(make_cases(n_calibration + 1, seed, shape=shape))
    calibration, test = cases[:-1], cases[-1]
    requests = {
        "cls": CalibrationRequest("cls", epsilon=0.1, alpha=0.2),
        "crc": CalibrationRequest("crc", epsilon=0.1),
        "sets": CalibrationRequest(
            "sets", alpha_inner=0.2, alpha_outer=0.2, inner_transform="identity", outer_transform="distance:0.5"
        ),
    }
    fixture = SliderFixture(test)
    for method in methods:
        profile = calibrate(calibration, requests[method])
        json_path, _ = profile.save(out / f"{method}.json", force=True)
        fixture.profiles[method] = json_path
    return fixture


# ----------------------------------------------------------------------------- tiny model

TINY_NETWORK_ARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
    "dropout": 0.2,
}


def tiny_model_unavailable_reason() -> str | None:
    """Why the tiny-model end-to-end test cannot run here, or None when it can."""
    if importlib.util.find_spec("ConformalSegLib.inference") is None:
        return "ConformalSegLib.inference is missing (this library version has no network inference)"
    for package in ("torch", "monai"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (install PyTorch from the PyTorch extension, then MONAI)"
    try:
        from ConformalSegLib.cli import COMMANDS
    except ImportError as exc:  # pragma: no cover - CLI changed
        return f"cannot inspect the conformalseg CLI ({exc})"
    if not any(module.__name__.rsplit(".", 1)[-1] == "infer_cmd" for module in COMMANDS):
        return "the conformalseg CLI has no 'infer' command yet"
    return None


#: The preprocessing, inference and output sections of the self-test's model cards (CT window, small patches).
_TINY_PIPELINE = {
    "preprocessing": {
        "orientation": None,
        "spacing_mm": None,
        "intensity": {"kind": "window", "a_min": -200, "a_max": 300, "b_min": 0.0, "b_max": 1.0, "clip": True},
    },
    "inference": {"patch_size": [32, 32, 16], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 2},
    "output": {"activation": "softmax", "lesion_channel": 1},
}


def make_tiny_model(out_dir: str | PathLike[str], *, seed: int = 0) -> Path:
    """A folder with ``model_card.json`` and ``unet.pt`` (random weights): a valid model for
    ``conformalseg infer --model FOLDER`` that runs in seconds on the CPU."""
    import torch
    from monai.networks.nets import UNet

    from ConformalSegLib.inference.card_format import CARD_FILE, FORMAT, FORMAT_VERSION
    from ConformalSegLib.inference.model_card import load_model_card

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    network = UNet(**TINY_NETWORK_ARGS)
    torch.save(network.state_dict(), folder / "unet.pt")
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": "conformalseg-selftest-tiny-unet",
        "source": {"state_dict": {"network": "UNet", "args": TINY_NETWORK_ARGS, "weights": "unet.pt"}},
        **_TINY_PIPELINE,
        "training": {"data": "none: random weights for the ConformalSeg self-test"},
    }
    path = folder / CARD_FILE
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    load_model_card(path)  # fails here, with the card's own message, if the format moved on
    return folder


def make_code_model_card(out_dir: str | PathLike[str]) -> Path:
    """A TorchScript model card whose archive is dummy bytes (never loaded): a model that needs the trust
    confirmation, for testing the question and its memory without running anything."""
    from ConformalSegLib.inference.card_format import FORMAT, FORMAT_VERSION

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.ts").write_bytes(b"not a real TorchScript archive")
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": "conformalseg-selftest-torchscript",
        "source": {"torchscript": "net.ts"},
        **_TINY_PIPELINE,
    }
    path = folder / "net.json"
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return folder / "net.ts"


# ----------------------------------------------------------------------------- sem-CRC intervals


@dataclass
class IntervalFixture:
    """A per-organ sem-CRC profile calibrated on synthetic scans, and the next scan as the "new scan".

    ``segments`` are that scan's organs as segment masks named the way a user might name them
    (other capitalisation, a ``Body`` segment, an extra segment that is no organ); ``labels`` is
    the scan's original label map (the library's reference for the expected result).
    """

    profile_path: Path
    lower: object  # numpy (z, y, x) float32 arrays
    upper: object
    truth: object
    labels: object
    segments: dict = field(default_factory=dict)  # segment name -> bool mask

    def expected(self, with_truth: bool = True):
        """The library's result on the original label map: ``apply_interval(...)``."""
        from ConformalSegLib.semcrc import apply_interval, load_interval_profile

        return apply_interval(
            load_interval_profile(self.profile_path),
            self.lower,
            self.upper,
            self.labels,
            truth=self.truth if with_truth else None,
        )


#: Segment names of the fixture's organs (matched to the profile's lower-case names case-insensitively).
INTERVAL_SEGMENT_NAMES = {"liver": "Liver", "spleen": "SPLEEN", "kidney": " Kidney", "pancreas": "Pancreas"}


def interval_fixture_unavailable_reason() -> str | None:
    """Why :func:`make_interval_fixture` cannot run here (sem-CRC calibration needs cvxpy), or None."""
    if importlib.util.find_spec("cvxpy") is None:
        return "cvxpy is not installed (sem-CRC calibration solves a convex problem with it: pip install cvxpy)"
    return None


def make_interval_fixture(
    out_dir: str | PathLike[str],
    *,
    n_calibration: int = 30,
    shape: tuple[int, int, int] = (2, 24, 24),
    seed: int = 5,
    method: str = "sem-crc-organ",
    epsilon: float = 0.1,
) -> IntervalFixture:
    """Calibrate ``method`` on ``n_calibration`` synthetic interval scans
    (:func:`ConformalSegLib.semcrc.synthetic_intervals`, background excluded) and write the profile
    ``out_dir/intervals.json``; the scan after them is the new scan (seed 5: liver and spleen present,
    kidney and pancreas absent)."""
    import warnings

    import numpy as np

    from ConformalSegLib.semcrc import IntervalProfile, calibrate_semcrc, calibrate_semcrc_organ, synthetic_intervals
    from ConformalSegLib.semcrc.synthetic import BODY_LABEL, SyntheticIntervals

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    syn = synthetic_intervals(n_calibration + 1, shape=shape, seed=seed)
    train = SyntheticIntervals(syn.lower[:-1], syn.upper[:-1], syn.truth[:-1], syn.labels[:-1], syn.organs)
    calibrate = {"sem-crc": calibrate_semcrc, "sem-crc-organ": calibrate_semcrc_organ}[method]
    with warnings.catch_warnings():  # an organ rare in the calibration scans may be uncontrollable: reported
        warnings.simplefilter("ignore")
        calibration = calibrate(train.data("nonzero"), epsilon, n_opt=n_calibration // 3, seed=0)
    path = out / "intervals.json"
    IntervalProfile(calibration, syn.organs, "nonzero", {"data": "ConformalSegSlicer.fixtures (synthetic)"}).save(
        path, force=True
    )
    labels = syn.labels[-1]
    segments = {}
    for value, organ in sorted(syn.organs.labels.items()):
        mask = labels == value
        if mask.any():
            segments[INTERVAL_SEGMENT_NAMES.get(organ, organ)] = mask
    segments["Body"] = labels == BODY_LABEL
    marker = np.zeros(labels.shape, dtype=bool)  # a segment that is no organ, inside the body: counts as body
    marker[tuple(np.argwhere(labels == BODY_LABEL)[0])] = True
    segments["Needle tip"] = marker
    return IntervalFixture(path, syn.lower[-1], syn.upper[-1], syn.truth[-1], labels, segments)


@dataclass(frozen=True)
class MaskFixture:
    """A mask-only margin profile (``calibrate --masks``, one structure) and a new predicted label map."""

    profile_path: Path
    labels: Any  # uint8 (z, y, x) predicted label map of the new scan (structure: value 1)
    geometry: Any  # its Geometry
    expected: dict  # {"Inner set": bool array, "Outer set": bool array}: the library's sets at the profile's alpha


def make_mask_fixture(out_dir: str | PathLike[str], *, n_calibration: int = 12, seed: int = 3) -> MaskFixture:
    """Calibrate distance margins (alpha 0.2) on ``n_calibration`` synthetic ellipsoid label maps (the
    prediction shifted and scaled at random against the truth) and write ``out_dir/margins.json``."""
    import numpy as np

    from ConformalSegLib.common.geometry import Geometry
    from ConformalSegLib.conformal.calibration import CalibrationRequest
    from ConformalSegLib.conformal.mask_sets import calibrate_structures, structure_map
    from ConformalSegLib.io.segmentation import INNER_SET, OUTER_SET

    shape = (10, 16, 16)
    geometry = Geometry(shape, spacing=(1.0, 1.25, 2.0))
    grid = np.indices(shape).reshape(3, -1).T.astype(float)
    rng = np.random.default_rng(seed)

    def case():
        centre, radii = np.array([5.0, 8.0, 8.0]) + rng.normal(0, 0.7, 3), np.array([3.0, 4.0, 4.0])
        truth = ((((grid - centre) / radii) ** 2).sum(axis=-1) <= 1.0).reshape(shape).astype(np.uint8)
        moved = (grid - centre - rng.normal(0, 0.6, 3)) / (radii * rng.uniform(0.8, 1.2, 3))
        return ((moved**2).sum(axis=-1) <= 1.0).reshape(shape).astype(np.uint8), truth

    cases = [(f"case{i:02d}", *case(), geometry) for i in range(n_calibration)]
    request = CalibrationRequest(method="sets", alpha=0.2, inner_transform="distance", outer_transform="distance")
    profile = calibrate_structures(cases, {"structure": (1,)}, request)["structure"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "margins.json"
    profile.save(path, force=True)
    labels, _truth = case()
    inner, outer = profile.masks(structure_map(labels, (1,)), geometry).values()
    return MaskFixture(path, labels, geometry, {INNER_SET: inner, OUTER_SET: outer})
