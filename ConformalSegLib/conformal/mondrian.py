"""Group-conditional (Mondrian) calibration: one threshold per group of scans, each with its own guarantee.

A marginal guarantee ("9 scans in 10") can hide a group where it fails: small lesions, one scanner,
one site. Mondrian calibration (Vovk et al., *Algorithmic Learning in a Random World*, 2005, sec. 4.5;
Vovk, "Conditional validity of inductive conformal predictors", 2012) calibrates every group on that
group's scans alone.

Guarantee
---------
Each scan carries a group label (a scanner, a site, a lesion-size bin). For every group ``g`` with
``n_g`` usable calibration scans, the threshold calibrated on them satisfies

* cls: ``P(FNR_test <= epsilon | the test scan is in g) >= 1 - alpha``;
* lesion: the same for the fraction of missed lesions (and, when joint, of missed voxels);
* sets: ``P(inner inside the lesion | g) >= 1 - alpha_inner`` and
  ``P(outer contains the lesion | g) >= 1 - alpha_outer`` (joint: both at once with ``1 - alpha``);
* crc: ``E[FNR_test | the test scan is in g] <= epsilon``.

*Proof.* Assume the ``n + 1`` pairs (scan, group) -- the calibration scans and the test scan -- are
exchangeable (e.g. i.i.d.), the group of a scan being known for all of them (``--groups FILE`` for the
calibration scans, ``--group G`` for the new one) or a fixed function of the scan (its lesion volume).
Condition on the event that the test scan is in ``g``, on which calibration scans are in ``g`` and on
the whole sequence of groups: this event is invariant under permutations of the scans of group ``g``
among themselves, so given it those ``n_g + 1`` scans are still exchangeable. The method's own proof
(:mod:`.cls`, :mod:`.lesion_level`, :mod:`.confidence_sets`, :mod:`.crc`) then applies word for word
to them, with ``n_g`` in place of ``n``: for the per-scan methods the test score is at most the
``ceil((1 - alpha)(n_g + 1))``-th smallest of the ``n_g`` group scores with probability at least
``1 - alpha``. Lesion-free scans excluded from cls/crc/lesion calibration are excluded within each
group too, and the guarantee is then also conditional on the test scan having a lesion.

Too small a group is a result, not a fallback: when ``n_g`` is below the method's minimum (cls, lesion,
sets: ``ceil((1 - alpha)/alpha)``; crc: ``ceil(1/epsilon - 1)``) the group's quantile is infinite, its
mask is the whole image (the inner set empty), a
:class:`~ConformalSegLib.common.errors.CalibrationSetTooSmallWarning` and the group's sentence say how
many more scans of that group are needed. The marginal threshold is **never** used in its place.

Groups
------
* ``--groups FILE`` (``by = "file"``): a ``case_id,group`` table (:mod:`ConformalSegLib.io.case_table`)
  naming the group of every calibration scan; at apply time the group of the new scan is given with
  ``--group G``. Valid as long as the group is assigned the same way to calibration and new scans.
* ``--group-by lesion-size:E1,E2,...`` (``by = "lesion-size"``): bins of the **total lesion volume in
  mL** computed from each calibration scan's label (``voxels x voxel volume / 1000``, float64): bin ``j``
  is ``[E_j, E_j+1)`` mL with ``E_0 = 0`` and a last bin up to ``inf`` (a volume on an edge goes to the
  upper bin). A new scan's true volume is unknown, so two partitions are calibrated:

  - **true-size groups** (``groups``): used when the caller states the bin with ``--group`` (its name, or
    a volume in mL, e.g. measured by a radiologist); the guarantee is conditional on the *true* volume
    being in that bin, and it says nothing when that statement is wrong;
  - **predicted-size groups** (``predicted_groups``): the same bins applied to the **predicted lesion
    volume** ``#{voxels with probability >= 0.5} x voxel volume / 1000`` mL -- a label-free function of
    the probability map, computed the same way for the calibration scans and the new scan. Without
    ``--group``, the new scan's predicted volume picks its bin, and the threshold is the one calibrated
    on the calibration scans *of that predicted size*. The guarantee is then exactly
    ``P(FNR_test <= epsilon | predicted volume in the bin) >= 1 - alpha``: conditional on the
    predicted-size group and marginal over the true lesion sizes within it (a large lesion predicted
    small counts among the small-predicted scans). It is not a guarantee per true size.

Recalibration for a new (epsilon, alpha): the per-scan scores (:mod:`.scan_scores`) are computed once for
all scans and each group's quantile is a partition of its own scores, so a Mondrian profile recalibrates
in a few times the time of a marginal one, well under a millisecond for 1000 scans
(``benchmarks/bench_mondrian.py``); expected-FNR groups keep their summaries subset and sorted cache
between calls.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ..common.geometry import Geometry
from .cls import ThresholdCalibration, used_cases
from .confidence_sets import SetsCalibration
from .crc import calibrate_crc, min_crc_calibration_size
from .exact import as_fraction, calibration_rank, check_alpha, needed_calibration_size
from .guarantee_sentences import guarantee_sentence
from .scan_scores import ProfileData, ScanScores, has_scan_scores, rebuild, scan_scores_of
from .summaries import LesionSummaries

BY_FILE = "file"
BY_LESION_SIZE = "lesion-size"
GROUPINGS = (BY_FILE, BY_LESION_SIZE)
#: The predicted-volume rule: voxels with ``probability >= PREDICTED_CUTOFF`` count as predicted lesion.
PREDICTED_CUTOFF = 0.5
PREDICTED_RULE = f"voxels with probability >= {PREDICTED_CUTOFF}"


def parse_group_by(text: str) -> tuple[float, ...]:
    """The bin edges (mL, increasing, > 0) of ``lesion-size:E1,E2,...``."""
    kind, _, bins = text.partition(":")
    fix = "e.g. --group-by lesion-size:5,20 (bins [0, 5), [5, 20) and [20, inf) mL)"
    if kind.strip() != BY_LESION_SIZE or not bins.strip():
        raise ConformalSegError(f"unknown grouping {text!r}", fix=fix)
    try:
        edges = tuple(float(as_fraction(float(e))) for e in bins.split(","))
    except (ValueError, ConformalSegError) as exc:
        raise ConformalSegError(f"lesion-size bins must be numbers in mL, got {bins!r}", fix=fix) from exc
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConformalSegError(f"lesion-size bins must be positive and increasing, got {bins!r}", fix=fix)
    return edges


def bin_names(edges: Sequence[float]) -> tuple[str, ...]:
    """``[0, 5) mL``, ``[5, 20) mL``, ``[20, inf) mL`` for edges ``(5, 20)``."""
    bounds = [0.0, *edges, math.inf]
    return tuple(f"[{a:g}, {b:g}) mL" for a, b in zip(bounds, bounds[1:]))


def volume_bins(volumes_ml: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin index of each volume: ``j`` such that ``E_j <= v < E_j+1`` (``E_0 = 0``)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(volumes_ml, np.float64), side="right")


def scan_volumes_ml(probability: np.ndarray, lesion: np.ndarray, geometry: Geometry) -> tuple[float, float]:
    """``(true lesion volume, predicted lesion volume)`` of one scan in mL (module docstring's rule)."""
    ml_per_voxel = geometry.voxel_volume_mm3 / 1000.0
    true_voxels = int(np.count_nonzero(lesion))
    return true_voxels * ml_per_voxel, predicted_voxels(probability) * ml_per_voxel


def predicted_voxels(probability: np.ndarray) -> int:
    """``#{probability >= 0.5}``, exact for any float dtype (0.5 is representable in every one)."""
    return int(np.count_nonzero(np.asarray(probability) >= PREDICTED_CUTOFF))


@dataclass(frozen=True)
class Grouping:
    """How the calibration scans (in the order of the profile's summaries) fall into groups.

    ``index[i]`` is the group of scan ``i`` (a row of ``names``); for lesion-size groupings it is the bin
    of the true volume and ``predicted_index`` the bin of the predicted volume.
    """

    by: str
    names: tuple[str, ...]
    index: np.ndarray
    edges_ml: tuple[float, ...] = ()
    true_ml: np.ndarray | None = None
    predicted_ml: np.ndarray | None = None
    source: str | None = None
    _subsets: dict[tuple[str, int], tuple[LesionSummaries, LesionSummaries]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def predicted_index(self) -> np.ndarray | None:
        return None if self.predicted_ml is None else volume_bins(self.predicted_ml, self.edges_ml)

    def summaries_subset(
        self, summaries: LesionSummaries, partition: str, g: int, members: np.ndarray
    ) -> LesionSummaries:
        """The summaries of one group (kept, so that expected-FNR control sorts each group once)."""
        cached = self._subsets.get((partition, g))
        if cached is None or cached[0] is not summaries:
            cached = (summaries, summaries.subset(np.flatnonzero(members)))
            self._subsets[(partition, g)] = cached
        return cached[1]


def grouping_from_table(case_ids: Sequence[str], groups: Mapping[str, str], source: str | None = None) -> Grouping:
    """Groups of the calibration scans from a ``case id -> group`` table (every scan must be listed;
    group names sorted)."""
    missing = [c for c in case_ids if c not in groups]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ConformalSegError(
            f"{len(missing)} calibration scan(s) have no group: {shown}",
            path=source,
            fix="give every calibration case a row case_id,group (a scan with no group cannot be calibrated)",
        )
    names = tuple(sorted({groups[c] for c in case_ids}))
    position = {name: j for j, name in enumerate(names)}
    return Grouping(BY_FILE, names, np.array([position[groups[c]] for c in case_ids], np.int64), source=source)


def grouping_by_size(edges_ml: Sequence[float], true_ml: np.ndarray, predicted_ml: np.ndarray) -> Grouping:
    """Lesion-size bins from the true and predicted volumes (mL) of the calibration scans."""
    edges = tuple(float(e) for e in edges_ml)
    true_ml = np.asarray(true_ml, np.float64)
    return Grouping(
        BY_LESION_SIZE,
        bin_names(edges),
        volume_bins(true_ml, edges),
        edges,
        true_ml,
        np.asarray(predicted_ml, np.float64),
    )


@dataclass(frozen=True)
class GroupCalibration:
    """One group's calibration (``calibration.n`` of its scans used) and how many scans it needs."""

    name: str
    calibration: ThresholdCalibration | SetsCalibration
    needed: int

    @property
    def n(self) -> int:
        return self.calibration.n

    @property
    def more_needed(self) -> int:
        """How many more usable scans of this group a finite threshold needs (0 when it has enough)."""
        return max(0, self.needed - self.n)


@dataclass(frozen=True)
class MondrianCalibration:
    """Per-group calibrations: by the grouping's index and, for lesion size, by the predicted size too."""

    grouping: Grouping
    groups: tuple[GroupCalibration, ...]
    predicted_groups: tuple[GroupCalibration, ...] = ()

    def group(self, name: str, *, predicted: bool = False) -> GroupCalibration:
        found = {g.name: g for g in (self.predicted_groups if predicted else self.groups)}
        if name not in found:
            raise ConformalSegError(
                f"unknown group {name!r}", fix=f"use one of: {', '.join(repr(n) for n in found) or 'none'}"
            )
        return found[name]

    def thresholds(self) -> list[tuple[float, ...]]:
        """Every group's thresholds, in order (for the consistency check of loaded profiles)."""
        return [_thresholds(g.calibration) for g in (*self.groups, *self.predicted_groups)]


def _thresholds(c: ThresholdCalibration | SetsCalibration) -> tuple[float, ...]:
    if isinstance(c, SetsCalibration):
        return (c.inner_threshold, c.outer_threshold)
    return (c.probability_threshold,)


def needed_scans(like: ThresholdCalibration | SetsCalibration) -> int:
    """The fewest usable scans for which every quantile of the method is finite at ``like``'s parameters
    (marginal or PAC ranks; expected-FNR: ``ceil(1/epsilon - 1)``, 0 at epsilon 0, which no number of scans
    makes finite)."""
    if isinstance(like, ThresholdCalibration) and like.method == "crc":
        return 0 if as_fraction(like.epsilon) == 0 else min_crc_calibration_size(like.epsilon)
    if isinstance(like, SetsCalibration):
        delta = like.pac_delta
        if delta is not None and like.mode == "joint-split":
            delta = float(as_fraction(delta) / 2)
        levels = [like.alpha] if like.mode == "joint-max" else [like.alpha_inner, like.alpha_outer]
        return max(needed_calibration_size(level, delta) for level in levels)
    assert like.alpha is not None  # cls and lesion calibrations have one
    return needed_calibration_size(like.alpha, like.pac_delta)


def calibrate_groups(
    grouping: Grouping,
    like: ThresholdCalibration | SetsCalibration,
    data: ProfileData,
    *,
    warn: bool = True,
) -> MondrianCalibration:
    """Calibrate every group at the parameters of ``like`` (the marginal calibration), exactly."""
    if len(grouping.index) != data.summaries.n:
        raise ConformalSegError(f"the grouping has {len(grouping.index)} scans, the summaries {data.summaries.n}")
    partitions = [("true", grouping.index)]
    if grouping.predicted_index is not None:
        partitions.append(("predicted", grouping.predicted_index))
    results = []
    scores = scan_scores_of(like, data) if has_scan_scores(like) else None
    for partition, index in partitions:
        if scores is not None:
            results.append(_quantile_groups(grouping, index, like, scores, _with_lesion(like, data)))
        else:
            results.append(_crc_groups(grouping, partition, index, like, data))
    mondrian = MondrianCalibration(grouping, *[tuple(r) for r in results])
    if warn:
        for g in (*mondrian.groups, *mondrian.predicted_groups):
            if g.more_needed:
                warnings.warn(
                    f"group {g.name!r}: {g.n} usable calibration scan(s), at least {g.needed} are needed; "
                    f"its mask is the whole image until {g.more_needed} more scan(s) of this group are calibrated",
                    CalibrationSetTooSmallWarning,
                    stacklevel=2,
                )
    return mondrian


def _quantile_groups(
    grouping: Grouping,
    index: np.ndarray,
    like: ThresholdCalibration | SetsCalibration,
    scores: ScanScores,
    with_lesion: np.ndarray | None,
) -> list[GroupCalibration]:
    """Each group's quantile of each channel: the ``k``-th smallest of the group's scores with
    ``k = ceil((1 - alpha)(n_g + 1))`` (``1 - alpha`` read once per channel; with a PAC profile the PAC
    rank), ``+inf`` when ``k > n_g`` -- as :func:`.confidence_sets.conformal_upper_quantile` computes it.
    ``with_lesion`` (cls under the ``include`` policy) counts each group's scans with a lesion."""
    needed = needed_scans(like)
    levels = [(c, 1 - check_alpha(c.alpha)) for c in scores.channels]
    out = []
    for g, name in enumerate(grouping.names):
        members = index == g
        used = members & scores.used
        n_g = int(np.count_nonzero(used))
        quantiles, rank = {}, None
        for channel, level in levels:
            if channel.pac_delta is None:
                k = math.ceil(level * (n_g + 1))
            else:
                k = calibration_rank(n_g, channel.alpha, channel.pac_delta)
            group_scores = channel.scores[used]
            quantiles[channel.name] = math.inf if k > n_g else float(np.partition(group_scores, k - 1)[k - 1])
            rank = k
        if not isinstance(like, ThresholdCalibration):
            rank = None
        calibration = rebuild(
            like,
            quantiles,
            n=n_g,
            n_excluded=int(np.count_nonzero(members)) - n_g,
            rank=rank,
            n_with_lesion=None if with_lesion is None else int(np.count_nonzero(members & with_lesion)),
        )
        out.append(GroupCalibration(name, calibration, needed))
    return out


def _with_lesion(like: ThresholdCalibration | SetsCalibration, data: ProfileData) -> np.ndarray | None:
    """Which scans have a lesion, where the sentence counts them (cls under the ``include`` policy)."""
    if isinstance(like, ThresholdCalibration) and like.n_with_lesion is not None:
        with_lesion: np.ndarray = data.summaries.lesion_sizes > 0
        return with_lesion
    return None


def _crc_groups(
    grouping: Grouping,
    partition: str,
    index: np.ndarray,
    like: ThresholdCalibration | SetsCalibration,
    data: ProfileData,
) -> list[GroupCalibration]:
    assert isinstance(like, ThresholdCalibration)  # sets have channels
    used_all = used_cases(data.summaries, data.empty_policy)
    needed = needed_scans(like)
    out = []
    for g, name in enumerate(grouping.names):
        members = index == g
        n_g = int(np.count_nonzero(members & used_all))
        if n_g == 0:
            with_lesion = None if like.n_with_lesion is None else 0
            calibration = ThresholdCalibration(
                "crc", like.epsilon, None, 0, int(members.sum()), float("-inf"), n_with_lesion=with_lesion
            )
        else:
            subset = grouping.summaries_subset(data.summaries, partition, g, members)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)  # reported per group instead
                calibration = calibrate_crc(subset, like.epsilon, empty=data.empty_policy)
        out.append(GroupCalibration(name, calibration, needed))
    return out


# ------------------------------------------------------------------------------------------ apply time


@dataclass(frozen=True)
class GroupChoice:
    """The group a new scan is calibrated by, how it was chosen, and the sentence that then holds."""

    group: GroupCalibration
    predicted: bool
    sentence: str
    predicted_ml: float | None = None


def choose_group(
    mondrian: MondrianCalibration,
    group: str | None,
    probability: np.ndarray | None = None,
    geometry: Geometry | None = None,
) -> GroupChoice:
    """The group of a new scan: ``group`` (a name, or for lesion-size groups a volume in mL), or for
    lesion-size groups without one, the bin of its predicted volume (module docstring)."""
    grouping = mondrian.grouping
    if group is not None:
        name = _resolve_name(grouping, group)
        chosen = mondrian.group(name)
        return GroupChoice(chosen, False, group_sentence(chosen, grouping))
    if grouping.by != BY_LESION_SIZE:
        raise ConformalSegError(
            "this profile is group-conditional: the new scan's group is needed",
            fix=f"pass --group with one of: {', '.join(repr(n) for n in grouping.names)}",
        )
    if probability is None or geometry is None:
        raise ConformalSegError("the predicted-size group needs the probability map and its geometry")
    ml = predicted_voxels(probability) * geometry.voxel_volume_mm3 / 1000.0
    name = grouping.names[int(volume_bins(np.array([ml]), grouping.edges_ml)[0])]
    chosen = mondrian.group(name, predicted=True)
    return GroupChoice(chosen, True, group_sentence(chosen, grouping, predicted=True), ml)


def _resolve_name(grouping: Grouping, group: str) -> str:
    if group in grouping.names or grouping.by != BY_LESION_SIZE:
        return group
    try:
        ml = float(group)
    except ValueError:
        return group  # reported as unknown by MondrianCalibration.group
    if not math.isfinite(ml) or ml < 0:
        raise ConformalSegError(f"a lesion volume must be a number >= 0 mL, got {group!r}")
    return grouping.names[int(volume_bins(np.array([ml]), grouping.edges_ml)[0])]


def group_sentence(g: GroupCalibration, grouping: Grouping, *, predicted: bool = False) -> str:
    """The guarantee of one group, prefixed by what the group is (and how many scans it still needs)."""
    if grouping.by == BY_FILE:
        prefix = f"For a new scan of group {g.name!r} (calibrated on that group's scans only)"
    elif predicted:
        prefix = (
            f"For a new scan whose predicted lesion volume ({PREDICTED_RULE}) is in {g.name} -- conditional on "
            "this predicted-size group and marginal over the true lesion sizes within it"
        )
    else:
        prefix = f"For a new scan whose true lesion volume is in {g.name} (calibrated on scans of that volume only)"
    sentence = f"{prefix}: {guarantee_sentence(g.calibration)}"
    if g.more_needed:
        sentence += f" This group needs {g.more_needed} more calibration scan(s)."
    return sentence
