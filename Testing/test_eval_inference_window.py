"""``benchmarks/eval_inference_window.py`` compares sliding windows of one set of weights: its card copies
must change the window and nothing else, or its table compares different models."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_inference_window as W  # noqa: E402

from ConformalSegLib.inference import InferenceEngine, resolve_model  # noqa: E402
from ConformalSegLib.io.volumes import Volume  # noqa: E402
from ConformalSegLib.phantoms.generator import make_phantom  # noqa: E402


def test_window_card_changes_only_the_window(tmp_path: Path) -> None:
    shipped = resolve_model(W.MODEL)
    same = resolve_model(W.window_card(W.MODEL, "card", tmp_path / "card"))
    other = resolve_model(W.window_card(W.MODEL, "64x64x48@0.5", tmp_path / "w64"))
    assert same.pipeline_sha256() == shipped.pipeline_sha256()
    assert other.pipeline_sha256() != shipped.pipeline_sha256()
    assert tuple(other.inference.patch_size) == (64, 64, 48) and other.inference.overlap == 0.5
    assert other.sha256() == same.sha256() == shipped.sha256()  # the same weights
    assert other.preprocessing == shipped.preprocessing and other.output == shipped.output

    phantom = make_phantom(7)  # the default 96 x 96 x 48 phantom: one window of the card, four of 64x64x48
    volume = Volume(phantom.image, phantom.geometry, None)
    a = InferenceEngine(same, device="cpu", seed=0).predict(volume).probability
    b = InferenceEngine(shipped, device="cpu", seed=0).predict(volume).probability
    c = InferenceEngine(other, device="cpu", seed=0).predict(volume).probability
    assert np.array_equal(a, b)  # the copied weights are the weights
    assert not np.array_equal(a, c)  # and the window takes effect
