"""The slider path: (epsilon, alpha, alpha-inner, alpha-outer) -> recalibrated masks and the guarantee.

A :class:`SliderState` holds the loaded calibration profiles and one probability map. Each
:meth:`SliderState.update` recalibrates every profile from its stored summaries
(:meth:`CalibrationProfile.recalibrate`: microseconds, no volume is read and the model is not run)
and recomputes only the masks whose threshold changed, into buffers allocated once. The masks are
exactly the library's (:meth:`CalibrationProfile.masks`, tested voxel for voxel):

* CLS / expected-FNR lesion: ``prob >= c`` (:func:`ConformalSegLib.conformal.cls.apply_threshold`);
* confidence sets: outer ``T_out >= outer_threshold``, inner ``(T_in > inner_threshold) & outer``,
  where the score maps ``T`` (e.g. a distance transform) are computed once per probability map and
  cached, so a slider move never recomputes them;
* optional baseline ``prob >= 0.5`` ("Lesion (threshold 0.5)").

Which slider drives what: epsilon -- CLS and expected-FNR; alpha -- CLS and joint-max confidence
sets; alpha-inner / alpha-outer -- marginal and joint-split confidence sets (joint-split's overall
level is their sum). Slider values are rounded to :data:`SLIDER_DECIMALS` decimals first, so that
``0.1`` means exactly one tenth to the library's exact arithmetic.

The guarantee text is the library's sentence for each recalibrated profile (it says how many scans
the calibration used, and carries a warning when the set is too small for the risk level: then the
mask is the whole image / the inner set is empty).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from os import PathLike

import numpy as np

from ConformalSegLib.common.errors import CalibrationSetTooSmallWarning, ConformalSegError
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.cls import ThresholdCalibration, apply_threshold, round_up_to_dtype
from ConformalSegLib.conformal.confidence_sets import SetsCalibration
from ConformalSegLib.conformal.guarantee_sentences import band_sentence
from ConformalSegLib.conformal.profile import CalibrationProfile, load_profile
from ConformalSegLib.conformal.score_transforms import parse_transform
from ConformalSegLib.conformal.simultaneous import SimultaneousBand
from ConformalSegLib.conformal.threshold_scores import (
    DEFAULT_SCORE,
    SCORE_MAP_PREFIX,
    describe_cutoff,
    score_map_by_name,
    score_sentence,
)
from ConformalSegLib.conformal.ties import apply_calibration
from ConformalSegLib.io.segmentation import INNER_SET, LESION_THRESHOLD, OUTER_SET
from ConformalSegLib.io.volumes import PROBABILITY_TOLERANCE

#: Decimals of the panel's sliders (and of the parameter node's ``Decimals`` annotation).
SLIDER_DECIMALS = 3
#: Cutoff of the baseline segment "Lesion (threshold 0.5)".
THRESHOLD_CUTOFF = 0.5
#: Slider names (parameter-node members) in panel order.
SLIDERS = ("epsilon", "alpha", "alphaInner", "alphaOuter")


def snap(value: float, decimals: int = SLIDER_DECIMALS) -> float:
    """A slider value as the decimal the user sees (``0.30000000000000004`` -> ``0.3``)."""
    return float(round(float(value), decimals))


@dataclass(frozen=True)
class SliderSettings:
    epsilon: float = 0.1
    alpha: float = 0.1
    alpha_inner: float = 0.1
    alpha_outer: float = 0.1
    include_threshold: bool = False
    #: CLS and lesion-level profiles: the slider-safe band (valid for every epsilon of the slider at once)
    #: instead of the per-(epsilon, alpha) threshold; the panel's default while browsing.
    slider_safe: bool = False

    def snapped(self) -> SliderSettings:
        return replace(
            self,
            epsilon=snap(self.epsilon),
            alpha=snap(self.alpha),
            alpha_inner=snap(self.alpha_inner),
            alpha_outer=snap(self.alpha_outer),
        )


@dataclass
class SegmentUpdate:
    """One segment after an update. ``mask`` is a buffer owned by the state (overwritten by the next
    update): copy it to keep it. ``changed`` is False when the threshold did not move."""

    name: str
    mask: np.ndarray
    changed: bool
    rule: str
    voxels: int
    volume_ml: float


@dataclass
class SliderResult:
    segments: dict[str, SegmentUpdate] = field(default_factory=dict)
    guarantees: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  #: segments left out until their score maps arrive

    @property
    def changed(self) -> list[str]:
        return [name for name, segment in self.segments.items() if segment.changed]

    @property
    def has_warning(self) -> bool:
        return bool(self.warnings or self.errors)

    @property
    def text(self) -> str:
        """The label text: one guarantee per profile, then any error."""
        return "\n".join(self.guarantees + self.pending + [f"Error: {e}" for e in self.errors])


def greater_than(values: np.ndarray, threshold: float, out: np.ndarray) -> np.ndarray:
    """``values > threshold`` exactly for float arrays (the threshold rounded *down* to the dtype,
    the mirror image of :func:`ConformalSegLib.conformal.cls.apply_threshold`), written into ``out``."""
    if math.isinf(threshold):
        out.fill(threshold < 0)
        return out
    dtype = values.dtype if values.dtype.kind == "f" else np.dtype(np.float64)
    largest_at_most = -round_up_to_dtype(-threshold, dtype)
    np.greater(values, largest_at_most, out=out)
    return out


def validate_probability(probability: np.ndarray, what: str = "probability map") -> np.ndarray:
    """A float array within [0, 1] (up to rounding noise) and finite, or a clear error."""
    array = np.asarray(probability)
    if array.ndim != 3:
        raise ConformalSegError(f"the {what} must be a 3D volume, got shape {array.shape}")
    if array.dtype.kind != "f":
        raise ConformalSegError(
            f"the {what} has integer voxels ({array.dtype}): it looks like a segmentation or an "
            "image, not probabilities",
            fix="select the probability map the model produced",
        )
    if not np.isfinite(array).all():
        raise ConformalSegError(
            f"the {what} contains NaN or infinite values", fix="select a valid probability map (values in [0, 1])"
        )
    low, high = float(array.min()), float(array.max())
    if low < -PROBABILITY_TOLERANCE or high > 1 + PROBABILITY_TOLERANCE:
        raise ConformalSegError(
            f"the {what} has values in [{low:g}, {high:g}], outside [0, 1]",
            fix="select the probability map (not the CT image); apply softmax/sigmoid to logits",
        )
    return array


def _segment_names(profile: CalibrationProfile) -> tuple[str, ...]:
    if profile.method == "sets":
        return (INNER_SET, OUTER_SET)
    return (profile.mask_name,)


#: The per-(epsilon, alpha) guarantee holds only for values chosen before the scan was viewed.
FIXED_PREFIX = "(epsilon and alpha fixed before viewing this scan) "


def grid_epsilon(epsilon: float, grid: Sequence[float]) -> float:
    """The largest slider-safe grid epsilon at or below ``epsilon`` (its mask is at least as large, so the
    band's promise at it implies the promise at ``epsilon``); the smallest grid value when none is below."""
    target = Fraction(str(snap(epsilon)))
    below = [e for e in grid if Fraction(str(e)) <= target]
    return max(below, key=lambda e: Fraction(str(e))) if below else grid[0]


def relevant_sliders(profiles: Iterable[CalibrationProfile]) -> set[str]:
    """The sliders that change something for these profiles (the others can be disabled)."""
    names: set[str] = set()
    for profile in profiles:
        if profile.method in ("cls", "lesion", "rcps"):  # rcps: the alpha slider is delta
            names |= {"epsilon", "alpha"}
        elif profile.method == "ltt":  # one target per risk: no slider
            continue
        elif profile.method == "crc":
            names.add("epsilon")
        elif profile.calibration.mode == "joint-max":
            names.add("alpha")
        else:
            names |= {"alphaInner", "alphaOuter"}
    return names


def initial_settings(
    profiles: Iterable[CalibrationProfile], default: SliderSettings = SliderSettings()
) -> SliderSettings:
    """Slider positions that reproduce the profiles as calibrated."""
    settings = default
    for profile in profiles:
        c = profile.calibration
        if isinstance(c, SetsCalibration):
            if c.mode == "joint-max":
                settings = replace(settings, alpha=c.alpha)
            else:
                settings = replace(settings, alpha_inner=c.alpha_inner, alpha_outer=c.alpha_outer)
        else:
            settings = replace(settings, epsilon=c.epsilon)
            if c.alpha is not None:
                settings = replace(settings, alpha=c.alpha)
    return settings.snapped()


def recalibrate(profile: CalibrationProfile, settings: SliderSettings) -> CalibrationProfile:
    """``profile`` recalibrated for the (snapped) slider settings, as :meth:`SliderState.update` does."""
    s = settings.snapped()
    if profile.method in ("cls", "lesion"):
        return profile.recalibrate(epsilon=s.epsilon, alpha=s.alpha)
    if profile.method == "crc":
        return profile.recalibrate(epsilon=s.epsilon)
    if profile.method == "rcps":
        return profile.recalibrate(epsilon=s.epsilon, alpha=s.alpha)  # alpha is delta
    if profile.method == "ltt":
        return profile
    if profile.calibration.mode == "joint-max":
        return profile.recalibrate(alpha=s.alpha)
    return profile.recalibrate(alpha_inner=s.alpha_inner, alpha_outer=s.alpha_outer)


def _fmt(x: float) -> str:
    return "-inf" if x == -math.inf else "+inf" if x == math.inf else f"{x:.6g}"


def score_label(transform_name: str) -> str:
    """What a confidence-set threshold compares, in words (for the results table)."""
    t = parse_transform(transform_name)
    if t.kind == "identity":
        return "probability"
    if t.kind == "distance":
        return f"signed distance to (probability >= {t.parameter:g}), mm"
    return f"probability smoothed with sigma {t.parameter:g} mm"


class SliderState:
    """Profiles + one probability map; :meth:`update` gives the masks for slider settings."""

    def __init__(
        self,
        profiles: Sequence[CalibrationProfile],
        probability: np.ndarray,
        geometry: Geometry,
        *,
        inline_scores: bool = True,
    ):
        if not profiles:
            raise ConformalSegError("no calibration profile loaded", fix="choose a calibration profile (.json)")
        self.profiles = list(profiles)
        self.probability = validate_probability(probability)
        if self.probability.shape != geometry.shape:
            raise ValueError(f"probability shape {self.probability.shape} != geometry shape {geometry.shape}")
        self.geometry = geometry
        names = [name for p in self.profiles for name in _segment_names(p)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConformalSegError(
                f"two profiles give the same segment(s) {', '.join(duplicates)}",
                fix="load at most one profile per method (CLS, expected-FNR, RCPS, LTT, lesion-level, sets)",
            )
        self._buffers: dict[str, np.ndarray] = {}
        self._keys: dict[str, object] = {}
        self._stats: dict[str, tuple[int, float]] = {}
        self._scores: dict[str, np.ndarray] = {}
        self._bands: dict[tuple[int, float], SimultaneousBand] = {}
        #: False (the panel): score maps other than the identity are not computed here but handed in by
        #: :meth:`set_scores` (computed in a background process, :mod:`ConformalSegSlicer.score_maps`);
        #: until then :meth:`update` leaves the confidence sets out and says so.
        self.inline_scores = inline_scores

    @classmethod
    def from_files(
        cls,
        paths: Iterable[str | PathLike[str]],
        probability: np.ndarray,
        geometry: Geometry,
        *,
        inline_scores: bool = True,
    ) -> SliderState:
        """Refuses a mask-only margin profile (``calibrate --masks``): its score is the distance to a predicted
        label map's boundary, so a probability map cannot stand in for it (``apply --mask`` refuses the same)."""
        from ConformalSegLib.common.errors import ConformalSegError

        from .profile_apply import MASK, profile_input

        paths = list(paths)
        for path in paths:
            if profile_input(path) == MASK:
                raise ConformalSegError(
                    "this profile was calibrated on predicted masks (calibrate --masks), not on probability maps",
                    path=path,
                    fix="apply it to the label map: ConformalSegLogic().runProfileApply(profile, maskVolume=LABELS)",
                )
        return cls([load_profile(p) for p in paths], probability, geometry, inline_scores=inline_scores)

    def missing_scores(self) -> list[str]:
        """The score maps (not the identity) the profiles need and that are not cached: confidence-set transforms
        by name, threshold profiles' scores as ``score:NAME`` (:func:`score_map_by_name`)."""
        names = []
        for profile in self.profiles:
            c = profile.calibration
            if isinstance(c, SetsCalibration):
                wanted = [n for n in (c.outer_transform, c.inner_transform) if parse_transform(n).kind != "identity"]
            else:
                wanted = [] if profile.score == DEFAULT_SCORE else [SCORE_MAP_PREFIX + profile.score]
            names += [n for n in wanted if n not in self._scores and n not in names]
        return names

    def set_scores(self, name: str, scores: np.ndarray) -> None:
        """Hand in the score map of transform ``name`` (computed elsewhere from this state's probability map)."""
        scores = np.asarray(scores)
        if scores.shape != self.probability.shape:
            raise ValueError(f"score map shape {scores.shape} != probability shape {self.probability.shape}")
        self._scores[name] = scores

    # ------------------------------------------------------------------ helpers

    @property
    def methods(self) -> list[str]:
        return [p.method for p in self.profiles]

    def relevant_sliders(self) -> set[str]:
        return relevant_sliders(self.profiles)

    def initial_settings(self) -> SliderSettings:
        return initial_settings(self.profiles)

    def scores(self, transform_name: str) -> np.ndarray:
        """The score map ``T`` of a transform (or ``score:NAME``), computed once per probability map."""
        if transform_name not in self._scores:
            self._scores[transform_name] = score_map_by_name(transform_name, self.probability, self.geometry)
        return self._scores[transform_name]

    def band(self, index: int, alpha: float) -> SimultaneousBand:
        """The slider-safe band of profile ``index`` at ``alpha`` (computed once per alpha)."""
        key = (index, snap(alpha))
        if key not in self._bands:
            self._bands[key] = self.profiles[index].slider_band(alpha=snap(alpha))
        return self._bands[key]

    def threshold_and_sentence(
        self, index: int, recalibrated: CalibrationProfile, settings: SliderSettings
    ) -> tuple[float, str]:
        """A threshold profile's cutoff and guarantee sentence for the settings: the slider-safe band's at
        the grid epsilon (CLS and lesion-level, ``slider_safe``), else the per-(epsilon, alpha) ones (also for
        a profile calibrated with random tie-breaking, which has no slider-safe band)."""
        c = recalibrated.calibration
        assert isinstance(c, ThresholdCalibration)
        if settings.slider_safe and recalibrated.method in ("cls", "lesion") and c.tie_seed is None:
            band = self.band(index, settings.alpha)
            epsilon = grid_epsilon(settings.epsilon, band.grid)
            cutoff = band.threshold(epsilon)
            return cutoff, band_sentence(band, recalibrated.method, epsilon) + score_sentence(
                recalibrated.score, cutoff
            )
        prefix = FIXED_PREFIX if recalibrated.method in ("cls", "lesion") else ""
        return c.probability_threshold, prefix + recalibrated.guarantee

    def _buffer(self, name: str) -> np.ndarray:
        if name not in self._buffers:
            self._buffers[name] = np.empty(self.probability.shape, dtype=bool)
        return self._buffers[name]

    def _segment(self, name: str, key: object, compute, rule: str) -> SegmentUpdate:
        changed = self._keys.get(name, object()) != key
        buffer = self._buffer(name)
        if changed:
            compute(buffer)
            self._keys[name] = key
            voxels = int(np.count_nonzero(buffer))
            self._stats[name] = (voxels, voxels * self.geometry.voxel_volume_mm3 / 1000.0)
        voxels, ml = self._stats[name]
        return SegmentUpdate(name, buffer, changed, rule, voxels, ml)

    # ------------------------------------------------------------------ update

    def update(self, settings: SliderSettings) -> SliderResult:
        settings = settings.snapped()
        result = SliderResult()
        for index, profile in enumerate(self.profiles):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CalibrationSetTooSmallWarning)
                try:
                    new = recalibrate(profile, settings)
                    if not isinstance(new.calibration, SetsCalibration):
                        cutoff, sentence = self.threshold_and_sentence(index, new, settings)
                    else:
                        sentence = new.guarantee
                except ConformalSegError as exc:
                    result.errors.append(f"{profile.method}: {exc}")
                    for name in _segment_names(profile):  # keep the last valid mask, if any
                        if name in self._stats:
                            voxels, ml = self._stats[name]
                            result.segments[name] = SegmentUpdate(
                                name, self._buffers[name], False, "unchanged", voxels, ml
                            )
                    continue
            result.warnings += [str(w.message) for w in caught if issubclass(w.category, CalibrationSetTooSmallWarning)]
            result.guarantees.append(sentence)
            c = new.calibration
            if isinstance(c, SetsCalibration) and not self.inline_scores and self.missing_scores():
                result.pending.append(
                    "Inner and outer sets: computing the score maps in the background "
                    f"({', '.join(self.missing_scores())}); they appear when done."
                )
            elif isinstance(c, SetsCalibration):
                t_out = self.scores(c.outer_transform)
                t_in = self.scores(c.inner_transform)
                outer = self._segment(
                    OUTER_SET,
                    ("outer", c.outer_transform, c.outer_threshold),
                    lambda out: apply_threshold(t_out, c.outer_threshold, out=out),
                    f"{score_label(c.outer_transform)} >= {_fmt(c.outer_threshold)}",
                )

                def inner_mask(out: np.ndarray) -> None:
                    greater_than(t_in, c.inner_threshold, out)
                    np.logical_and(out, outer.mask, out=out)

                inner = self._segment(
                    INNER_SET,
                    ("inner", c.inner_transform, c.inner_threshold, self._keys[OUTER_SET]),
                    inner_mask,
                    f"{score_label(c.inner_transform)} > {_fmt(c.inner_threshold)}, within the outer set",
                )
                result.segments[INNER_SET] = inner
                result.segments[OUTER_SET] = outer
            elif not self.inline_scores and SCORE_MAP_PREFIX + new.score in self.missing_scores():
                result.pending.append(
                    f"{new.mask_name}: computing its {new.score} score map in the background; it appears when done."
                )
            else:
                result.segments[new.mask_name] = self._threshold_segment(new, cutoff)
        if settings.include_threshold:
            result.segments[LESION_THRESHOLD] = self._segment(
                LESION_THRESHOLD,
                ("prob", THRESHOLD_CUTOFF),
                lambda out: apply_threshold(self.probability, THRESHOLD_CUTOFF, out=out),
                f"probability >= {THRESHOLD_CUTOFF}",
            )
        return result

    def _threshold_segment(self, profile: CalibrationProfile, cutoff: float) -> SegmentUpdate:
        """A threshold profile's mask at ``cutoff``: on the probability, or on the profile's score map."""
        c = profile.calibration
        assert isinstance(c, ThresholdCalibration)
        ties = c.tie_seed is not None  # the fixed (eps, alpha) mask
        if profile.score == DEFAULT_SCORE:
            values, key, rule = self.probability, "prob", f"probability >= {_fmt(cutoff)}"
        else:
            values, key = self.scores(SCORE_MAP_PREFIX + profile.score), profile.score
            rule = describe_cutoff(profile.score, cutoff)
        return self._segment(
            profile.mask_name,
            (key, cutoff, c.tie_threshold if ties else None),
            (lambda out: apply_calibration(values, c, out=out))
            if ties
            else (lambda out: apply_threshold(values, cutoff, out=out)),
            rule + (" (ties broken at random)" if ties else ""),
        )

    def library_masks(self, settings: SliderSettings) -> dict[str, np.ndarray]:
        """The same masks straight from the library (:meth:`CalibrationProfile.masks`), for checks."""
        masks: dict[str, np.ndarray] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationSetTooSmallWarning)
            for index, profile in enumerate(self.profiles):
                new = recalibrate(profile, settings)
                c = new.calibration
                if isinstance(c, SetsCalibration) or c.tie_seed is not None:  # tie-broken: fixed (eps, alpha)
                    masks.update(new.masks(self.probability, self.geometry))
                else:
                    cutoff, _ = self.threshold_and_sentence(index, new, settings.snapped())
                    masks[new.mask_name] = apply_threshold(new.score_map(self.probability, self.geometry), cutoff)
        if settings.include_threshold:
            masks[LESION_THRESHOLD] = apply_threshold(self.probability, THRESHOLD_CUTOFF)
        return masks
