"""``calibrate`` / ``evaluate`` / ``apply`` with ``--model --images``: the model runs once per case, in
the identical pipeline, and gives the same calibration as its precomputed probability maps.

The "model" is an elementwise logit probe (TorchScript): with no intensity transform its
probability map is its input image, so predicting from ``probs/`` must reproduce calibrating on
``probs/`` directly (up to float32 rounding of logit/sigmoid).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

from ConformalSegLib.cli import main  # noqa: E402
from ConformalSegLib.common.errors import ConformalSegError  # noqa: E402
from ConformalSegLib.conformal.profile import load_profile  # noqa: E402
from ConformalSegLib.inference import InferenceEngine  # noqa: E402
from ConformalSegLib.inference.model_dataset import InferenceDataset, engine_for_profile, match_images_to_labels  # noqa: E402
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset  # noqa: E402


class LogitProbe(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(1e-6, 1.0 - 1e-6)
        return torch.log(x) - torch.log1p(-x)


def _card(folder, name="probe") -> dict:
    return {
        "format": "conformalseg-model-card",
        "format_version": 1,
        "name": name,
        "source": {"torchscript": "probe.ts"},
        "preprocessing": {"orientation": "RAS", "spacing_mm": None, "intensity": {"kind": "none"}},
        "inference": {"patch_size": [16, 16, 16], "overlap": 0.25, "blend": "gaussian", "sw_batch_size": 4},
        "output": {"activation": "sigmoid", "lesion_channel": 0},
    }


@pytest.fixture(autouse=True)
def _trusted_model_code(monkeypatch):
    """These tests load TorchScript probes and MONAI bundles written by the tests themselves."""
    monkeypatch.setenv("CONFORMALSEG_TRUST_MODEL_CODE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_data")
    write_synthetic_dataset(root / "data", 12, seed=3, shape=(16, 24, 24))
    probe = root / "probe"
    probe.mkdir()
    torch.jit.script(LogitProbe()).save(str(probe / "probe.ts"))
    (probe / "model_card.json").write_text(json.dumps(_card(probe)))
    other = root / "other"
    other.mkdir()
    torch.jit.script(LogitProbe()).save(str(other / "probe.ts"))
    (other / "model_card.json").write_text(
        json.dumps(
            {
                **_card(other, "other"),
                "inference": {"patch_size": [8, 8, 8], "overlap": 0.5, "blend": "gaussian", "sw_batch_size": 4},
            }
        )
    )
    return {"root": root, "data": root / "data", "model": probe, "other": other}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_calibrate_with_model_matches_precomputed_maps(setup, tmp_path, capsys):
    data = setup["data"]
    common = ["--method", "cls", "--lesion-label", "2", "--epsilon", "0.2", "--alpha", "0.2"]
    code, _, err = run(
        ["calibrate", *common, "--probs", data / "probs", "--labels", data / "labels", "--out", tmp_path / "pre.json"],
        capsys,
    )
    assert code == 0, err
    cache = tmp_path / "cache"
    code, out, err = run(
        [
            "calibrate",
            *common,
            "--model",
            setup["model"],
            "--images",
            data / "probs",
            "--labels",
            data / "labels",
            "--device",
            "cpu",
            "--probs-cache",
            cache,
            "--out",
            tmp_path / "model.json",
        ],
        capsys,
    )
    assert code == 0, err
    pre, via_model = load_profile(tmp_path / "pre.json"), load_profile(tmp_path / "model.json")
    assert pre.calibration.n == via_model.calibration.n == 12
    assert via_model.calibration.rank == pre.calibration.rank
    assert via_model.calibration.probability_threshold == pytest.approx(pre.calibration.probability_threshold, rel=1e-5)
    record = via_model.provenance["inference"]
    assert record["mc_passes"] == 0 and record["probability"].startswith("deterministic")
    assert record["model"]["name"] == "probe" and len(record["pipeline_sha256"]) == 64
    assert sorted(p.name for p in cache.glob("*.nii.gz")) == sorted(p.name for p in (data / "probs").glob("*.nii.gz"))


def test_cache_is_reused_and_never_mixed(setup, tmp_path):
    data = setup["data"]
    engine = InferenceEngine(setup["model"], device="cpu")
    calls = []
    original = engine.predict
    engine.predict = lambda *a, **k: calls.append(1) or original(*a, **k)
    dataset = InferenceDataset(engine, data / "probs", data / "labels", [2], tmp_path / "cache")
    first = [case.probability.array.copy() for case in dataset]
    second = [case.probability.array for case in dataset]  # read back from the cache
    assert len(calls) == 12
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ConformalSegError, match="another model, pipeline"):
        InferenceDataset(
            InferenceEngine(setup["other"], device="cpu"), data / "probs", data / "labels", [2], tmp_path / "cache"
        )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ConformalSegError, match="not empty"):
        InferenceDataset(engine, data / "probs", data / "labels", [2], tmp_path / "busy")


def test_cache_is_keyed_on_image_content(setup, tmp_path):
    """An image replaced under the same name is predicted again, never served from the cache (issue 16)."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(setup["data"] / "probs", images)
    engine = InferenceEngine(setup["model"], device="cpu")
    calls = []
    original = engine.predict
    engine.predict = lambda *a, **k: calls.append(1) or original(*a, **k)
    first = {c.case_id: c.probability.array.copy() for c in InferenceDataset(engine, images, setup["data"] / "labels",
                                                                              [2], tmp_path / "cache")}  # fmt: skip
    replaced = sorted(images.iterdir())[3]
    shutil.copy(sorted(images.iterdir())[4], replaced)  # another image under the same name
    again = {c.case_id: c.probability.array for c in InferenceDataset(engine, images, setup["data"] / "labels",
                                                                       [2], tmp_path / "cache")}  # fmt: skip
    assert len(calls) == 13  # 12, then only the replaced image
    changed = [cid for cid in first if not np.array_equal(first[cid], again[cid])]
    assert len(changed) == 1 and replaced.name.startswith(changed[0])


def test_evaluate_with_model_runs_inference_once_per_case(setup, tmp_path, capsys, monkeypatch):
    calls = []
    original = InferenceEngine.predict

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InferenceEngine, "predict", counting)
    data = setup["data"]
    code, out, err = run(
        [
            "evaluate",
            "--model",
            setup["model"],
            "--images",
            data / "probs",
            "--labels",
            data / "labels",
            "--lesion-label",
            "2",
            "--device",
            "cpu",
            "--splits",
            "5",
            "--epsilons",
            "0.2",
            "--alphas",
            "0.2",
            "--transforms",
            "identity",
            "--no-hd95",
            "--out",
            tmp_path / "ev",
        ],
        capsys,
    )
    assert code == 0, err
    assert len(calls) == 12  # the evaluation reads each case twice; the second read comes from the cache
    assert (tmp_path / "ev" / "report.md").is_file()


def test_apply_with_image_predicts_like_calibration(setup, tmp_path, capsys):
    data = setup["data"]
    profile = tmp_path / "p.json"
    code, _, err = run(
        [
            "calibrate",
            "--method",
            "cls",
            "--lesion-label",
            "2",
            "--epsilon",
            "0.2",
            "--alpha",
            "0.2",
            "--model",
            setup["model"],
            "--images",
            data / "probs",
            "--labels",
            data / "labels",
            "--device",
            "cpu",
            "--out",
            profile,
        ],
        capsys,
    )
    assert code == 0, err
    image = data / "probs" / "synth_000.nii.gz"
    code, out, err = run(
        [
            "apply",
            "--profile",
            profile,
            "--image",
            image,
            "--model",
            setup["model"],
            "--device",
            "cpu",
            "--out",
            tmp_path / "a",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run(["apply", "--profile", profile, "--prob", image, "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    a = json.loads((tmp_path / "a" / "apply.json").read_text())["voxels"]
    b = json.loads((tmp_path / "b" / "apply.json").read_text())["voxels"]
    assert a == b
    assert (tmp_path / "a" / "probability.nii.gz").is_file()
    # another pipeline is refused, as is --image for a profile calibrated on precomputed maps
    code, _, err = run(
        ["apply", "--profile", profile, "--image", image, "--model", setup["other"], "--out", tmp_path / "c"], capsys
    )
    assert code == 2 and "not the pipeline the profile was calibrated with" in err
    with pytest.raises(ConformalSegError, match="precomputed probability maps"):
        engine_for_profile(None, setup["model"])


def test_unmatched_images_and_bad_options_are_clear_errors(setup, tmp_path, capsys):
    data = setup["data"]
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in sorted((data / "labels").glob("*.nii.gz"))[:-1]:
        (labels / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ConformalSegError, match="1 image\\(s\\) .* have no label file"):
        match_images_to_labels(data / "probs", labels)
    code, _, err = run(
        [
            "calibrate",
            "--method",
            "cls",
            "--lesion-label",
            "2",
            "--epsilon",
            "0.2",
            "--alpha",
            "0.2",
            "--images",
            data / "probs",
            "--labels",
            data / "labels",
            "--out",
            tmp_path / "x.json",
        ],
        capsys,
    )
    assert code == 2 and "--images needs --model" in err
    code, _, err = run(
        [
            "calibrate",
            "--method",
            "cls",
            "--lesion-label",
            "2",
            "--epsilon",
            "0.2",
            "--alpha",
            "0.2",
            "--model",
            setup["model"],
            "--images",
            data / "probs",
            "--probs",
            data / "probs",
            "--labels",
            data / "labels",
            "--out",
            tmp_path / "x.json",
        ],
        capsys,
    )
    assert code == 2 and "not both" in err


def test_evaluate_with_model_on_a_process_pool_equals_serial(setup, tmp_path, capsys):
    """``evaluate --model --images --executor processes``: the network goes to each worker with the dataset,
    each task predicts its case there; every output file is byte-identical to the serial run's (issue 15)."""
    data = setup["data"]
    base = ["evaluate", "--model", setup["model"], "--images", data / "probs", "--labels", data / "labels"]
    base += ["--lesion-label", "2", "--device", "cpu", "--splits", "5", "--epsilons", "0.2", "--alphas", "0.2"]
    base += ["--transforms", "identity", "--no-hd95"]
    code, _, err = run([*base, "--out", tmp_path / "serial"], capsys)
    assert code == 0, err
    code, _, err = run([*base, "--out", tmp_path / "pool", "--executor", "processes", "--workers", "2"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "pool").iterdir()) and "results.json" in names
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes(), name
