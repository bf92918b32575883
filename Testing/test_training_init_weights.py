"""Fine-tuning from a trained model (``conformalseg train --init-weights MODEL``): the run starts from
exactly that model's weights, records their checksum and the option in its card, refuses a model of
another architecture or whose weights changed, and is refused for the denoiser. Tiny networks, CPU."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY, TINY_ARGS, run_cli  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import TrainingConfig, phantom_cases, train  # noqa: E402
from ConformalSegLib.training.initial_weights import initial_weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cases():
    return phantom_cases(1, seed=3, shape=(16, 32, 32), n_lesions=(1, 2), empty_probability=0.0)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, cases):
    """A tiny trained model (the library's UNet, one epoch on one phantom) to start from."""
    out = tmp_path_factory.mktemp("parent") / "m"
    train(TrainingConfig(**{**TINY, "epochs": 1}), cases, [], out)
    return out


def _weights(folder):
    return torch.load(folder / "weights.pt", weights_only=True)


def test_the_run_starts_from_the_parent_weights(parent, cases, tmp_path):
    sha = resolve_model(parent).sha256()
    # A learning rate of 1e-12 leaves the weights where they started, to within float rounding.
    config = TrainingConfig(**{**TINY, "epochs": 1, "learning_rate": 1e-12, "weight_decay": 0.0})
    train(dataclasses.replace(config, init_weights_sha256=sha), cases, [], tmp_path / "ft", init_weights=parent)
    train(config, cases, [], tmp_path / "fresh")
    start, tuned, fresh = _weights(parent), _weights(tmp_path / "ft"), _weights(tmp_path / "fresh")
    assert all(torch.allclose(start[k], tuned[k], atol=1e-6) for k in start)
    assert not all(torch.allclose(start[k], fresh[k], atol=1e-3) for k in start)
    assert resolve_model(tmp_path / "ft").training["init_weights_sha256"] == sha
    assert resolve_model(tmp_path / "fresh").training["init_weights_sha256"] is None


def test_cli_records_the_option_and_the_checksum(tmp_path):
    cli_parent, out = tmp_path / "parent", tmp_path / "ft"
    assert run_cli("--phantoms", "1", "--heldout", "0", "--out", str(cli_parent), *TINY_ARGS) == 0
    assert (
        run_cli("--phantoms", "1", "--heldout", "0", "--out", str(out), "--init-weights", str(cli_parent), *TINY_ARGS)
        == 0
    )
    training = resolve_model(out).training
    assert f"--init-weights {cli_parent}" in training["command"]
    assert training["init_weights_sha256"] == resolve_model(cli_parent).sha256()
    # more filters per level widen the model (test_training_widening.py); fewer are refused
    with pytest.raises(
        ConformalSegError,
        match=r"filters: \[4, 8, 16\] \(model\) vs \[4, 8, 8\] \(this run\) \(widening cannot remove filters",
    ):
        run_cli(
            "--phantoms", "1", "--heldout", "0", "--out", str(tmp_path / "a"), "--init-weights", str(cli_parent),
            *TINY_ARGS, "--channels", "4", "8", "8",
        )  # fmt: skip
    assert not (tmp_path / "a").exists()
    wide = tmp_path / "wide"
    widened = ["--phantoms", "1", "--heldout", "0", "--out", str(wide), "--init-weights", str(cli_parent)]
    assert run_cli(*widened, *TINY_ARGS, "--channels", "4", "8", "32") == 0
    assert resolve_model(wide).source.args["filters"] == [4, 8, 32]
    assert resolve_model(wide).training["init_weights_sha256"] == resolve_model(cli_parent).sha256()


def test_refusals(parent, cases, tmp_path):
    with pytest.raises(ConformalSegError, match=r"channels: \[4, 8, 16\] \(model\) vs \[4, 8, 32\]"):
        initial_weights(parent, "unet", TrainingConfig(**{**TINY, "channels": (4, 8, 32)}).network_args())
    with pytest.raises(ConformalSegError, match="the model is a UNet, this run builds a DynUNet"):
        initial_weights(parent, "dynunet", TrainingConfig(**{**TINY, "network": "dynunet"}).network_args())
    config = TrainingConfig(**{**TINY, "epochs": 1, "init_weights_sha256": "0" * 64})
    with pytest.raises(ConformalSegError, match="initial weights changed"):
        train(config, cases, [], tmp_path / "b", init_weights=parent)
    with pytest.raises(ConformalSegError, match="go together"):
        train(TrainingConfig(**{**TINY, "epochs": 1}), cases, [], tmp_path / "c", init_weights=parent)
    with pytest.raises(ConformalSegError, match="lesion and roi tasks"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "d"), "--init-weights", str(parent))
    with pytest.raises(ConformalSegError, match="model not found"):
        run_cli("--phantoms", "1", "--out", str(tmp_path / "e"), "--init-weights", str(tmp_path / "nope"), *TINY_ARGS)
    assert not any(p.name in "bcde" for p in tmp_path.iterdir())
