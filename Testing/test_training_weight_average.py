"""The weight average of training (``conformalseg train --ema-decay D``): it is the exponential moving
average of the trained weights step by step (hand values), it leaves the training itself bit-identical,
it and the raw weights are both validated and the best of either is selected and written (the rule on
scripted scores, the record on real runs), it resumes bit-identically, old checkpoints without the
setting still resume, and bad values are refused clearly. Tiny networks, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY_ARGS, run_cli  # noqa: E402
from test_training_recipe import DYN, STREAM  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import (  # noqa: E402
    TrainingCancelled,
    TrainingConfig,
    run_state,
    train,
)
from ConformalSegLib.training.checkpoint import Checkpoint, default_checkpoint_path  # noqa: E402
from ConformalSegLib.training.run_state import epoch_candidate  # noqa: E402
from ConformalSegLib.training.weight_average import WeightAverage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def _epochs(folder: Path) -> list[dict]:
    return json.loads((folder / "training.json").read_text())["epochs"]


def test_the_average_is_the_exponential_moving_average_by_hand():
    layer = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(layer, decay=0.75)
    expected = None
    for value in (4.0, 8.0, -2.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
        expected = value if expected is None else 0.75 * expected + 0.25 * value  # the first update copies
        assert float(average.network.weight.detach()) == pytest.approx(expected, abs=1e-6)
    assert average.updates == 3 and expected == pytest.approx(0.75 * (0.75 * 4 + 0.25 * 8) + 0.25 * -2.0)  # 3.25
    assert float(layer.weight.detach()) == -2.0  # the trained module is only read


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2.0, True])
def test_bad_decays_are_refused(decay):
    with pytest.raises(ConformalSegError, match="strictly between 0 and 1"):
        TrainingConfig(**{**DYN, "ema_decay": decay}).validate()


def test_the_training_is_unchanged_and_the_average_is_selected_and_written(tmp_path):
    heldout = STREAM.heldout_cases(1)
    train(TrainingConfig(**DYN), STREAM, heldout, tmp_path / "plain")
    train(TrainingConfig(**{**DYN, "ema_decay": 0.5}), STREAM, heldout, tmp_path / "ema")
    plain, ema = _epochs(tmp_path / "plain"), _epochs(tmp_path / "ema")
    # the raw trajectory is bit-identical: same losses, and the raw weights validate exactly as before
    assert [e["loss"] for e in ema] == [e["loss"] for e in plain]
    assert [e["val_dice_raw"] for e in ema] == [e["val_dice"] for e in plain]
    card = resolve_model(tmp_path / "ema")
    assert card.training["ema_decay"] == 0.5 and resolve_model(tmp_path / "plain").training["ema_decay"] is None
    assert resolve_model(tmp_path / "plain").training["selected_weights"] == "raw"
    # the selection runs over both columns: each epoch's candidate by epoch_candidate, the best over epochs
    candidates = [epoch_candidate(e["val_dice"], e["val_dice_raw"]) for e in ema]
    best = max(range(len(ema)), key=lambda i: (candidates[i][1], i)) + 1
    assert card.training["selected_epoch"] == best
    assert (card.training["selected_weights"], card.training["selected_val_dice"]) == candidates[best - 1]
    if card.training["selected_weights"] == "raw":  # the raw trajectory is the plain run's: same weights
        plain_card = resolve_model(tmp_path / "plain").training
        if plain_card["selected_epoch"] == best:
            a, b = _weights(tmp_path / "ema"), _weights(tmp_path / "plain")
            assert all(torch.equal(a[k], b[k]) for k in a)

    # without held-out cases the final average is written: with a decay near 0 it is the final raw
    # weights (so the average is fed the weights after every step), with 0.5 it is not
    train(TrainingConfig(**DYN), STREAM, [], tmp_path / "raw")
    train(TrainingConfig(**{**DYN, "ema_decay": 1e-9}), STREAM, [], tmp_path / "near0")
    train(TrainingConfig(**{**DYN, "ema_decay": 0.5}), STREAM, [], tmp_path / "half")
    raw, near0, half = (_weights(tmp_path / n) for n in ("raw", "near0", "half"))
    assert all(torch.allclose(raw[k], near0[k], atol=1e-6) for k in raw)
    assert not all(torch.allclose(raw[k], half[k], atol=1e-4) for k in raw)


@pytest.mark.parametrize(
    ("average", "raw", "expected"),
    [
        (0.5, 0.6, ("raw", 0.6)),
        (0.6, 0.5, ("average", 0.6)),
        (0.5, 0.5, ("average", 0.5)),  # a tie goes to the average
        (None, 0.4, ("raw", 0.4)),
        (0.4, None, ("average", 0.4)),
        (None, None, ("average", None)),  # nothing scored (no held-out lesion): nothing to compare
    ],
)
def test_epoch_candidate_rule(average, raw, expected):
    assert epoch_candidate(average, raw) == expected


def test_the_best_of_either_weights_is_kept_over_epochs(tmp_path, monkeypatch):
    """Scripted validation scores (average, raw) per epoch: the kept weights are the scripted winner's,
    the epoch the last one reaching the maximum (``>=``), and the checkpoint records which weights."""
    scripted = [(0.30, 0.20), (0.35, 0.50), (0.40, 0.45), (0.50, 0.50), (0.20, 0.10)]
    # epoch candidates: average 0.30, raw 0.50, raw 0.45, average 0.50 (tie -> average), average 0.20;
    # best: epoch 4 (0.50 ties epoch 2's raw 0.50; the later one wins, as without an average)
    network = torch.nn.Linear(1, 1, bias=False)
    config = TrainingConfig(**{**DYN, "epochs": len(scripted), "ema_decay": 0.5})
    run = run_state.RunState(config, None, network, torch.device("cpu"), ["a held-out case"], tmp_path / "c.pt")
    assert run.average is not None
    calls: list[str] = []

    def fake_validation(net, cases, card, device):
        epoch = len(calls) // 2
        which = "average" if net is run.average.network else "raw"
        calls.append(which)
        score = scripted[epoch][0 if which == "average" else 1]
        return {"val_dice": score, "val_cases_with_lesion": 1, "val_cls_pc": 1 - score}

    monkeypatch.setattr(run_state, "validation_dice", fake_validation)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    seen = []
    for epoch in range(len(scripted)):
        with torch.no_grad():
            network.weight.fill_(10.0 + epoch)  # the raw weights of this epoch
        run.average.update()
        run.on_epoch_end(epoch, {"epoch": epoch + 1, "loss": 0.0}, optimizer, None)
        seen.append((run.best.epoch, run.best.weights, float(run.best.state["weight"])))
        saved = Checkpoint.load(tmp_path / "c.pt", config.to_json())
        assert (saved.best_epoch, saved.best_weights, saved.best_score) == (
            run.best.epoch,
            run.best.weights,
            run.best.score,
        )
    assert calls == ["average", "raw"] * len(scripted)
    averages = [float(v) for v in (10.0, 10.5, 11.25, 12.125, 13.0625)]  # first update copies, then d = 0.5
    assert seen == [
        (1, "average", averages[0]),
        (2, "raw", 11.0),
        (2, "raw", 11.0),
        (4, "average", averages[3]),
        (4, "average", averages[3]),
    ]
    assert [e["val_dice_raw"] for e in run.log] == [r for _, r in scripted]
    assert [(e["val_cls_pc"], e["val_cls_pc_raw"]) for e in run.log] == [(1 - a, 1 - r) for a, r in scripted]
    run.keep_selected()
    assert float(network.weight.detach()) == averages[3]


def test_a_checkpoint_naming_unknown_best_weights_is_refused(tmp_path):
    config = TrainingConfig(**{**DYN, "ema_decay": 0.5})
    layer = torch.nn.Linear(1, 1)
    path = tmp_path / "c.pt"
    Checkpoint(config.to_json(), 1, layer.state_dict(), {}, None, None, None, None, [], torch.get_rng_state(),
               best_weights="raw").save(path)  # fmt: skip
    assert Checkpoint.load(path, config.to_json()).best_weights == "raw"
    saved = torch.load(path, weights_only=True)
    saved["best_weights"] = "ensemble"
    torch.save(saved, path)
    with pytest.raises(ConformalSegError, match="unknown best weights 'ensemble'") as info:
        Checkpoint.load(path, config.to_json())
    assert str(path) in str(info.value)


def train_interrupted(config: TrainingConfig, heldout: list, out: Path, epochs_done: int) -> Path:
    """Train ``config`` into ``out``, cancelled in the epoch after ``epochs_done``; the checkpoint's path."""
    steps = {"n": 0}

    def stop() -> bool:
        steps["n"] += 1
        return steps["n"] > epochs_done * config.steps_per_epoch

    with pytest.raises(TrainingCancelled):
        train(config, STREAM, heldout, out, cancel=stop)
    return default_checkpoint_path(out)


def as_written_before(path: Path, setting: str, *fields: str) -> None:
    """Rewrite the checkpoint at ``path`` as a version before ``setting`` existed wrote it: the setting
    absent from its configuration, and the checkpoint ``fields`` added with it absent too."""
    saved = torch.load(path, weights_only=True)
    config_json = json.loads(saved["config_json"])
    del config_json[setting]
    saved["config_json"] = json.dumps(config_json, sort_keys=True)
    for name in fields:
        del saved[name]
    torch.save(saved, path)


def check_a_later_setting_resumes(tmp_path: Path, key: str, value: object, card_key: str, default: object) -> None:
    """A setting added to the configuration later (``key``; ``value`` is not its default): a run resumes
    only under the same value (any other is refused naming the key) and its card records it under
    ``card_key``; a checkpoint written before the setting existed resumes as the default
    (``checkpoint.LATER_DEFAULTS``) and is refused as ``value``."""
    heldout = STREAM.heldout_cases(1)
    config = TrainingConfig(**{**DYN, "epochs": 3, key: value})
    plain = TrainingConfig(**{**DYN, "epochs": 3})
    out = tmp_path / "run"
    train_interrupted(config, heldout, out, epochs_done=2)
    with pytest.raises(ConformalSegError, match=rf"other settings \({key}\)"):
        train(plain, STREAM, heldout, out, resume=True)
    train(config, STREAM, heldout, out, resume=True)
    assert resolve_model(out).training[card_key] == value

    old = tmp_path / "old"
    as_written_before(train_interrupted(plain, heldout, old, epochs_done=2), key)
    with pytest.raises(ConformalSegError, match=rf"other settings \({key}\)"):
        train(config, STREAM, heldout, old, resume=True)
    train(plain, STREAM, heldout, old, resume=True)
    assert resolve_model(old).training[card_key] == default


def test_resume_with_the_average_is_bit_identical_and_old_checkpoints_resume(tmp_path):
    config = TrainingConfig(**{**DYN, "epochs": 3, "ema_decay": 0.5})
    heldout = STREAM.heldout_cases(1)
    train(config, STREAM, heldout, tmp_path / "whole")
    out = tmp_path / "resumed"
    train_interrupted(config, heldout, out, epochs_done=2)
    with pytest.raises(ConformalSegError, match=r"other settings \(ema_decay\)"):
        train(TrainingConfig(**{**DYN, "epochs": 3}), STREAM, heldout, out, resume=True)
    train(config, STREAM, heldout, out, resume=True)
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _epochs(tmp_path / "whole") == [
        {**e, "seconds": w["seconds"]} for e, w in zip(_epochs(out), _epochs(tmp_path / "whole"))
    ]

    # a checkpoint written before the setting existed has no "ema_decay" key: it resumes as "off"
    plain = TrainingConfig(**{**DYN, "epochs": 3})
    old = tmp_path / "old"
    path = train_interrupted(plain, heldout, old, epochs_done=2)
    as_written_before(path, "ema_decay", "weight_average", "best_weights")
    train(plain, STREAM, heldout, old, resume=True)
    assert resolve_model(old).training["ema_decay"] is None


def test_cli_option(tmp_path):
    out = tmp_path / "m"
    assert run_cli("--phantoms", "1", "--heldout", "0", "--out", str(out), "--ema-decay", "0.9", *TINY_ARGS) == 0
    training = resolve_model(out).training
    assert training["ema_decay"] == 0.9 and "--ema-decay 0.9 " in training["command"]
    plain = tmp_path / "p"
    assert run_cli("--phantoms", "1", "--heldout", "0", "--out", str(plain), *TINY_ARGS) == 0
    assert "--ema-decay" not in resolve_model(plain).training["command"]
    with pytest.raises(ConformalSegError, match="strictly between 0 and 1"):
        run_cli("--phantoms", "1", "--out", str(tmp_path / "a"), "--ema-decay", "1", *TINY_ARGS)
    with pytest.raises(ConformalSegError, match="--ema-decay serves the lesion and roi tasks"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "b"), "--ema-decay", "0.9")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
