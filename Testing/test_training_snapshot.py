"""Snapshots of an unfinished training run (``conformalseg train ... --snapshot DIR``): the folder holds the
weights the run would write if it ended now, measured and recorded like a finished run's with the epochs done;
the checkpoint is not touched, so the run resumes bit-identically; bad requests are refused before anything
is read or written. Tiny networks, CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY_ARGS, run_cli  # noqa: E402
from test_training_recipe import DYN, STREAM  # noqa: E402
from test_training_weight_average import train_interrupted  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import TrainingConfig, snapshot, train, trainer  # noqa: E402
from ConformalSegLib.training.checkpoint import default_checkpoint_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_snapshot_writes_the_best_weights_so_far_and_the_run_resumes_unchanged(tmp_path):
    config = TrainingConfig(**{**DYN, "epochs": 3, "ema_decay": 0.5})
    heldout = STREAM.heldout_cases(1)
    train(config, STREAM, heldout, tmp_path / "whole")
    out = tmp_path / "run"
    ckpt = train_interrupted(config, heldout, out, epochs_done=2)
    before = _sha(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 2 and saved["best_epoch"] is not None

    rng = torch.get_rng_state()
    result = snapshot(config, STREAM, heldout, tmp_path / "snap", ckpt, command="conformalseg train ...")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random numbers are left alone
    assert _sha(ckpt) == before and not out.exists()  # the checkpoint is only read; the run's --out stays free
    weights = _weights(tmp_path / "snap")
    assert all(torch.equal(weights[k], saved["best_network"][k]) for k in weights)
    training = resolve_model(tmp_path / "snap").training
    assert training["snapshot"] == {"epochs_done": 2, "epochs_planned": 3}
    assert training["selected_epoch"] == saved["best_epoch"] == result.best_epoch
    assert training["selected_weights"] == saved["best_weights"] in ("raw", "average")
    assert training["selected_val_dice"] == saved["best_score"]
    assert training["train_cases"] == 2 * config.steps_per_epoch * config.batch_size  # samples drawn so far
    assert abs(training["train_seconds"] - saved["elapsed_seconds"]) < 1.0  # the run's time, not the snapshot's
    assert training["command"] == "conformalseg train ..."
    log = json.loads((tmp_path / "snap" / "training.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["heldout"] == result.heldout
    assert "snapshot" not in resolve_model(tmp_path / "whole").training  # a finished run's card has none

    # the run goes on from the untouched checkpoint and ends exactly where the uninterrupted run did
    train(config, STREAM, heldout, out, resume=True)
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not ckpt.exists()

    # without a checkpoint (the run has finished) nothing is written
    with pytest.raises(ConformalSegError, match="no training checkpoint to take a snapshot of") as info:
        snapshot(config, STREAM, heldout, tmp_path / "late", ckpt)
    assert str(ckpt) in str(info.value) and not (tmp_path / "late").exists()


def test_cli_snapshot(tmp_path, monkeypatch):
    out, snap = tmp_path / "m", tmp_path / "m_now"
    args = ["--phantoms", "1", "--heldout", "1", "--out", str(out), *TINY_ARGS]

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt  # after the last epoch's checkpoint, before the model folder

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_publish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_cli(*args)
    ckpt = default_checkpoint_path(out)
    assert ckpt.is_file() and not out.exists()

    with pytest.raises(ConformalSegError, match="does not go with --resume"):
        run_cli(*args, "--snapshot", str(snap), "--resume")
    with pytest.raises(ConformalSegError, match="another folder than --out"):
        run_cli(*args, "--snapshot", str(out))
    with pytest.raises(ConformalSegError, match="--snapshot serves the lesion and roi tasks"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "d"), "--snapshot", str(snap))
    with pytest.raises(ConformalSegError, match="other settings \\(epochs\\)"):
        run_cli(*args, "--epochs", "2", "--snapshot", str(snap))  # the options must be the run's own
    assert not snap.exists()

    before = _sha(ckpt)
    assert run_cli(*args, "--snapshot", str(snap), "--force") == 0
    assert _sha(ckpt) == before and not out.exists()
    training = resolve_model(snap).training
    assert training["snapshot"] == {"epochs_done": 1, "epochs_planned": 1}
    assert "--snapshot" not in training["command"] and "--force" not in training["command"]  # the run's command
    assert f"--out {out}" in training["command"]
    with pytest.raises(ConformalSegError, match="exists"):
        run_cli(*args, "--snapshot", str(snap))  # an existing folder needs --force
    assert run_cli(*args, "--resume") == 0 and out.is_dir() and not ckpt.exists()
