"""Trust confirmation of the Slicer panel (issue 16), tested without Slicer.

Which models need ``--trust-model-code`` (the library's own test, :func:`runs_code`), the question
naming the folder and what runs, the session memory per pipeline fingerprint, the child-process
variant the panel uses, and the flag reaching the CLI's own option.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ConformalSeg"))

from ConformalSegLib.cli import build_parser  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference.model_card import resolve_model  # noqa: E402
from ConformalSegLib.inference.networks import TRUST_ENV, require_trust, runs_code  # noqa: E402
from ConformalSegSlicer import commands, trust  # noqa: E402


def _card(source: dict) -> dict:
    return {
        "format": "conformalseg-model-card",
        "format_version": 1,
        "name": "tiny",
        "source": source,
        "preprocessing": {
            "orientation": "RAS",
            "spacing_mm": [1.0, 1.0, 1.0],
            "intensity": {"kind": "window", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        },
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 1},
        "output": {"activation": "softmax", "lesion_channel": 1},
    }


def _write(path: Path, data: dict | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    """A state-dict card, a TorchScript file with its card, a MONAI bundle (weights are dummy bytes:
    nothing here loads a network)."""
    sd = tmp_path / "sd"
    _write(sd / "weights.pt", b"weights")
    _write(sd / "model_card.json", _card({"state_dict": {"network": "UNet", "args": {}, "weights": "weights.pt"}}))
    ts = tmp_path / "ts"
    _write(ts / "tiny.ts", b"torchscript")
    _write(ts / "tiny.json", _card({"torchscript": "tiny.ts"}))
    bundle = tmp_path / "bundle"
    _write(bundle / "configs" / "inference.json", {"imports": ["$import torch"], "network_def": {"_target_": "UNet"}})
    _write(bundle / "models" / "model.pt", b"bundle weights")
    _write(bundle / "configs" / "model_card.json", _card({"bundle": ".."}))
    return {"sd": sd, "ts": ts / "tiny.ts", "bundle": bundle}


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


def test_which_models_need_trust(models):
    assert trust.trust_request(models["sd"]) is None
    ts = trust.trust_request(models["ts"])
    bundle = trust.trust_request(models["bundle"])
    assert ts is not None and bundle is not None
    # the same test as the library's loader (require_trust refuses exactly these)
    for kind, request in (("ts", ts), ("bundle", bundle)):
        card = resolve_model(models[kind])
        assert request.what == runs_code(card.source)
        assert request.fingerprint == card.pipeline_sha256()
        with pytest.raises(ConformalSegError, match="--trust-model-code"):
            require_trust(card.source, card.path)
    require_trust(resolve_model(models["sd"]).source, None)  # plain weights: never refused
    assert ts.folder == models["ts"].parent.resolve()
    assert bundle.folder == models["bundle"].resolve()
    assert "TorchScript" in ts.what and "MONAI bundle" in bundle.what


def test_message_names_the_folder_and_what_runs(models):
    request = trust.trust_request(models["bundle"])
    assert request is not None
    text = request.message
    assert str(models["bundle"].resolve()) in text
    assert "MONAI bundle (its config runs Python expressions)" in text
    assert "'tiny'" in text and "executes code" in text
    assert "until Slicer is closed" in text and text.rstrip().endswith("Run this model?")
    assert trust.TITLE == "Run code from the model folder?"


def test_decide_asks_once_per_fingerprint(models):
    asked: list[tuple[str, str]] = []
    answers = [False, True]

    def ask(title, message):
        asked.append((title, message))
        return answers.pop(0)

    memory = trust.TrustedModels()
    assert trust.decide(None, memory, ask) is False and not asked  # plain weights: no question
    request = trust.trust_request(models["ts"])
    assert trust.decide(request, memory, ask) is None  # "No": do not run, not remembered
    assert request not in memory
    assert trust.decide(request, memory, ask) is True  # "Yes"
    assert trust.decide(request, memory, ask) is True and len(asked) == 2  # remembered: not asked again
    assert asked[0] == (trust.TITLE, request.message)
    # other weights: another fingerprint, asked again
    models["ts"].write_bytes(b"other torchscript")
    changed = trust.trust_request(models["ts"])
    assert changed.fingerprint != request.fingerprint and changed not in memory
    memory.forget_all()
    assert request not in memory
    assert "x" not in memory


def test_request_in_child_matches(models):
    for kind in ("sd", "ts", "bundle"):
        assert trust.request_in_child(models[kind], sys.executable, os.environ) == trust.trust_request(models[kind])
    with pytest.raises(ConformalSegError, match="model not found"):
        trust.request_in_child(models["sd"].parent / "missing", sys.executable, os.environ)


def test_main_prints_json(models, capsys):
    assert trust.main([str(models["sd"])]) == 0
    assert json.loads(capsys.readouterr().out) is None
    assert trust.main([str(models["ts"])]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["folder"] == str(models["ts"].parent.resolve()) and len(data["fingerprint"]) == 64
    assert trust.main([]) == 2


def test_trust_flag_reaches_the_cli_option():
    plain = commands.infer_command("py", model="m", images="i", out_dir="o")
    trusted = commands.infer_command("py", model="m", images="i", out_dir="o", trust_model_code=True)
    assert "--trust-model-code" not in plain
    assert trusted == [*plain[:-1], "--trust-model-code", plain[-1]]  # before --force
    parser = build_parser()
    assert parser.parse_args(trusted[3:]).trust_model_code is True
    assert parser.parse_args(plain[3:]).trust_model_code is False


def test_self_test_fixture_needs_trust(tmp_path):
    from ConformalSegSlicer import fixtures

    model = fixtures.make_code_model_card(tmp_path / "m")
    request = trust.trust_request(model)
    assert request is not None and request.folder == model.parent.resolve() and "TorchScript" in request.what
    assert trust.request_in_child(model, sys.executable, os.environ) == request
