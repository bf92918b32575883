"""Drift monitoring after deployment: a conformal test martingale over reviewed cases, in time order.

Every guarantee of this package assumes that the calibration scans and the new scans are exchangeable.
Once radiologists review (correct) the masks of new scans, each reviewed case has a ground truth, hence a
per-scan score, and the assumption can be *tested online*, with a false-alarm probability fixed in
advance, however long the monitoring runs.

Scores and p-values
-------------------
Each case's nonconformity score is the method's per-scan score at the profile's parameters
(:mod:`.scan_scores`: ``-c_i`` for CLS and lesion-level, ``c_i`` the critical threshold; ``max(tau, gamma)``
for confidence sets; expected-FNR profiles use the CLS critical cutoff at their epsilon). Lesion-free
cases are skipped where the calibration excluded them. Taking the ``n`` calibration scores first and
the ``K`` reviewed ones in time order, the ``k``-th reviewed case gets the smoothed conformal p-value

    p_k = (#{j <= N : s_j > s_N} + theta_k * #{j <= N : s_j = s_N}) / N,   N = n + k,

over all scores up to and including its own, ``theta_k`` uniform on ``(0, 1]`` (seeded). If the whole
sequence is exchangeable, ``p_1, p_2, ...`` are independent and uniform on ``(0, 1)`` (the exact validity
of smoothed conformal p-values in the online mode: Vovk, Gammerman & Shafer, *Algorithmic Learning in a
Random World*, 2005, ch. 2 and 7; the calibration scores' own p-values need not be computed, since betting
1 on them changes nothing). A small ``p_k`` says case ``k``
is harder for the model (a lower critical threshold) than the cases before it.

Martingale and alarm
--------------------
A *conformal test martingale* multiplies betting factors ``f_k(p_k)`` with ``f_k >= 0`` and
``integral_0^1 f_k = 1``, ``f_k`` chosen from the earlier p-values only: under exchangeability
``M_k = prod f_j(p_j)`` is a nonnegative martingale with ``M_0 = 1``, and by **Ville's inequality**
``P(sup_k M_k >= 1 / delta) <= delta``. So flagging the first ``k`` with ``M_k >= 1/delta`` raises a false
alarm with probability at most ``delta`` over the whole, unbounded stream. Two martingales:

* ``jumper`` (default): the *Simple Jumper* (Vovk, Petej, Nouretdinov, Ahlberg, Carlsson & Gammerman,
  "Retrain or not retrain: conformal test martingales for change-point detection", COPA 2021): three bettors with
  ``f_e(p) = 1 + e (p - 1/2)``, ``e`` in ``{-1, 0, 1}``, and a fraction ``J = 0.01`` of the capital
  redistributed evenly among them before every bet. It bets on p-values drifting low (``e = -1``: cases
  getting harder) or high; each factor is at most 1.5, so an alarm needs at least
  ``log(1/delta) / log(1.5)`` cases (12 for delta = 0.01).
* ``power``: power martingales (Vovk, Nouretdinov & Gammerman, "Testing exchangeability on-line", ICML
  2003) mixed as ``(1/|E|) sum_{e in E} prod_j e p_j^(e - 1)`` over the fixed grid
  ``E = {0.05, 0.10, ..., 0.95}`` (an average of test martingales is one). It bets only on small p-values
  (cases getting harder), and can grow fast when they are very small.

The monitor also reports the **running ECR** of the reviewed cases at the profile's threshold (the
fraction so far whose guarantee event held, e.g. FNR <= epsilon), or for expected-FNR profiles the
running mean FNR, next to the ``1 - alpha`` (or epsilon) target.

The log
-------
:func:`write_log` stores one JSON document (``conformalseg-monitor``, version 1): the profile's file and
SHA-256, the settings, per case its id, time, score, p-value, martingale value and covered flag, and the
alarm. :func:`drift_status` turns a log into the one-line badge that the Slicer panel shows.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import ConformalSegError
from ..io.atomic import atomic_write_text
from ..io.json_file import read_json_file
from .cls import ThresholdCalibration, critical_cutoffs, used_cases
from .confidence_sets import SetStatistics, SetStatisticsBuilder
from .deployment import DeployableProfile
from .exact import check_alpha, fnr_exceeds
from .lesion_level import LesionLevelBuilder, LesionLevelSummaries
from .scan_scores import channel_quantiles, has_scan_scores, scan_scores_of
from .score_transforms import parse_transform
from .summaries import LesionSummaries, SummaryBuilder, check_probabilities
from .threshold_scores import DEFAULT_SCORE, threshold_scores

LOG_FORMAT = "conformalseg-monitor"
LOG_VERSION = 1
MARTINGALES = ("jumper", "power")
JUMPER_RATE = 0.01
POWER_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def conformal_p_values(calibration: np.ndarray, stream: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smoothed online conformal p-values of ``stream`` after ``calibration`` (module docstring)."""
    seen = sorted(np.asarray(calibration, np.float64).tolist())
    out = np.empty(len(stream))
    for k, s in enumerate(np.asarray(stream, np.float64).tolist()):
        bisect.insort(seen, s)
        lo, hi = bisect.bisect_left(seen, s), bisect.bisect_right(seen, s)
        theta = 1.0 - rng.random()  # uniform on (0, 1]
        out[k] = ((len(seen) - hi) + theta * (hi - lo)) / len(seen)
    return out


def simple_jumper(p_values: np.ndarray, jump: float = JUMPER_RATE) -> np.ndarray:
    """``M_1, M_2, ...`` of the Simple Jumper martingale (module docstring)."""
    capital = np.full(3, 1.0 / 3.0)
    bets = np.array([-1.0, 0.0, 1.0])
    out = np.empty(len(p_values))
    for k, p in enumerate(np.asarray(p_values, np.float64)):
        total = capital.sum()
        capital = (1.0 - jump) * capital + jump * total / 3.0
        capital = capital * (1.0 + bets * (p - 0.5))
        out[k] = capital.sum()
    return out


def power_mixture(p_values: np.ndarray, grid: Sequence[float] = POWER_GRID) -> np.ndarray:
    """``M_1, M_2, ...`` of the power-martingale mixture over ``grid`` (module docstring), in log space."""
    e = np.asarray(grid, np.float64)[:, None]
    logs = np.log(e) + (e - 1.0) * np.log(np.asarray(p_values, np.float64))[None, :]
    cumulative = np.cumsum(logs, axis=1)
    top = cumulative.max(axis=0)
    return np.asarray(np.exp(top) * np.exp(cumulative - top).mean(axis=0))


def first_alarm(martingale: np.ndarray, delta: float) -> int | None:
    """Index of the first ``M_k >= 1/delta`` (Ville's inequality), or None."""
    d = check_alpha(delta, "delta")
    hits = np.flatnonzero(np.asarray(martingale) >= float(1 / d))
    return int(hits[0]) if hits.size else None


@dataclass(frozen=True)
class MonitorResult:
    """The monitoring of one stream of reviewed cases (arrays are per reviewed case, in time order)."""

    case_ids: tuple[str, ...]
    times: tuple[str, ...]
    scores: np.ndarray
    p_values: np.ndarray
    martingale: np.ndarray
    covered: np.ndarray
    running: np.ndarray  # running ECR (or running mean FNR for expected-FNR profiles)
    running_label: str
    target: float
    alarm: int | None
    delta: float
    kind: str
    n_calibration: int
    seed: int
    skipped: tuple[str, ...] = ()


def monitor(
    calibration_scores: np.ndarray,
    reviewed_scores: np.ndarray,
    covered: np.ndarray | None,
    *,
    case_ids: Sequence[str],
    times: Sequence[str] | None = None,
    running: np.ndarray | None = None,
    running_label: str = "running ECR",
    target: float = math.nan,
    delta: float = 0.01,
    kind: str = "jumper",
    seed: int = 0,
    skipped: Sequence[str] = (),
) -> MonitorResult:
    """Conformal p-values, the martingale and the alarm for reviewed cases in time order.

    ``covered`` (bool per case) gives the running ECR unless ``running`` (e.g. a running mean FNR) is given.
    """
    if kind not in MARTINGALES:
        raise ConformalSegError(f"unknown martingale {kind!r}", fix=f"use one of: {', '.join(MARTINGALES)}")
    reviewed = np.asarray(reviewed_scores, np.float64)
    if reviewed.size == 0:
        raise ConformalSegError("no reviewed case to monitor", fix="give reviewed cases with a lesion")
    p = conformal_p_values(calibration_scores, reviewed, np.random.default_rng(seed))
    martingale = simple_jumper(p) if kind == "jumper" else power_mixture(p)
    ok = np.ones(reviewed.size, bool) if covered is None else np.asarray(covered, bool)
    if running is None:
        running = np.cumsum(ok) / np.arange(1, ok.size + 1)
    return MonitorResult(
        tuple(case_ids),
        tuple(times) if times is not None else ("",) * reviewed.size,
        reviewed,
        p,
        martingale,
        ok,
        np.asarray(running, np.float64),
        running_label,
        float(target),
        first_alarm(martingale, delta),
        float(delta),
        kind,
        int(np.asarray(calibration_scores).size),
        int(seed),
        tuple(skipped),
    )


# ------------------------------------------------------------------------------- a profile's stream


@dataclass(frozen=True)
class ReviewedData:
    """Summaries of reviewed cases, built as the profile's own (same precision, transforms, lesion rule)."""

    summaries: LesionSummaries
    set_statistics: SetStatistics | None
    lesion_level: LesionLevelSummaries | None
    empty_policy: str


def reviewed_data(cases: Iterable[Any], profile: DeployableProfile) -> ReviewedData:
    """Stream reviewed cases (objects with ``case_id``, ``probability`` and ``lesion`` volumes, as
    :class:`ConformalSegLib.io.dataset.Case`) into the summaries the profile's method needs (on the profile's
    score, :mod:`.threshold_scores`)."""
    summaries = SummaryBuilder(profile.summaries.precision)
    stats = profile.set_statistics
    sets = (
        SetStatisticsBuilder(parse_transform(stats.inner_transform), parse_transform(stats.outer_transform))
        if stats
        else None
    )
    ll = profile.lesion_level
    lesions = LesionLevelBuilder(ll.detect_fraction, ll.min_lesion_voxels, ll.min_lesion_mm3) if ll else None
    score = getattr(profile, "score", DEFAULT_SCORE)  # threshold profiles calibrated with --score
    for case in cases:
        probability, lesion, geometry = case.probability.array, case.lesion.array, case.probability.geometry
        if sets is not None:
            sets.add_case(case.case_id, probability, lesion, geometry)
        if score != DEFAULT_SCORE:
            check_probabilities(probability, case.case_id)
            probability = threshold_scores(probability, geometry, score)
        summaries.add_case(case.case_id, probability, lesion)
        if lesions is not None:
            lesions.add_case(case.case_id, probability, lesion, geometry.voxel_volume_mm3)
    built = summaries.build()
    shared = sorted(set(built.case_ids) & set(profile.summaries.case_ids))
    if shared:
        raise ConformalSegError(
            f"{len(shared)} reviewed case(s) are calibration scans of the profile (e.g. {shared[0]})",
            fix="monitor only new scans: a calibration scan is no new observation",
        )
    return ReviewedData(
        built,
        None if sets is None else sets.build(),
        None if lesions is None else lesions.build(),
        profile.empty_policy,
    )


def monitor_profile(
    profile: DeployableProfile,
    reviewed: ReviewedData,
    *,
    times: Mapping[str, str] | None = None,
    delta: float = 0.01,
    kind: str = "jumper",
    seed: int = 0,
) -> MonitorResult:
    """Monitor the reviewed cases (in the order of their summaries) against the profile's calibration."""
    c = profile.calibration
    if profile.weighting is not None:
        raise ConformalSegError(
            "a weighted profile's target scans are, by design, not exchangeable with its calibration scans",
            fix="monitor a profile calibrated on scans of the site being monitored",
        )
    ids = reviewed.summaries.case_ids
    if has_scan_scores(c):
        cal, rev = scan_scores_of(c, profile), scan_scores_of(c, reviewed)
        quantiles = channel_quantiles(c)
        covered = np.all([ch.scores <= quantiles[ch.name] for ch in rev.channels], axis=0)
        cal_scores, rev_scores, used = cal.monitoring_score()[cal.used], rev.monitoring_score(), rev.used
        # covered = every channel's event; by the union bound it holds with probability >= 1 - sum of levels
        running, label, target = None, "running ECR", 1 - math.fsum(ch.alpha for ch in rev.channels)
    else:  # expected-FNR control: the CLS critical cutoff as the score, the running mean FNR as the statistic
        assert isinstance(c, ThresholdCalibration)  # sets have scan scores
        used = used_cases(reviewed.summaries, reviewed.empty_policy)
        cal_scores = -critical_cutoffs(profile.summaries, c.epsilon)[
            used_cases(profile.summaries, profile.empty_policy)
        ]
        rev_scores = -critical_cutoffs(reviewed.summaries, c.epsilon)
        sizes = reviewed.summaries.lesion_sizes
        misses = sizes - reviewed.summaries.count_at_least(c.probability_threshold)
        covered = ~fnr_exceeds(misses, sizes, c.epsilon)
        fnr = np.divide(misses, sizes, out=np.zeros(len(sizes)), where=sizes > 0)[used]
        running, label, target = np.cumsum(fnr) / np.arange(1, fnr.size + 1), "running mean FNR", c.epsilon
    kept = [cid for cid, u in zip(ids, used) if u]
    return monitor(
        cal_scores,
        rev_scores[used],
        covered[used],
        case_ids=kept,
        times=[(times or {}).get(cid, "") for cid in kept],
        running=running,
        running_label=label,
        target=target,
        delta=delta,
        kind=kind,
        seed=seed,
        skipped=[cid for cid, u in zip(ids, used) if not u],
    )


# ------------------------------------------------------------------------------------------- the log


def profile_sha256(profile_path: str | PathLike[str]) -> str:
    return hashlib.sha256(Path(profile_path).read_bytes()).hexdigest()


def default_log_dir(profile_path: str | PathLike[str]) -> Path:
    """``PROFILE.monitor/`` beside ``PROFILE.json``: where ``monitor`` writes and the panel looks."""
    path = Path(profile_path)
    return path.with_name(path.stem + ".monitor")


LOG_NAME = "monitor.json"


def log_document(result: MonitorResult, profile_path: str | PathLike[str]) -> dict[str, Any]:
    alarm = result.alarm
    return {
        "format": LOG_FORMAT,
        "format_version": LOG_VERSION,
        "profile": str(Path(profile_path).resolve()),
        "profile_sha256": profile_sha256(profile_path),
        "martingale": result.kind,
        "delta": result.delta,
        "threshold": 1.0 / result.delta,
        "seed": result.seed,
        "n_calibration": result.n_calibration,
        "running_label": result.running_label,
        "target": None if math.isnan(result.target) else result.target,
        "alarm": None
        if alarm is None
        else {"index": alarm, "case_id": result.case_ids[alarm], "time": result.times[alarm]},
        "max_martingale": float(result.martingale.max()),
        "skipped": list(result.skipped),
        "cases": [
            {
                "case_id": cid,
                "time": t,
                "score": float(s) if math.isfinite(s) else str(s),
                "p_value": float(p),
                "martingale": float(m),
                "covered": bool(c),
                "running": float(r),
            }
            for cid, t, s, p, m, c, r in zip(
                result.case_ids,
                result.times,
                result.scores,
                result.p_values,
                result.martingale,
                result.covered,
                result.running,
            )
        ],
    }


def write_log(
    result: MonitorResult, profile_path: str | PathLike[str], path: str | PathLike[str], *, force: bool = False
) -> Path:
    """Write the monitoring log (atomically; an existing one only with ``force``)."""
    return atomic_write_text(path, json.dumps(log_document(result, profile_path), indent=2) + "\n", force=force)


def read_log(path: str | PathLike[str]) -> dict[str, Any]:
    """A monitoring log, checked for its format."""
    doc = read_json_file(path, "monitoring log", "rerun conformalseg monitor")
    if not isinstance(doc, dict) or doc.get("format") != LOG_FORMAT or doc.get("format_version") != LOG_VERSION:
        raise ConformalSegError("not a ConformalSeg monitoring log", path=path, fix="rerun conformalseg monitor")
    return doc


@dataclass(frozen=True)
class DriftStatus:
    """What the panel shows: ``state`` is ``none`` (no log), ``ok``, ``drift`` or ``stale``."""

    state: str
    text: str

    @property
    def warning(self) -> bool:
        return self.state in ("drift", "stale")


def drift_status(profile_path: str | PathLike[str], log_path: str | PathLike[str] | None = None) -> DriftStatus:
    """The drift badge of a profile from its reviewed-case log (default: ``PROFILE.monitor/monitor.json``)."""
    log_path = Path(log_path) if log_path is not None else default_log_dir(profile_path) / LOG_NAME
    if not log_path.is_file():
        return DriftStatus("none", "")
    doc = read_log(log_path)
    if doc.get("profile_sha256") != profile_sha256(profile_path):
        return DriftStatus(
            "stale", f"Drift log {log_path.name} was made for another version of this profile: rerun monitor."
        )
    n, threshold = len(doc.get("cases", [])), float(doc["threshold"])
    alarm = doc.get("alarm")
    if alarm is None:
        return DriftStatus(
            "ok",
            f"No drift detected over {n} reviewed case(s) "
            f"(martingale max {doc['max_martingale']:.3g} < {threshold:g}).",
        )
    when = f", {alarm['time']}" if alarm.get("time") else ""
    return DriftStatus(
        "drift",
        f"Shift detected at reviewed case {alarm['index'] + 1} of {n} ({alarm['case_id']}{when}): the conformal test "
        f"martingale reached 1/delta = {threshold:g}, so the scans are no longer exchangeable with the calibration "
        "scans and the guarantee may not hold. Recalibrate on recent scans.",
    )
