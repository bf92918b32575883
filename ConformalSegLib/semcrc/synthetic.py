"""Seeded synthetic interval data: truth volumes, organ label maps and miscalibrated quantile intervals.

Each scan (numpy ``(z, y, x)``) has an elliptic body and up to four ellipsoidal organs whose position,
size and presence vary from scan to scan (so memberships ``s(y)`` are instance-dependent). Truth is
0 outside the body, organ-dependent intensity plus texture inside. The "model" predicts
``truth + sigma_k * s_i * noise`` (Student-t noise with 5 degrees of freedom, per-scan scale
``s_i``) and reports ``[pred - h_k, pred + h_k]`` with ``h_k = m_k * 1.2816 * sigma_k``: the
organ-dependent factor ``m_k`` makes some organs over-covered (``m > 1``) and others under-covered
(``m < 1``), so the organs need different lambdas. Label map: organ labels 1..4, body tissue
:data:`BODY_LABEL`, background 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intervals import IntervalData, make_interval_scan
from .memberships import OrganMap, organ_memberships

BODY_LABEL = 9
#: name, label, mean intensity, error sigma, width factor m, presence probability, relative radius
ORGANS: tuple[tuple[str, int, float, float, float, float, float], ...] = (
    ("liver", 1, 0.60, 0.05, 0.8, 1.0, 0.35),
    ("spleen", 2, 0.55, 0.08, 0.6, 0.9, 0.18),
    ("kidney", 3, 0.70, 0.04, 1.0, 0.9, 0.15),
    ("pancreas", 4, 0.50, 0.10, 0.5, 0.7, 0.12),
)
BODY_SIGMA, BODY_FACTOR, BODY_INTENSITY = 0.03, 1.3, 0.40
Z90 = 1.2816  # standard normal 0.9 quantile


@dataclass(frozen=True)
class SyntheticIntervals:
    """Per-scan arrays (lists of equal-shape volumes) and the organ map of their labels."""

    lower: list[np.ndarray]
    upper: list[np.ndarray]
    truth: list[np.ndarray]
    labels: list[np.ndarray]
    organs: OrganMap

    def data(self, body: str = "nonzero") -> IntervalData:
        """The scans as :class:`IntervalData` (background excluded with ``body="nonzero"``)."""
        scans = [
            make_interval_scan(lo, hi, y, organ_memberships(lab, self.organs, body), case_id=f"case{i:04d}")
            for i, (lo, hi, y, lab) in enumerate(zip(self.lower, self.upper, self.truth, self.labels))
        ]
        return IntervalData(scans, self.organs.groups)


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
        (xx - centre[2]) / radii[2]
    ) ** 2 <= 1


def synthetic_intervals(
    n: int, *, shape: tuple[int, int, int] = (2, 24, 24), seed: int = 0, dtype: type = np.float32
) -> SyntheticIntervals:
    """``n`` synthetic scans (module docstring), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    organs = OrganMap({label: name for name, label, *_ in ORGANS})
    out: dict[str, list[np.ndarray]] = {"lower": [], "upper": [], "truth": [], "labels": []}
    centre = np.array([(z - 1) / 2, (h - 1) / 2, (w - 1) / 2])
    for _ in range(n):
        body_radii = np.array([z * 10.0, h * rng.uniform(0.36, 0.48), w * rng.uniform(0.40, 0.49)])
        body = _ellipsoid(shape, centre + np.r_[0, rng.normal(0, 0.5, 2)], body_radii)
        labels = np.where(body, BODY_LABEL, 0).astype(np.int16)
        truth = np.where(body, BODY_INTENSITY, 0.0) + body * rng.normal(0, 0.02, shape)
        sigma = np.where(body, BODY_SIGMA, 0.002)
        factor = np.where(body, BODY_FACTOR, 1.0)
        for _name, label, intensity, organ_sigma, organ_factor, presence, radius in ORGANS:
            if rng.uniform() > presence:
                continue
            r = radius * rng.uniform(0.7, 1.3) * np.array([z * 10.0, h, w])
            c = centre + np.r_[0.0, rng.uniform(-0.25, 0.25) * h, rng.uniform(-0.25, 0.25) * w]
            mask = _ellipsoid(shape, c, r) & body
            labels[mask] = label
            truth[mask] = intensity + rng.normal(0, 0.03, int(mask.sum()))
            sigma[mask], factor[mask] = organ_sigma, organ_factor
        scale = rng.lognormal(0.0, 0.2)
        prediction = truth + sigma * scale * rng.standard_t(5, shape) * np.sqrt(3 / 5)
        half = factor * Z90 * sigma
        out["lower"].append((prediction - half).astype(dtype))
        out["upper"].append((prediction + half).astype(dtype))
        out["truth"].append(truth.astype(dtype))
        out["labels"].append(labels)
    return SyntheticIntervals(out["lower"], out["upper"], out["truth"], out["labels"], organs)
