"""The training forward pass in bfloat16 mixed precision (``conformalseg train --precision bf16``): the
context really lowers the convolutions and leaves the loss in float32, a bf16 run trains, is
deterministic, differs from the fp32 run only by rounding (its gradient is the fp32 gradient up to a small
angle) and writes float32 weights; checks, resuming (old checkpoints resume as fp32; the other precision
is refused) and the command line. Tiny networks, CPU."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY_ARGS, run_cli  # noqa: E402
from test_training_recipe import DYN, STREAM  # noqa: E402
from test_training_weight_average import check_a_later_setting_resumes  # noqa: E402

from ConformalSegLib.cli.train_options import PRECISION_CHOICES  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import TrainingConfig, train, trainer  # noqa: E402
from ConformalSegLib.training.networks import build_network  # noqa: E402
from ConformalSegLib.training.precision import PRECISIONS, check_precision, forward_precision  # noqa: E402
from ConformalSegLib.training.trainer import training_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def _weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def _losses(folder) -> list[float]:
    return [e["loss"] for e in json.loads((folder / "training.json").read_text())["epochs"]]


def test_choices_checks_and_refusals(monkeypatch):
    assert PRECISION_CHOICES == PRECISIONS == ("fp32", "bf16")
    with pytest.raises(ConformalSegError, match="unknown training precision 'fp16'") as info:
        TrainingConfig(**{**DYN, "precision": "fp16"}).validate()
    assert "fp32, bf16" in str(info.value)
    with pytest.raises(ConformalSegError, match="unknown training precision"):
        with forward_precision(CPU, "half"):
            pass
    check_precision("bf16", CPU)  # the CPU always has it (fast or not)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
    with pytest.raises(ConformalSegError, match=r"this GPU \(Old GPU\) does not support bfloat16") as info:
        check_precision("bf16", torch.device("cuda"))
    assert "--precision fp32" in str(info.value)
    check_precision("fp32", torch.device("cuda"))  # float32 needs nothing


def test_the_context_lowers_convolutions_only_under_bf16():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 6, 6, 6)
    with forward_precision(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    with forward_precision(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32  # and only inside
    assert conv.weight.dtype == torch.float32  # the weights themselves stay float32


def test_the_bf16_gradient_is_the_fp32_gradient_up_to_rounding():
    """Same weights, same batch: the loss agrees to a few parts in a thousand and the gradient points the
    same way (cosine > 0.99), but it is not the fp32 gradient (the forward pass really ran in bf16)."""
    torch.manual_seed(0)
    network = build_network(TrainingConfig(**DYN).network, TrainingConfig(**DYN).network_args())
    network.eval()  # no dropout: the two passes differ by their arithmetic only
    images = torch.rand(2, 1, 16, 16, 8)
    targets = (torch.rand(2, 1, 16, 16, 8) > 0.8).float()
    results = {}
    for precision in PRECISIONS:
        network.zero_grad(set_to_none=True)
        loss = training_loss(network, TrainingConfig(**{**DYN, "precision": precision}), CPU)(images, targets)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])
        results[precision] = (float(loss.detach()), grad)
    (loss32, grad32), (loss16, grad16) = results["fp32"], results["bf16"]
    assert loss16 != loss32 and abs(loss16 - loss32) < 5e-3 * abs(loss32)
    assert not torch.equal(grad16, grad32)
    assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99


def test_the_loss_sees_float32_heads(tmp_path, monkeypatch):
    seen: list[torch.dtype] = []
    real = trainer.supervised_loss

    def spy(loss_fn, heads, targets, uncertainty=None):
        seen.extend(h.dtype for h in heads)
        return real(loss_fn, heads, targets, uncertainty)

    monkeypatch.setattr(trainer, "supervised_loss", spy)
    train(TrainingConfig(**{**DYN, "epochs": 1, "precision": "bf16"}), STREAM, [], tmp_path / "m")
    assert seen and set(seen) == {torch.float32}


def test_a_bf16_run_trains_deterministically_and_writes_float32_weights(tmp_path):
    heldout = STREAM.heldout_cases(1)
    runs = {}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16_again", "bf16")):
        runs[name] = tmp_path / name
        train(TrainingConfig(**{**DYN, "epochs": 2, "precision": precision}), STREAM, heldout, runs[name])
    w32, w16, w16b = (_weights(runs[n]) for n in ("fp32", "bf16", "bf16_again"))
    assert all(t.dtype == torch.float32 for t in w16.values() if t.is_floating_point())
    assert all(torch.equal(w16[k], w16b[k]) for k in w16)  # same seed and threads: the same bytes
    assert not all(torch.equal(w16[k], w32[k]) for k in w16)  # the arithmetic did change
    l32, l16 = _losses(runs["fp32"]), _losses(runs["bf16"])
    assert l16 == _losses(runs["bf16_again"]) and l16 != l32
    assert all(abs(a - b) < 0.05 * a for a, b in zip(l32, l16))  # two epochs of rounding apart, not two runs
    card = resolve_model(runs["bf16"])
    assert card.training["precision"] == "bf16" and resolve_model(runs["fp32"]).training["precision"] == "fp32"


def test_resume_keeps_the_precision_and_old_checkpoints_resume_as_fp32(tmp_path):
    # before the setting existed every run was float32
    check_a_later_setting_resumes(tmp_path, "precision", "bf16", "precision", "fp32")


def test_cli_option(tmp_path):
    out = tmp_path / "m"
    assert run_cli("--phantoms", "2", "--heldout", "1", "--out", str(out), "--precision", "bf16", *TINY_ARGS) == 0
    training = resolve_model(out).training
    assert training["precision"] == "bf16" and "--precision bf16 " in training["command"]
    plain = tmp_path / "p"
    assert run_cli("--phantoms", "2", "--heldout", "1", "--out", str(plain), *TINY_ARGS) == 0
    assert "--precision" not in resolve_model(plain).training["command"]  # the default is left unspelled
    with pytest.raises(SystemExit):
        run_cli("--phantoms", "1", "--out", str(tmp_path / "a"), "--precision", "fp16", *TINY_ARGS)
    with pytest.raises(ConformalSegError, match="--precision serves the lesion and roi tasks"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "b"), "--precision", "bf16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
