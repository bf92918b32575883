"""``scripts/device_train.sh run``: the GPU recipe's command line is valid and trains, here on the CPU with
this environment's interpreter and tiny shapes appended (a later option wins), so a session lent a GPU
does not find a broken script with its few device minutes. The GPU run itself cannot be tested here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")

from ConformalSegLib.inference import resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "device_train.sh"


def test_the_recipe_trains_and_records_what_it_is(tmp_path):
    out = tmp_path / "lesion_gpu"
    env = {**os.environ, "CONFORMALSEG_PYTHON": sys.executable, "CONFORMALSEG_DEVICE": "cpu"}
    tiny = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--heldout", "1", "--num-workers", "0",
            "--phantom-shape", "24", "48", "48", "--patch-size", "32", "32", "16", "--crop-size", "16", "16", "8",
            "--threads", "1", "--time-limit", "1h"]  # fmt: skip
    done = subprocess.run(
        ["bash", str(SCRIPT), "run", str(out), *tiny], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    card = resolve_model(out)
    training = card.training
    v11 = resolve_model(REPO / "Resources" / "models" / "phantom_lesion_unet_v11")
    assert training["precision"] == "bf16" and training["loss"] == "blob-dice-ce"
    assert training["data"]["phantom_seed"] == 1016 and training["init_weights_sha256"] == v11.sha256()
    assert card.source.args["filters"] == v11.source.args["filters"]  # v11's network, fine-tuned


def test_run_without_wheels_or_an_output_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CONFORMALSEG_PYTHON"}
    done = subprocess.run(["bash", str(SCRIPT), "run"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "give the output folder" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr
