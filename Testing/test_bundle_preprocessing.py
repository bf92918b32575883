"""Model cards that take the preprocessing and the sliding window from a MONAI bundle's own inference config:
the translation, the same fingerprint as a card stating them, the same tensor as MONAI running the bundle's
transforms, and every refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.inference.card_format import InferenceSettings, Intensity, Preprocessing
from ConformalSegLib.inference.model_card import ModelCard, load_model_card

CONFIG = {
    "image_key": "image",
    "pixdim": [1.5, 1.25, 2.0],
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
    },
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
            {
                "_target_": "monai.transforms.ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -200,
                "a_max": 300,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [32, 32, 16],
        "sw_batch_size": 2,
        "overlap": 0.5,
        "mode": "gaussian",
    },
}
CARD = {
    "format": "conformalseg-model-card",
    "format_version": 1,
    "name": "tiny-bundle",
    "source": {"bundle": "bundle"},
    "preprocessing": "bundle",
    "inference": "bundle",
    "output": {"activation": "softmax", "lesion_channel": 1},
}


def write_bundle(root: Path, config: dict | None = None, card: dict | None = None) -> Path:
    (root / "bundle" / "configs").mkdir(parents=True, exist_ok=True)
    (root / "bundle" / "configs" / "inference.json").write_text(json.dumps(config or CONFIG))
    (root / "bundle" / "models").mkdir(exist_ok=True)
    (root / "bundle" / "models" / "model.pt").write_bytes(b"weights (only hashed here)")
    path = root / "model_card.json"
    path.write_text(json.dumps(card or CARD))
    return path


def test_translation_and_fingerprint(tmp_path):
    card = load_model_card(write_bundle(tmp_path))
    assert card.preprocessing == Preprocessing("RAS", (1.5, 1.25, 2.0), Intensity("window", -200, 300, 0.0, 1.0, True))
    assert card.inference == InferenceSettings((32, 32, 16), 0.5, "gaussian", 2)
    stated = {**CARD, "preprocessing": card.preprocessing.to_dict(), "inference": card.inference.to_dict()}
    explicit = ModelCard.from_dict(stated, base_dir=tmp_path)
    assert explicit.pipeline_sha256() == card.pipeline_sha256()  # the same pipeline, however it is stated
    zscore = copy.deepcopy(CONFIG)
    zscore["preprocessing"]["transforms"][4] = {"_target_": "NormalizeIntensityd", "keys": "image"}
    assert load_model_card(write_bundle(tmp_path / "z", zscore)).preprocessing.intensity == Intensity("zscore")


def _with_step(index: int, step: dict) -> dict:
    config = copy.deepcopy(CONFIG)
    config["preprocessing"]["transforms"].insert(index, step)
    return config


EARLY_WINDOW = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1}
REFUSALS = [
    (_with_step(3, {"_target_": "CropForegroundd", "keys": "image"}), None, "CropForegroundd has no counterpart"),
    (_with_step(2, EARLY_WINDOW), None, "Orientationd comes after the intensity step"),
    ({**CONFIG, "pixdim": "$[1.5] * 3"}, None, "computes a value with an expression"),
    ({**CONFIG, "inferer": {"_target_": "SimpleInferer"}}, None, "not a SlidingWindowInferer"),
    ({k: v for k, v in CONFIG.items() if k != "preprocessing"}, None, "has no 'preprocessing' section"),
    (None, {**CARD, "source": {"torchscript": "net.ts"}}, '"bundle" preprocessing or inference needs a MONAI bundle'),
]


@pytest.mark.parametrize(("config", "card", "message"), REFUSALS)
def test_refusals(tmp_path, config, card, message):
    with pytest.raises(ConformalSegError, match=message) as info:
        load_model_card(write_bundle(tmp_path, config, card))
    assert "Fix:" in str(info.value)


def test_same_tensor_as_the_bundles_own_transforms(tmp_path):
    pytest.importorskip("monai")
    import torch
    from monai.bundle import ConfigParser

    from ConformalSegLib.inference.preprocessing import build_preprocessing, network_affine, preprocess_on
    from ConformalSegLib.io.volumes import load_image, save_volume

    card = load_model_card(write_bundle(tmp_path))
    t = np.deg2rad(20)
    direction = (np.cos(t), -np.sin(t), 0.0, np.sin(t), np.cos(t), 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((10, 20, 18), spacing=(0.9, 1.1, 2.5), origin=(10.0, -5.0, 3.0), direction=direction)
    hu = np.random.default_rng(0).normal(0, 200, geometry.shape).astype(np.float32)
    path = save_volume(hu, geometry, tmp_path / "ct.nii.gz")
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "bundle" / "configs" / "inference.json"))
    theirs = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
    image = load_image(path)
    spatial, intensity = build_preprocessing(card)
    affine = torch.as_tensor(network_affine(image.geometry), dtype=torch.float64)
    ours = preprocess_on(image.array, affine, torch.device("cpu"), spatial, intensity).tensor
    assert tuple(ours.shape) == tuple(theirs.shape)
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), atol=1e-4)


def test_schema_accepts_bundle_sections():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "Resources/schemas/model-card.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(CARD)) == []
    assert list(validator.iter_errors({**CARD, "source": {"torchscript": "net.ts"}}))
    assert list(validator.iter_errors({**CARD, "preprocessing": "from the bundle"}))
