"""``benchmarks/eval_openkbp_margin.py``: CLS on ``g(T)``, ``T`` the signed distance to the network's 0.5
mask. The cutoff must read back as the margin it stands for, and CLS on the score must keep its promise
(many seeded calibration/test draws against a binomial tolerance) where CLS on the probability needs the
whole background."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_openkbp_margin as M  # noqa: E402

from ConformalSegLib.common.geometry import Geometry  # noqa: E402
from ConformalSegLib.conformal.cls import conformal_lower_cutoff, critical_cutoff  # noqa: E402
from ConformalSegLib.conformal.score_transforms import parse_transform  # noqa: E402

SHAPE = (16, 24, 24)
GEOMETRY = Geometry(SHAPE, spacing=(2.0, 2.0, 3.0))


def _ball(center: np.ndarray, radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE).astype(float)
    sz, sy, sx = GEOMETRY.spacing_zyx
    d2 = ((zz - center[0]) * sz) ** 2 + ((yy - center[1]) * sy) ** 2 + ((xx - center[2]) * sx) ** 2
    return d2 <= radius_mm**2


def _case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A lesion ball and a network that finds its core confidently and ranks a random-width outer shell
    (the "margin") below the whole background: ``p = 1e-9`` there, against ``1e-6 .. 1e-3`` elsewhere."""
    center = np.array(SHAPE) / 2 + rng.uniform(-2, 2, 3)
    radius = rng.uniform(8.0, 14.0)
    lesion = _ball(center, radius)
    core = _ball(center, radius - rng.uniform(0.0, 6.0))
    p = rng.uniform(1e-6, 1e-3, SHAPE)
    p[lesion] = 1e-9
    p[core] = rng.uniform(0.6, 1.0, int(core.sum()))
    return p.astype(np.float32), lesion


def test_the_cutoff_reads_back_as_the_margin() -> None:
    p, lesion = _case(np.random.default_rng(0))
    score = M.margin_score(p, GEOMETRY)
    distance = parse_transform("distance:0.5")(p, GEOMETRY)
    assert np.array_equal(score >= 0.5, p >= 0.5)  # the fixed 0.5 cutoff is the network's own mask
    for d in (-7.5, -3.0, 2.5):
        c = 1.0 / (1.0 + math.exp(-d / M.SCALE_MM))
        assert math.isclose(M.margin_mm(c), d, abs_tol=1e-9)
        clear = np.abs(distance - d) > 1e-3  # away from float32 rounding at the mask's own edge
        assert np.array_equal((score >= c)[clear], (distance >= d)[clear])
    assert M.margin_mm(0.0) == -math.inf and M.margin_mm(1.0) == math.inf


def test_cls_on_the_margin_keeps_its_promise_with_a_small_mask() -> None:
    rng = np.random.default_rng(1)
    cases = [_case(rng) for _ in range(120)]
    eps, alpha, n_cal, trials = 0.1, 0.1, 19, 1500
    margin = [(M.margin_score(p, GEOMETRY), lesion) for p, lesion in cases]
    cut_margin = np.array([critical_cutoff(s, lesion, eps) for s, lesion in margin])
    cut_prob = np.array([critical_cutoff(p, lesion, eps) for p, lesion in cases])
    covered, size_margin, size_prob = 0, [], []
    draw = np.random.default_rng(2)
    for _ in range(trials):
        pick = draw.choice(len(cases), n_cal + 1, replace=False)
        cal, test = pick[:-1], pick[-1]
        c_margin = conformal_lower_cutoff(cut_margin[cal], alpha)
        covered += c_margin <= cut_margin[test]  # FNR_test <= eps  <=>  c_hat <= c_test (cls.py)
        size_margin.append(float(np.mean(margin[test][0] >= c_margin)))
        size_prob.append(float(np.mean(cases[test][0] >= conformal_lower_cutoff(cut_prob[cal], alpha))))
    ecr = covered / trials
    # k = ceil(0.9 * 20) = 18 of 20: coverage >= 0.9 exactly; 4 binomial sd below it fails
    assert ecr >= 1 - alpha - 4 * math.sqrt(alpha * (1 - alpha) / trials)
    assert np.mean(size_margin) < 0.25 < 0.9 < np.mean(size_prob)  # the probability cutoff takes the background
