"""The phantom seeds a model learnt from, followed through fine-tuning (inference/model_lineage.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ConformalSegLib.inference import resolve_model
from ConformalSegLib.inference.model_lineage import training_lineage

MODELS = Path(__file__).resolve().parents[1] / "Resources" / "models"


def test_the_demo_model_follows_an_unshipped_run_through_its_ancestors_card():
    v7 = training_lineage(resolve_model(MODELS / "phantom_lesion_unet_v7"))
    assert v7.phantom_seeds == (1006, 1005, 1002, 1001, 1000) and v7.complete
    assert v7.models == ("phantom_lesion_unet_v7", "lesion_v6", "phantom_lesion_unet_v3", "phantom_lesion_unet_v2",
                         "phantom_lesion_unet")  # fmt: skip
    # v10: through its own ancestors/ (lesion_v9) and then v7's (lesion_v6)
    v10 = training_lineage(resolve_model(MODELS / "phantom_lesion_unet_v10"))
    assert v10.phantom_seeds == (1009, 1008, 1006, 1005, 1002, 1001, 1000) and v10.complete
    assert v10.models[:3] == ("phantom_lesion_unet_v10", "lesion_v9", "phantom_lesion_unet_v7")
    assert v10.models[3:] == v7.models[1:]
    # the demo's v11: fine-tuned from v10 directly (a shipped parent, no ancestors/ card needed)
    v11 = training_lineage(resolve_model(MODELS / "phantom_lesion_unet_v11"))
    assert v11.phantom_seeds == (1010, *v10.phantom_seeds) and v11.complete
    assert v11.models == ("phantom_lesion_unet_v11", *v10.models)


def test_without_the_ancestors_card_the_chain_stops_at_the_unshipped_run(tmp_path):
    v7 = _copy_card(MODELS / "phantom_lesion_unet_v7", tmp_path / "models" / "v7")
    _copy_card(MODELS / "phantom_lesion_unet_v3", tmp_path / "models" / "v3")
    lineage = training_lineage(resolve_model(v7))
    assert lineage.phantom_seeds == (1006,) and not lineage.complete
    (v7 / "ancestors").mkdir()
    shutil.copy(MODELS / "phantom_lesion_unet_v7" / "ancestors" / "lesion_v6.model_card.json", v7 / "ancestors")
    lineage = training_lineage(resolve_model(v7))  # now through lesion_v6 to v3, whose parent v2 is not there
    assert lineage.phantom_seeds == (1006, 1005, 1002) and not lineage.complete
    assert lineage.models == ("phantom_lesion_unet_v7", "lesion_v6", "phantom_lesion_unet_v3")


def test_a_shipped_folder_card_wins_over_an_ancestors_card_of_the_same_weights(tmp_path):
    child = _copy_card(MODELS / "phantom_lesion_unet_v2", tmp_path / "models" / "child")
    _copy_card(MODELS / "phantom_lesion_unet", tmp_path / "models" / "parent")
    stale = json.loads((MODELS / "phantom_lesion_unet" / "model_card.json").read_text())
    stale["name"], stale["training"]["data"]["phantom_seed"] = "stale copy", 999
    (child / "ancestors").mkdir()
    (child / "ancestors" / "v1.model_card.json").write_text(json.dumps(stale))
    lineage = training_lineage(resolve_model(child))  # the parent folder's card, not the "stale copy"
    assert lineage.phantom_seeds == (1001, 1000)
    assert lineage.models == ("phantom_lesion_unet_v2", "phantom_lesion_unet")


def test_the_shipped_fine_tuned_model_follows_its_parent():
    v3 = training_lineage(resolve_model(MODELS / "phantom_lesion_unet_v3"))
    assert v3.phantom_seeds == (1002, 1001, 1000) and v3.complete
    assert v3.models == ("phantom_lesion_unet_v3", "phantom_lesion_unet_v2", "phantom_lesion_unet")
    v2 = training_lineage(resolve_model(MODELS / "phantom_lesion_unet_v2"))
    assert v2.phantom_seeds == (1001, 1000) and v2.complete
    assert v2.models == ("phantom_lesion_unet_v2", "phantom_lesion_unet")
    v1 = training_lineage(resolve_model(MODELS / "phantom_lesion_unet"))
    assert v1.phantom_seeds == (1000,) and v1.complete and v1.models == ("phantom_lesion_unet",)


def _copy_card(src: Path, dst: Path, **training_changes) -> Path:
    dst.mkdir(parents=True)
    document = json.loads((src / "model_card.json").read_text())
    document["training"].update(training_changes)
    (dst / "model_card.json").write_text(json.dumps(document))
    shutil.copy(src / "weights.pt", dst / "weights.pt")
    return dst


def test_a_parent_not_beside_the_model_leaves_the_lineage_incomplete(tmp_path):
    alone = _copy_card(MODELS / "phantom_lesion_unet_v2", tmp_path / "models" / "child")
    lineage = training_lineage(resolve_model(alone))
    assert lineage.phantom_seeds == (1001,) and not lineage.complete


@pytest.mark.parametrize("broken", ["not json", "[1, 2]", '{"training": "none"}'])
def test_unreadable_or_foreign_sibling_cards_are_skipped(tmp_path, broken):
    child = _copy_card(MODELS / "phantom_lesion_unet_v2", tmp_path / "models" / "child")
    (tmp_path / "models" / "other").mkdir()
    (tmp_path / "models" / "other" / "model_card.json").write_text(broken)
    _copy_card(MODELS / "phantom_lesion_unet", tmp_path / "models" / "parent")
    lineage = training_lineage(resolve_model(child))
    assert lineage.phantom_seeds == (1001, 1000) and lineage.complete


def test_a_cycle_of_cards_ends(tmp_path):
    v2 = json.loads((MODELS / "phantom_lesion_unet_v2" / "model_card.json").read_text())["training"]
    a = _copy_card(MODELS / "phantom_lesion_unet", tmp_path / "models" / "a", init_weights_sha256=v2["weights_sha256"])
    _copy_card(MODELS / "phantom_lesion_unet_v2", tmp_path / "models" / "b")
    lineage = training_lineage(resolve_model(a))  # a -> b -> a (hand-edited cards): stops, incomplete
    assert lineage.phantom_seeds == (1000, 1001) and not lineage.complete
