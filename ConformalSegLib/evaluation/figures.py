"""Figures: slice overlays of calibrated masks and confidence sets, and the bare Agg figure of every plot."""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike

import numpy as np

from ..common.geometry import Geometry
from ..io.atomic import atomic_output

GROUND_TRUTH = "Ground truth"
TRUTH_COLOR = (0.0, 0.9, 1.0)  # cyan: visible on CT and on a white legend


def agg_figure(width: float = 6.4, height: float = 4.4):  # -> matplotlib.figure.Figure
    """A bare matplotlib figure on an Agg canvas: no pyplot state, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def best_axial_slice(mask: np.ndarray) -> int:
    """Index (numpy axis 0) of the axial slice with the largest mask area (middle slice if empty)."""
    areas = np.asarray(mask, dtype=bool).reshape(mask.shape[0], -1).sum(axis=1)
    return int(np.argmax(areas)) if areas.any() else mask.shape[0] // 2


def slice_overlay_png(
    image: np.ndarray,
    geometry: Geometry,
    truth: np.ndarray,
    panels: Mapping[str, Mapping[str, np.ndarray]],
    path: str | PathLike[str],
    *,
    title: str = "",
    window: tuple[float, float] = (-160.0, 240.0),
    force: bool = False,
    colors: Mapping[str, tuple[float, float, float]] | None = None,
) -> None:
    """One row of panels on the axial slice with the most lesion: the image, then per panel the
    ground truth contour (cyan, dashed) and each named mask's contour in its colour.

    ``panels`` maps a panel title to ``{mask name: bool volume}``. Pixel aspect follows the spacing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    k = best_axial_slice(truth)
    sx, sy, _ = geometry.spacing
    extent = (0, image.shape[2] * sx, image.shape[1] * sy, 0)
    colors = dict(colors or {})
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.6), squeeze=False)
    axes = axes[0]
    for ax in axes:
        ax.imshow(image[k], cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("CT (synthetic)" if not title else title, fontsize=9)
    for ax, (panel_title, masks) in zip(axes[1:], panels.items()):
        handles = [Line2D([0], [0], color=TRUTH_COLOR, ls="--", lw=1.2, label=GROUND_TRUTH)]
        ax.contour(
            truth[k].astype(float),
            levels=[0.5],
            colors=[TRUTH_COLOR],
            linestyles="--",
            linewidths=1.2,
            extent=(0, extent[1], 0, extent[2]),
            origin="upper",
        )
        for name, mask in masks.items():
            color = colors.get(name, (1.0, 0.3, 0.3))
            if mask[k].any() and not mask[k].all():
                ax.contour(
                    mask[k].astype(float),
                    levels=[0.5],
                    colors=[color],
                    linewidths=1.4,
                    extent=(0, extent[1], 0, extent[2]),
                    origin="upper",
                )
            label = name + (" (whole slice)" if mask[k].all() else " (empty)" if not mask[k].any() else "")
            handles.append(Line2D([0], [0], color=color, lw=1.4, label=label))
        ax.set_title(panel_title, fontsize=9)
        ax.legend(handles=handles, loc="lower center", fontsize=6, framealpha=0.6, bbox_to_anchor=(0.5, -0.32))
    fig.tight_layout()
    with atomic_output(path, force=force) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
