"""Which epoch's weights a run writes (``conformalseg train --select-by {dice,cls-pc,last}``): the score of
each rule (hand values), the kept epoch over scripted validation scores with and without a weight average
(ties to the later epoch), the card's record on real runs (the training itself unchanged by the rule),
resuming (old checkpoints without the setting resume as ``dice``; another rule is refused), and the
command line. Tiny networks, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY_ARGS, run_cli  # noqa: E402
from test_training_recipe import DYN, STREAM  # noqa: E402
from test_training_weight_average import check_a_later_setting_resumes  # noqa: E402

from ConformalSegLib.cli.train_options import SELECTION_CHOICES  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import TrainingConfig, run_state, train  # noqa: E402
from ConformalSegLib.training.config import SELECTION_RULES  # noqa: E402
from ConformalSegLib.training.run_state import BestWeights, selected_values, selection_score  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _epochs(folder: Path) -> list[dict]:
    return json.loads((folder / "training.json").read_text())["epochs"]


@pytest.mark.parametrize(
    "rule, dice, pc, expected",
    [
        ("dice", 0.6, 0.04, 0.6),
        ("dice", None, 0.04, None),  # no held-out lesion: nothing to score
        ("cls-pc", 0.6, 0.04, -0.04),  # a smaller guaranteed mask scores higher
        ("cls-pc", 0.6, None, None),
        ("cls-pc", None, 0.0, -0.0),
        ("last", None, None, 0.0),  # every epoch scores the same: with >= the last one is kept
        ("last", 0.9, 0.01, 0.0),
    ],
)
def test_selection_score(rule, dice, pc, expected):
    assert selection_score(rule, dice, pc) == expected


def test_unknown_rules_are_refused_and_the_cli_choices_are_the_rules():
    assert SELECTION_CHOICES == SELECTION_RULES == ("dice", "cls-pc", "last")
    with pytest.raises(ValueError, match="unknown selection rule 'pc'"):
        selection_score("pc", 0.5, 0.1)
    with pytest.raises(ConformalSegError, match="unknown epoch selection rule 'pc'") as info:
        TrainingConfig(**{**DYN, "select_by": "pc"}).validate()
    assert "dice, cls-pc, last" in str(info.value)


# (val_dice, val_cls_pc) per epoch. dice: best 0.6 at epochs 2 and 4 -> 4 (the later); cls-pc: smallest
# 0.03 at epochs 3 and 5 -> 5; last: 5. Epoch 6 has no held-out lesion (None, None): never kept by dice or
# cls-pc, kept by last.
SCRIPTED = [(0.5, 0.08), (0.6, 0.05), (0.4, 0.03), (0.6, 0.04), (0.55, 0.03), (None, None)]


@pytest.mark.parametrize("rule, kept", [("dice", 4), ("cls-pc", 5), ("last", 6)])
def test_the_rule_picks_the_epoch_over_scripted_scores(tmp_path, monkeypatch, rule, kept):
    network = torch.nn.Linear(1, 1, bias=False)
    config = TrainingConfig(**{**DYN, "epochs": len(SCRIPTED), "select_by": rule})
    run = run_state.RunState(config, None, network, torch.device("cpu"), ["a held-out case"], tmp_path / "c.pt")

    def fake_validation(net, cases, card, device):
        dice, pc = SCRIPTED[len(run.log)]
        return {"val_dice": dice, "val_cases_with_lesion": 0 if dice is None else 1, "val_cls_pc": pc}

    monkeypatch.setattr(run_state, "validation_dice", fake_validation)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    for epoch in range(len(SCRIPTED)):
        with torch.no_grad():
            network.weight.fill_(10.0 + epoch)  # this epoch's weights
        run.on_epoch_end(epoch, {"epoch": epoch + 1, "loss": 0.0}, optimizer, None)
    assert run.best.epoch == kept
    assert selected_values(run.epochs, run.best) == SCRIPTED[kept - 1]
    run.keep_selected()
    assert float(network.weight.detach()) == 10.0 + kept - 1


def test_with_a_weight_average_the_lower_cls_cost_of_either_competes(tmp_path, monkeypatch):
    # (average, raw) CLS cost per epoch: epoch 1 average 0.05 (tie -> average); epoch 2 raw 0.02; epoch 3
    # average 0.02 (a tie with epoch 2: the later epoch). The kept weights are epoch 3's average.
    scripted = [(0.05, 0.05), (0.04, 0.02), (0.02, 0.03)]
    network = torch.nn.Linear(1, 1, bias=False)
    config = TrainingConfig(**{**DYN, "epochs": 3, "ema_decay": 0.5, "select_by": "cls-pc"})
    run = run_state.RunState(config, None, network, torch.device("cpu"), ["a held-out case"], tmp_path / "c.pt")
    assert run.average is not None
    calls: list[str] = []

    def fake_validation(net, cases, card, device):
        which = "average" if net is run.average.network else "raw"
        pc = scripted[len(calls) // 2][0 if which == "average" else 1]
        calls.append(which)
        return {"val_dice": 1.0 - pc, "val_cases_with_lesion": 1, "val_cls_pc": pc}

    monkeypatch.setattr(run_state, "validation_dice", fake_validation)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    seen = []
    for epoch in range(3):
        with torch.no_grad():
            network.weight.fill_(10.0 + epoch)
        run.average.update()
        run.on_epoch_end(epoch, {"epoch": epoch + 1, "loss": 0.0}, optimizer, None)
        seen.append((run.best.epoch, run.best.weights))
    assert seen == [(1, "average"), (2, "raw"), (3, "average")]
    assert selected_values(run.epochs, run.best) == (0.98, 0.02)
    assert selected_values(run.epochs, BestWeights(-0.02, 2, None, "raw")) == (0.98, 0.02)
    assert selected_values(run.epochs, BestWeights()) == (None, None)


def test_real_runs_record_the_rule_and_the_training_is_unchanged(tmp_path):
    heldout = STREAM.heldout_cases(2)
    folders = {}
    for rule in SELECTION_RULES:
        folders[rule] = tmp_path / rule
        train(TrainingConfig(**{**DYN, "epochs": 3, "select_by": rule}), STREAM, heldout, folders[rule])
    logs = {rule: [{k: v for k, v in e.items() if k != "seconds"} for e in _epochs(f)] for rule, f in folders.items()}
    assert logs["dice"] == logs["cls-pc"] == logs["last"]  # the rule only picks among the same epochs
    log = logs["dice"]
    assert all(e["val_cls_pc"] is not None for e in log)
    expected = {
        "dice": max(range(3), key=lambda i: (log[i]["val_dice"], i)) + 1,
        "cls-pc": max(range(3), key=lambda i: (-log[i]["val_cls_pc"], i)) + 1,
        "last": 3,
    }
    for rule, folder in folders.items():
        training = resolve_model(folder).training
        kept = expected[rule]
        assert training["selected_by"] == rule and training["selected_epoch"] == kept
        assert training["selected_val_dice"] == log[kept - 1]["val_dice"]
        assert training["selected_val_cls_pc"] == log[kept - 1]["val_cls_pc"]
    weights = {rule: torch.load(f / "weights.pt", weights_only=True) for rule, f in folders.items()}
    for a in SELECTION_RULES:
        for b in SELECTION_RULES:
            same = all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])
            assert same == (expected[a] == expected[b])


def test_resume_keeps_the_rule_and_old_checkpoints_resume_as_dice(tmp_path):
    # a checkpoint written before the setting existed had its epochs chosen by Dice
    check_a_later_setting_resumes(tmp_path, "select_by", "cls-pc", "selected_by", "dice")


def test_cli_option(tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli("--phantoms", "2", "--heldout", "1", "--out", str(out), "--select-by", "last", *TINY_ARGS) == 0
    training = resolve_model(out).training
    assert training["selected_by"] == "last" and "--select-by last " in training["command"]
    assert training["selected_epoch"] == training["epochs"]
    assert "the last epoch" in capsys.readouterr().out
    plain = tmp_path / "p"
    assert run_cli("--phantoms", "2", "--heldout", "1", "--out", str(plain), *TINY_ARGS) == 0
    training = resolve_model(plain).training
    assert training["selected_by"] == "dice" and "--select-by" not in training["command"]
    with pytest.raises(SystemExit):
        run_cli("--phantoms", "1", "--out", str(tmp_path / "a"), "--select-by", "pc", *TINY_ARGS)
    with pytest.raises(ConformalSegError, match="--select-by serves the lesion and roi tasks"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "b"), "--select-by", "last")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_last_with_a_weight_average_keeps_the_last_epochs_average(tmp_path, monkeypatch):
    network = torch.nn.Linear(1, 1, bias=False)
    config = TrainingConfig(**{**DYN, "epochs": 3, "ema_decay": 0.5, "select_by": "last"})
    run = run_state.RunState(config, None, network, torch.device("cpu"), ["a held-out case"], tmp_path / "c.pt")
    assert run.average is not None
    monkeypatch.setattr(
        run_state, "validation_dice", lambda *a: {"val_dice": 0.5, "val_cases_with_lesion": 1, "val_cls_pc": 0.1}
    )
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    for epoch in range(3):
        with torch.no_grad():
            network.weight.fill_(10.0 + epoch)
        run.average.update()
        run.on_epoch_end(epoch, {"epoch": epoch + 1, "loss": 0.0}, optimizer, None)
        assert (run.best.epoch, run.best.weights) == (epoch + 1, "average")
    run.keep_selected()
    assert float(network.weight.detach()) == 11.25  # 10, then (10 + 11) / 2, then (10.5 + 12) / 2
