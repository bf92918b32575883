"""How the probability and uncertainty overlays are shown (colour table, window, hidden low values).

Both are float foreground volumes with a perceptual colour table that Slicer ships (Viridis for the
probability, Inferno for the MC-dropout variance). The probability is windowed to [0, 1]; the
variance, whose scale depends on the model, to its data range. Values below the lower threshold are
hidden (Slicer draws voxels outside the display threshold transparent), so the CT stays visible
where the network is confident that there is no lesion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Slicer's built-in colour tables (``Base/Logic/Resources/ColorFiles/Viridis.txt`` / ``Inferno.txt``).
PROBABILITY_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileViridis.txt"
UNCERTAINTY_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
OVERLAYS = ("none", "probability", "uncertainty")


@dataclass(frozen=True)
class OverlayDisplay:
    color_node_id: str
    window_min: float
    window_max: float
    lower_threshold: float
    upper_threshold: float


def overlay_display(kind: str, data_min: float = 0.0, data_max: float = 1.0, hide_below: float = 0.05) -> OverlayDisplay:
    """Display settings of an overlay.

    ``hide_below`` is a fraction of the window in [0, 1]: for the probability it is the probability
    under which voxels are hidden; for the uncertainty, that fraction of the data range above its
    minimum.
    """
    if kind not in ("probability", "uncertainty"):
        raise ValueError(f"overlay kind must be probability or uncertainty, got {kind!r}")
    hide_below = min(1.0, max(0.0, float(hide_below)))
    if kind == "probability":
        return OverlayDisplay(PROBABILITY_COLOR_NODE_ID, 0.0, 1.0, hide_below, 1.0)
    low, high = float(data_min), float(data_max)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("the uncertainty map has non-finite values")
    if high <= low:  # a constant map: a tiny window so that the colour table still applies
        high = low + max(abs(low) * 1e-6, 1e-12)
    return OverlayDisplay(UNCERTAINTY_COLOR_NODE_ID, low, high, low + hide_below * (high - low), high)
