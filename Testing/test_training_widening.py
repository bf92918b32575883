"""Widening a trained DynUNet (``conformalseg train --init-weights MODEL --channels`` with more filters):
the wider network computes what the narrow one computed (every head, any widths at least the old ones),
its copies are not copies of each other's weights (symmetry broken), the draw is seeded, anything but
the filters must match, and the whole path runs from the CLI and records the parent. Tiny networks, CPU."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training_recipe import DYN, STREAM  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.training import TrainingConfig, train  # noqa: E402
from ConformalSegLib.training.initial_weights import initial_weights  # noqa: E402
from ConformalSegLib.training.networks import build_network, network_args  # noqa: E402
from ConformalSegLib.training.widening import widen_dynunet, widening_difference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STRIDES = ((2, 2, 1), (2, 2, 2), (2, 2, 2))


def _net(channels, *, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    args = network_args("dynunet", channels, STRIDES, dropout=dropout, deep_supervision=True)
    network = build_network("dynunet", args)
    with torch.no_grad():  # instance-norm scales and shifts away from 1 and 0, so the copy of them is tested
        for name, p in network.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return network


@pytest.mark.parametrize("wider", [(8, 16, 32, 64), (6, 9, 20, 40), (4, 8, 16, 33), (8, 16, 16, 32)])
def test_the_widened_network_computes_the_same(wider):
    old, new = _net((4, 8, 16, 32)), _net(wider, seed=1)
    image = torch.rand(2, 1, 32, 32, 16)
    widen_dynunet(old, new, seed=3)
    old.eval(), new.eval()
    with torch.no_grad():
        a, b = old(image), new(image)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    old.train(), new.train()  # dropout 0: training mode is deterministic and returns every supervision head
    with torch.no_grad():
        a, b = old(image), new(image)
    assert a.shape == b.shape and a.shape[1] == 3
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_copies_get_different_read_weights_and_the_draw_is_seeded():
    old = _net((4, 8, 16, 32))
    one, two, other = _net((8, 16, 32, 64)), _net((8, 16, 32, 64)), _net((8, 16, 32, 64))
    widen_dynunet(old, one, seed=3)
    widen_dynunet(old, two, seed=3)
    widen_dynunet(old, other, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True))
    assert not torch.equal(one.input_block.conv2.conv.weight, other.input_block.conv2.conv.weight)
    # channel j + 4 copies channel j: the same filter written ...
    written = one.input_block.conv1.conv.weight
    torch.testing.assert_close(written[4:], written[:4])
    # ... but read with different shares, which sum to the old weight
    read = one.downsamples[0].conv1.conv.weight
    assert not torch.allclose(read[:, :4], read[:, 4:])
    torch.testing.assert_close(read[:, :4] + read[:, 4:], old.downsamples[0].conv1.conv.weight[one_map(16, 8)])


def one_map(new: int, old: int) -> torch.Tensor:
    return torch.arange(new) % old


def test_only_the_filters_may_grow():
    base = network_args("dynunet", (4, 8, 16), STRIDES[:2], dropout=0.1, deep_supervision=True)
    assert widening_difference(base, {**base, "filters": [8, 8, 32]}) is None
    assert "cannot remove filters: level 1" in widening_difference(base, {**base, "filters": [8, 4, 32]})
    assert "number of levels" in widening_difference(base, {**base, "filters": [8, 8, 32, 64]})
    assert "dropout" in widening_difference(base, {**base, "filters": [8, 8, 32], "dropout": 0.0})
    with pytest.raises(ConformalSegError, match="cannot widen"):
        widen_dynunet(_net((4, 8, 16, 32)), _net((4, 8, 8, 32)), seed=0)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    out = tmp_path_factory.mktemp("parent") / "m"
    train(TrainingConfig(**{**DYN, "epochs": 1}), STREAM, [], out)
    return out


def test_training_starts_from_the_narrow_models_function(parent, tmp_path):
    sha = resolve_model(parent).sha256()
    wide = TrainingConfig(**{**DYN, "channels": (8, 8, 24), "epochs": 1, "init_weights_sha256": sha})
    state, got = initial_weights(parent, "dynunet", wide.network_args(), seed=wide.seed)
    assert got == sha
    network = build_network("dynunet", wide.network_args())
    network.load_state_dict(state)
    narrow = resolve_model(parent).load_network()
    network.eval(), narrow.eval()
    image = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(network(image), narrow(image), atol=1e-4, rtol=1e-4)
    result = train(wide, STREAM, STREAM.heldout_cases(1), tmp_path / "wide", init_weights=parent)
    card = resolve_model(tmp_path / "wide")
    assert card.source.args["filters"] == [8, 8, 24] and card.training["init_weights_sha256"] == sha
    assert len(result.epoch_losses) == 1
    # narrower than the model, or another stride: refused with the reason, nothing written
    for other in ({"channels": (2, 8, 16)}, {"strides": ((2, 2, 2), (2, 2, 2))}):
        config = dataclasses.replace(wide, **other)
        with pytest.raises(ConformalSegError, match="another network"):
            train(config, STREAM, [], tmp_path / "refused", init_weights=parent)
    assert not (tmp_path / "refused").exists()
