"""Streaming interval calibration (ConformalSegLib.semcrc.streaming) against the in-memory procedures.

The lambdas, anchors, statuses, splits and stored records must be bit-identical on several seeded data sets
and for every interval method, and the profiles written by both paths must recalibrate identically.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.semcrc import synthetic_intervals  # noqa: E402
from ConformalSegLib.semcrc.errors import IntervalCalibrationError, IntervalInputError  # noqa: E402
from ConformalSegLib.semcrc.profile import load_interval_profile  # noqa: E402
from ConformalSegLib.semcrc.recalibrate import IntervalRecord  # noqa: E402
from ConformalSegLib.semcrc.synthetic import ORGANS  # noqa: E402
from ConformalSegLib.semcrc.workflow import calibrate_interval  # noqa: E402

ORGAN_SPEC = ",".join(f"{label}={name}" for name, label, *_ in ORGANS)
METHOD_OPTIONS = {
    "crc": {},
    "k-crc": dict(n_opt=6, k=3, d_opt=40, gammas=(0.3, 0.7)),
    "sem-crc": dict(n_opt=6, gammas=(0.5,)),  # automatic d_opt: the group-size pass over S_opt
    "sem-crc-organ": dict(n_opt=5, d_opt=50, gammas=(0.5,)),
}


def write_folders(root: Path, n: int, seed: int, shape: tuple[int, int, int], widen: float = 0.0) -> dict[str, Path]:
    """``n`` synthetic scans as ``.npy`` folders; ``widen``: every raw interval that much wider on each side (an
    under-confident quantile model, which the shrinkable family tightens)."""
    syn = synthetic_intervals(n, shape=shape, seed=seed)
    dirs = {name: root / name for name in ("lower", "upper", "truth", "organs")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for i in range(n):
        np.save(dirs["lower"] / f"c{i:02d}.npy", syn.lower[i] - widen)
        np.save(dirs["upper"] / f"c{i:02d}.npy", syn.upper[i] + widen)
        np.save(dirs["truth"] / f"c{i:02d}.npy", syn.truth[i])
        np.save(dirs["organs"] / f"c{i:02d}.npy", syn.labels[i].astype(np.int16))
    return dirs


def run(dirs: dict[str, Path], method: str, stream: bool, epsilon: float = 0.1, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibrate_interval(
            method,
            dirs["lower"],
            dirs["upper"],
            dirs["truth"],
            dirs["organs"],
            epsilon,
            organs=ORGAN_SPEC,
            body="nonzero",
            stream=stream,
            **options,
        )


def assert_same_record(a: IntervalRecord | None, b: IntervalRecord | None) -> None:
    assert a is not None and b is not None
    for key, value in a.to_arrays().items():
        other = b.to_arrays()[key]
        assert value.dtype == other.dtype, key
        np.testing.assert_array_equal(value, other, err_msg=key)
    assert a.to_json() == b.to_json()


def assert_same_profile(streamed, reference) -> None:
    s, r = streamed.calibration, reference.calibration
    for field in ("lam", "anchor", "omega", "n_cal"):
        np.testing.assert_array_equal(getattr(s, field), getattr(r, field), err_msg=field)
        assert getattr(s, field).dtype == getattr(r, field).dtype, field
    for field in ("method", "epsilon", "groups", "status", "n_opt", "organs", "gamma", "shape", "lambda_max"):
        assert getattr(s, field) == getattr(r, field), field
    for field in ("opt_cases", "cal_cases", "shrink_floor"):
        assert getattr(s, field) == getattr(r, field), field
    if r.partition is not None:
        np.testing.assert_array_equal(s.partition, r.partition)
    assert_same_record(streamed.record, reference.record)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_streaming_is_bit_identical(tmp_path: Path, method: str, seed: int) -> None:
    shape = ((1, 14, 14), (2, 12, 12), (1, 18, 10))[seed]
    dirs = write_folders(tmp_path, 16 + 3 * seed, seed, shape)
    options = {**METHOD_OPTIONS[method], "seed": seed}
    streamed = run(dirs, method, True, **options)
    reference = run(dirs, method, False, **options)
    assert_same_profile(streamed, reference)
    assert streamed.calibration.controlled or method == "sem-crc-organ"
    # the written profiles recalibrate identically (apply --epsilon), and load with the compact record
    streamed.save(tmp_path / "s.json")
    reference.save(tmp_path / "r.json")
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "r.npz").read_bytes()
    again = load_interval_profile(tmp_path / "s.json").recalibrate(0.2)
    fresh = run(dirs, method, False, epsilon=0.2, **options)
    np.testing.assert_array_equal(again.calibration.lam, fresh.calibration.lam)


def test_streaming_shrinkable_crc_and_lambda_max(tmp_path: Path) -> None:
    dirs = write_folders(tmp_path, 14, 5, (1, 14, 14))
    for options in ({"shrinkable": True}, {"lambda_max": 0.01}, {"shrinkable": True, "lambda_max": 0.2}):
        assert_same_profile(run(dirs, "crc", True, **options), run(dirs, "crc", False, **options))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("from_anchor", [False, True])
def test_streaming_shrinkable_per_organ_sem_crc(tmp_path: Path, seed: int, from_anchor: bool) -> None:
    """Shrinkable per-organ sem-CRC streams bit-identically (lambdas, record, half widths) and its profile
    recalibrates (``apply --epsilon``) exactly as a calibration from scratch at the new epsilon."""
    shape = ((1, 14, 14), (2, 12, 12), (1, 18, 10))[seed]
    dirs = write_folders(tmp_path, 16 + 2 * seed, seed, shape, widen=0.3)
    options = {**METHOD_OPTIONS["sem-crc-organ"], "seed": seed, "shrinkable": True, "from_anchor": from_anchor}
    streamed, reference = run(dirs, "sem-crc-organ", True, **options), run(dirs, "sem-crc-organ", False, **options)
    assert_same_profile(streamed, reference)
    assert streamed.calibration.shrink_floor is not None and streamed.calibration.shrink_floor < 0
    record = streamed.record
    assert record is not None and record.half_width is not None
    assert -streamed.calibration.shrink_floor == record.half_width.max()
    assert (streamed.calibration.lam < 0).any() or from_anchor  # the family does shrink below the raw interval
    streamed.save(tmp_path / "s.json")
    reference.save(tmp_path / "r.json")
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "r.npz").read_bytes()
    for epsilon in (0.1, 0.2):
        again = load_interval_profile(tmp_path / "s.json").recalibrate(epsilon)
        fresh = run(dirs, "sem-crc-organ", False, epsilon=epsilon, **options)
        for field in ("lam", "omega", "anchor", "n_cal"):
            np.testing.assert_array_equal(getattr(again.calibration, field), getattr(fresh.calibration, field))
        assert again.calibration.status == fresh.calibration.status


def test_compact_record_keeps_only_uncovered_voxels(tmp_path: Path) -> None:
    dirs = write_folders(tmp_path, 12, 7, (1, 16, 16))
    profile = run(dirs, "sem-crc-organ", True, n_opt=4, d_opt=40, gammas=(0.5,))
    record = profile.record
    assert record is not None and record.counts is not None
    assert (record.need > 0).all()  # voxels covered at lambda = 0 are only counted
    assert record.counts.shape == (8, len(profile.calibration.groups))
    assert record.need.size < record.counts.sum()


def test_old_records_without_counts_still_recalibrate(tmp_path: Path) -> None:
    """A profile written before the compact record (every counted voxel stored, no counts) gives the same lambdas."""
    dirs = write_folders(tmp_path, 14, 4, (1, 14, 14))
    for method in ("crc", "sem-crc-organ"):
        options = dict(METHOD_OPTIONS[method])
        options.pop("n_opt", None)
        if method != "crc":
            options["n_opt"] = 4
        profile = run(dirs, method, False, **options)
        record = profile.record
        assert record is not None and record.counts is not None
        # re-expand: add the covered voxels back with need -1 and drop the counts
        parts_need, parts_group, offsets = [], [], [0]
        for need, group, counts in record.scans(len(profile.calibration.groups)):
            extra = np.repeat(np.arange(counts.size), counts - np.bincount(group, minlength=counts.size))
            parts_need.append(np.concatenate([need, np.full(extra.size, -1.0)]))
            parts_group.append(np.concatenate([group, extra.astype(np.int32)]))
            offsets.append(offsets[-1] + parts_need[-1].size)
        old = IntervalRecord(
            np.concatenate(parts_need),
            np.concatenate(parts_group).astype(np.int32),
            np.asarray(offsets, dtype=np.int64),
            record.sample,
            record.gammas,
            record.from_anchor,
        )
        from ConformalSegLib.semcrc.recalibrate import recalibrate_interval

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = recalibrate_interval(profile.calibration, old, 0.15)
            b = recalibrate_interval(profile.calibration, record, 0.15)
        np.testing.assert_array_equal(a.lam, b.lam)


def test_streaming_errors_match_the_in_memory_path(tmp_path: Path) -> None:
    dirs = write_folders(tmp_path, 10, 1, (1, 12, 12))
    for stream in (True, False):
        with pytest.raises(IntervalCalibrationError, match="n_opt must be an integer in 1..9"):
            run(dirs, "sem-crc", stream, n_opt=10)
        with pytest.raises(IntervalCalibrationError, match="lambda_max"):
            run(dirs, "crc", stream, lambda_max=-1.0)
    np.save(dirs["truth"] / "c03.npy", np.full((1, 12, 12), np.nan, dtype=np.float32))
    for stream in (True, False):
        with pytest.raises(IntervalInputError, match="NaN"):
            run(dirs, "crc", stream)


def test_streaming_reports_progress_per_scan_read(tmp_path: Path) -> None:
    dirs = write_folders(tmp_path, 10, 2, (1, 12, 12))
    seen: list[tuple[int, int, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate_interval(
            "k-crc",
            dirs["lower"],
            dirs["upper"],
            dirs["truth"],
            None,
            0.2,
            n_opt=3,
            d_opt=20,
            gammas=(0.5,),
            progress=lambda done, total, text: seen.append((done, total, text)),
        )
    assert [d for d, _, _ in seen] == list(range(1, 14)) and {t for _, t, _ in seen} == {13}
    assert "partition" in seen[0][2] and "calibration split" in seen[-1][2]


def test_spilled_scans_evaluate_exactly_like_scans_in_memory(tmp_path: Path) -> None:
    from ConformalSegLib.semcrc.evaluation import evaluate_interval_methods
    from ConformalSegLib.semcrc.spill import SpilledScan
    from ConformalSegLib.semcrc.workflow import load_interval_data

    dirs = write_folders(tmp_path / "in", 14, 6, (1, 12, 12))
    args = (dirs["lower"], dirs["upper"], dirs["truth"], dirs["organs"], ORGAN_SPEC, "nonzero")
    memory = load_interval_data(*args)
    (tmp_path / "spill").mkdir()
    spilled = load_interval_data(*args, spill_to=tmp_path / "spill")
    assert all(isinstance(s, SpilledScan) for s in spilled.scans)
    for a, b in zip(memory.scans, spilled.scans):
        assert (a.shape, a.d, a.case_id) == (b.shape, b.d, b.case_id)
        for name in ("index", "need", "width", "group"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    options = dict(n_opt=3, d_opt=30, gammas=(0.5,), runs=2, n_cal=8)
    steps: list[tuple[int, int, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = evaluate_interval_methods(memory, 0.2, **options)
        got = evaluate_interval_methods(spilled, 0.2, progress=lambda *a: steps.append(a), **options)
    assert got == want
    assert [s[:2] for s in steps] == [(i, 8) for i in range(1, 9)] and steps[-1][2] == "run 2 sem-crc-organ"


def test_spilled_arrays_are_exact_read_only_and_checked(tmp_path: Path) -> None:
    """Every dtype and size the scans use (empty included) comes back bit for bit and read-only, also after
    pickling (what an executor's worker gets); a file that changed size or vanished gets one clear error."""
    import pickle

    from ConformalSegLib.semcrc.errors import IntervalInputError
    from ConformalSegLib.semcrc.intervals import IntervalScan
    from ConformalSegLib.semcrc.spill import spill_scan

    rng = np.random.default_rng(0)
    for d in (0, 1, 1000):
        scan = IntervalScan(
            (d, 1), np.arange(d, dtype=np.int64), rng.normal(size=d), rng.random(d).astype(np.float32),
            rng.integers(0, 3, d).astype(np.int16), case_id=f"c{d}",
        )  # fmt: skip
        spilled = pickle.loads(pickle.dumps(spill_scan(scan, tmp_path / f"s{d}")))
        for name in ("index", "need", "width", "group"):
            got, want = getattr(spilled, name), getattr(scan, name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes() and not got.flags.writeable
    path = tmp_path / "s1000" / "need.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(IntervalInputError, match="changed size"):
        spilled.need  # noqa: B018
    path.unlink()
    with pytest.raises(IntervalInputError, match="not on this machine"):
        spilled.need  # noqa: B018


def test_anchor_progress_and_progress_lines_without_a_tty(capsys: pytest.CaptureFixture) -> None:
    from ConformalSegLib.cli.common import progress_bar

    update = progress_bar("reading scans")
    for i in range(1, 5):
        update(i, 4, f"c{i}")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["reading scans: 1/4 cases (c1)", "reading scans: 4/4 cases (c4)"]


def test_streaming_reports_anchor_progress(tmp_path: Path) -> None:
    dirs = write_folders(tmp_path, 10, 2, (1, 12, 12))
    seen: list[tuple[int, int, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate_interval(
            "sem-crc",
            dirs["lower"],
            dirs["upper"],
            dirs["truth"],
            dirs["organs"],
            0.2,
            organs=ORGAN_SPEC,
            n_opt=3,
            gammas=(0.3, 0.7),
            anchor_progress=lambda *a: seen.append(a),
        )
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and seen[0][2].startswith("gamma 0.3")
