"""Organ memberships ``s(y)`` (sem-CRC) and the fixed loss-quantile partition (K-CRC).

Memberships from a label map
----------------------------
An :class:`OrganMap` names the organ label values (``{1: "spleen", 2: "kidney", ...}``; several label
values may share a name, e.g. left and right kidney). Groups are the organ names in order of first
appearance, then ``"body"``. A voxel whose label is a named organ value belongs to that organ; every
other voxel inside the body mask belongs to ``"body"``; voxels outside the body mask are
:data:`~.intervals.EXCLUDED` and count in no loss. Body mask choices:

* ``"all"``: every voxel counts (no background exclusion);
* ``"nonzero"``: voxels with label > 0 (the label map carries a body label, as in the paper's
  "all remaining voxels that are not background are labeled generically as body");
* a bool array: an explicit mask (e.g. ``truth > air_threshold``). Organ voxels always count, even
  outside a given mask.

Fixed partition (K-CRC)
-----------------------
Following Teneggi et al. (2023), voxel *positions* are grouped into K quantile bins of the per-position
0-1 loss at ``lambda = 0`` averaged over the optimisation scans (the fraction of those scans in which
the position is counted and not covered; never-counted positions get 0). Bin edges are the
``1/K, ..., (K-1)/K`` quantiles (duplicates merged, so fewer than K groups may result); a position
with value ``v`` goes to the number of edges ``< v`` (``searchsorted(edges, v, side="left")``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..io.volumes import label_values
from .errors import IntervalInputError
from .intervals import EXCLUDED, IntervalData

BODY = "body"


@dataclass(frozen=True)
class OrganMap:
    """Organ label values and their names; ``groups`` = distinct names, then ``"body"``."""

    labels: Mapping[int, str]

    def __post_init__(self) -> None:
        for value, name in self.labels.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise IntervalInputError(
                    f"organ label values must be integers, got {value!r}",
                    fix="map integer label values to names, e.g. {1: 'liver'}",
                )
            if int(value) <= 0:
                raise IntervalInputError(
                    f"organ label value {value} must be positive (0 is background)",
                    fix="use the organ label values of the label map",
                )
            if not str(name) or str(name) == BODY:
                raise IntervalInputError(
                    f"organ name {name!r} for label {value} is empty or reserved",
                    fix=f"give every organ a name other than {BODY!r}",
                )

    @property
    def groups(self) -> tuple[str, ...]:
        names: list[str] = []
        for value in sorted(self.labels):
            if self.labels[value] not in names:
                names.append(str(self.labels[value]))
        return tuple(names) + (BODY,)

    @classmethod
    def parse(cls, spec: str) -> OrganMap:
        """Parse ``"1=spleen,2=kidney,3=kidney"`` (also ``;``-separated)."""
        labels: dict[int, str] = {}
        for item in spec.replace(";", ",").split(","):
            if not item.strip():
                continue
            value, sep, name = item.partition("=")
            try:
                key = int(value.strip())
            except ValueError:
                key = None
            if not sep or key is None or not name.strip():
                raise IntervalInputError(
                    f"cannot read organ spec item {item!r}",
                    fix="write organs as VALUE=NAME pairs, e.g. 1=spleen,2=kidney",
                )
            labels[key] = name.strip()
        if not labels:
            raise IntervalInputError("no organ given", fix="write organs as VALUE=NAME pairs, e.g. 1=spleen")
        return cls(labels)


def organ_memberships(label_map: np.ndarray, organs: OrganMap, body: str | np.ndarray = "all") -> np.ndarray:
    """Group index per voxel (int32): organ index, ``len(organs.groups) - 1`` for body, -1 excluded."""
    labels = np.asarray(label_map)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise IntervalInputError(
            f"organ label map must be integer, got {labels.dtype}",
            fix="pass an integer label map (nearest-neighbour resampled)",
        )
    groups = organs.groups
    body_index = len(groups) - 1
    if isinstance(body, str):
        if body == "all":
            body_mask = np.ones(labels.shape, dtype=bool)
        elif body == "nonzero":
            body_mask = labels > 0
        else:
            raise IntervalInputError(f"unknown body mask {body!r}", fix="use 'all', 'nonzero' or a bool array")
    else:
        body_mask = np.asarray(body, dtype=bool)
        if body_mask.shape != labels.shape:
            raise IntervalInputError(
                f"body mask has shape {body_mask.shape}, label map has {labels.shape}",
                fix="give the body mask on the label map's voxel grid",
            )
    unknown = sorted(label_values(labels) - {0} - set(organs.labels))
    if unknown and organs.labels:
        warnings.warn(
            f"organ label map values {unknown} are not in the organ labels {sorted(organs.labels)}: those voxels "
            "count as 'body' (pass them with --organ-labels if they are organs)",
            stacklevel=2,
        )
    out = np.where(body_mask, body_index, EXCLUDED).astype(np.int32)
    for value, name in organs.labels.items():
        out[labels == value] = groups.index(str(name))
    return out


def loss_quantile_partition(opt: IntervalData, k: int) -> tuple[np.ndarray, int]:
    """The K-CRC partition of voxel positions (module docstring): ``(group per flat position, K_eff)``.

    All scans must share one shape (a fixed pixel domain).
    """
    if k < 1:
        raise IntervalInputError(f"K must be >= 1, got {k}", fix="pass e.g. k=4")
    shapes = {s.shape for s in opt.scans}
    if len(shapes) != 1:
        raise IntervalInputError(
            f"K-CRC needs all scans on one voxel grid, got shapes {sorted(shapes)}",
            fix="crop/pad the scans to a common shape, or use sem-CRC",
        )
    size = int(np.prod(next(iter(shapes))))
    misses = np.zeros(size, dtype=np.float64)
    for scan in opt.scans:
        misses[scan.index] += scan.need > 0
    return partition_from_misses(misses, opt.n, k)


def partition_from_misses(misses: np.ndarray, n_scans: int, k: int) -> tuple[np.ndarray, int]:
    """The K-CRC partition from the per-position count of S_opt scans whose raw interval misses the truth
    (accumulated scan by scan as ``misses[scan.index] += scan.need > 0``): ``(group per position, K_eff)``."""
    value = misses / n_scans
    edges = np.unique(np.quantile(value, np.arange(1, k) / k)) if k > 1 else np.zeros(0)
    partition = np.searchsorted(edges, value, side="left").astype(np.int32)
    return partition, int(edges.size + 1)
