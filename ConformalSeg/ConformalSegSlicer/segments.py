"""Names, ids, colours, terminology and visibility switches of the result segments.

Names and colours come from :mod:`ConformalSegLib.io.segmentation` (the same as the ``.seg.nrrd``
files of ``conformalseg apply``), so a segmentation made in Slicer and one made by the CLI look the
same. Slicer stores a segment's terminology as one string (``vtkSegment.SetTerminology``):
``context~category~type~type modifier~anatomic context~region~region modifier`` with each code as
``scheme^value^meaning`` (the format of ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``).
"""

from __future__ import annotations

from ConformalSegLib.conformal.profile import LESION_CRC, LESION_LTT, LESION_RCPS
from ConformalSegLib.io.segmentation import (
    DEFAULT_COLOR,
    INNER_SET,
    LESION_FNR,
    LESION_LEVEL,
    LESION_THRESHOLD,
    OUTER_SET,
    SEGMENT_COLORS,
    SEGMENT_TERMINOLOGY,
    slug,
)

#: Display order of the segments (lesion masks first, then the sets, then the 0.5 baseline).
SEGMENT_ORDER: tuple[str, ...] = (
    LESION_FNR,
    LESION_CRC,
    LESION_RCPS,
    LESION_LTT,
    LESION_LEVEL,
    INNER_SET,
    OUTER_SET,
    LESION_THRESHOLD,
)
#: Expected-FNR lesion mask: orange, so that it is not mistaken for the CLS lesion (red); RCPS and
#: Learn-Then-Test (expected risks with confidence over the calibration draw): magenta and purple.
_EXTRA_COLORS = {LESION_CRC: (0.95, 0.55, 0.10), LESION_RCPS: (0.85, 0.20, 0.60), LESION_LTT: (0.55, 0.25, 0.80)}
#: Lesion masks without a terminology entry of their own take the CLS lesion's (a neoplasm).
_LESION_LIKE = (LESION_CRC, LESION_RCPS, LESION_LTT)
#: Parameter-node member (and checkbox) that shows or hides each segment.
VISIBILITY_PARAMETER: dict[str, str] = {
    LESION_FNR: "showLesion",
    LESION_CRC: "showLesion",
    LESION_RCPS: "showLesion",
    LESION_LTT: "showLesion",
    LESION_LEVEL: "showLesion",
    INNER_SET: "showInnerSet",
    OUTER_SET: "showOuterSet",
    LESION_THRESHOLD: "showThresholdSegment",
}


def segment_id(name: str) -> str:
    """Stable segment id of a segment name (the slug the ``.seg.nrrd`` writer uses)."""
    return slug(name)


def segment_color(name: str) -> tuple[float, float, float]:
    return tuple(SEGMENT_COLORS.get(name, _EXTRA_COLORS.get(name, DEFAULT_COLOR)))


def _code(triple) -> str:
    return "^".join(str(part) for part in triple) if triple else "^^"


def terminology_string(name: str) -> str | None:
    """Slicer's serialized terminology entry of a standard segment, or None (no terminology)."""
    entry = SEGMENT_TERMINOLOGY.get(name)
    if entry is None and name in _LESION_LIKE:
        entry = SEGMENT_TERMINOLOGY.get(LESION_FNR)
    if entry is None:
        return None
    return "~".join(
        [
            str(entry.get("contextName", "")),
            _code(entry.get("category")),
            _code(entry.get("type")),
            _code(entry.get("typeModifier")),
            str(entry.get("anatomicContextName", "")),
            _code(entry.get("anatomicRegion")),
            _code(entry.get("anatomicRegionModifier")),
        ]
    )


def sort_names(names) -> list[str]:
    """Segment names in :data:`SEGMENT_ORDER` (unknown names last, alphabetically)."""
    rank = {name: i for i, name in enumerate(SEGMENT_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))
