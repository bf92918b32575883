"""Learn-Then-Test (Angelopoulos et al., 2021): several expected risks controlled at once, with confidence.

Guarantee
---------
With calibration scans i.i.d. as new scans, with probability ``>= 1 - delta`` over the calibration draw,
the mask ``prob >= t_hat`` satisfies **every** requested bound at once, each an expectation over new scans:

* ``fnr=E``: expected voxel FNR ``<= E`` (over scans with a lesion);
* ``lesion-miss=E``: expected fraction of missed lesions ``<= E`` (over scans with a counted lesion; lesions
  and detection as in :mod:`ConformalSegLib.conformal.lesion_level`);
* ``fp-ml=E``: expected false-positive volume, each scan's counted up to the cap ``B`` mL, ``<= E`` mL (over
  all scans; ``B`` fixed before calibration, default 100 mL, :mod:`ConformalSegLib.conformal.fp_summaries`);
* ``fp-components=E``: expected number of false-positive components, each scan's counted up to
  ``C = 10``, ``<= E`` (over all scans) -- at the thresholds of ``COMPONENT_THRESHOLDS`` only (see below).

Losses are normalised to [0, 1] by their cap (1 for the two miss rates, ``B`` and ``C``); a target is
divided by the same cap. Masks are ``prob >= t`` (a voxel equal to ``t`` is kept).

p-values and the test
---------------------
For threshold ``t`` and risk ``r`` the null is ``H_{r,t}: R_r(t) > E_r``, tested with the
Hoeffding-Bentkus p-value of :func:`ConformalSegLib.conformal.rcps.hb_p_value` (the same as MAPIE's; ``ceil``
of the loss sum exact in fractions). Risks are combined per threshold by the **maximum** p-value (the
null ``H_t = union_r H_{r,t}`` is rejected only when every risk's is). The two miss risks grow with ``t``
(smaller masks), the false-positive risks shrink, so two fixed sequences are run, each ordered from the
threshold most likely to be rejected: the miss risks from the largest mask (smallest ``t``) upwards, the
false-positive risks from the smallest mask downwards, each stopping at its first non-rejection, at level
``delta`` (``delta / 2`` each when both kinds are requested: the family-wise error is at most the sum).
The valid thresholds are those rejected by both sequences, a contiguous range; ``t_hat`` is its largest
(the smallest mask). When it is empty, no threshold is certified: ``t_hat = -inf`` (the trivial whole-image
result, which controls the miss risks but not the false-positive ones) with a
:class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning`.

Why every threshold is tested exactly
-------------------------------------
Without ``fp-components`` the candidates are the union of the jumps of the requested losses: lesion
values (FNR), detection thresholds (lesion miss), stored background values (FP volume), and ``+inf`` (the
empty mask, the smallest mask when only false-positive risks are requested). Every loss is
constant on each interval between consecutive candidates ``(u', u]``, so testing ``u`` tests the whole
interval, and the procedure equals fixed-sequence testing over the continuum of thresholds. That is valid
although the candidates come from the data: each risk is monotone and left-continuous in ``t``, so its
violation set is an interval ending at a fixed point ``s``; a false rejection means the sequence passed
``s`` (or points ``t_k -> s`` inside the violation set), each an event of probability ``<= delta`` for a
fixed threshold, and by continuity of measure so is their union (as in :mod:`ConformalSegLib.conformal.rcps`).
False-positive component counts are not monotone in ``t`` and have no compact exact summary: with
``fp-components`` every risk is tested at the 19 fixed thresholds ``0.05, ..., 0.95`` only, chosen before any
data; fixed-sequence testing over a pre-specified finite set needs no monotonicity. With monotone risks
only, the rejections along each sequence form a prefix, so its first non-rejection is found by binary
search (the same index as the scan, in ``O(log K)`` tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .cls import ThresholdCalibration
from .exact import check_alpha
from .fp_summaries import COMPONENT_THRESHOLDS, FalsePositiveSummaries, components_at
from .lesion_level import LesionLevelSummaries
from .rcps import first_failure, first_failure_monotone, hb_p_value
from .summaries import LesionSummaries

RISKS = ("fnr", "lesion-miss", "fp-ml", "fp-components")
COMPONENT_CAP = 10
_INCREASING = ("fnr", "lesion-miss")


@dataclass(frozen=True)
class RiskBound:
    """One requested bound: ``name`` (one of :data:`RISKS`) and its target in the risk's own units."""

    name: str
    target: float

    @property
    def increasing(self) -> bool:
        return self.name in _INCREASING


def parse_risks(specs: Sequence[str]) -> tuple[RiskBound, ...]:
    """``["fnr=0.1", "fp-ml=5"]`` -> risk bounds (each name at most once, targets > 0)."""
    out: list[RiskBound] = []
    for spec in specs:
        name, _, value = str(spec).partition("=")
        name = name.strip()
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if name not in RISKS or not target > 0 or not math.isfinite(target):
            raise ConformalSegError(
                f"cannot read the risk {spec!r}", fix=f"use NAME=TARGET with NAME one of {', '.join(RISKS)}, TARGET > 0"
            )
        if any(r.name == name for r in out):
            raise ConformalSegError(f"the risk {name!r} is given twice", fix="give each risk once")
        out.append(RiskBound(name, target))
    if not out:
        raise ConformalSegError("--method ltt needs at least one --risk", fix="e.g. --risk fnr=0.1 --risk fp-ml=5")
    return tuple(out)


@dataclass(frozen=True)
class RiskData:
    """The summaries the losses are computed from (each needed only by the risks that use it)."""

    voxels: LesionSummaries
    lesions: LesionLevelSummaries | None = None
    false_positives: FalsePositiveSummaries | None = None

    def cap(self, name: str) -> float:
        if name == "fp-ml":
            return self._fp().cap_ml
        return float(COMPONENT_CAP) if name == "fp-components" else 1.0

    def _fp(self) -> FalsePositiveSummaries:
        if self.false_positives is None:
            raise ConformalSegError("false-positive risks need false-positive summaries", fix="re-calibrate")
        return self.false_positives

    def _lesions(self) -> LesionLevelSummaries:
        if self.lesions is None:
            raise ConformalSegError("the lesion-miss risk needs lesion-level summaries", fix="re-calibrate")
        return self.lesions

    def losses(self, name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per scan of the risk's population (rows) and threshold (columns): the losses in [0, 1], and the
        integer counts and per-scan scales they come from (missed voxels / lesion size, missed lesions /
        lesion count, capped components / C; false-positive voxels and the voxel volume in mL)."""
        if name == "fnr":
            sizes = self.voxels.lesion_sizes
            rows = [np.searchsorted(self.voxels.case(int(i))[::-1], t) for i in np.flatnonzero(sizes > 0)]
            num, den = np.asarray(rows, np.int64).reshape(-1, t.size), sizes[sizes > 0].astype(np.float64)
        elif name == "lesion-miss":
            counts = self._lesions().lesion_counts
            rows = [np.searchsorted(self._lesions().case(int(i)), t) for i in np.flatnonzero(counts > 0)]
            num, den = np.asarray(rows, np.int64).reshape(-1, t.size), counts[counts > 0].astype(np.float64)
        elif name == "fp-ml":
            fp = self._fp()
            num = fp.counts(t)
            return np.minimum(num * fp.voxel_ml[:, None], fp.cap_ml) / fp.cap_ml, num, fp.voxel_ml
        else:
            fp = self._fp()
            if np.any(fp.components < 0):
                raise ConformalSegError("these summaries have no component counts", fix="re-calibrate")
            counted = components_at(fp.components, self.voxels.lesion_sizes > 0, t)
            num, den = np.minimum(counted, COMPONENT_CAP), np.full(fp.n, float(COMPONENT_CAP))
        return num / den[:, None], num, den

    def exact_sum(self, name: str, counts: np.ndarray, scale: np.ndarray) -> Fraction:
        """``sum_i loss_i`` in exact arithmetic, from one column of :meth:`losses`'s counts and its scales."""
        if name == "fp-ml":  # grouped by voxel volume v = a/b: a scan is capped iff c >= ceil(cap / v)
            cap = Fraction(self._fp().cap_ml)
            total = Fraction(0)
            for v in np.unique(scale):
                volume = Fraction(float(v))
                c = counts[scale == v]
                capped_from = math.ceil(cap / volume)
                total += volume * int(c[c < capped_from].sum()) + cap * int(np.count_nonzero(c >= capped_from))
            return total / cap
        return sum((Fraction(int(c), int(m)) for c, m in zip(counts, scale)), Fraction(0))

    def candidates(self, risks: Sequence[RiskBound]) -> np.ndarray:
        """Ascending thresholds to test (see module docstring)."""
        if any(r.name == "fp-components" for r in risks):
            return np.asarray(COMPONENT_THRESHOLDS, dtype=np.float64)
        parts = [np.zeros(0)]
        for r in risks:
            if r.name == "fnr":
                parts.append(self.voxels.probabilities_view())
            elif r.name == "lesion-miss":
                parts.append(self._lesions().values.astype(np.float64))
            else:
                parts.append(self._fp().values.astype(np.float64))
        values = np.unique(np.concatenate(parts))
        out: np.ndarray = np.r_[values[np.isfinite(values)], np.inf]  # +inf: the empty mask
        return out


def p_values(data: RiskData, risk: RiskBound, t: np.ndarray) -> np.ndarray:
    """Hoeffding-Bentkus p-values of ``H: R(t) > target`` for each threshold (exact ``ceil`` of the loss sums)."""
    losses, counts, scale = data.losses(risk.name, t)
    n = losses.shape[0]
    cap = data.cap(risk.name)
    if n == 0:
        return np.ones(t.size)
    if risk.target >= cap:
        return np.zeros(t.size)  # the capped loss never exceeds the cap: nothing to test
    totals = losses.sum(axis=0)
    ceil_sum = np.ceil(totals)
    near = np.abs(totals - np.round(totals)) <= 4 * (n + 1) * np.finfo(np.float64).eps * np.maximum(1.0, totals)
    near &= np.any(losses > 0, axis=0) & np.any(losses < 1, axis=0)  # all 0 or all 1: the float sum is exact
    for j in np.flatnonzero(near):
        ceil_sum[j] = math.ceil(data.exact_sum(risk.name, counts[:, j], scale))
    return hb_p_value(totals / n, n, risk.target / cap, ceil_sum=ceil_sum)


@dataclass(frozen=True)
class LttResult:
    """The tested thresholds (ascending) and the valid range ``candidates[lo:hi]`` (empty when ``lo >= hi``)."""

    candidates: np.ndarray
    lo: int
    hi: int

    @property
    def n_valid(self) -> int:
        return max(0, self.hi - self.lo)

    @property
    def threshold(self) -> float:
        return float(self.candidates[self.hi - 1]) if self.n_valid else float("-inf")


def ltt_test(data: RiskData, risks: Sequence[RiskBound], delta: float) -> LttResult:
    """The two fixed sequences of the module docstring."""
    d = float(check_alpha(delta, "delta"))
    grid = data.candidates(risks)
    up = [r for r in risks if r.increasing]
    down = [r for r in risks if not r.increasing]
    level = d / 2 if up and down else d

    def passes(group: list[RiskBound]) -> Callable[[np.ndarray], np.ndarray]:
        def test(t: np.ndarray) -> np.ndarray:
            worst = np.max([p_values(data, r, t) for r in group], axis=0)
            ok: np.ndarray = worst <= level
            return ok

        return test

    monotone = not any(r.name == "fp-components" for r in risks)
    search = first_failure_monotone if monotone else first_failure
    hi = search(passes(up), grid) if up else grid.size
    lo = grid.size - search(passes(down), grid[::-1]) if down else 0
    return LttResult(grid, lo, hi)


@dataclass(frozen=True)
class LttCalibration(ThresholdCalibration):
    """A Learn-Then-Test result: ``alpha`` holds ``delta``; the valid thresholds are ``[valid_low, valid_high]``
    (``n_valid`` tested thresholds), ``probability_threshold = valid_high`` (the smallest valid mask)."""

    risks: tuple[RiskBound, ...] = ()
    n_valid: int = 0
    valid_low: float = float("nan")
    fp_ml_cap: float | None = None

    @property
    def delta(self) -> float:
        assert self.alpha is not None  # LTT always has a delta
        return self.alpha


def calibrate_ltt(data: RiskData, risks: Sequence[RiskBound], delta: float) -> LttCalibration:
    """Learn-Then-Test from summaries (``delta`` stored in ``alpha``; ``epsilon`` holds the first target)."""
    risks = tuple(risks)
    if not risks:
        raise ConformalSegError("Learn-Then-Test needs at least one risk", fix="e.g. --risk fnr=0.1")
    result = ltt_test(data, risks, delta)
    if not result.n_valid:
        warnings.warn(
            "Learn-Then-Test: no threshold controls every requested risk at delta = "
            f"{delta:g} (too few scans or too strict targets); the result is the trivial whole-image mask.",
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    low = float(result.candidates[result.lo]) if result.n_valid else float("nan")
    fp = data.false_positives
    return LttCalibration(
        "ltt",
        risks[0].target,
        float(delta),
        data.voxels.n,
        0,
        result.threshold,
        risks=risks,
        n_valid=result.n_valid,
        valid_low=low,
        fp_ml_cap=None if fp is None else fp.cap_ml,
    )


def _units(risk: RiskBound, fp_ml_cap: float | None) -> str:
    if risk.name == "fnr":
        return f"at most {round(100 * risk.target, 6):g}% of the lesion voxels are missed"
    if risk.name == "lesion-miss":
        return f"at most {round(100 * risk.target, 6):g}% of the lesions are missed"
    if risk.name == "fp-ml":
        return f"at most {risk.target:g} mL are false positives (each scan counted up to {fp_ml_cap:g} mL)"
    return (
        f"at most {risk.target:g} false-positive components (each scan counted up to {COMPONENT_CAP}; thresholds "
        "restricted to 0.05, 0.10, ..., 0.95)"
    )


def ltt_sentence(c: LttCalibration) -> str:
    """The guarantee of a Learn-Then-Test profile in one sentence (and the warning when nothing is valid)."""
    bounds = "; ".join(_units(r, c.fp_ml_cap) for r in c.risks)
    sentence = (
        f"With confidence at least {round(100 * (1 - c.delta), 6):g}% over the draw of the calibration scans, on "
        f"average over new scans, all at once: {bounds} (Learn-Then-Test, fixed-sequence testing); calibrated on "
        f"{c.n} scans"
    )
    if c.n_valid:
        sentence += f"; {c.n_valid} tested thresholds are valid and the smallest mask is used."
    else:
        sentence += (
            ". Warning: no threshold controls every requested risk (too few scans or too strict targets), so the "
            "mask is the whole image (nothing is missed; the false-positive bounds do not hold)."
        )
    return sentence


def _encode(x: float) -> float | str | None:
    return None if math.isnan(x) else (str(x) if math.isinf(x) else x)


def ltt_json(c: LttCalibration, lesions: LesionLevelSummaries | None) -> dict[str, Any]:
    """The profile keys of a Learn-Then-Test calibration (:mod:`ConformalSegLib.conformal.profile`)."""
    doc: dict[str, Any] = {
        "delta": c.delta,
        "risks": {r.name: r.target for r in c.risks},
        "fp_ml_cap": c.fp_ml_cap,
        "valid_thresholds": {"count": c.n_valid, "low": _encode(c.valid_low), "high": _encode(c.probability_threshold)},
    }
    if lesions is not None:
        doc.update(
            detect_fraction=lesions.detect_fraction,
            min_lesion_voxels=lesions.min_lesion_voxels,
            min_lesion_mm3=lesions.min_lesion_mm3,
        )
    return doc


def read_ltt(doc: dict[str, Any], n: int, threshold: float) -> LttCalibration:
    """The calibration stored by :func:`ltt_json` (``ValueError`` / ``KeyError`` / ``TypeError`` when malformed)."""
    risks = parse_risks([f"{name}={target}" for name, target in dict(doc["risks"]).items()])
    valid = dict(doc["valid_thresholds"])
    low = valid.get("low")
    cap = doc.get("fp_ml_cap")
    return LttCalibration(
        "ltt",
        risks[0].target,
        float(doc["delta"]),
        n,
        0,
        threshold,
        risks=risks,
        n_valid=int(valid["count"]),
        valid_low=math.nan if low is None else float(low),
        fp_ml_cap=None if cap is None else float(cap),
    )
