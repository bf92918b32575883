"""The drift-monitoring figure: the conformal test martingale over reviewed cases (log scale, with the
``1/delta`` alarm line of Ville's inequality) above the running ECR (or mean FNR) and its target."""

from __future__ import annotations

import math
from os import PathLike

import numpy as np

from ..conformal.monitoring import MonitorResult
from ..io.atomic import atomic_output
from .figures import agg_figure


def monitor_png(result: MonitorResult, path: str | PathLike[str], *, title: str = "", force: bool = False) -> None:
    """Write the two-panel PNG of a monitoring run (atomically; an existing file only with ``force``)."""
    fig = agg_figure(7.0, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    cases = np.arange(1, result.martingale.size + 1)
    top.semilogy(cases, result.martingale, color="#1f4e9c", label=f"{result.kind} martingale")
    top.axhline(1 / result.delta, color="#b34700", linestyle="--", label=f"1/delta = {1 / result.delta:g}")
    top.axhline(1.0, color="0.6", linewidth=0.8)
    if result.alarm is not None:
        for ax in (top, bottom):
            ax.axvline(result.alarm + 1, color="#b34700", linewidth=0.8)
        top.annotate(
            f"alarm: case {result.alarm + 1}",
            (result.alarm + 1, 1 / result.delta),
            textcoords="offset points",
            xytext=(4, 6),
            color="#b34700",
        )
    top.set_ylabel("martingale")
    top.legend(loc="upper left", fontsize=8)
    bottom.plot(cases, result.running, color="#2c7a2c", label=result.running_label)
    if not math.isnan(result.target):
        bottom.axhline(result.target, color="0.3", linestyle=":", label=f"target {result.target:g}")
    bottom.set_xlabel("reviewed case (time order)")
    bottom.set_ylabel(result.running_label)
    bottom.legend(loc="lower left", fontsize=8)
    fig.suptitle(
        title or f"Drift monitoring: {result.martingale.size} reviewed cases, {result.n_calibration} calibration"
    )
    fig.tight_layout()
    with atomic_output(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
