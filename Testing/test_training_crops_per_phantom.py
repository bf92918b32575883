"""Several crops per generated phantom (``conformalseg train --phantom-stream --crops-per-phantom K``):
sample ``i`` is a crop of phantom ``i // K`` with the sample's own seed, exactly as written in
:mod:`ConformalSegLib.training.phantom_stream` (``K = 1`` is the one-phantom-per-sample stream, sample for
sample); each phantom is generated once; the batches do not depend on the loader workers; the checks,
the card's record, resuming (old checkpoints resume as one crop per phantom) and the command line.
Tiny phantoms and networks, CPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from test_training import TINY_ARGS, run_cli  # noqa: E402
from test_training_recipe import DYN, STREAM  # noqa: E402
from test_training_weight_average import check_a_later_setting_resumes  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.inference import resolve_model  # noqa: E402
from ConformalSegLib.phantoms.labels import LESION  # noqa: E402
from ConformalSegLib.training import (  # noqa: E402
    AugmentationConfig,
    PhantomStream,
    PhantomStreamSampler,
    TrainingConfig,
    build_card,
    train,
)
from ConformalSegLib.training.data import prepare_case  # noqa: E402
from ConformalSegLib.training.patches import sample_patch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GENERATED: list[int] = []


class CountingStream(PhantomStream):
    """The test stream, noting in :data:`GENERATED` each phantom it generates."""

    def training_case(self, index: int):
        GENERATED.append(int(index))
        return super().training_case(index)


def _sampler(tmp_path, crops: int, *, stream: PhantomStream = STREAM, batch_size: int = 4, workers: int = 0):
    config = TrainingConfig(**{**DYN, "batch_size": batch_size, "crops_per_phantom": crops})
    return PhantomStreamSampler(
        stream,
        build_card(config, tmp_path),
        (LESION,),
        config.crops,
        batch_size=batch_size,
        steps_per_epoch=2,
        fg_fraction=0.5,
        augmentation=AugmentationConfig(),
        num_workers=workers,
        crops_per_phantom=crops,
    )


def _as_documented(sampler: PhantomStreamSampler, index: int, crops: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``index`` built from the module docstring's formula, with nothing cached."""
    case = STREAM.training_case(index // crops)
    prepared = prepare_case(sampler.card, case, (LESION,), sampler.patch_size)
    rng = np.random.default_rng((STREAM.seed, 2, index))
    image, lesion, _ = sample_patch(
        prepared, sampler.patch_size, rng, fg_fraction=0.5, augmentation=AugmentationConfig()
    )
    return image, lesion


@pytest.mark.parametrize("crops", [1, 2])
def test_sample_i_is_a_crop_of_phantom_i_div_k(tmp_path, crops):
    sampler = _sampler(tmp_path, crops)
    for index in range(4):  # in order: the later crops of a phantom come from the kept phantom
        got, want = sampler.sample(index), _as_documented(sampler, index, crops)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # two crops of one phantom are different crops (own position, foreground draw and augmentation)
    assert not torch.equal(sampler.sample(2)[0], sampler.sample(3)[0])


def test_each_phantom_is_generated_once_and_workers_do_not_matter(tmp_path):
    GENERATED.clear()
    serial = list(_sampler(tmp_path, 2, stream=CountingStream(STREAM.seed, dict(STREAM.options))).epoch(1))
    assert GENERATED == [4, 5, 6, 7]  # epoch 1: samples 8..15 are crops of phantoms 4..7
    parallel = list(_sampler(tmp_path, 2, workers=2).epoch(1))
    assert len(serial) == len(parallel) == 2
    for (x, y), (u, v) in zip(serial, parallel):
        assert x.shape == (4, 1, 16, 16, 8) and torch.equal(x, u) and torch.equal(y, v)
    sampler = _sampler(tmp_path, 2)
    assert torch.equal(serial[1][0][3], sampler.sample(15)[0])  # batch 1 of epoch 1 holds samples 12..15


@pytest.mark.parametrize("crops", [0, 3, True, 1.5])
def test_a_k_that_does_not_divide_the_batch_is_refused(tmp_path, crops):
    with pytest.raises(ConformalSegError, match=r"crops per phantom must be a whole number >= 1 that divides") as info:
        TrainingConfig(**{**DYN, "batch_size": 4, "crops_per_phantom": crops}).validate()
    assert "--crops-per-phantom 2 with --batch-size 4" in str(info.value)
    if crops in (0, 3):
        with pytest.raises(ValueError, match="divide the batch size"):
            PhantomStreamSampler(
                STREAM, None, (LESION,), (16, 16, 8), batch_size=4, steps_per_epoch=1, fg_fraction=0.5,
                augmentation=None, crops_per_phantom=crops,
            )  # fmt: skip


def test_a_run_records_it_and_resumes_only_under_the_same_k(tmp_path):
    out = tmp_path / "two"
    train(TrainingConfig(**{**DYN, "crops_per_phantom": 2}), STREAM, STREAM.heldout_cases(1), out)
    training = resolve_model(out).training
    assert training["crops_per_phantom"] == 2 and training["train_cases"] == 2 * 2 * 2
    assert training["train_case_ids"] == "a fresh phantom per 2 samples (see data)"
    assert training["data"]["train"] == (
        "sample i = a crop of make_phantom(SeedSequence(11, spawn_key=(0, i // 2))), "
        "a fresh phantom per 2 training samples"
    )
    assert STREAM.describe()["train"].startswith("sample i = make_phantom(SeedSequence(11, spawn_key=(0, i)))")
    # before the setting existed every run drew one crop per phantom
    check_a_later_setting_resumes(tmp_path / "resume", "crops_per_phantom", 2, "crops_per_phantom", 1)


def test_cli_option(tmp_path, monkeypatch):
    stream = ["--phantom-stream", "--phantom-seed", "5", "--heldout", "1", "--steps-per-epoch", "2"]
    out = tmp_path / "m"
    assert run_cli(*stream, "--out", str(out), "--crops-per-phantom", "2", *TINY_ARGS) == 0
    training = resolve_model(out).training
    assert training["crops_per_phantom"] == 2 and "--crops-per-phantom 2 " in training["command"]
    assert "i // 2" in training["data"]["train"]
    plain = tmp_path / "p"
    assert run_cli(*stream, "--out", str(plain), *TINY_ARGS) == 0
    assert "--crops-per-phantom" not in resolve_model(plain).training["command"]  # the default is left unspelled
    with pytest.raises(ConformalSegError, match="--crops-per-phantom serves --phantom-stream") as info:
        run_cli("--phantoms", "2", "--out", str(tmp_path / "a"), "--crops-per-phantom", "2", *TINY_ARGS)
    assert "--samples-per-case" in str(info.value)
    with pytest.raises(ConformalSegError, match="--crops-per-phantom serves --phantom-stream"):
        run_cli("--task", "denoise", "--phantoms", "2", "--out", str(tmp_path / "b"), "--crops-per-phantom", "2")
    generated = []
    monkeypatch.setattr(PhantomStream, "heldout_cases", lambda self, n: generated.append(n) or [])
    with pytest.raises(ConformalSegError, match="divides the batch size"):
        run_cli(*stream, "--out", str(tmp_path / "c"), "--crops-per-phantom", "3", *TINY_ARGS)
    assert generated == []  # refused before any phantom is generated
    assert not any((tmp_path / name).exists() for name in "abc")
