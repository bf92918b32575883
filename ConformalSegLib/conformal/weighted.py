"""Weighted conformal calibration under covariate shift (Tibshirani, Barber, Candes & Ramdas, NeurIPS 2019).

A profile calibrated at hospital A and used at hospital B breaks exchangeability. When B differs from A
only in *which* scans it sees -- more small lesions, thinner slices, another scanner's noise -- and not
in how a scan and its truth relate given its features, re-weighting A's calibration scans by the
likelihood ratio of the two sites restores the guarantee at B.

Guarantee
---------
Let ``X`` be a scan's label-free features (:mod:`.scan_features`), the calibration scans drawn i.i.d.
from site A and the new scan from site B, and assume **covariate shift**: the law of the whole scan
(map and truth) given ``X`` is the same at both sites, only the law of ``X`` differs, with likelihood
ratio ``w(x) = dP_B(x) / dP_A(x)``. With ``p_i = w(X_i) / (sum_j w(X_j) + w(x))`` for the ``n``
calibration scans and ``p_test = w(x) / (sum_j w(X_j) + w(x))`` for the new scan ``x``, the weighted
conformal quantile

    q(x) = Quantile_{1 - alpha}( sum_i p_i delta_{s_i} + p_test delta_{+inf} )

of the calibration nonconformity scores ``s_i`` (:mod:`.scan_scores`) satisfies
``P(s_test <= q(X_test)) >= 1 - alpha`` (Tibshirani et al. 2019, Corollary 1), i.e. for CLS
``P(FNR_test <= epsilon) >= 1 - alpha`` *at site B*; likewise for lesion-level control and for each
confidence set at its own level (joint-split: union bound; joint-max: one score). The threshold depends
on the new scan's weight ``w(x)``, so it is computed per scan at apply time.

*Proof* (Tibshirani et al. 2019, Lemma 3 and Theorem 2). Write ``Z_i = (X_i, S_i)``. The joint density of
``Z_1..Z_{n+1}`` is ``prod_{i<=n} f(z_i) * w(x_{n+1}) f(z_{n+1})`` (same conditional law of ``S`` given
``X`` at both sites), so given the multiset ``E = {z_1, ..., z_{n+1}}`` of the ``n + 1`` points, the test
point is ``z_j`` with probability ``w(x_j) / sum_k w(x_k)``. Hence, given ``E``, ``S_{n+1}`` has the law
``sum_j p_j(E) delta_{s_j}`` and ``P(S_{n+1} <= q_E | E) >= 1 - alpha`` for its ``(1 - alpha)`` quantile
``q_E``. The computable ``q(x)`` puts the test point's mass at ``+inf`` instead of at the unknown
``S_{n+1}``, which can only raise the quantile: ``q(X_{n+1}) >= q_E``. Taking the expectation over ``E``,
``P(S_{n+1} <= q(X_{n+1})) >= 1 - alpha``.

When it does **not** hold: the label process changes (another contouring protocol, ``P(truth | image)``
differs), the shift is in something the features do not see, site B has scans site A never has (``w``
unbounded: the effective sample size collapses), or the weights are badly estimated. ``w`` is not known
here: it is *estimated* by a domain classifier, so the guarantee holds to the extent that the estimate
is right (with the true ratio it is exact; the seeded tests and ``benchmarks/RESULTS.md`` show both).

Weights
-------
A logistic regression (scikit-learn, L2 penalty ``C``, on standardised features) is fitted to tell the
calibration scans (class 0, ``n_A`` of them) from unlabelled target scans (class 1, ``n_B``). Its log
odds estimate ``log w(x) + log(n_B / n_A)``, so ``w(x) = exp(log odds(x)) * n_A / n_B`` (the class
sizes' prior is taken out). The model is a few numbers, stored in the profile without pickles (hence
logistic regression: a gradient-boosted model could not be stored and checked as plainly). The
cross-validated AUC is reported: near 0.5 means no detectable shift (weights near 1).

Effective sample size (Kish): ``n_eff = (sum w_i)^2 / sum w_i^2`` over the calibration scans used. With
equal weights it is ``n``; the weighted quantile is finite only when ``p_test <= alpha``, which needs
roughly ``n_eff >= (1 - alpha) / alpha`` -- below that a warning is given, and a scan whose own weight
is too large gets the trivial result (the whole image), with a warning saying so.

Exact weighted quantile
-----------------------
:func:`weighted_conformal_quantile`: scores sorted with their weights (ties merged), the smallest score
``s`` with ``sum_{s_i <= s} w_i >= (1 - alpha)(sum_i w_i + w_test)``, ``+inf`` if none (the test point's
mass at ``+inf``). The weights are taken as the exact binary numbers they are and ``1 - alpha`` as the
decimal typed: prefix sums are located in floating point and the decision at the boundary is made with
correctly rounded sums (``math.fsum``) and, inside their rounding band, with fractions. No grid, no
bisection.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from .cls import ThresholdCalibration
from .confidence_sets import SetsCalibration
from .exact import check_alpha, min_calibration_size
from .guarantee_sentences import guarantee_sentence
from .scan_scores import ProfileData, rebuild, scan_scores_of

DEFAULT_C = 1.0
_LOG_RATIO_CLIP = 700.0  # exp(700) is finite in float64


def weighted_conformal_quantile(
    scores: np.ndarray, weights: np.ndarray, test_weight: float, alpha: float | Fraction
) -> float:
    """``Quantile_{1-alpha}(sum_i p_i delta_{s_i} + p_test delta_{+inf})`` (module docstring), exactly.

    ``weights`` and ``test_weight`` must be positive and finite (an infinite test weight gives ``+inf``).
    With all weights equal it is the ``ceil((1 - alpha)(n + 1))``-th smallest score, as in unweighted
    split conformal.
    """
    level = 1 - (alpha if isinstance(alpha, Fraction) else check_alpha(alpha))
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if scores.shape != weights.shape or scores.ndim != 1:
        raise ValueError("scores and weights must be 1-D arrays of the same length")
    if np.any(~np.isfinite(weights)) or np.any(weights <= 0) or not test_weight > 0:
        raise ValueError("weights must be positive and finite")
    if math.isinf(test_weight) or scores.size == 0:
        return math.inf
    order = np.argsort(scores, kind="stable")
    s, w = scores[order], weights[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each run of equal scores
    total = math.fsum(w.tolist()) + float(test_weight)
    j = int(np.searchsorted(np.cumsum(w)[ends], float(level) * total, side="left"))
    j = min(j, ends.size - 1)

    def reaches(k: int) -> bool:  # sum of w[: ends[k] + 1] >= level * (sum w + test_weight), exactly
        return _prefix_reaches(w, int(ends[k]) + 1, level, float(test_weight))

    if reaches(j):
        while j > 0 and reaches(j - 1):
            j -= 1
        return float(s[ends[j]])
    while j < ends.size - 1:
        j += 1
        if reaches(j):
            return float(s[ends[j]])
    return math.inf


def _prefix_reaches(w: np.ndarray, k: int, level: Fraction, test_weight: float) -> bool:
    """Exact test of ``sum(w[:k]) >= level * (sum(w) + test_weight)``: correctly rounded sums decide
    unless the two sides are within their rounding error, then fractions do."""
    prefix = math.fsum(w[:k].tolist())
    total = math.fsum(w.tolist()) + test_weight
    rhs = float(level) * total
    tol = 8 * np.finfo(np.float64).eps * max(prefix, rhs) + 1e-300
    if prefix > rhs + tol:
        return True
    if prefix < rhs - tol:
        return False
    exact_prefix = sum((Fraction(float(x)) for x in w[:k]), Fraction(0))
    exact_total = sum((Fraction(float(x)) for x in w), Fraction(0)) + Fraction(test_weight)
    return exact_prefix >= level * exact_total


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's ``(sum w)^2 / sum w^2`` (``n`` for equal weights; 0 for none)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return 0.0
    return math.fsum(w.tolist()) ** 2 / math.fsum((w * w).tolist())


@dataclass(frozen=True)
class DomainClassifier:
    """Logistic regression on standardised features, ``P(target | x)``, as plain numbers."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    n_source: int
    n_target: int
    C: float = DEFAULT_C

    def log_weights(self, features: np.ndarray) -> np.ndarray:
        """``log w(x)``: the log odds minus ``log(n_target / n_source)``."""
        z = (np.atleast_2d(np.asarray(features, np.float64)) - self.mean) / self.scale
        log_odds = z @ self.coef + self.intercept
        result: np.ndarray = log_odds + math.log(self.n_source / self.n_target)
        return result

    def weights(self, features: np.ndarray) -> np.ndarray:
        """``w(x) = dP_target / dP_source`` estimated at each row of ``features``."""
        weights: np.ndarray = np.exp(np.clip(self.log_weights(features), -_LOG_RATIO_CLIP, _LOG_RATIO_CLIP))
        return weights


def fit_domain_classifier(
    source: np.ndarray, target: np.ndarray, names: tuple[str, ...], *, C: float = DEFAULT_C, cv_auc: bool = True
) -> tuple[DomainClassifier, float | None]:
    """Fit the classifier (class 0 = calibration scans, 1 = target scans) and its 5-fold cross-validated
    AUC (None when a class has fewer than 5 scans, or without ``cv_auc``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if len(source) < 2 or len(target) < 2:
        raise ConformalSegError(
            f"a domain classifier needs at least 2 calibration and 2 target scans ({len(source)} and {len(target)})",
            fix="give more unlabelled scans of the target site (--target-scans)",
        )
    X = np.vstack([source, target])
    y = np.r_[np.zeros(len(source), int), np.ones(len(target), int)]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=10000))
    model.fit(X, y)
    scaler, logistic = model[0], model[1]
    classifier = DomainClassifier(
        names,
        np.asarray(scaler.mean_, np.float64),
        np.asarray(scaler.scale_, np.float64),
        np.asarray(logistic.coef_[0], np.float64),
        float(logistic.intercept_[0]),
        len(source),
        len(target),
        float(C),
    )
    auc = None
    if cv_auc and min(len(source), len(target)) >= 5:
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        auc = float(np.mean(cross_val_score(model, X, y, cv=folds, scoring="roc_auc")))
    return classifier, auc


@dataclass(frozen=True)
class Weighting:
    """The domain classifier of a weighted profile and the features it was fitted on.

    ``features`` has one row per calibration scan (in the order of the profile's summaries),
    ``target_features`` one per unlabelled target scan."""

    classifier: DomainClassifier
    features: np.ndarray
    target_features: np.ndarray
    target_ids: tuple[str, ...] = ()
    auc: float | None = None
    source: str | None = None

    @cached_property
    def calibration_weights(self) -> np.ndarray:
        return self.classifier.weights(self.features)

    @cached_property
    def target_weights(self) -> np.ndarray:
        return self.classifier.weights(self.target_features)

    def weight_of(self, features: np.ndarray) -> float:
        """The weight of a new scan from its features (names checked by the caller)."""
        return float(self.classifier.weights(features)[0])


@dataclass(frozen=True)
class WeightedResult:
    """A calibration at one test weight: the thresholds, the effective sample size, the sentence."""

    calibration: ThresholdCalibration | SetsCalibration
    test_weight: float
    effective_n: float
    sentence: str

    @property
    def is_trivial(self) -> bool:
        c = self.calibration
        if isinstance(c, SetsCalibration):
            return c.inner_threshold == math.inf or c.outer_threshold == -math.inf
        return c.is_trivial


def weighted_calibration(
    like: ThresholdCalibration | SetsCalibration,
    data: ProfileData,
    weighting: Weighting,
    test_weight: float,
    *,
    warn: bool = True,
) -> WeightedResult:
    """The weighted thresholds for a new scan of weight ``test_weight`` at ``like``'s parameters."""
    if like.pac_delta is not None:
        raise ConformalSegError(
            "weighted calibration gives a marginal guarantee at the target site, not a PAC one",
            fix="calibrate without --pac-delta for a weighted profile",
        )
    scores = scan_scores_of(like, data)
    w = weighting.calibration_weights[scores.used]
    quantiles = {
        c.name: weighted_conformal_quantile(c.scores[scores.used], w, test_weight, c.alpha) for c in scores.channels
    }
    n = int(np.count_nonzero(scores.used))
    calibration = rebuild(like, quantiles, n=n, n_excluded=scores.used.size - n, rank=None)
    ess = effective_sample_size(w)
    level = min((c.alpha for c in scores.channels), key=check_alpha)
    result = WeightedResult(calibration, float(test_weight), ess, "")
    sentence = weighted_sentence(result, weighting, min_calibration_size(level))
    result = WeightedResult(calibration, float(test_weight), ess, sentence)
    if warn and result.is_trivial:
        warnings.warn(sentence.split(" Warning: ", 1)[-1], CalibrationSetTooSmallWarning, stacklevel=2)
    return result


def _base_sentence(c: ThresholdCalibration | SetsCalibration) -> str:
    """The method's sentence without its too-few-scans warning (the weighted one replaces it)."""
    from dataclasses import replace

    if isinstance(c, SetsCalibration):
        return guarantee_sentence(replace(c, inner_threshold=0.5, outer_threshold=0.5))
    return guarantee_sentence(replace(c, probability_threshold=0.5))


def weighted_sentence(result: WeightedResult, weighting: Weighting, needed: int) -> str:
    """The weighted guarantee, with the shift it assumes and a warning when it is trivial or weak."""
    c = weighting.classifier
    sentence = (
        f"At the target site, under covariate shift (calibration scans re-weighted by a domain classifier "
        f"fitted against {c.n_target} unlabelled target scans; effective sample size {result.effective_n:.1f} "
        f"of {result.calibration.n}; this scan's weight {result.test_weight:.3g}): {_base_sentence(result.calibration)}"
    )
    if result.is_trivial:
        sentence += (
            " Warning: this scan's weight is too large for the calibration weights (the weighted quantile is "
            "infinite), so the result is the trivial set (whole image / empty inner set); it looks unlike the "
            "calibration scans: calibrate on scans like it."
        )
    elif result.effective_n < needed:
        sentence += (
            f" Warning: the effective sample size {result.effective_n:.1f} is below {needed}, the least that a "
            "finite threshold needs at this level for typical weights: the two sites differ too much."
        )
    return sentence


def check_effective_size(
    weighting: Weighting, like: ThresholdCalibration | SetsCalibration, data: ProfileData
) -> tuple[float, int]:
    """The calibration weights' effective sample size and how many of the target scans would get the
    trivial set at their own weight; warns when either says the two sites differ too much."""
    scores = scan_scores_of(like, data)
    ess = effective_sample_size(weighting.calibration_weights[scores.used])
    level = min((c.alpha for c in scores.channels), key=check_alpha)
    needed = min_calibration_size(level)
    trivial = sum(
        weighted_calibration(like, data, weighting, float(w), warn=False).is_trivial for w in weighting.target_weights
    )
    if ess < needed or trivial:
        warnings.warn(
            f"weighted calibration: effective sample size {ess:.1f} of {int(scores.used.sum())} scans (at least "
            f"{needed} are needed at alpha = {level:g}); {trivial} of {len(weighting.target_weights)} target scans "
            "would get the trivial set (whole image) at their own weight. The sites differ too much where it "
            "matters: calibrate on scans of the target site.",
            CalibrationSetTooSmallWarning,
            stacklevel=2,
        )
    return ess, int(trivial)


# ---------------------------------------------------------------------------------------- profile files


def reference_weight(weighting: Weighting) -> float:
    """The median weight of the target scans: the weight of a typical new scan of the target site."""
    return float(statistics.median(weighting.target_weights.tolist()))


def weighting_json(weighting: Weighting, reference: WeightedResult) -> dict[str, Any]:
    """The ``weighting`` section of a profile's JSON (arrays of features go to the ``.npz``)."""
    c = weighting.classifier
    r = reference.calibration
    thresholds: dict[str, float] = (
        {"inner_threshold": r.inner_threshold, "outer_threshold": r.outer_threshold}
        if isinstance(r, SetsCalibration)
        else {"probability_threshold": r.probability_threshold}
    )
    return {
        "method": "weighted conformal (Tibshirani et al. 2019), covariate shift",
        "features": list(c.names),
        "classifier": {
            "kind": "logistic-regression",
            "C": c.C,
            "mean": c.mean.tolist(),
            "scale": c.scale.tolist(),
            "coef": c.coef.tolist(),
            "intercept": c.intercept,
            "n_source": c.n_source,
            "n_target": c.n_target,
        },
        "cv_auc": weighting.auc,
        "target_scans": weighting.source,
        "target_ids": list(weighting.target_ids),
        "effective_sample_size": reference.effective_n,
        "reference": {"test_weight": reference.test_weight, **thresholds, "guarantee": reference.sentence},
    }


def weighting_arrays(weighting: Weighting) -> dict[str, np.ndarray]:
    return {"weighting_features": weighting.features, "weighting_target_features": weighting.target_features}


def read_weighting(doc: dict[str, Any], arrays: Mapping[str, np.ndarray], source_n: int) -> Weighting:
    """The weighting of a loaded profile (``KeyError``/``ValueError``/``TypeError`` when malformed)."""
    c = doc["classifier"]
    if c.get("kind") != "logistic-regression":
        raise ValueError(f"unknown domain classifier {c.get('kind')!r}")
    names = tuple(str(n) for n in doc["features"])
    classifier = DomainClassifier(
        names,
        np.asarray(c["mean"], np.float64),
        np.asarray(c["scale"], np.float64),
        np.asarray(c["coef"], np.float64),
        float(c["intercept"]),
        int(c["n_source"]),
        int(c["n_target"]),
        float(c["C"]),
    )
    features = np.asarray(arrays["weighting_features"], np.float64)
    target = np.asarray(arrays["weighting_target_features"], np.float64)
    d = len(names)
    if any(len(v) != d for v in (classifier.mean, classifier.scale, classifier.coef)) or features.shape != (
        source_n,
        d,
    ):
        raise ValueError("the weighting's features or classifier do not match")
    if target.ndim != 2 or target.shape[1] != d or target.shape[0] != classifier.n_target:
        raise ValueError("the target features do not match the classifier")
    auc = doc.get("cv_auc")
    return Weighting(
        classifier,
        features,
        target,
        tuple(doc.get("target_ids", ())),
        None if auc is None else float(auc),
        doc.get("target_scans"),
    )
