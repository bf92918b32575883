"""RCPS and Learn-Then-Test over repeated random calibration/test splits, from summaries only.

For each of ``splits`` random splits (``numpy.random.default_rng(seed)``, split ``s`` the ``s``-th
``rng.permutation(n)``, its first ``floor(cal_fraction * n)`` scans calibrate) the methods are calibrated on
the calibration side and measured on the test side, exactly from the summaries
(:class:`~ConformalSegLib.conformal.ltt.RiskData`):

* ``crc`` (:mod:`ConformalSegLib.conformal.crc`), ``rcps-hb`` and ``rcps-wsr`` (:mod:`ConformalSegLib.conformal.rcps`)
  at ``epsilon`` and ``delta``: the threshold, the test side's mean FNR (over its scans with a lesion);
* ``ltt`` (:mod:`ConformalSegLib.conformal.ltt`) with the requested risks: the threshold and each risk's test mean.

Per method: the mean threshold, the mean over splits of the test mean FNR, and the share of splits whose
test means are all within their targets ("held"). RCPS and LTT promise that share to be at least
``1 - delta`` *when the test side is the population*; with a finite test side it is a noisy estimate (a
test mean near its target can fall on either side), so read it next to the mean risk. A whole-image result
claims nothing beyond "nothing is missed" and counts as held. CRC promises only that the mean over splits
of the test FNR is at most epsilon.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..conformal.crc import crc_cutoff
from ..conformal.ltt import RiskBound, RiskData, ltt_test
from ..conformal.rcps import rcps_cutoff
from .config import split_sizes


@dataclass(frozen=True)
class RiskControlRow:
    """One method's results over the splits."""

    method: str
    mean_threshold: float  # over splits with a finite threshold
    mean_test_fnr: float
    held: float  # share of splits whose test means are all within their targets
    trivial: int  # splits with the whole image (-inf)
    test_means: dict[str, float]  # mean over splits of each risk's test mean (ltt; fnr for the others)


def _subset(data: RiskData, idx: np.ndarray) -> RiskData:
    return RiskData(
        data.voxels.subset(idx),
        None if data.lesions is None else data.lesions.subset(idx),
        None if data.false_positives is None else data.false_positives.subset(idx),
    )


def _test_means(data: RiskData, risks: Sequence[RiskBound], t: float) -> dict[str, float]:
    out = {}
    for r in risks:
        losses, _, _ = data.losses(r.name, np.array([t]))
        out[r.name] = float(losses.mean()) * data.cap(r.name) if losses.size else math.nan
    return out


def evaluate_risk_control(
    data: RiskData,
    *,
    epsilon: float,
    delta: float,
    risks: Sequence[RiskBound] = (),
    splits: int = 100,
    cal_fraction: float = 0.5,
    seed: int = 0,
) -> list[RiskControlRow]:
    """The rows of the module docstring (``risks`` empty: no ``ltt`` row)."""
    n_cal, _ = split_sizes(data.voxels.n, cal_fraction)
    rng = np.random.default_rng(seed)
    fnr = [RiskBound("fnr", float(epsilon))]
    methods = ["crc", "rcps-hb", "rcps-wsr"] + (["ltt"] if risks else [])
    records: dict[str, list[tuple[float, dict[str, float]]]] = {m: [] for m in methods}
    for _ in range(splits):
        perm = rng.permutation(data.voxels.n)
        cal, test = _subset(data, perm[:n_cal]), _subset(data, perm[n_cal:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too-few-scans results are counted as trivial below
            used = int(np.count_nonzero(cal.voxels.lesion_sizes))
            cuts = {
                "crc": crc_cutoff(cal.voxels, epsilon, n=used) if used else -math.inf,
                "rcps-hb": rcps_cutoff(cal.voxels, epsilon, delta, bound="hb"),
                "rcps-wsr": rcps_cutoff(cal.voxels, epsilon, delta, bound="wsr"),
            }
            if risks:
                cuts["ltt"] = ltt_test(cal, risks, delta).threshold
        for m in methods:
            records[m].append((cuts[m], _test_means(test, risks if m == "ltt" else fnr, cuts[m])))
    return [_row(m, records[m], list(risks) if m == "ltt" else fnr) for m in methods]


def _row(method: str, record: list[tuple[float, dict[str, float]]], risks: list[RiskBound]) -> RiskControlRow:
    cuts = np.array([c for c, _ in record])
    finite = cuts[np.isfinite(cuts)]
    means = {r.name: float(np.nanmean([m[r.name] for _, m in record])) for r in risks}
    held = np.mean([c == -math.inf or all(m[r.name] <= r.target for r in risks) for c, m in record])
    fnr = float(np.nanmean([m.get("fnr", math.nan) for _, m in record])) if "fnr" in means else math.nan
    return RiskControlRow(
        method,
        float(finite.mean()) if finite.size else math.nan,
        fnr,
        float(held),
        int(np.count_nonzero(cuts == -math.inf)),
        means,
    )


def markdown_table(rows: Sequence[RiskControlRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| method | mean threshold | mean test FNR | splits within target(s) | whole image | test means |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        means = ", ".join(f"{k} {v:.4g}" for k, v in r.test_means.items())
        lines.append(
            f"| {r.method} | {r.mean_threshold:.4f} | {r.mean_test_fnr:.4f} | {100 * r.held:.1f}% | {r.trivial} | "
            f"{means} |"
        )
    return "\n".join(lines)
