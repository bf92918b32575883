"""``train(time_limit=...)`` / ``conformalseg train --time-limit``: a run that would not finish in time stops
cleanly after an epoch, writes the best weights so far as its model folder (recorded as a snapshot stopped
by the time limit) and keeps its checkpoint, and the same run resumed finishes bit-identical to a run never
stopped. The clock is scripted, so the tests do not depend on the machine's speed. Tiny networks, CPU."""

from __future__ import annotations

import argparse

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY_ARGS, run_cli  # noqa: E402
from test_training_recipe import DYN, STREAM  # noqa: E402

from ConformalSegLib.cli.train_options import duration_seconds  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import TrainingConfig, train, trainer  # noqa: E402
from ConformalSegLib.training.checkpoint import default_checkpoint_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ScriptedClock:
    """``time.perf_counter`` for the trainer: each call advances by ``tick`` seconds (so an epoch, which
    reads the clock a fixed number of times, takes a fixed scripted time)."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def test_a_run_that_fits_is_unchanged(tmp_path):
    heldout = STREAM.heldout_cases(1)
    config = TrainingConfig(**{**DYN, "epochs": 3})
    plain = train(config, STREAM, heldout, tmp_path / "plain")
    limited = train(config, STREAM, heldout, tmp_path / "limited", time_limit=3600.0)
    assert not plain.stopped_early and not limited.stopped_early
    assert "snapshot" not in resolve_model(limited.out).training
    assert not default_checkpoint_path(limited.out).exists()
    a, b = _weights(plain.out), _weights(limited.out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_stops_when_another_epoch_would_not_fit_and_resumes_bit_identically(tmp_path, monkeypatch):
    heldout = STREAM.heldout_cases(1)
    config = TrainingConfig(**{**DYN, "epochs": 4})
    whole = train(config, STREAM, heldout, tmp_path / "whole")

    # every clock read advances 1 s; an epoch then takes a fixed number of seconds E (measured with a
    # long limit), and a limit of 2.5 E lets exactly one epoch through (1 E done, 1 E + 2 E > 2.5 E)
    clock = ScriptedClock(1.0)
    monkeypatch.setattr(trainer.time, "perf_counter", clock)
    out = tmp_path / "run"
    first = train(config, STREAM, heldout, out, time_limit=1e9)
    epoch_seconds = clock.now / (len(first.epoch_losses) + 1)  # an upper bound: setup and publishing included
    clock.now = 0.0
    stopped = train(config, STREAM, heldout, out, force=True, time_limit=2.5 * epoch_seconds)
    assert stopped.stopped_early and 1 <= len(stopped.epoch_losses) < 4
    training = resolve_model(out).training
    done = len(stopped.epoch_losses)
    assert training["snapshot"] == {"epochs_done": done, "epochs_planned": 4, "stopped_by": "time limit"}
    assert default_checkpoint_path(out).exists()  # the run can go on
    monkeypatch.undo()

    with pytest.raises(ConformalSegError, match="exists"):  # its model folder is not replaced silently
        train(config, STREAM, heldout, out, resume=True)
    resumed = train(config, STREAM, heldout, out, resume=True, force=True)
    assert not resumed.stopped_early and not default_checkpoint_path(out).exists()
    assert "snapshot" not in resolve_model(out).training
    a, b = _weights(whole.out), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.epoch_losses == whole.epoch_losses


def test_at_least_one_epoch_runs_and_the_limit_must_be_positive(tmp_path, monkeypatch):
    heldout = STREAM.heldout_cases(1)
    config = TrainingConfig(**{**DYN, "epochs": 3})
    monkeypatch.setattr(trainer.time, "perf_counter", ScriptedClock(100.0))
    result = train(config, STREAM, heldout, tmp_path / "m", time_limit=1.0)  # already over after one epoch
    assert result.stopped_early and len(result.epoch_losses) == 1
    for bad in (0.0, -5.0, float("nan")):
        with pytest.raises(ConformalSegError, match="time limit must be a positive number"):
            train(config, STREAM, heldout, tmp_path / f"bad{bad}", time_limit=bad)


@pytest.mark.parametrize(
    "text, seconds", [("600", 600.0), ("600s", 600.0), ("90m", 5400.0), ("2.5h", 9000.0), ("1H", 3600.0)]
)
def test_duration_parsing(text, seconds):
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "ten", "0", "-5m", "inf", "nan"])
def test_bad_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration_seconds(text)


def test_cli_option(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    monkeypatch.setattr(trainer.time, "perf_counter", ScriptedClock(100.0))
    args = ("--phantoms", "2", "--heldout", "1", "--out", str(out), *TINY_ARGS, "--epochs", "3")
    assert run_cli(*args, "--time-limit", "1s") == 0
    printed = capsys.readouterr().out
    assert "stopped by the time limit after epoch 1 of 3" in printed and "--resume --force" in printed
    training = resolve_model(out).training
    assert training["snapshot"]["stopped_by"] == "time limit" and "--time-limit" not in training["command"]
    monkeypatch.undo()
    assert run_cli(*args, "--resume", "--force") == 0
    assert "snapshot" not in resolve_model(out).training
    with pytest.raises(ConformalSegError, match="--time-limit serves the lesion and roi tasks"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "d"), "--time-limit", "1h")
    with pytest.raises(ConformalSegError, match="takes no --time-limit"):
        run_cli(*args, "--snapshot", str(tmp_path / "s"), "--time-limit", "1h")
