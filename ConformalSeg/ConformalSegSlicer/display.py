"""How the probability, uncertainty and interval-length overlays are shown (colour table, window,
hidden low values).

All are float foreground volumes with a perceptual colour table that Slicer ships (Viridis for the
probability, Inferno for the MC-dropout variance and for the sem-CRC interval length). The
probability is windowed to [0, 1]; the variance and the interval length, whose scales depend on the
model, to their finite data range. Values below the lower threshold are hidden (Slicer draws voxels
outside the display threshold transparent), so the CT stays visible where the network is confident
that there is no lesion. Infinite interval lengths (an organ whose risk could not be controlled)
are stored in the scene as a finite sentinel, twice the largest finite length
(:func:`scene_interval_length`: ``inf`` in a scene volume upsets auto window/level and histograms in
other modules), and drawn in the top colour, not hidden; the library's output keeps ``inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Slicer's built-in colour tables (``Base/Logic/Resources/ColorFiles/Viridis.txt`` / ``Inferno.txt``).
PROBABILITY_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileViridis.txt"
UNCERTAINTY_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
INTERVAL_COLOR_NODE_ID = UNCERTAINTY_COLOR_NODE_ID
#: Overlay choices of the panel ("interval": the sem-CRC interval-length map).
OVERLAYS = ("none", "probability", "uncertainty", "interval")
#: What the overlay combo box shows for each choice (the parameter node keeps the identifiers).
OVERLAY_LABELS = {
    "none": "None",
    "probability": "Lesion probability",
    "uncertainty": "MC-dropout variance (uncertainty)",
    "interval": "Interval length (sem-CRC)",
}


@dataclass(frozen=True)
class OverlayDisplay:
    color_node_id: str
    window_min: float
    window_max: float
    lower_threshold: float
    upper_threshold: float


def overlay_display(
    kind: str, data_min: float = 0.0, data_max: float = 1.0, hide_below: float = 0.05
) -> OverlayDisplay:
    """Display settings of an overlay.

    ``hide_below`` is a fraction of the window in [0, 1]: for the probability it is the probability
    under which voxels are hidden; for the uncertainty and the interval length, that fraction of the
    (finite) data range above its minimum.
    """
    if kind not in OVERLAYS[1:]:
        raise ValueError(f"overlay kind must be one of {', '.join(OVERLAYS[1:])}, got {kind!r}")
    hide_below = min(1.0, max(0.0, float(hide_below)))
    if kind == "probability":
        return OverlayDisplay(PROBABILITY_COLOR_NODE_ID, 0.0, 1.0, hide_below, 1.0)
    low, high = float(data_min), float(data_max)
    if kind == "interval" and not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0  # every interval is infinite: all voxels in the top colour
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"the {kind} map has no finite values to window")
    if high <= low:  # a constant map: a tiny window so that the colour table still applies
        high = low + max(abs(low) * 1e-6, 1e-12)
    if kind == "interval":
        return OverlayDisplay(INTERVAL_COLOR_NODE_ID, low, high, low + hide_below * (high - low), FINITE_TOP)
    return OverlayDisplay(UNCERTAINTY_COLOR_NODE_ID, low, high, low + hide_below * (high - low), high)


#: Upper display threshold that keeps every finite value (the largest float32), instead of ``inf``.
FINITE_TOP = float(np.finfo(np.float32).max)


def scene_interval_length(length: np.ndarray) -> np.ndarray:
    """The interval-length map as stored in the scene: ``+inf`` (uncontrollable organs) replaced by twice
    the largest finite length (1 when there is none, or it is not positive); other values unchanged."""
    length = np.asarray(length)
    infinite = np.isposinf(length)
    if not infinite.any():
        return length
    finite = length[np.isfinite(length)]
    top = float(finite.max()) if finite.size else 0.0
    out = length.copy()
    out[infinite] = 2.0 * top if top > 0 else 1.0
    return out


def finite_range(array) -> tuple[float, float]:
    """``(min, max)`` of the finite values of ``array`` (``(nan, nan)`` when it has none)."""
    values = np.asarray(array)
    finite_mask = np.isfinite(values)
    finite = values if finite_mask.all() else values[finite_mask]
    if finite.size == 0:
        return math.nan, math.nan
    return float(np.min(finite)), float(np.max(finite))
