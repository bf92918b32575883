"""Repeated-calibration evaluation in the layout of Teneggi et al.'s Table 1 and Fig. 3.

For each of ``runs`` independent runs (seed ``seed + r``) the scans are permuted; the first ``n_cal``
calibrate every method (K-CRC and sem-CRC take their ``n_opt`` optimisation scans out of these, with
seed ``r``) and the next ``n_test`` (default: all the rest) are test scans. Per run and method:

* risk = mean over test scans of the whole-scan 0-1 loss (eq. 2);
* length = mean over test scans of the mean interval length ``q_hi - q_lo + 2 lambda`` over counted voxels;
* per organ k: risk_k = mean over test scans containing k of the organ loss (eq. 11), length_k the
  mean length inside the organ, over the same scans (per-scan means, as the tables say: the authors'
  Fig. 3 pools the voxels of all scans instead, which weighs large organs and large scans more).

Reported as mean ± standard deviation (ddof = 1) over runs. Infinite lambdas (uncontrollable groups)
give infinite lengths, shown as ``inf``. Outputs: JSON, Markdown and a PNG (matplotlib Agg) of
per-organ risk and length per method (a bare Agg ``Figure``: no pyplot, no global backend change).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..common.jsonable import jsonable
from ..evaluation.figures import agg_figure
from ..io.atomic import atomic_output, atomic_write_text, check_can_write
from .errors import IntervalCalibrationError
from .intervals import IntervalData, mean_length, scan_loss
from .procedures import METHODS, calibrate_interval_method

LABELS = {"crc": "CRC", "k-crc": "K-CRC", "sem-crc": "sem-CRC", "sem-crc-organ": "sem-CRC (per organ)"}


def _stats(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": math.nan, "std": math.nan}
    if not np.isfinite(a).all():
        return {"mean": math.inf if np.isinf(a).any() else math.nan, "std": math.nan}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


def _test_metrics(calib, test: IntervalData) -> tuple[float, float, list[float], list[float]]:
    risks, lengths = [], []
    organ_risk: list[list[float]] = [[] for _ in test.groups]
    organ_length: list[list[float]] = [[] for _ in test.groups]
    for scan in test.scans:
        lam = calib.voxel_lambda(scan)
        need, width, group = scan.need, scan.width, scan.group  # once per scan: a spilled scan maps them per access
        risks.append(scan_loss(need, lam))
        lengths.append(mean_length(width, lam))
        for k in range(test.n_groups):
            inside = group == k
            if inside.any():
                organ_risk[k].append(scan_loss(need[inside], lam[inside]))
                organ_length[k].append(mean_length(width[inside], lam[inside]))
    mean = lambda v: float(np.mean(v)) if v else math.nan  # noqa: E731
    return mean(risks), mean(lengths), [mean(v) for v in organ_risk], [mean(v) for v in organ_length]


#: ``map_tasks(task, shared, items, labels)``: ``[task(shared, item) for item in items]`` in order, on any
#: executor (``labels`` name the items in progress and errors); see :func:`evaluate_interval_methods`.
TaskMap = Callable[[Callable[[Any, Any], Any], Any, list[Any], list[str]], list[Any]]


def evaluate_interval_methods(
    data: IntervalData,
    epsilon: float,
    *,
    runs: int = 20,
    n_cal: int,
    n_test: int | None = None,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    map_tasks: TaskMap | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Table 1 / Fig. 3 statistics (module docstring); ``options`` go to every procedure; ``progress(done, total,
    text)`` after every calibration and its test (``runs * len(methods)`` of them).

    Every (run, method) pair is one independent task (:func:`run_method_task`: its split comes from seed
    ``seed + r`` and its procedure's seed is ``r``, whatever ran before). ``map_tasks`` runs them on an executor
    (``data`` is then sent to the workers: spilled scans (:mod:`.spill`) travel as their folder names, so the
    workers must see that folder); the results are merged here in (run, method) order, so the summary is
    bit-identical to the serial loop. Without ``map_tasks`` the tasks run here, one after another.
    """
    n_test = _check_evaluation(data, runs, n_cal, n_test, methods)
    shared = (data, epsilon, n_cal, n_test, seed, options)
    tasks = [(r, method) for r in range(runs) for method in methods]
    labels = [f"run {r + 1} {method}" for r, method in tasks]
    if map_tasks is not None:
        results = map_tasks(run_method_task, shared, tasks, labels)
    else:
        results = []
        for done, task in enumerate(tasks, start=1):
            results.append(run_method_task(shared, task))
            if progress is not None:
                progress(done, len(tasks), labels[done - 1])
    raw: dict[str, dict[str, list]] = {
        m: {"risk": [], "length": [], "organ_risk": [], "organ_length": [], "lambda": []} for m in methods
    }
    for (_, method), result in zip(tasks, results):
        for key, value in zip(("risk", "length", "organ_risk", "organ_length", "lambda"), result):
            raw[method][key].append(value)
        for category, message in result[-1]:
            warnings.warn(message, category, stacklevel=2)
    return _summary(data, epsilon, runs, n_cal, n_test, methods, raw)


def _check_evaluation(data: IntervalData, runs: int, n_cal: int, n_test: int | None, methods: Sequence[str]) -> int:
    """Validate the protocol's sizes and methods; return ``n_test`` (default: every scan not calibrating)."""
    if runs < 1 or not 1 <= n_cal < data.n:
        raise IntervalCalibrationError(
            f"need runs >= 1 and 1 <= n_cal < {data.n} scans, got runs={runs}, n_cal={n_cal}",
            fix="lower n_cal or add scans",
        )
    n_test = data.n - n_cal if n_test is None else int(n_test)
    if not 1 <= n_test <= data.n - n_cal:
        raise IntervalCalibrationError(f"n_test must be in 1..{data.n - n_cal}, got {n_test}", fix="lower n_test")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise IntervalCalibrationError(f"unknown method(s) {unknown}", fix=f"use {', '.join(METHODS)}")
    return n_test


def run_method_task(shared: tuple[Any, ...], task: tuple[int, str]) -> tuple[Any, ...]:
    """Run ``r``'s split, calibrate ``method`` on it and measure its test scans: ``(risk, length, organ_risk,
    organ_length, lambda by group, warnings)``. Module level: the task of ``map_tasks`` on any executor. The
    procedure's warnings (an uncontrollable group, an anchor fallback) are returned as ``(category, message)``
    rather than shown, since a worker's warnings never reach the user: the caller shows them in task order."""
    data, epsilon, n_cal, n_test, seed, options = shared
    r, method = task
    perm = np.random.default_rng(seed + r).permutation(data.n)
    cal, test = data.subset(perm[:n_cal]), data.subset(perm[n_cal : n_cal + n_test])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib = calibrate_interval_method(method, cal, epsilon, seed=r, **options)
    risk, length, organ_risk, organ_length = _test_metrics(calib, test)
    raised = [(w.category, str(w.message)) for w in caught]
    return risk, length, organ_risk, organ_length, dict(zip(calib.groups, calib.lam.tolist())), raised


def _summary(
    data: IntervalData,
    epsilon: float,
    runs: int,
    n_cal: int,
    n_test: int,
    methods: Sequence[str],
    raw: dict[str, dict[str, list]],
) -> dict[str, Any]:
    """Mean and standard deviation over runs of every per-run statistic (module docstring)."""
    summary: dict[str, Any] = {
        "epsilon": epsilon,
        "runs": runs,
        "n_cal": n_cal,
        "n_test": n_test,
        "organs": list(data.groups),
        "methods": {},
    }
    for method in methods:
        store = raw[method]
        risk_by_organ = np.asarray(store["organ_risk"], dtype=np.float64)
        length_by_organ = np.asarray(store["organ_length"], dtype=np.float64)
        summary["methods"][method] = {
            "risk": _stats(store["risk"]),
            "length": _stats(store["length"]),
            "organ_risk": {
                g: _stats(risk_by_organ[:, k][~np.isnan(risk_by_organ[:, k])]) for k, g in enumerate(data.groups)
            },
            "organ_length": {
                g: _stats(length_by_organ[:, k][~np.isnan(length_by_organ[:, k])]) for k, g in enumerate(data.groups)
            },
            "runs": {"risk": store["risk"], "length": store["length"], "lambda": store["lambda"]},
        }
    return summary


def _fmt(stat: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    mean, std = stat["mean"], stat["std"]
    if math.isinf(mean):
        return "inf"
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def evaluation_markdown(summary: dict[str, Any]) -> str:
    """Table 1 (risk, length ×10⁻²) and the per-organ risk/length tables as Markdown."""
    methods = list(summary["methods"])
    lines = [
        f"Risk tolerance epsilon = {summary['epsilon']}; mean ± std over {summary['runs']} calibrations "
        f"(n_cal = {summary['n_cal']}, n_test = {summary['n_test']}).",
        "",
        "| Procedure | Risk | Length (×10⁻²) |",
        "|---|---|---|",
    ]
    left_out = summary.get("left_out") or []
    if left_out:  # --keep-going: say which scans the figures are not about, before the figures
        listed = "; ".join(f"{row['case']} ({row['error']})" for row in left_out)
        lines[1:1] = ["", f"Left out (--keep-going), {len(left_out)} unreadable scan(s): {listed}"]
    for m in methods:
        s = summary["methods"][m]
        lines.append(f"| {LABELS.get(m, m)} | {_fmt(s['risk'])} | {_fmt(s['length'], 100, 2)} |")
    for key, title, scale, digits in (
        ("organ_risk", "Per-organ risk (per-scan mean over the test scans containing the organ)", 1.0, 3),
        (
            "organ_length",
            "Per-organ mean length (×10⁻², per-scan mean over the test scans containing the organ)",
            100.0,
            2,
        ),
    ):
        lines += [
            "",
            f"**{title}**",
            "",
            "| Organ | " + " | ".join(LABELS.get(m, m) for m in methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for organ in summary["organs"]:
            cells = [_fmt(summary["methods"][m][key][organ], scale, digits) for m in methods]
            lines.append(f"| {organ} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_organ_metrics(summary: dict[str, Any], path: str | PathLike[str], *, force: bool = False) -> Path:
    """Fig. 3 layout: per-organ mean length (left) and risk (right) per method, epsilon as a line."""
    organs, methods = summary["organs"], list(summary["methods"])
    x = np.arange(len(organs))
    width = 0.8 / max(1, len(methods))
    fig = agg_figure(11, 3.8)  # a bare Agg figure: no pyplot state, no global backend switch
    axes = fig.subplots(1, 2)
    for j, m in enumerate(methods):
        for ax, key in zip(axes, ("organ_length", "organ_risk")):
            stats = [summary["methods"][m][key][o] for o in organs]
            mean = np.array([s["mean"] if math.isfinite(s["mean"]) else np.nan for s in stats])
            std = np.array([s["std"] if math.isfinite(s["std"]) else 0.0 for s in stats])
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, mean, width, yerr=std, label=LABELS.get(m, m))
    axes[1].axhline(summary["epsilon"], color="k", linestyle="--", linewidth=1, label="epsilon")
    for ax, title in zip(axes, ("Mean interval length", "Risk")):
        ax.set_xticks(x, organs, rotation=30, ha="right")
        ax.set_title(title)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    target = Path(path)
    with atomic_output(target, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return target


def write_interval_evaluation(
    summary: dict[str, Any], out_dir: str | PathLike[str], *, force: bool = False
) -> list[Path]:
    """Write ``interval_evaluation.json``, ``.md`` and ``.png`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    paths = [out / "interval_evaluation.json", out / "interval_evaluation.md", out / "interval_evaluation.png"]
    for p in paths:
        check_can_write(p, force=force)
    text = json.dumps(jsonable(summary, non_finite="inf-string"), indent=2, allow_nan=False) + "\n"
    atomic_write_text(paths[0], text, force=force)
    atomic_write_text(paths[1], evaluation_markdown(summary), force=force)
    plot_organ_metrics(summary, paths[2], force=force)
    return paths
