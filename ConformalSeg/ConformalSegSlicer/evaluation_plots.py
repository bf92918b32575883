"""ECR versus alpha and PC versus alpha from the results of ``conformalseg evaluate``.

``results.json`` (written by :func:`ConformalSegLib.evaluation.report.write_report`) has a ``summary`` list
with one row per (method, epsilon, alpha): for CLS the mean and standard deviation over splits of
the empirical coverage rate (ECR: share of test scans with FNR <= epsilon) and of the prediction
compactness (PC: predicted / total voxels). The panel plots, for the evaluated epsilon nearest to
the epsilon slider, ECR and the target ``1 - alpha`` against alpha, and PC against alpha, with a
marker at the alpha slider (values interpolated between grid points).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ConformalSegLib.common.errors import ConformalSegError


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def load_results(path: str | PathLike[str]) -> dict[str, Any]:
    """Read ``results.json`` of ``conformalseg evaluate`` (a folder is taken to contain it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ConformalSegError(
            "evaluation results not found",
            path=path,
            fix="run the evaluation first, or choose the results.json it wrote",
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConformalSegError(
            f"not a valid results.json ({exc})", path=path, fix="re-run conformalseg evaluate"
        ) from exc
    if not isinstance(results, dict) or "summary" not in results or "config" not in results:
        raise ConformalSegError(
            "not a results.json of conformalseg evaluate (no 'summary'/'config')",
            path=path,
            fix="choose the results.json that conformalseg evaluate wrote",
        )
    return results


@dataclass(frozen=True)
class AlphaCurves:
    epsilon: float  # the evaluated epsilon the curves are for
    alphas: np.ndarray
    ecr: np.ndarray
    ecr_std: np.ndarray
    pc: np.ndarray
    pc_std: np.ndarray
    crc_pc: float  # expected-FNR control at this epsilon (no alpha); NaN if absent
    baseline_ecr: float  # fixed 0.5 threshold
    baseline_pc: float
    n_cases: int
    splits: int

    @property
    def target(self) -> np.ndarray:
        return 1.0 - self.alphas

    def at(self, alpha: float) -> tuple[float, float]:
        """(ECR, PC) at ``alpha``, linearly interpolated (clamped to the evaluated range)."""
        finite = np.isfinite(self.ecr) & np.isfinite(self.pc)
        if not finite.any():
            return float("nan"), float("nan")
        x = self.alphas[finite]
        return (float(np.interp(alpha, x, self.ecr[finite])), float(np.interp(alpha, x, self.pc[finite])))


def alpha_curves(results: dict[str, Any], epsilon: float) -> AlphaCurves:
    """CLS curves over alpha for the evaluated epsilon nearest to ``epsilon``."""
    rows = [r for r in results.get("summary", []) if r.get("method") == "cls"]
    if not rows:
        raise ConformalSegError("the evaluation has no CLS results", fix="re-run conformalseg evaluate")
    epsilons = sorted({float(r["epsilon"]) for r in rows})
    chosen = min(epsilons, key=lambda e: (abs(e - float(epsilon)), e))
    rows = sorted((r for r in rows if float(r["epsilon"]) == chosen), key=lambda r: float(r["alpha"]))

    def metric(row: dict[str, Any], key: str, stat: str) -> float:
        return _number(row.get("metrics", {}).get(key, {}).get(stat))

    def single(method: str, key: str) -> float:
        for r in results.get("summary", []):
            if r.get("method") == method and float(r.get("epsilon", math.nan)) == chosen:
                return metric(r, key, "mean")
        return float("nan")

    dataset = results.get("dataset", {})
    return AlphaCurves(
        epsilon=chosen,
        alphas=np.array([float(r["alpha"]) for r in rows]),
        ecr=np.array([metric(r, "ecr", "mean") for r in rows]),
        ecr_std=np.array([metric(r, "ecr", "std") for r in rows]),
        pc=np.array([metric(r, "pc", "mean") for r in rows]),
        pc_std=np.array([metric(r, "pc", "std") for r in rows]),
        crc_pc=single("crc", "pc"),
        baseline_ecr=single("baseline", "ecr"),
        baseline_pc=single("baseline", "pc"),
        n_cases=int(dataset.get("n_cases", 0) or 0),
        splits=int(results.get("config", {}).get("splits", 0) or 0),
    )


def table_columns(curves: AlphaCurves) -> dict[str, np.ndarray]:
    """Columns of the plot table (name -> values), in order."""
    n = curves.alphas.size
    return {
        "alpha": curves.alphas,
        "ECR": curves.ecr,
        "ECR std": curves.ecr_std,
        "target 1-alpha": curves.target,
        "PC": curves.pc,
        "PC std": curves.pc_std,
        "PC expected-FNR": np.full(n, curves.crc_pc),
        "ECR threshold 0.5": np.full(n, curves.baseline_ecr),
        "PC threshold 0.5": np.full(n, curves.baseline_pc),
    }


def marker_columns(curves: AlphaCurves, alpha: float) -> dict[str, np.ndarray]:
    """A one-row table: the current alpha and the interpolated ECR and PC there."""
    ecr, pc = curves.at(alpha)
    return {"alpha": np.array([float(alpha)]), "ECR": np.array([ecr]), "PC": np.array([pc])}
