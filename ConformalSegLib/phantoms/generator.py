"""Deterministic synthetic abdominal/thoracic CT phantoms: the embedded default training data.

The project trains a small MONAI 3D U-Net on these phantoms and then calibrates its outputs
conformally, so the phantoms are built to be *realistic enough that such a network is neither
perfect nor useless*: the anatomy is simple but CT-like, and some lesions are genuinely hard (small,
low contrast, next to lung vessels).

Each :class:`Phantom` holds a float32 image in Hounsfield units and a uint8 label map (values in
:data:`~.labels.LABEL_NAMES`) on a :class:`~ConformalSegLib.common.geometry.Geometry`. Arrays are in
numpy ``(z, y, x)`` order; ``spacing`` is in ITK ``(x, y, z)`` order. With the identity direction the
axes are LPS: ``x`` runs to the patient's **left**, ``y`` to **posterior**, ``z`` to **superior**
(higher slice index = more cranial).

:func:`make_phantom` draws, in this order, from one ``np.random.default_rng(seed)``:

1. whether the case is empty and its lesion count (always two draws);
2. the anatomy (:mod:`.anatomy`: tissue intensities, body, spine, thorax, abdomen, organs);
3. the lesions (:mod:`.lesions`, label :data:`~.labels.LESION`): ``n_lesions`` of them (default 1-4;
   none with probability ``empty_probability``);
4. image formation (:mod:`.imaging`: blur, CT-like noise, clipping).

The same arguments give bit-identical output; the order of the draws is part of that contract. One
default phantom takes about 0.1 s on one core. :mod:`.dataset` writes phantoms as an nnU-Net dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from .anatomy import draw_anatomy
from .imaging import form_image
from .labels import LESION
from .lesions import LesionInfo, place_lesions

__all__ = ["Phantom", "make_phantom", "make_phantoms", "phantom_seed", "validate_options"]


@dataclass
class Phantom:
    """One synthetic CT case. Arrays are in numpy ``(z, y, x)`` order and have ``geometry.shape``."""

    case_id: str
    image: np.ndarray  #: float32, CT intensities in HU
    labels: np.ndarray  #: uint8 label map, values in LABEL_NAMES
    geometry: Geometry
    lesions: list[LesionInfo] = field(default_factory=list)  #: what was placed, in placement order

    @property
    def lesion_mask(self) -> np.ndarray:
        """Boolean ground-truth lesion mask."""
        return self.labels == LESION


def make_phantom(
    seed: int | np.random.SeedSequence,
    *,
    shape: tuple[int, int, int] = (48, 96, 96),
    spacing: tuple[float, float, float] = (1.6, 1.6, 3.0),
    n_lesions: int | tuple[int, int] = (1, 4),
    empty_probability: float = 0.1,
    case_id: str | None = None,
) -> Phantom:
    """Generate one synthetic CT phantom, deterministically from ``seed``.

    ``shape`` is in numpy ``(z, y, x)`` order, ``spacing`` in mm in ITK ``(x, y, z)`` order.
    ``n_lesions`` is a fixed count or an inclusive range ``(lo, hi)`` drawn uniformly; with
    probability ``empty_probability`` the case has no lesion at all. A lesion whose placement fails
    (no room in a tiny organ) is dropped, so :attr:`Phantom.lesions` may hold fewer. ``case_id``
    defaults to ``f"phantom_seed{seed}"``. The geometry is centred on the physical origin with the
    identity direction. Lesions are drawn after the anatomy, so the organ labels of a seed do not
    depend on ``n_lesions`` or ``empty_probability`` (outside the lesions; image noise does).
    """
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    lo_n, hi_n = validate_options(shape, spacing, n_lesions, empty_probability)
    nz, ny, nx = shape
    origin = (-0.5 * (nx - 1) * spacing[0], -0.5 * (ny - 1) * spacing[1], -0.5 * (nz - 1) * spacing[2])
    geometry = Geometry(shape=shape, spacing=spacing, origin=origin)
    sp = np.array(geometry.spacing_zyx, dtype=float)
    rng = np.random.default_rng(seed)
    # always two draws, so the anatomy of a seed does not depend on the lesion options
    is_empty = bool(rng.random() < empty_probability)
    count = min(lo_n + int(rng.random() * (hi_n - lo_n + 1)), hi_n)
    if is_empty:
        count = 0
    anatomy = draw_anatomy(rng, shape, sp)
    lesions = place_lesions(
        rng, count, anatomy.image, anatomy.labels, anatomy.texture, anatomy.appearance.host_hu, sp, geometry
    )
    image = form_image(rng, anatomy.image, sp, anatomy.appearance.noise_sigma)
    return Phantom(
        case_id=case_id if case_id is not None else f"phantom_seed{seed}",
        image=np.ascontiguousarray(image, dtype=np.float32),
        labels=np.ascontiguousarray(anatomy.labels, dtype=np.uint8),
        geometry=geometry,
        lesions=lesions,
    )


def validate_options(
    shape: tuple[int, ...], spacing: tuple[float, ...], n_lesions: object, empty_probability: float
) -> tuple[int, int]:
    """Check the options of :func:`make_phantom`; return the inclusive range of the lesion count."""
    if len(shape) != 3 or any(int(s) != s or int(s) < 16 for s in shape):
        raise ConformalSegError(
            f"phantom shape must be three integers >= 16, got {shape}.",
            fix="pass a shape such as (48, 96, 96) in numpy (z, y, x) order.",
        )
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ConformalSegError(
            f"phantom spacing must be three positive numbers, got {spacing}.",
            fix="pass a spacing such as (1.6, 1.6, 3.0) in mm, ITK (x, y, z) order.",
        )
    if not 0.0 <= float(empty_probability) <= 1.0:
        raise ConformalSegError(f"empty_probability must lie in [0, 1], got {empty_probability}.")
    if isinstance(n_lesions, (int, np.integer)) and not isinstance(n_lesions, bool):
        lo = hi = int(n_lesions)
    elif (
        isinstance(n_lesions, (tuple, list))
        and len(n_lesions) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_lesions)
    ):
        lo, hi = int(n_lesions[0]), int(n_lesions[1])
    else:
        lo, hi = -1, -1
    if not 0 <= lo <= hi:
        raise ConformalSegError(
            f"n_lesions must be a non-negative integer or an inclusive range (lo, hi) "
            f"with 0 <= lo <= hi, got {n_lesions!r}.",
            fix="pass e.g. n_lesions=(1, 4).",
        )
    return lo, hi


def phantom_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of phantom ``index`` of :func:`make_phantoms`: an independent ``SeedSequence`` stream."""
    return np.random.SeedSequence(int(seed), spawn_key=(int(index),))


def make_phantoms(n: int, seed: int = 0, **kw) -> Iterator[Phantom]:
    """Yield ``n`` independent phantoms ``phantom_000``, ``phantom_001``, ...

    Phantom ``i`` is ``make_phantom(phantom_seed(seed, i), **kw)``; keyword arguments go to
    :func:`make_phantom`.
    """
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ConformalSegError(f"the number of phantoms must be a non-negative integer, got {n}.")
    width = max(3, len(str(int(n) - 1)))
    for i in range(int(n)):
        yield make_phantom(phantom_seed(seed, i), case_id=f"phantom_{i:0{width}d}", **kw)
