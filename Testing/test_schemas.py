"""The published JSON Schemas (Resources/schemas/) against the shipped model cards and freshly made profiles,
model cards and structure indexes; and bad documents that they must refuse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ConformalSegLib.cli import main
from ConformalSegLib.conformal.profile import METHODS
from ConformalSegLib.inference import card_format
from ConformalSegLib.io.volumes import save_volume
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "Resources" / "schemas"
CARDS = sorted((ROOT / "Resources" / "models").glob("*/model_card.json"))


def validator(name: str):
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(name: str, doc: dict) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(name).iter_errors(doc)]


def test_schemas_are_valid_and_follow_the_library():
    assert {p.name for p in SCHEMAS.glob("*.json")} == {
        "profile.schema.json",
        "model-card.schema.json",
        "structures.schema.json",
    }
    profile = json.loads((SCHEMAS / "profile.schema.json").read_text())
    assert tuple(profile["properties"]["method"]["enum"]) == METHODS  # a new method needs the schema updated
    card = json.loads((SCHEMAS / "model-card.schema.json").read_text())
    assert tuple(card["properties"]) == card_format.TOP_KEYS
    assert tuple(card["required"]) == card_format.REQUIRED_KEYS
    assert tuple(card["properties"]["source"]["properties"]) == card_format.SOURCE_KINDS
    assert tuple(card["properties"]["inference"]["properties"]["blend"]["enum"]) == card_format.BLEND_MODES
    kinds = [
        o["properties"]["kind"]["const"]
        for o in card["properties"]["preprocessing"]["properties"]["intensity"]["oneOf"]
    ]
    assert tuple(kinds) == card_format.INTENSITY_KINDS
    softmax = card["properties"]["output"]["oneOf"][0]["properties"]["activation"]["enum"]
    assert tuple(softmax) == card_format.ACTIVATIONS


@pytest.mark.parametrize("path", CARDS, ids=[p.parent.name for p in CARDS])
def test_shipped_model_cards(path):
    assert errors("model-card", json.loads(path.read_text())) == []


def test_fresh_model_card_and_refusals(tmp_path):
    from ConformalSegLib.inference.model_card import ModelCard

    shipped = json.loads(CARDS[0].read_text())
    card = ModelCard.from_dict(copy.deepcopy(shipped), base_dir=CARDS[0].parent)
    assert errors("model-card", card.to_dict()) == []
    other = {  # another source kind, z-score intensity and sigmoid output, written back by the library
        **shipped,
        "source": {"torchscript": "net.ts"},
        "preprocessing": {"orientation": "lps", "spacing_mm": [1, 1, 2.5], "intensity": {"kind": "zscore"}},
        "output": {"activation": "sigmoid", "lesion_channel": 0},
    }
    written = ModelCard.from_dict(other, base_dir=tmp_path).to_dict()
    assert errors("model-card", written) == []
    bad = {
        "unknown key": {**shipped, "extra": 1},
        "two sources": {**shipped, "source": {"torchscript": "a.pt", "bundle": "b"}},
        "bad orientation": {**shipped, "preprocessing": {**shipped["preprocessing"], "orientation": "RRS"}},
        "window without a_max": {
            **shipped,
            "preprocessing": {"intensity": {"kind": "window", "a_min": 0, "b_min": 0, "b_max": 1}},
        },
        "quantiles with softmax": {**shipped, "output": {"activation": "softmax", "quantiles": [0.1, 0.9]}},
        "patch of two": {**shipped, "inference": {"patch_size": [96, 96]}},
        "wrong format": {**shipped, "format": "conformalseg-profile"},
    }
    for what, doc in bad.items():
        assert errors("model-card", doc), what


def run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemas")
    write_synthetic_dataset(root / "data", 10, seed=8, shape=(16, 24, 24))
    return root


CALIBRATIONS = {
    "cls": ["--method", "cls", "--epsilon", "0.1", "--alpha", "0.2"],
    "cls_pac": ["--method", "cls", "--epsilon", "0.2", "--alpha", "0.2", "--pac-delta", "0.3"],
    "crc": ["--method", "crc", "--epsilon", "0.1"],
    "lesion": ["--method", "lesion", "--epsilon", "0.25", "--alpha", "0.2", "--voxel-epsilon", "0.2"],
    "sets": ["--method", "sets", "--alpha", "0.2", "--joint", "--transform", "distance"],
    "sets_tiny_alpha": ["--method", "sets", "--alpha", "0.01"],  # too few scans: infinite thresholds
    "rcps": ["--method", "rcps", "--epsilon", "0.3", "--delta", "0.3"],
    "ltt": ["--method", "ltt", "--delta", "0.3", "--risk", "fnr=0.3", "--risk", "fp-ml=5"],
    "groups": ["--method", "cls", "--epsilon", "0.2", "--alpha", "0.3", "--group-by", "lesion-size:1"],
    "weighted": ["--method", "cls", "--epsilon", "0.2", "--alpha", "0.3", "--target-scans", "TARGET"],
    "cls_margin": ["--method", "cls", "--epsilon", "0.1", "--alpha", "0.2", "--score", "margin"],
    "lesion_gaussian": ["--method", "lesion", "--epsilon", "0.25", "--alpha", "0.2", "--score", "gaussian:2"],
}


@pytest.mark.parametrize("name", list(CALIBRATIONS))
def test_fresh_profiles(data, tmp_path, capsys, name):
    out = tmp_path / f"{name}.json"
    options = [data / "data" if option == "TARGET" else option for option in CALIBRATIONS[name]]
    run(["calibrate", "--data", data / "data", "--lesion-label", "2", *options, "--out", out], capsys)
    doc = json.loads(out.read_text())
    assert errors("profile", doc) == []
    assert ("groups" in doc) == (name == "groups") and ("weighting" in doc) == (name == "weighted")
    if name == "sets_tiny_alpha":
        assert doc["inner_threshold"] == "inf"
    assert (doc["format_version"], doc.get("score")) == ((2, doc["score"]) if "score" in doc else (1, None))
    assert ("score" in doc) == name.endswith(("_margin", "_gaussian"))
    broken = {
        "no guarantee": {k: v for k, v in doc.items() if k != "guarantee"},
        "unknown key": {**doc, "threshold": 0.5},
        "unknown method": {**doc, "method": "magic"},
        "NaN-like threshold": {
            **doc,
            "inner_threshold" if "inner_threshold" in doc else "probability_threshold": "nan",
        },
        "bad checksum": {**doc, "summaries": {**doc["summaries"], "sha256": "xyz"}},
        "version 2 without a score": {**{k: v for k, v in doc.items() if k != "score"}, "format_version": 2},
        "version 1 with a score": {**doc, "format_version": 1, "score": "margin:0.5"},
        "distance score": {**doc, "format_version": 2, "score": "distance:0.5"},
    }
    for what, bad in broken.items():
        assert errors("profile", bad), what


def test_mask_only_profiles_and_index(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(6):
        for folder in ("pred", "labels"):
            labels = np.zeros((8, 12, 12), np.uint8)
            z, y, x = rng.integers(2, 5, 3)
            labels[z : z + 3, y : y + 4, x : x + 4] = 1
            labels[z : z + 3, y + 5 : y + 7, x : x + 4] = 2
            save_volume(labels, _geometry(), tmp_path / folder / f"c{i}.nii.gz")
    index = tmp_path / "organs.json"
    argv = ["calibrate", "--method", "sets", "--transform", "distance", "--alpha", "0.3", "--masks", tmp_path / "pred"]
    run([*argv, "--labels", tmp_path / "labels", "--structures", "1=liver,2=spleen", "--out", index], capsys)
    doc = json.loads(index.read_text())
    assert errors("structures", doc) == []
    assert errors("structures", {**doc, "structures": []})
    for entry in doc["structures"]:
        profile = json.loads((tmp_path / entry["profile"]).read_text())
        assert errors("profile", profile) == []
        assert profile["provenance"]["mask_input"]["structure"] == entry["name"]


def _geometry():
    from ConformalSegLib.common.geometry import Geometry

    return Geometry((8, 12, 12), spacing=(1.0, 1.0, 2.0))


def test_readme_points_to_the_schemas():
    readme = (ROOT / "README.md").read_text()
    for name in ("profile.schema.json", "model-card.schema.json", "structures.schema.json"):
        assert f"Resources/schemas/{name}" in readme
