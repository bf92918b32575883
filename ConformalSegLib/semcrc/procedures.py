"""The four calibration procedures: CRC, K-CRC, sem-CRC and per-organ sem-CRC (Teneggi et al.).

All four pick ``lambda`` per group along ``lambda(omega) = max(0, anchor + omega)`` with the exact
CRC choice of :mod:`.exact_omega` (closed intervals: covered iff ``lambda >= need``):

* ``crc`` (eq. 3): one scalar lambda, anchor 0, ``omega in [0, lambda_max]``, all scans calibrate.
  Guarantee: ``E[l01(test)] <= epsilon`` (whole-scan loss, eq. 2).
* ``k-crc`` (eq. 6): the scans are split into ``S_opt`` (``n_opt`` scans, seeded) and ``S_cal``.
  On ``S_opt`` voxel *positions* are partitioned into K loss quantiles
  (:func:`.memberships.loss_quantile_partition`) and the anchor solves (PK)
  (:mod:`.anchor`); on ``S_cal`` ``omega`` is chosen in ``[-max(anchor), lambda_max]`` (at the lower
  end every lambda is 0). Same guarantee as CRC: the anchor and the partition depend on ``S_opt``
  only, hence are fixed with respect to ``S_cal`` and the test scan.
* ``sem-crc`` (eq. 9, Prop. 1): like K-CRC with the instance-dependent organ memberships ``s(y)``
  (one lambda per organ, ``"body"`` included) and the anchor of (Psem). Same guarantee.
* ``sem-crc-organ`` (eq. 12): the sem-CRC anchor, then for each organ ``k`` separately
  ``lambda_k = anchor_k + omega_k`` with ``omega_k in [-anchor_k, lambda_max]`` (default
  ``from_anchor=False``: ``lambda_k >= 0``, shorter intervals, the same guarantee since the range is fixed
  before ``S_cal`` is seen; the statistics audit measured per-organ risk 0.065-0.082 at eps 0.1 against
  0.015-0.064 with the paper-literal ``from_anchor=True``, ``omega_k >= 0`` of eq. 12) with the CRC condition on the
  per-organ loss (eq. 11), averaged over the ``n_k`` calibration scans in which organ ``k`` is
  present. Guarantee for every organ: ``E[l01_k(test) | organ k present in the test scan] <= epsilon``
  (conditioning on presence keeps exchangeability: presence is a function of each scan alone).

A group for which no ``omega`` in range works gets ``lambda = +inf`` and status ``"uncontrollable"``
(with an :class:`~.errors.UncontrollableRiskWarning`), including too few calibration scans for epsilon
(``n < 1/epsilon - 1``) and ``epsilon = 0``: the trivial result plus a warning, the convention of CLS and
CRC (:mod:`ConformalSegLib.conformal.crc`); an organ without any calibration scan gets
``+inf`` and ``"no-calibration-data"``. Nothing is left silently uncontrolled.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..common.errors import ConformalSegError
from ..conformal.crc import min_crc_calibration_size
from ..conformal.exact import check_epsilon
from .anchor import DEFAULT_GAMMAS, AnchorResult, auto_d_opt_from_counts, solve_anchor, stratified_sample
from .errors import IntervalCalibrationError, UncontrollableRiskWarning
from .exact_omega import OmegaCurve, exact_omega, lambdas_at, omega_thresholds
from .intervals import IntervalData, IntervalScan, check_groups
from .memberships import loss_quantile_partition

METHODS: tuple[str, ...] = ("crc", "k-crc", "sem-crc", "sem-crc-organ")
CONTROLLED, UNCONTROLLABLE, NO_DATA = "controlled", "uncontrollable", "no-calibration-data"


@dataclass(frozen=True)
class IntervalCalibration:
    """A calibrated interval method: ``lam[k]`` for group ``groups[k]`` (``inf`` = not controllable).

    ``organs`` are the semantic groups of the data (for per-organ reports); ``groups`` are the
    groups lambda is indexed by: ``("all",)`` for CRC, ``("q1", ..., "qK")`` for K-CRC (with
    ``partition``, the group of every flat voxel position of a ``shape`` grid), the organs for
    sem-CRC. ``omega`` has one entry per group (all equal except for per-organ sem-CRC).
    """

    method: str
    epsilon: float
    groups: tuple[str, ...]
    lam: np.ndarray
    anchor: np.ndarray
    omega: np.ndarray
    status: tuple[str, ...]
    n_cal: np.ndarray
    n_opt: int
    organs: tuple[str, ...]
    gamma: float | None = None
    partition: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    lambda_max: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    opt_cases: tuple[str, ...] = ()
    cal_cases: tuple[str, ...] = ()
    shrink_floor: float | None = None  # shrinkable CRC (:mod:`.shrinkable`): lambda may go down to this

    def voxel_groups(self, scan: IntervalScan) -> np.ndarray:
        """Index into :attr:`lam` for every counted voxel of ``scan``."""
        if self.method == "crc":
            return np.zeros(scan.d, dtype=np.int64)
        if self.method == "k-crc":
            if self.partition is None or tuple(scan.shape) != tuple(self.shape or ()):
                raise IntervalCalibrationError(
                    f"K-CRC was calibrated on grid {self.shape}, scan {scan.case_id!r} has {scan.shape}",
                    fix="apply K-CRC only to scans on its calibration grid",
                )
            return self.partition[scan.index].astype(np.int64)
        if int(scan.group.max(initial=0)) >= len(self.groups):
            raise IntervalCalibrationError(
                f"scan {scan.case_id!r} has organ index {int(scan.group.max())}, the "
                f"calibration knows {len(self.groups)} groups",
                fix="use the same organ map as for calibration",
            )
        return scan.group.astype(np.int64)

    def voxel_lambda(self, scan: IntervalScan) -> np.ndarray:
        """Per counted voxel its group's lambda (clamped at ``-width/2`` when shrinkable, :mod:`.shrinkable`)."""
        lam = self.lam[self.voxel_groups(scan)]
        return lam if self.shrink_floor is None else np.maximum(lam, -0.5 * scan.width)

    @property
    def controlled(self) -> bool:
        return all(s == CONTROLLED for s in self.status)

    @property
    def guarantee(self) -> str:
        eps = self.epsilon
        infinite = [g for g, s in zip(self.groups, self.status) if s != CONTROLLED]
        note = f"; infinite intervals (not controllable) for: {', '.join(infinite)}" if infinite else ""
        if self.method == "sem-crc-organ":
            return (
                f"for each organ k: E[fraction of organ-k voxels outside their interval | organ k present] "
                f"<= {eps} over scans exchangeable with the calibration scans (sem-CRC per organ, n_cal per "
                f"organ {dict(zip(self.groups, self.n_cal.tolist()))}{note})"
            )
        return (
            f"E[fraction of counted (body-mask) voxels outside their interval] <= {eps} over scans "
            f"exchangeable with the calibration scans ({self.method}, n_cal={int(self.n_cal[0])}, "
            f"n_opt={self.n_opt}{note})"
        )


def _generator(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise IntervalCalibrationError(f"seed must be an integer, got {seed!r}", fix="pass e.g. seed=0")
    return np.random.default_rng(int(seed))


def _check_common(data: IntervalData, epsilon: float, lambda_max: float | None) -> float:
    try:
        check_epsilon(epsilon)
    except ConformalSegError as exc:
        raise IntervalCalibrationError(f"epsilon: {exc.message}", fix="pass e.g. epsilon=0.1") from exc
    if lambda_max is not None and not (math.isfinite(lambda_max) and lambda_max >= 0):
        raise IntervalCalibrationError(
            f"lambda_max must be a finite number >= 0, got {lambda_max}",
            fix="pass e.g. lambda_max=0.5 (image units), or None for no bound",
        )
    check_groups(data)
    return float(epsilon)


def _require_calibration_size(n_cal: int, what: str) -> None:
    """An empty calibration split is a usage error; too few scans for epsilon (or epsilon = 0) are not: they
    give the trivial result (lambda = +inf) with an :class:`UncontrollableRiskWarning`, as CLS / CRC give the
    whole image with a :class:`CalibrationSetTooSmallWarning` (one convention for impossible settings)."""
    if n_cal < 1:
        raise IntervalCalibrationError(f"{what} is empty", fix="add calibration scans or lower n_opt")


def _case_ids(data: IntervalData) -> tuple[str, ...]:
    return tuple(s.case_id for s in data.scans)


def split_order(n: int, n_opt: int, rng: np.random.Generator) -> np.ndarray:
    """The seeded permutation of ``n`` scans whose first ``n_opt`` form ``S_opt`` and the rest ``S_cal``."""
    if isinstance(n_opt, bool) or not isinstance(n_opt, (int, np.integer)) or not 1 <= n_opt < n:
        raise IntervalCalibrationError(
            f"n_opt must be an integer in 1..{n - 1} (there are {n} scans), got {n_opt!r}",
            fix="pass e.g. n_opt=32 with enough scans left to calibrate",
        )
    return rng.permutation(n)


def _split(data: IntervalData, n_opt: int, rng: np.random.Generator) -> tuple[IntervalData, IntervalData]:
    perm = split_order(data.n, n_opt, rng)
    return data.subset(perm[:n_opt]), data.subset(perm[n_opt:])


def _warn_uncontrollable(what: str, n: int, epsilon: float, lambda_max: float | None) -> None:
    needed = min_crc_calibration_size(epsilon) if epsilon > 0 else None
    if needed is None:
        cause = "risk control needs epsilon > 0"
    elif n < needed:
        cause = f"only {n} calibration scan(s), at least {needed} are needed (n >= 1/epsilon - 1)"
    else:
        cause = f"risk stays above epsilon up to lambda_max={lambda_max}"
    warnings.warn(
        f"{what}: risk cannot be brought under epsilon={epsilon} ({cause}); its lambda is +inf "
        f"(status '{UNCONTROLLABLE}')",
        UncontrollableRiskWarning,
        stacklevel=3,
    )


def _backtrack(
    cal: IntervalData, groups_of, anchor: np.ndarray, epsilon: float, *, omega_min: float, omega_max: float
) -> float:
    """Exact omega_hat for the whole-scan loss with per-group anchors."""
    thresholds = [t[np.isfinite(t)] for t in (omega_thresholds(s.need, anchor[groups_of(s)]) for s in cal.scans)]
    curve = OmegaCurve.from_scans(thresholds, [s.d for s in cal.scans])
    return exact_omega(curve, epsilon, omega_min=omega_min, omega_max=omega_max)


def _finish_shared(
    method: str,
    cal: IntervalData,
    organs: tuple[str, ...],
    groups: tuple[str, ...],
    anchor: np.ndarray,
    omega: float,
    epsilon: float,
    n_opt: int,
    lambda_max: float | None,
    **extra,
) -> IntervalCalibration:
    status = CONTROLLED if math.isfinite(omega) else UNCONTROLLABLE
    if status == UNCONTROLLABLE:
        _warn_uncontrollable(f"{method} (whole scan)", cal.n, epsilon, lambda_max)
    k = len(groups)
    return IntervalCalibration(
        method=method,
        epsilon=epsilon,
        groups=groups,
        lam=lambdas_at(anchor, omega),
        anchor=np.asarray(anchor, dtype=np.float64),
        omega=np.full(k, omega),
        status=(status,) * k,
        n_cal=np.full(k, cal.n, dtype=np.int64),
        n_opt=n_opt,
        organs=organs,
        lambda_max=lambda_max,
        cal_cases=_case_ids(cal),
        **extra,
    )


def calibrate_crc_interval(
    data: IntervalData, epsilon: float, *, lambda_max: float | None = None
) -> IntervalCalibration:
    """CRC with one scalar lambda (eq. 3) on all scans of ``data``."""
    epsilon = _check_common(data, epsilon, lambda_max)
    _require_calibration_size(data.n, "the calibration set")
    start = time.perf_counter()
    omega = _backtrack(
        data,
        lambda s: np.zeros(s.d, dtype=np.int64),
        np.zeros(1),
        epsilon,
        omega_min=0.0,
        omega_max=math.inf if lambda_max is None else lambda_max,
    )
    return _finish_shared(
        "crc",
        data,
        data.groups,
        ("all",),
        np.zeros(1),
        omega,
        epsilon,
        0,
        lambda_max,
        seconds={"omega": time.perf_counter() - start},
    )


def _anchor_for(
    opt: IntervalData,
    groups_of,
    n_groups: int,
    epsilon: float,
    *,
    d_opt: int,
    d_min: int,
    gammas: Sequence[float],
    lambda_max: float | None,
    rng: np.random.Generator,
) -> AnchorResult:
    groups = [groups_of(s) for s in opt.scans]
    sample = stratified_sample(
        [s.need for s in opt.scans], [s.width for s in opt.scans], groups, n_groups, d_opt=d_opt, d_min=d_min, rng=rng
    )
    return solve_anchor(sample, epsilon, gammas=gammas, lambda_max=lambda_max)


def calibrate_kcrc(
    data: IntervalData,
    epsilon: float,
    *,
    n_opt: int,
    k: int = 4,
    d_opt: int = 50,
    d_min: int = 1,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    lambda_max: float | None = None,
    seed: int | np.random.Generator = 0,
) -> IntervalCalibration:
    """K-CRC (eq. 6): fixed K-quantile partition and (PK) anchor on ``S_opt``, exact omega on ``S_cal``."""
    epsilon = _check_common(data, epsilon, lambda_max)
    rng = _generator(seed)
    opt, cal = _split(data, n_opt, rng)
    _require_calibration_size(cal.n, "the calibration split S_cal")
    partition, k_eff = loss_quantile_partition(opt, k)
    groups_of = lambda s: partition[s.index].astype(np.int64)  # noqa: E731
    anchor = _anchor_for(
        opt, groups_of, k_eff, epsilon, d_opt=d_opt, d_min=d_min, gammas=gammas, lambda_max=lambda_max, rng=rng
    )
    start = time.perf_counter()
    omega = _backtrack(
        cal,
        groups_of,
        anchor.lam,
        epsilon,
        omega_min=-float(anchor.lam.max(initial=0.0)),
        omega_max=math.inf if lambda_max is None else lambda_max,
    )
    return _finish_shared(
        "k-crc",
        cal,
        data.groups,
        tuple(f"q{j + 1}" for j in range(k_eff)),
        anchor.lam,
        omega,
        epsilon,
        opt.n,
        lambda_max,
        gamma=anchor.gamma,
        partition=partition,
        opt_cases=_case_ids(opt),
        shape=tuple(opt.scans[0].shape),
        seconds={"anchor": anchor.solve_seconds, "omega": time.perf_counter() - start},
    )


def auto_d_opt(opt: IntervalData, d_min: int) -> int:
    """The paper's ``d_opt = d_min / min_k E[|S_k| / d]`` over groups present in ``S_opt`` (capped)."""
    return auto_d_opt_from_counts(opt.group_counts(), np.array([[s.d] for s in opt.scans]), d_min)


def _sem_anchor(
    data: IntervalData,
    epsilon: float,
    n_opt: int,
    d_opt: int | None,
    d_min: int,
    gammas: Sequence[float],
    lambda_max: float | None,
    rng: np.random.Generator,
):
    opt, cal = _split(data, n_opt, rng)
    d_opt = auto_d_opt(opt, d_min) if d_opt is None else d_opt
    anchor = _anchor_for(
        opt,
        lambda s: s.group.astype(np.int64),
        data.n_groups,
        epsilon,
        d_opt=d_opt,
        d_min=d_min,
        gammas=gammas,
        lambda_max=lambda_max,
        rng=rng,
    )
    return opt, cal, anchor


def calibrate_semcrc(
    data: IntervalData,
    epsilon: float,
    *,
    n_opt: int,
    d_opt: int | None = None,
    d_min: int = 2,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    lambda_max: float | None = None,
    seed: int | np.random.Generator = 0,
) -> IntervalCalibration:
    """sem-CRC (eqs. 7-9): organ memberships, (Psem) anchor on ``S_opt``, exact omega on ``S_cal``."""
    epsilon = _check_common(data, epsilon, lambda_max)
    rng = _generator(seed)
    opt, cal, anchor = _sem_anchor(data, epsilon, n_opt, d_opt, d_min, gammas, lambda_max, rng)
    _require_calibration_size(cal.n, "the calibration split S_cal")
    start = time.perf_counter()
    omega = _backtrack(
        cal,
        lambda s: s.group.astype(np.int64),
        anchor.lam,
        epsilon,
        omega_min=-float(anchor.lam.max(initial=0.0)),
        omega_max=math.inf if lambda_max is None else lambda_max,
    )
    return _finish_shared(
        "sem-crc",
        cal,
        data.groups,
        data.groups,
        anchor.lam,
        omega,
        epsilon,
        opt.n,
        lambda_max,
        gamma=anchor.gamma,
        opt_cases=_case_ids(opt),
        seconds={"anchor": anchor.solve_seconds, "omega": time.perf_counter() - start},
    )


def organ_curve(cal: IntervalData, k: int, anchor_k: float, shrinkable: bool = False) -> OmegaCurve | None:
    """The per-organ loss curve (eq. 11) over the calibration scans in which organ ``k`` is present
    (``shrinkable``: lambda_k = anchor_k + omega_k unclipped, each voxel clamped at -width/2, :mod:`.shrinkable`)."""
    thresholds, sizes = [], []
    for scan in cal.scans:
        inside = scan.group == k
        if inside.any():
            floor = -0.5 * scan.width[inside] if shrinkable else 0.0
            t = omega_thresholds(scan.need[inside], anchor_k, floor)
            thresholds.append(t[np.isfinite(t)])  # covered at every omega: never counts (keeps memory small)
            sizes.append(int(inside.sum()))
    return OmegaCurve.from_scans(thresholds, sizes) if sizes else None


def calibrate_semcrc_organ(
    data: IntervalData,
    epsilon: float,
    *,
    n_opt: int,
    d_opt: int | None = None,
    d_min: int = 2,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    lambda_max: float | None = None,
    from_anchor: bool = False,
    seed: int | np.random.Generator = 0,
    shrinkable: bool = False,
) -> IntervalCalibration:
    """Per-organ sem-CRC (eq. 12): risk control for every organ separately (module docstring); ``shrinkable``:
    lambda_k may go below 0, down to minus the organ's largest half-width (:mod:`.shrinkable`)."""
    epsilon = _check_common(data, epsilon, lambda_max)
    rng = _generator(seed)
    opt, cal, anchor = _sem_anchor(data, epsilon, n_opt, d_opt, d_min, gammas, lambda_max, rng)
    if cal.n < 1:
        raise IntervalCalibrationError("the calibration split S_cal is empty", fix="lower n_opt")
    start = time.perf_counter()
    k_groups = data.n_groups
    omega, status, n_cal = np.full(k_groups, math.inf), [], np.zeros(k_groups, dtype=np.int64)
    half = [
        max((0.5 * float(s.width[s.group == k].max(initial=0.0)) for s in cal.scans), default=0.0)
        for k in range(k_groups)
    ]
    for k in range(k_groups):
        curve = organ_curve(cal, k, float(anchor.lam[k]), shrinkable)
        if curve is None:
            status.append(NO_DATA)
            warnings.warn(
                f"organ {data.groups[k]!r} is absent from every calibration scan: its lambda is +inf "
                f"(status '{NO_DATA}'). Fix: add calibration scans that contain it",
                UncontrollableRiskWarning,
                stacklevel=2,
            )
            continue
        n_cal[k] = curve.n
        lo = 0.0 if from_anchor else -float(anchor.lam[k]) - (half[k] if shrinkable else 0.0)
        omega[k] = exact_omega(curve, epsilon, omega_min=lo, omega_max=math.inf if lambda_max is None else lambda_max)
        if math.isfinite(omega[k]):
            status.append(CONTROLLED)
        else:
            status.append(UNCONTROLLABLE)
            _warn_uncontrollable(f"organ {data.groups[k]!r}", curve.n, epsilon, lambda_max)
    lam = np.array([lambdas_at(anchor.lam[k], omega[k], clip=not shrinkable) for k in range(k_groups)]).reshape(-1)
    return IntervalCalibration(
        method="sem-crc-organ",
        epsilon=epsilon,
        groups=data.groups,
        lam=lam,
        anchor=anchor.lam,
        omega=omega,
        status=tuple(status),
        n_cal=n_cal,
        n_opt=opt.n,
        organs=data.groups,
        gamma=anchor.gamma,
        lambda_max=lambda_max,
        opt_cases=_case_ids(opt),
        cal_cases=_case_ids(cal),
        seconds={"anchor": anchor.solve_seconds, "omega": time.perf_counter() - start},
        shrink_floor=-max(half, default=0.0) if shrinkable else None,
    )


def calibrate_interval_method(method: str, data: IntervalData, epsilon: float, **options) -> IntervalCalibration:
    """Dispatch on ``method`` (one of :data:`METHODS`); options as in the per-method functions."""
    if method == "crc":
        options = {k: v for k, v in options.items() if k == "lambda_max"}
        return calibrate_crc_interval(data, epsilon, **options)
    if method == "k-crc":
        return calibrate_kcrc(data, epsilon, **{k: v for k, v in options.items() if k != "from_anchor"})
    if method == "sem-crc":
        options = {k: v for k, v in options.items() if k not in ("k", "from_anchor")}
        return calibrate_semcrc(data, epsilon, **options)
    if method == "sem-crc-organ":
        return calibrate_semcrc_organ(data, epsilon, **{k: v for k, v in options.items() if k != "k"})
    raise IntervalCalibrationError(f"unknown interval method {method!r}", fix=f"use one of {', '.join(METHODS)}")
