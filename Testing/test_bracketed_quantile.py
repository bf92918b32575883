"""The two-pass bracketed order statistic (issue 15): equal, bit for bit, to the one-pass path on the merged
summaries -- ties, empty partitions, k at the edges, values on bracket edges, many rounds, and on Dask."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.conformal.bracketed_quantile import (
    KEY_END,
    KEY_MIN,
    DaskPartitions,
    LocalPartitions,
    cls_cutoff_partitioned,
    crc_cutoff_partitioned,
    from_key,
    kth_largest,
    order_keys,
    sorted_keys,
)
from ConformalSegLib.conformal.cls import calibrate_cls
from ConformalSegLib.conformal.crc import crc_cutoff
from ConformalSegLib.conformal.summaries import LesionSummaries, SummaryBuilder


def test_order_keys_are_monotone_and_invertible():
    special = [-np.inf, -1e308, -1.0, -5e-324, -0.0, 0.0, 5e-324, 1e-300, 0.5, 1.0, 1e308, np.inf]
    rng = np.random.default_rng(0)
    values = np.concatenate([special, rng.normal(size=200), rng.uniform(size=200).astype(np.float32)])
    keys = order_keys(values)
    order = np.argsort(keys, kind="stable")
    assert np.array_equal(values[order], np.sort(values))
    assert all(from_key(int(k)) == v for k, v in zip(keys, values))
    assert order_keys([-0.0])[0] == order_keys([0.0])[0]
    assert from_key(KEY_MIN) == -np.inf and from_key(KEY_END - 1) == np.inf
    with pytest.raises(ConformalSegError, match="NaN"):
        order_keys([0.1, np.nan])


def partitions_of(values: np.ndarray, cuts: list[int]) -> LocalPartitions:
    bounds = [0, *sorted(cuts), values.size]
    return LocalPartitions([sorted_keys(values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, np.inf, 1e-9, 0.3]) | st.floats(0, 1), min_size=1, max_size=60),
    st.lists(st.integers(0, 60), max_size=4),
    st.integers(2, 5),
    st.integers(1, 4),
    st.data(),
)
def test_kth_largest_equals_np_partition(values, cuts, bins, max_fetch, data):
    values = np.asarray(values, dtype=np.float64)
    cuts = [min(c, values.size) for c in cuts]  # repeated / extreme cuts: empty partitions
    k = data.draw(st.integers(1, values.size))
    expected = np.partition(values, values.size - k)[values.size - k]
    assert kth_largest(partitions_of(values, cuts), k, bins=bins, max_fetch=max_fetch) == expected


def test_kth_largest_edges_and_refusals():
    values = np.array([0.5] * 7 + [0.25, 1.0])  # ties at the answer
    parts = partitions_of(values, [0, 0, 3, 9])
    for k in range(1, values.size + 1):
        for bins, max_fetch in ((2, 1), (1024, 1 << 16), (3, 2)):
            assert kth_largest(parts, k, bins=bins, max_fetch=max_fetch) == np.sort(values)[::-1][k - 1]
    # values sitting exactly on the first round's edges (bins=2 cuts at the middle key)
    middle = from_key((KEY_MIN + KEY_END) // 2)
    on_edges = np.array([middle, middle, from_key((KEY_MIN + KEY_END) // 2 - 1), -np.inf, np.inf])
    for k in range(1, 6):
        assert kth_largest(partitions_of(on_edges, [2]), k, bins=2, max_fetch=1) == np.sort(on_edges)[::-1][k - 1]
    with pytest.raises(ConformalSegError, match="outside"):
        kth_largest(parts, 0)
    with pytest.raises(ConformalSegError, match="outside"):
        kth_largest(parts, 10)


def summaries(rng, n: int, precision: str, empty_share: float) -> list[tuple[str, np.ndarray]]:
    cases = []
    for i in range(n):
        m = 0 if rng.uniform() < empty_share else int(rng.integers(1, 40))
        values = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=m) if i % 3 == 0 else rng.beta(2, 1, size=m)  # ties
        cases.append((f"c{i:03d}", np.sort(values)[::-1]))
    return cases


def split(cases, cuts: list[int], precision: str) -> tuple[LesionSummaries, LocalPartitions]:
    bounds = [0, *sorted(min(c, len(cases)) for c in cuts), len(cases)]
    parts = [LesionSummaries.from_sorted(cases[a:b], precision) for a, b in zip(bounds[:-1], bounds[1:])]
    merged = LesionSummaries.from_sorted(cases, precision)
    return merged, LocalPartitions(parts)


@pytest.mark.parametrize("precision", ["float32", "uint16"])
@pytest.mark.parametrize("seed", range(4))
def test_cls_and_crc_cutoffs_equal_the_one_pass_path(precision, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    cases = summaries(rng, n, precision, empty_share=0.2)
    cuts = [0, int(rng.integers(0, n)), int(rng.integers(0, n)), n]
    merged, parts = split(cases, cuts, precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epsilon in (0.0, 0.1, 0.3, 1.0):
            for alpha in (0.05, 0.2, 0.5):
                for empty in ("exclude", "include"):
                    if empty == "exclude" and not (merged.lesion_sizes > 0).any():
                        continue
                    expected = calibrate_cls(merged, epsilon, alpha, empty=empty).probability_threshold
                    for bins, fetch in ((2, 1), (1024, 1 << 16)):
                        got = cls_cutoff_partitioned(parts, epsilon, alpha, empty=empty, bins=bins, max_fetch=fetch)
                        assert got == expected, (epsilon, alpha, empty, bins)
            if epsilon == 0.0:
                continue
            for n_cal in (None, int(np.count_nonzero(merged.lesion_sizes))):
                expected = crc_cutoff(merged, epsilon, n=n_cal)
                for bins, fetch in ((2, 1), (3, 5), (64, 1 << 16)):
                    assert crc_cutoff_partitioned(parts, epsilon, n=n_cal, bins=bins, max_fetch=fetch) == expected


def test_crc_trivial_budgets():
    merged, parts = split([("a", np.array([0.9, 0.2])), ("b", np.array([0.7]))], [1], "float32")
    assert crc_cutoff_partitioned(parts, 0.1) == crc_cutoff(merged, 0.1) == -np.inf  # too few scans
    assert crc_cutoff_partitioned(parts, 1.0) == crc_cutoff(merged, 1.0) == np.inf  # every cutoff allowed


def test_on_a_dask_cluster_the_summaries_stay_on_the_workers():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(7)
    cases = summaries(rng, 40, "float32", empty_share=0.1)
    merged, parts = split(cases, [10, 25], "float32")
    with (
        warnings.catch_warnings(),
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c,
        distributed.Client(c) as client,
    ):
        remote = DaskPartitions(client, client.scatter(parts.parts))
        warnings.simplefilter("ignore")
        assert (
            cls_cutoff_partitioned(remote, 0.1, 0.1, bins=4, max_fetch=3)
            == calibrate_cls(merged, 0.1, 0.1).probability_threshold
        )
        assert crc_cutoff_partitioned(remote, 0.1, bins=4, max_fetch=3) == crc_cutoff(merged, 0.1)


def test_builder_and_from_sorted_agree():  # the fixture above builds partitions the way workers do
    values = np.array([0.9, 0.5, 0.5])
    builder = SummaryBuilder()
    builder.add_sorted("a", values)
    assert builder.build().values.tobytes() == LesionSummaries.from_sorted([("a", values)]).values.tobytes()


def test_case_ranges_are_views_and_calibrate_crc_switches_above_the_size(monkeypatch):
    from ConformalSegLib.conformal import crc
    from ConformalSegLib.conformal.bracketed_quantile import case_ranges

    rng = np.random.default_rng(3)
    cases = [(f"c{i}", np.sort(rng.beta(2, 1, size=int(rng.integers(0, 30))))[::-1]) for i in range(50)]
    merged, _ = split(cases, [], "float32")
    ranges = case_ranges(merged, 7)
    assert sum(r.n for r in ranges) == merged.n and all(
        np.shares_memory(r.values, merged.values) for r in ranges if r.n
    )
    assert np.concatenate([r.values for r in ranges]).tobytes() == merged.values.tobytes()
    one_pass = [crc.calibrate_crc(merged, eps, empty=e) for eps in (0.05, 0.1, 0.3) for e in ("exclude", "include")]
    monkeypatch.setattr(crc, "TWO_PASS_VOXELS", 0)
    calls = []
    original = crc_cutoff_partitioned
    monkeypatch.setattr(
        "ConformalSegLib.conformal.bracketed_quantile.crc_cutoff_partitioned",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    two_pass = [crc.calibrate_crc(merged, eps, empty=e) for eps in (0.05, 0.1, 0.3) for e in ("exclude", "include")]
    assert two_pass == one_pass and len(calls) == 6
    assert all(0 < c.probability_threshold < 1 for c in one_pass)
