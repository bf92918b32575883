"""Small Markdown formatting helpers of the evaluation reports (numbers, mean ± std, tables, verdicts)."""

from __future__ import annotations

import numpy as np

from .results import mean_std


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def pm(values: np.ndarray, digits: int = 3) -> str:
    mean, std = mean_std(np.asarray(values, dtype=np.float64))
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def cutoff_text(values: np.ndarray) -> str:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    text = pm(finite, 4) if finite.size else "n/a"
    n_inf = values.size - finite.size
    if n_inf:
        text += f" ({n_inf} infinite)"
    return text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def trivial_text(count: int, total: int) -> str:
    return f"{count}/{total}" if count else "0"


def verdict(status: str, trivial: int, total: int) -> str:
    """The verdict, flagged when the point is trivial (calibration side too small) in some splits."""
    if trivial == total:
        return "trivial"
    return f"{status} ({trivial} trivial)" if trivial else status
