"""Tests of ConformalSegLib.inference: model cards, the engine (geometry, MC dropout, OOM fallback,
cancellation), input discovery and the ``infer`` command. Tiny real networks are built in tmp
folders; everything runs on the CPU in well under a minute."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
pytest.importorskip("monai")

from monai.networks.nets import UNet  # noqa: E402

from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.inference import (  # noqa: E402
    DeviceFallbackWarning,
    InferenceCancelled,
    InferenceEngine,
    MCDropoutInactiveWarning,
    ModelCard,
    count_windows,
    find_images,
    load_model_card,
    network_affine,
    resolve_model,
)
from ConformalSegLib.inference import engine as engine_module  # noqa: E402
from ConformalSegLib.io.volumes import Volume, load_image, sitk_image  # noqa: E402

UNET_ARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
    "dropout": 0.3,
}
WINDOW = {"kind": "window", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True}


def card_dict(
    source: dict,
    *,
    orientation="RAS",
    spacing=None,
    intensity=None,
    patch=(16, 16, 16),
    activation="softmax",
    lesion_channel=1,
    sw_batch_size=4,
) -> dict:
    return {
        "format": "conformalseg-model-card",
        "format_version": 1,
        "name": "tiny-unet",
        "source": source,
        "preprocessing": {"orientation": orientation, "spacing_mm": spacing, "intensity": intensity or WINDOW},
        "inference": {"patch_size": list(patch), "overlap": 0.25, "blend": "gaussian", "sw_batch_size": sw_batch_size},
        "output": {"activation": activation, "lesion_channel": lesion_channel},
        "training": {"note": "random weights, for tests"},
    }


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [ax, ay, az], degrees=True).as_matrix()


OBLIQUE = Geometry(
    shape=(14, 22, 19),
    spacing=(1.1, 0.8, 2.3),
    origin=(12.0, -30.0, 7.5),
    direction=tuple(rotation(15, -20, 30).reshape(-1)),
)


def ct_volume(geometry: Geometry = OBLIQUE, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    array = ndimage.gaussian_filter(rng.normal(0, 1, geometry.shape), 1.5)
    array = (array / array.std() * 150 + 40).astype(np.float32)
    return Volume(array, geometry, None)


@pytest.fixture(autouse=True)
def _trusted_model_code(monkeypatch):
    """These tests load TorchScript probes and MONAI bundles written by the tests themselves."""
    monkeypatch.setenv("CONFORMALSEG_TRUST_MODEL_CODE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The same random UNet as a state-dict card, a TorchScript file + card and a MONAI bundle."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(1234)
    net = UNet(**UNET_ARGS).eval()
    # state dict + card in a folder
    (root / "sd").mkdir()
    torch.save(net.state_dict(), root / "sd" / "weights.pt")
    write_json(
        root / "sd" / "model_card.json",
        card_dict({"state_dict": {"network": "UNet", "args": UNET_ARGS, "weights": "weights.pt"}}),
    )
    # TorchScript file with its sibling card
    (root / "ts").mkdir()
    torch.jit.script(net).save(str(root / "ts" / "tiny.ts"))
    write_json(root / "ts" / "tiny.json", card_dict({"torchscript": "tiny.ts"}))
    # MONAI bundle with the card in configs/
    bundle = root / "bundle"
    (bundle / "models").mkdir(parents=True)
    write_json(
        bundle / "configs" / "inference.json",
        {"imports": ["$import torch"], "bundle_root": ".", "network_def": {"_target_": "UNet", **UNET_ARGS}},
    )
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    write_json(bundle / "configs" / "model_card.json", card_dict({"bundle": ".."}))
    # an elementwise "logit" probe: sigmoid(probe(x)) == x, so the probability map is the network input
    probe = torch.jit.script(LogitProbe())
    (root / "probe").mkdir()
    probe.save(str(root / "probe" / "probe.ts"))
    return {
        "sd": root / "sd",
        "ts": root / "ts" / "tiny.ts",
        "bundle": bundle,
        "root": root,
        "probe": root / "probe" / "probe.ts",
    }


class LogitProbe(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(1e-6, 1.0 - 1e-6)
        return torch.log(x) - torch.log1p(-x)


def probe_card(models: dict, tmp_path: Path, **kwargs) -> ModelCard:
    shutil.copy(models["probe"], tmp_path / "probe.ts")  # model files stay inside the card's folder
    data = card_dict(
        {"torchscript": "probe.ts"},
        intensity={"kind": "none"},
        activation="sigmoid",
        lesion_channel=0,
        **kwargs,
    )
    return load_model_card(write_json(tmp_path / "probe.json", data))


def engine(card, **kwargs) -> InferenceEngine:
    kwargs.setdefault("device", "cpu")
    return InferenceEngine(card, **kwargs)


# ----------------------------------------------------------------------------- model cards


def test_three_sources_load_and_agree(models):
    cards = {kind: resolve_model(models[kind]) for kind in ("sd", "ts", "bundle")}
    assert {c.source.kind for c in cards.values()} == {"state_dict", "torchscript", "bundle"}
    volume = ct_volume()
    out = {kind: engine(card).predict(volume).probability for kind, card in cards.items()}
    assert np.array_equal(out["sd"], out["bundle"])  # same eager network, same weights
    np.testing.assert_allclose(out["ts"], out["sd"], rtol=0, atol=1e-6)
    assert out["sd"].dtype == np.float32 and out["sd"].shape == volume.geometry.shape
    assert 0 <= out["sd"].min() and out["sd"].max() <= 1 and out["sd"].std() > 0
    assert len({c.sha256() for c in cards.values()}) >= 2 and all(len(c.sha256()) == 64 for c in cards.values())


def test_resolve_model_forms(models, tmp_path):
    assert resolve_model(models["sd"] / "model_card.json").name == "tiny-unet"
    assert resolve_model(models["sd"]).source.kind == "state_dict"
    assert resolve_model(models["bundle"]).source.path == models["bundle"].resolve()
    assert resolve_model(models["ts"]).source.kind == "torchscript"
    pt = tmp_path / "net.pt"  # X.pt with X.json
    pt.write_bytes(models["ts"].read_bytes())
    write_json(tmp_path / "net.json", card_dict({"torchscript": "net.pt"}))
    assert resolve_model(pt).source.path == pt.resolve()
    lonely = tmp_path / "lonely.ts"
    lonely.write_bytes(b"x")
    with pytest.raises(ConformalSegError, match="lonely.json"):
        resolve_model(lonely)
    with pytest.raises(ConformalSegError, match="model_card.json"):
        resolve_model(tmp_path)
    with pytest.raises(ConformalSegError, match="not found"):
        resolve_model(tmp_path / "missing.json")


def test_card_round_trip_and_fingerprint(models, tmp_path):
    card = resolve_model(models["sd"])
    again = ModelCard.from_dict(card.to_dict(), models["sd"] / "model_card.json")
    assert again == card
    saved = load_model_card(card.save(models["sd"] / "copy.json"))
    assert saved.to_dict() == card.to_dict() and saved.pipeline_sha256() == card.pipeline_sha256()
    data = card.to_dict()
    data["name"], data["inference"]["sw_batch_size"] = "renamed", 1
    assert ModelCard.from_dict(data, models["sd"] / "x.json").pipeline_sha256() == card.pipeline_sha256()
    data["preprocessing"]["intensity"]["a_max"] = 301.0
    assert ModelCard.from_dict(data, models["sd"] / "x.json").pipeline_sha256() != card.pipeline_sha256()


def _mutate(path: str, value):
    def apply(data: dict) -> dict:
        *parents, key = path.split(".")
        target = data
        for p in parents:
            target = target[p]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
        return data

    return apply


INVALID_CARDS = {
    "wrong format": (_mutate("format", "something-else"), "format"),
    "future version": (_mutate("format_version", 2), "newer"),
    "typo key": (
        lambda d: {**{k: v for k, v in d.items() if k != "preprocessing"}, "preprocesing": d["preprocessing"]},
        "did you mean 'preprocessing'",
    ),
    "unknown network": (_mutate("source.state_dict.network", "UNett"), "UNet"),
    "two sources": (_mutate("source.torchscript", "x.ts"), "exactly one"),
    "bad orientation": (_mutate("preprocessing.orientation", "RAX"), "orientation"),
    "negative spacing": (_mutate("preprocessing.spacing_mm", [1, -1, 1]), "positive"),
    "2d patch": (_mutate("inference.patch_size", [16, 16]), "patch_size"),
    "overlap 1": (_mutate("inference.overlap", 1.0), "overlap"),
    "relu": (_mutate("output.activation", "relu"), "activation"),
    "negative channel": (_mutate("output.lesion_channel", -1), "lesion_channel"),
    "missing output": (_mutate("output", KeyError), "output"),
    "window without a_max": (_mutate("preprocessing.intensity.a_max", KeyError), "a_max"),
}


@pytest.mark.parametrize("name", sorted(INVALID_CARDS))
def test_invalid_cards_name_the_file(models, tmp_path, name):
    mutate, expected = INVALID_CARDS[name]
    data = mutate(json.loads((models["sd"] / "model_card.json").read_text()))
    path = write_json(tmp_path / "bad_card.json", data)
    with pytest.raises(ConformalSegError) as info:
        load_model_card(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_invalid_card_files_and_weights(models, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConformalSegError, match="not valid JSON") as info:
        load_model_card(broken)
    assert str(broken) in str(info.value)
    data = json.loads((models["sd"] / "model_card.json").read_text())
    shutil.copy(models["sd"] / "weights.pt", tmp_path / "weights.pt")  # model files stay inside the card's folder
    data["source"]["state_dict"]["weights"] = "weights.pt"
    data["source"]["state_dict"]["args"] = {**UNET_ARGS, "channels": [4, 8, 32]}  # does not match the weights
    with pytest.raises(ConformalSegError, match="do not match") as info:
        engine(load_model_card(write_json(tmp_path / "mismatch.json", data)))
    assert "weights.pt" in str(info.value)
    data["source"]["state_dict"]["args"] = UNET_ARGS
    data["source"]["state_dict"]["weights"] = "missing.pt"
    with pytest.raises(ConformalSegError, match="missing.pt"):
        engine(load_model_card(write_json(tmp_path / "missing_weights.json", data)))
    data["source"]["state_dict"]["weights"] = "weights.pt"
    data["output"]["lesion_channel"] = 5  # only known once the network ran
    path = write_json(tmp_path / "channel.json", data)
    with pytest.raises(ConformalSegError, match="lesion_channel") as info:
        engine(load_model_card(path)).predict(ct_volume())
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- geometry


def test_network_input_matches_monai_loadimage_pipeline(models, tmp_path):
    """The tensor the network sees equals MONAI's LoadImage -> Orientation -> Spacing -> window on the
    same NIfTI file (so a network trained with MONAI transforms sees what it was trained on)."""
    import SimpleITK as sitk
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, ScaleIntensityRange, Spacing

    volume = ct_volume()
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk_image(volume.array, volume.geometry), str(path))
    spacing = (1.3, 0.9, 1.7)
    shutil.copy(models["sd"] / "weights.pt", tmp_path / "weights.pt")  # model files stay inside the card's folder
    card = load_model_card(
        write_json(
            tmp_path / "c.json",
            card_dict(
                {"state_dict": {"network": "UNet", "args": UNET_ARGS, "weights": "weights.pt"}},
                spacing=list(spacing),
            ),
        )
    )
    ours = engine(card)._preprocess(load_image(path).array, load_image(path)).tensor
    reference = Compose(
        [
            LoadImage(reader="NibabelReader", image_only=True),
            EnsureChannelFirst(),
            Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(spacing, mode="bilinear"),
            ScaleIntensityRange(**{k: v for k, v in WINDOW.items() if k != "kind"}),
        ]
    )(str(path))
    assert tuple(ours.shape) == tuple(reference.shape)
    np.testing.assert_allclose(ours.numpy(), reference.numpy().astype(np.float32), atol=2e-4)


def test_lps_identity_image_is_flipped_to_ras(models, tmp_path):
    """An ITK image with identity direction has +x = Left, +y = Posterior: in RAS order the first two
    network axes run the other way."""
    geometry = Geometry(shape=(6, 7, 8), spacing=(1.0, 2.0, 3.0))
    volume = Volume(np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), geometry, None)
    card = probe_card(models, tmp_path)
    tensor = engine(card)._preprocess(volume.array, volume).tensor[0].numpy()
    np.testing.assert_array_equal(tensor, volume.array.transpose(2, 1, 0)[::-1, ::-1, :])
    affine = network_affine(geometry)
    np.testing.assert_allclose(affine[:3, :3], np.diag([-1.0, -2.0, 3.0]))


@pytest.mark.parametrize(
    "intensity", [WINDOW, {"kind": "zscore"}, {"kind": "zscore", "mean": 40.0, "std": 150.0}, {"kind": "none"}]
)
def test_intensity_normalisation(models, tmp_path, intensity):
    volume = ct_volume()
    shutil.copy(models["probe"], tmp_path / "probe.ts")
    data = card_dict(
        {"torchscript": "probe.ts"},
        orientation=None,
        intensity=intensity,
        activation="sigmoid",
        lesion_channel=0,
    )
    tensor = engine(load_model_card(write_json(tmp_path / "c.json", data)))._preprocess(volume.array, volume).tensor
    x = volume.array.transpose(2, 1, 0)[None].astype(np.float64)
    expected = {
        "window": lambda: np.clip((x + 200) / 500, 0, 1),
        "none": lambda: x,
        "zscore": lambda: (x - 40) / 150 if "mean" in intensity else (x - x.mean()) / x.std(),
    }[intensity["kind"]]()
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-4)


def test_invalid_images_are_rejected(models, tmp_path):
    eng = engine(probe_card(models, tmp_path))
    bad = ct_volume()
    bad.array[3, 4, 5] = np.nan
    with pytest.raises(ConformalSegError, match="NaN"):
        eng.predict(Volume(bad.array, bad.geometry, "ct.nii.gz"))
    with pytest.raises(ConformalSegError, match="shape"):
        eng.predict(Volume(np.zeros((4, 5, 6), np.float32), OBLIQUE, None))


def test_probability_lands_on_input_grid_without_resampling(models, tmp_path):
    volume = ct_volume()
    values = 1 / (1 + np.exp(-volume.array / 100))  # in (0, 1): the probe returns them unchanged
    volume = Volume(values.astype(np.float32), volume.geometry, None)
    eng = engine(probe_card(models, tmp_path))
    prediction = eng.predict(volume)
    assert prediction.geometry == volume.geometry and prediction.probability.shape == volume.geometry.shape
    np.testing.assert_allclose(prediction.probability, volume.array, atol=2e-6)
    flips = eng.predict(volume, tta_flips=True)  # each flip is undone before averaging
    assert flips.tta_flips == 8
    np.testing.assert_allclose(flips.probability, volume.array, atol=2e-6)


def test_probability_lands_on_input_grid_with_resampling(models, tmp_path):
    """A probability that is a linear function of the physical (LPS) position survives resampling to
    the card's spacing and back (trilinear interpolation is exact for linear functions) -- any axis
    order or LPS/RAS mix-up would move it."""
    geometry = OBLIQUE
    index = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape[::-1]], indexing="ij"), -1)  # (x,y,z,3)
    lps = index @ geometry.ijk_to_lps()[:3, :3].T + geometry.ijk_to_lps()[:3, 3]
    centre = lps.reshape(-1, 3).mean(axis=0)
    values = 0.5 + (lps - centre) @ np.array([0.006, -0.009, 0.004])
    assert 0.05 < values.min() and values.max() < 0.95
    volume = Volume(values.transpose(2, 1, 0).astype(np.float32), geometry, None)
    card = probe_card(models, tmp_path, spacing=[1.3, 0.9, 1.7])
    prediction = engine(card).predict(volume)
    assert prediction.geometry.mismatch(geometry) is None and prediction.probability.shape == geometry.shape
    assert prediction.info["network_grid_xyz"] != list(geometry.shape[::-1])  # it really was resampled
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(prediction.probability[inner], volume.array[inner], atol=2e-4)
    assert np.abs(prediction.probability - volume.array).mean() < 2e-3


def _flipped_x(volume: Volume) -> Volume:
    """The same physical image stored with the x index reversed."""
    g = volume.geometry
    d = np.asarray(g.direction).reshape(3, 3)
    origin = np.asarray(g.origin) + d[:, 0] * g.spacing[0] * (g.shape[2] - 1)
    direction = d @ np.diag([-1.0, 1.0, 1.0])
    return Volume(
        volume.array[:, :, ::-1].copy(), Geometry(g.shape, g.spacing, tuple(origin), tuple(direction.reshape(-1))), None
    )


def _swapped_xy(volume: Volume) -> Volume:
    """The same physical image stored with the x and y index axes exchanged."""
    g = volume.geometry
    d = np.asarray(g.direction).reshape(3, 3)[:, [1, 0, 2]]
    shape = (g.shape[0], g.shape[2], g.shape[1])
    return Volume(
        volume.array.transpose(0, 2, 1).copy(),
        Geometry(shape, (g.spacing[1], g.spacing[0], g.spacing[2]), g.origin, tuple(d.reshape(-1))),
        None,
    )


@pytest.mark.parametrize("spacing", [None, [1.2, 1.0, 2.0]])
def test_orientation_same_physical_prediction(models, tmp_path, spacing):
    data = json.loads((models["sd"] / "model_card.json").read_text())
    data["preprocessing"]["spacing_mm"] = spacing
    shutil.copy(models["sd"] / "weights.pt", tmp_path / "weights.pt")  # model files stay inside the card's folder
    data["source"]["state_dict"]["weights"] = "weights.pt"
    eng = engine(load_model_card(write_json(tmp_path / "c.json", data)))
    volume = ct_volume()
    base = eng.predict(volume).probability
    flipped = eng.predict(_flipped_x(volume))
    assert flipped.geometry == _flipped_x(volume).geometry
    np.testing.assert_array_equal(flipped.probability[:, :, ::-1], base)
    swapped = eng.predict(_swapped_xy(volume)).probability
    np.testing.assert_array_equal(swapped.transpose(0, 2, 1), base)
    # without reorientation the network sees a different array: the prediction changes
    data["preprocessing"]["orientation"] = None
    raw = engine(load_model_card(write_json(tmp_path / "raw.json", data)))
    assert not np.allclose(raw.predict(_flipped_x(volume)).probability[:, :, ::-1], raw.predict(volume).probability)


# ----------------------------------------------------------------------------- MC dropout


@pytest.fixture(scope="module")
def mc_volume() -> Volume:
    # 8 windows of 16^3 (2 per axis on d0/d1, 2 on d2): two full batches of sw_batch_size=4
    geometry = Geometry(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0), direction=tuple(rotation(0, 0, 10).reshape(-1)))
    return ct_volume(geometry, seed=3)


def test_mc_passes_differ_and_maps_are_consistent(models, mc_volume):
    eng = engine(resolve_model(models["sd"]))
    deterministic = eng.predict(mc_volume)
    mc = eng.predict(mc_volume, mc_dropout=6)
    assert mc.mc_passes == 6 and mc.info["seeded_dropout"]
    for array in (mc.probability, mc.variance, mc.entropy):
        assert array.dtype == np.float32 and array.shape == mc_volume.geometry.shape
    assert mc.variance.max() > 1e-3 and np.all(mc.variance >= 0) and np.all(mc.variance <= 0.25)
    assert np.all(mc.entropy >= 0) and np.all(mc.entropy <= np.log(2) + 1e-6)
    assert np.abs(mc.probability - deterministic.probability).max() > 1e-3
    again = eng.predict(mc_volume, mc_dropout=6)  # reproducible (seeded per pass)
    assert np.array_equal(again.probability, mc.probability) and np.array_equal(again.variance, mc.variance)
    other_seed = engine(resolve_model(models["sd"]), seed=7).predict(mc_volume, mc_dropout=6)
    assert not np.allclose(other_seed.probability, mc.probability)
    with_tta = eng.predict(mc_volume, mc_dropout=2, tta_flips=True)
    assert with_tta.tta_flips == 8 and with_tta.info["samples_per_forward"] == 16


def test_mc_with_dropout_disabled_equals_plain_inference_exactly(models, mc_volume):
    eng = engine(resolve_model(models["sd"]))
    plain = eng.predict(mc_volume).probability
    for module in eng._dropouts:
        module.p = 0.0
    with pytest.warns(MCDropoutInactiveWarning):
        batched = eng.predict(mc_volume, mc_dropout=3)
    assert np.array_equal(batched.probability, plain)
    assert not batched.variance.any()


def test_batched_and_sequential_mc_identical_when_seeded(models, mc_volume):
    """Seeded per pass, batched (3 passes x 4 windows = 12 rows per call) and sequential (4 rows per
    call) MC runs draw the same masks: the maps agree to float rounding -- bit for bit here, where the
    CPU convolution does not depend on the batch size (>= 2)."""
    card = resolve_model(models["sd"])
    batched = engine(card).predict(mc_volume, mc_dropout=3)
    sequential = engine(card, mc_chunk=1).predict(mc_volume, mc_dropout=3)
    assert sequential.info["samples_per_forward"] == 1 and batched.info["samples_per_forward"] == 3
    np.testing.assert_array_equal(batched.probability, sequential.probability)
    np.testing.assert_array_equal(batched.variance, sequential.variance)


class _ScaledDropoutNet(torch.nn.Module):
    """Elementwise only (no convolution whose rounding could depend on the batch size)."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(p=0.5)
        self.drop3d = torch.nn.Dropout3d(p=0.25)

    def forward(self, x):
        h = self.drop3d(self.drop(x * 4.0 - 2.0))
        return torch.cat([-h, h], dim=1)


class _CustomCard(ModelCard):
    def load_network(self):
        return _ScaledDropoutNet().eval()


def test_seeded_masks_do_not_depend_on_batching(models, tmp_path, mc_volume):
    """Pass n's masks are the same whether 1, 2 or all 5 passes share a forward call (an elementwise
    network, so no convolution rounding is involved: bit-identical on any backend)."""
    base = resolve_model(models["sd"])
    card = _CustomCard(
        name="elementwise",
        source=base.source,
        preprocessing=base.preprocessing,
        inference=base.inference,
        output=base.output,
    )
    results = [engine(card, mc_chunk=c).predict(mc_volume, mc_dropout=5) for c in (None, 1, 2)]
    for other in results[1:]:
        assert np.array_equal(other.probability, results[0].probability)
        assert np.array_equal(other.variance, results[0].variance)
    assert results[0].variance.max() > 1e-3
    other_grouping = engine(card, sw_batch_size=3).predict(mc_volume, mc_dropout=5)  # other windows per draw
    assert not np.array_equal(other_grouping.probability, results[0].probability)
    assert abs(other_grouping.probability.mean() - results[0].probability.mean()) < 0.01


def test_unseeded_batched_and_sequential_agree_statistically(models, mc_volume):
    """With the global RNG (seed=None) batched and sequential runs consume random numbers in a
    different order: not bit-identical, but the same distribution -- the mean maps agree within their
    Monte Carlo error."""
    card = resolve_model(models["sd"])
    passes = 24
    torch.manual_seed(0)
    batched = engine(card, seed=None).predict(mc_volume, mc_dropout=passes)
    sequential = engine(card, seed=None, mc_chunk=1).predict(mc_volume, mc_dropout=passes)
    assert not batched.info["seeded_dropout"] and not np.array_equal(batched.probability, sequential.probability)
    diff = batched.probability.astype(np.float64) - sequential.probability
    standard_error = np.sqrt((batched.variance + sequential.variance) / passes) + 1e-4
    z = np.abs(diff) / standard_error
    assert np.median(z) < 1.5 and np.mean(z > 4) < 0.01
    assert abs(batched.probability.mean() - sequential.probability.mean()) < 0.01


def test_mc_needs_dropout_and_valid_pass_count(models, tmp_path):
    eng = engine(probe_card(models, tmp_path))
    with pytest.raises(ConformalSegError, match="no dropout"):
        eng.predict(ct_volume(), mc_dropout=2)
    with pytest.raises(ConformalSegError, match="mc_dropout"):
        eng.predict(ct_volume(), mc_dropout=-1)


# ----------------------------------------------------------------------------- OOM, cancel, progress, device


def test_oom_fallback_halves_batch(models, mc_volume):
    card = resolve_model(models["sd"])
    reference = engine(card, sw_batch_size=2).predict(mc_volume).probability
    eng = engine(card, sw_batch_size=4)
    eng._oom_if = lambda rows, stage: rows > 2
    prediction = eng.predict(mc_volume)
    assert [a["sw_batch_size"] for a in prediction.info["attempts"]] == [4, 2]
    assert prediction.info["attempts"][0]["error"] == "out of memory"
    assert np.array_equal(prediction.probability, reference)
    assert eng.sw_batch_size == 2  # remembered for the next case
    assert len(eng.predict(mc_volume).info["attempts"]) == 1


def test_oom_fallback_reaches_host_stitching(models, mc_volume):
    card = resolve_model(models["sd"])
    reference = engine(card, sw_batch_size=1, mc_chunk=1).predict(mc_volume, mc_dropout=2)
    eng = engine(card, sw_batch_size=4)
    eng._oom_if = lambda rows, stage: stage != "host"
    prediction = eng.predict(mc_volume, mc_dropout=2)
    steps = [(a["sw_batch_size"], a["samples_per_forward"], a["stage"]) for a in prediction.info["attempts"]]
    assert steps == [(4, 2, "device"), (4, 1, "device"), (2, 1, "device"), (1, 1, "device"), (1, 1, "host")]
    assert eng._host_stitching
    assert np.array_equal(prediction.probability, reference.probability)


def test_oom_of_stitching_buffer_goes_to_host(models, mc_volume, monkeypatch):
    eng = engine(resolve_model(models["sd"]))
    original = eng._sliding_window
    calls = []

    def stitching_oom(tensor, batch, predictor, host):
        calls.append((batch, host))
        if not host:
            raise torch.cuda.OutOfMemoryError("buffer")
        return original(tensor, batch, predictor, host)

    monkeypatch.setattr(eng, "_sliding_window", stitching_oom)
    eng.predict(mc_volume)
    assert calls == [(4, False), (4, True)]


def test_oom_everywhere_is_a_clear_error(models, mc_volume):
    eng = engine(resolve_model(models["sd"]))
    eng._oom_if = lambda rows, stage: True
    with pytest.raises(ConformalSegError, match="out of memory.*sw_batch_size=1") as info:
        eng.predict(mc_volume)
    assert "patch_size" in str(info.value)


def test_progress_and_cancellation(models, mc_volume):
    card = resolve_model(models["sd"])
    seen = []
    engine(card, progress=lambda done, total, label: seen.append((done, total))).predict(mc_volume)
    total = count_windows((24, 24, 24), (16, 16, 16), 0.25)
    assert total == 8
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    event = threading.Event()
    calls = []

    def progress(done, total, label):
        calls.append(done)
        event.set()  # e.g. the user pressed Cancel after the first window batch

    eng = engine(card, sw_batch_size=1, progress=progress, cancel=event)
    with pytest.raises(InferenceCancelled):
        eng.predict(mc_volume)
    assert calls == [1]  # stopped before the second window
    with pytest.raises(InferenceCancelled):
        engine(card, cancel=lambda: True).predict(mc_volume)


def test_device_selection():
    assert engine_module.resolve_device("cpu").type == "cpu"
    assert engine_module.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConformalSegError, match="device"):
        engine_module.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.warns(DeviceFallbackWarning, match="CUDA is not available"):
            assert engine_module.resolve_device("cuda").type == "cpu"


# ----------------------------------------------------------------------------- input discovery


def _touch_image(path: Path, shape=(4, 5, 6)) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.float32)), str(path))
    return path


def test_find_images_plain_folder_and_file(tmp_path):
    folder = tmp_path / "imgs"
    for name in ("b.nii.gz", "a.nrrd", "c.mha"):
        _touch_image(folder / name)
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.nii.gz").write_text("x")
    assert [c.case_id for c in find_images(folder)] == ["a", "b", "c"]
    assert [c.case_id for c in find_images(folder / "b.nii.gz")] == ["b"]
    numbered = tmp_path / "numbered"
    for name in ("scan_0000.nii.gz", "scan_0001.nii.gz"):
        _touch_image(numbered / name)
    with pytest.raises(ConformalSegError, match="more than one input channel"):
        find_images(numbered)  # scan_0000 + scan_0001 look like two channels of one case
    suffixed = tmp_path / "suffixed"
    for name in ("x_0000.nii.gz", "y_0000.nii.gz"):
        _touch_image(suffixed / name)
    assert [c.case_id for c in find_images(suffixed)] == ["x", "y"]
    dup = tmp_path / "dup"
    _touch_image(dup / "a.nii.gz")
    _touch_image(dup / "a.nrrd")
    with pytest.raises(ConformalSegError, match="more than one image"):
        find_images(dup)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConformalSegError, match="no images"):
        find_images(tmp_path / "empty")


def test_find_images_nnunet_and_msd(tmp_path):
    nnunet = tmp_path / "Dataset001_Kidney"
    write_json(
        nnunet / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "tumour": 1},
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
    )
    for name in (
        "imagesTr/k_001_0000.nii.gz",
        "imagesTr/k_002_0000.nii.gz",
        "imagesTs/k_101_0000.nii.gz",
        "labelsTr/k_001.nii.gz",
    ):
        _touch_image(nnunet / name)
    cases = find_images(nnunet)
    assert [(c.case_id, c.subset) for c in cases] == [
        ("k_001", "imagesTr"),
        ("k_002", "imagesTr"),
        ("k_101", "imagesTs"),
    ]
    assert [c.case_id for c in find_images(nnunet, subset="ts")] == ["k_101"]
    assert [c.case_id for c in find_images(nnunet / "imagesTr")] == ["k_001", "k_002"]
    _touch_image(nnunet / "imagesTr" / "k_001_0001.nii.gz")
    with pytest.raises(ConformalSegError, match="single-channel"):
        find_images(nnunet)
    msd = tmp_path / "Task03_Liver"
    write_json(msd / "dataset.json", {"modality": {"0": "CT"}, "training": [], "test": []})
    _touch_image(msd / "imagesTr" / "liver_0.nii.gz")
    assert [c.case_id for c in find_images(msd)] == ["liver_0"]
    brats = tmp_path / "Task01_BrainTumour"
    write_json(brats / "dataset.json", {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}})
    _touch_image(brats / "imagesTr" / "BRATS_001.nii.gz")
    with pytest.raises(ConformalSegError, match="4 input channels") as info:
        find_images(brats)
    assert "single-channel" in str(info.value) and "dataset.json" in str(info.value)


# ----------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    from ConformalSegLib.cli import infer_cmd

    parser = argparse.ArgumentParser()
    infer_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["infer", *argv])
    return args.func(args)


def test_cli_infer_on_a_process_pool_matches_serial(models, tmp_path):
    """--executor processes: the engine goes to each worker once; every map equals a serial run's.

    Equal to float rounding, not bit for bit: a spawned worker runs torch with its default thread count,
    while this process may have been set to another by earlier tests, and CPU convolutions sum in an
    order that depends on the thread count (seen: differences in the 7th digit)."""
    import SimpleITK as sitk

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        vol = ct_volume(seed=10 + i)
        sitk.WriteImage(sitk_image(vol.array, vol.geometry), str(images / f"c{i}_0000.nii.gz"))
    base = ["--model", str(models["sd"]), "--images", str(images), "--mc-dropout", "2", "--device", "cpu"]
    assert _run_cli([*base, "--out", str(tmp_path / "serial")]) == 0
    assert _run_cli([*base, "--out", str(tmp_path / "pool"), "--executor", "processes", "--workers", "2"]) == 0
    report = json.loads((tmp_path / "pool" / "inference.json").read_text())
    assert report["executor"] == "processes" and report["workers"] == 2
    assert [c["case_id"] for c in report["cases"]] == ["c0", "c1", "c2"]
    for sub, name in [("probs", "{}.nii.gz"), ("uncertainty", "{}_variance.nii.gz")]:
        for i in range(3):
            a, b = (load_image(tmp_path / run / sub / name.format(f"c{i}")).array for run in ("serial", "pool"))
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_cli_infer_two_images(models, tmp_path):
    import SimpleITK as sitk

    images = tmp_path / "images"
    volumes = {
        "case_a": ct_volume(seed=1),
        "case_b": ct_volume(Geometry((10, 18, 20), (0.7, 0.7, 3.0), (5.0, 6.0, -7.0)), seed=2),
    }
    images.mkdir()
    for cid, vol in volumes.items():
        sitk.WriteImage(sitk_image(vol.array, vol.geometry), str(images / f"{cid}_0000.nii.gz"))
    out = tmp_path / "out"
    argv = [
        "--model",
        str(models["sd"]),
        "--images",
        str(images),
        "--out",
        str(out),
        "--mc-dropout",
        "2",
        "--device",
        "cpu",
    ]
    assert _run_cli(argv) == 0
    report = json.loads((out / "inference.json").read_text())
    card = resolve_model(models["sd"])
    assert report["model"]["name"] == "tiny-unet" and report["model"]["sha256"] == card.sha256()
    assert report["mc_passes"] == 2 and report["device"] == "cpu" and len(report["cases"]) == 2
    assert all(c["seconds"] > 0 for c in report["cases"])
    for cid, vol in volumes.items():
        prob = load_image(out / "probs" / f"{cid}.nii.gz")
        assert prob.geometry.mismatch(vol.geometry) is None
        assert sitk.ReadImage(str(out / "probs" / f"{cid}.nii.gz")).GetPixelID() == sitk.sitkFloat32
        assert 0 <= prob.array.min() and prob.array.max() <= 1
        for kind in ("variance", "entropy"):
            assert load_image(out / "uncertainty" / f"{cid}_{kind}.nii.gz").geometry.mismatch(vol.geometry) is None
        expected = engine(card).predict(load_image(images / f"{cid}_0000.nii.gz"), mc_dropout=2).probability
        np.testing.assert_allclose(prob.array, expected, atol=1e-6)
    with pytest.raises(ConformalSegError, match="already exist"):
        _run_cli(argv)
    assert _run_cli(argv[:-4] + ["--force", "--device", "cpu"]) == 0  # deterministic rerun over the old outputs
    assert json.loads((out / "inference.json").read_text())["mc_passes"] == 0


def test_cli_cuda_request_without_gpu_warns(models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    images = tmp_path / "images"
    _touch_image(images / "one.nii.gz", shape=(8, 9, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            _run_cli(
                [
                    "--model",
                    str(models["ts"]),
                    "--images",
                    str(images),
                    "--out",
                    str(tmp_path / "o"),
                    "--device",
                    "cuda",
                ]
            )
            == 0
        )
    assert any(issubclass(w.category, DeviceFallbackWarning) for w in caught)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_tf32(monkeypatch):
    """Ampere+ GPUs run float32 convolutions in TF32 by default (~1e-3 relative error, and different
    algorithms for different batch sizes): compare with CPU results in true float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@cuda_only
def test_cuda_matches_cpu(models, mc_volume, no_tf32):
    card = resolve_model(models["sd"])
    cpu = engine(card).predict(mc_volume).probability
    exact = InferenceEngine(card, device="cuda", amp=False)
    assert exact.device.type == "cuda" and InferenceEngine(card, device="auto").device.type == "cuda"
    np.testing.assert_allclose(exact.predict(mc_volume).probability, cpu, atol=1e-4)
    np.testing.assert_allclose(InferenceEngine(card, device="cuda").predict(mc_volume).probability, cpu, atol=2e-2)
    batched = exact.predict(mc_volume, mc_dropout=4)
    sequential = InferenceEngine(card, device="cuda", amp=False, mc_chunk=1).predict(mc_volume, mc_dropout=4)
    assert batched.variance.max() > 1e-3
    np.testing.assert_allclose(batched.probability, sequential.probability, atol=1e-4)
    resampled = json.loads((models["sd"] / "model_card.json").read_text())
    resampled["preprocessing"]["spacing_mm"] = [1.3, 0.9, 1.7]
    resampled["source"]["state_dict"]["weights"] = str(models["sd"] / "weights.pt")
    card2 = ModelCard.from_dict(resampled, models["sd"] / "resampled.json")
    np.testing.assert_allclose(
        InferenceEngine(card2, device="cuda", amp=False).predict(ct_volume()).probability,
        engine(card2).predict(ct_volume()).probability,
        atol=1e-4,
    )


@cuda_only
def test_cuda_real_out_of_memory_falls_back(tmp_path, no_tf32):
    """A real torch.cuda.OutOfMemoryError (memory capped with set_per_process_memory_fraction) makes
    the engine halve its batch until the forward call fits; the result is unchanged."""
    args = {**UNET_ARGS, "channels": [16, 32, 64], "dropout": 0.1}
    net = UNet(**args).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    card = load_model_card(
        write_json(
            tmp_path / "big.json",
            card_dict(
                {"state_dict": {"network": "UNet", "args": args, "weights": "w.pt"}},
                patch=(64, 64, 64),
                sw_batch_size=32,
            ),
        )
    )
    volume = ct_volume(Geometry((96, 160, 160)), seed=5)
    reference = InferenceEngine(card, device="cuda", amp=False, sw_batch_size=2).predict(volume).probability
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    InferenceEngine(card, device="cuda", amp=False, sw_batch_size=2).predict(volume)
    peak_two = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    eng = InferenceEngine(card, device="cuda", amp=False)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2.5 * peak_two / total))
    try:
        prediction = eng.predict(volume)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    attempts = prediction.info["attempts"]
    assert len(attempts) > 1 and attempts[0]["error"].startswith("out of memory")
    assert prediction.info["sw_batch_size"] < 32
    np.testing.assert_allclose(prediction.probability, reference, atol=1e-4)


class _ScriptedCard(ModelCard):
    def load_network(self):
        return torch.jit.script(_ScaledDropoutNet()).eval()


def test_engine_pickles_for_workers_torchscript_included(models, mc_volume):
    """Executors send the engine to workers by pickling it: a TorchScript network (not picklable itself)
    travels as its archive and predicts, MC dropout included, exactly as on the driver."""
    import pickle

    base = resolve_model(models["sd"])
    card = _ScriptedCard(
        name="scripted", source=base.source, preprocessing=base.preprocessing, inference=base.inference,
        output=base.output,
    )  # fmt: skip
    driver = engine(card)
    assert driver.is_torchscript
    worker = pickle.loads(pickle.dumps(driver))
    assert worker.is_torchscript and worker.network is not driver.network
    a, b = driver.predict(mc_volume, mc_dropout=4), worker.predict(mc_volume, mc_dropout=4)
    assert np.array_equal(a.probability, b.probability) and np.array_equal(a.variance, b.variance)
    assert a.variance.max() > 1e-3  # dropout really ran on both
    plain = pickle.loads(pickle.dumps(engine(base)))  # a state_dict network pickles as it is
    assert np.array_equal(plain.predict(mc_volume).probability, engine(base).predict(mc_volume).probability)


def test_a_subset_of_flips(models, mc_volume):
    """``tta_flips=N``: the first N of the 8 flips (identity, single axes, pairs, all three), N passes per window;
    1 is plain inference bit for bit, 8 is ``True``; other counts are refused with the fix."""
    from ConformalSegLib.inference.mc_passes import ALL_FLIPS, flip_count, variants

    assert [flip_count(x) for x in (None, False, True, 1, 4, np.int64(8))] == [1, 1, 8, 1, 4, 8]
    assert variants(0, 4) == [((), None), ((2,), None), ((3,), None), ((4,), None)]
    assert [f for f, _ in variants(2, 2)] == [(), (), (2,), (2,)] and len(variants(0, True)) == len(ALL_FLIPS)
    for bad in (0, 9, 2.5, "4"):
        with pytest.raises(ConformalSegError, match="1..8"):
            flip_count(bad)
    eng = engine(resolve_model(models["sd"]))
    plain, one, four, eight, every = (eng.predict(mc_volume, tta_flips=n) for n in (False, 1, 4, 8, True))
    assert np.array_equal(one.probability, plain.probability) and one.tta_flips == 1
    assert four.tta_flips == 4 and four.info["samples_per_forward"] == 4
    assert np.array_equal(eight.probability, every.probability) and eight.tta_flips == 8
    assert not np.allclose(four.probability, plain.probability) and not np.allclose(four.probability, every.probability)
