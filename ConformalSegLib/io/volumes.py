"""Reading and writing 3D volumes: probability maps, label maps and result masks.

Conventions
-----------
* Arrays are in numpy order ``(z, y, x)`` exactly as ``SimpleITK.GetArrayFromImage`` returns them;
  :class:`~ConformalSegLib.common.geometry.Geometry` keeps spacing/origin/direction in ITK ``(x, y, z)`` order.
* Probability maps are float32 (float64 inputs stay float64), finite and within ``[0, 1]`` (values
  at most ``PROBABILITY_TOLERANCE`` outside are rounding noise and are clipped). Integer-typed maps
  are rejected: they are segmentations, not probabilities.
* Label maps are integer arrays; a lesion mask is a bool array (voxel is lesion iff its label value is
  one of the lesion labels).
* Formats: ``.nii.gz .nii .seg.nrrd .nrrd .mha .mhd`` via SimpleITK (NIfTI probability voxels via
  nibabel, because SimpleITK silently reads NaN/Inf in NIfTI files as 0); ``.npy`` (a bare 3D array, no
  geometry); nnU-Net v2 ``--save_probabilities`` ``.npz`` (key ``probabilities``, shape
  ``(C, z, y, x)``), whose geometry comes from the sibling ``CASE.nii.gz``/``.nrrd``/... that nnU-Net
  writes next to it.
* Files without geometry (``.npy``, an ``.npz`` without sibling) get an identity geometry with
  ``geometry_known=False``; :func:`check_same_geometry` then compares only the shape.
* Every failure caused by the user's files raises :class:`ConformalSegError` naming the file.

This file is long because every format's reader goes through the same checks and error messages
(file present and readable, 3D, geometry, finite values in range): they are read together here, in
one place, so that no reader can skip one. Its sections: helpers, probability maps, label maps, writing.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import ConformalSegError
from ..common.geometry import Geometry
from ..common.lazy_import import lazy_module
from .atomic import atomic_output
from .guards import LazyNpz, check_allocation, load_npy, require_utf8_path

if TYPE_CHECKING:
    import SimpleITK as sitk
else:
    sitk = lazy_module("SimpleITK", purpose="read and write image files (NIfTI, NRRD, MetaImage)")

PathLikeStr = str | PathLike[str]

#: Extensions read with SimpleITK, longest first so ``.nii.gz`` wins over ``.nii``.
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd")
#: Extensions read with numpy.
NUMPY_EXTENSIONS: tuple[str, ...] = (".npy", ".npz")
VOLUME_EXTENSIONS: tuple[str, ...] = IMAGE_EXTENSIONS + NUMPY_EXTENSIONS
#: Extensions :func:`save_volume` writes (single-file formats only: ``.mhd`` has a ``.raw`` sidecar).
WRITABLE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")
#: How far outside [0, 1] a probability may be before it is an error (float rounding is clipped).
PROBABILITY_TOLERANCE = 1e-5
NPZ_KEY = "probabilities"
LOGITS_FIX = "probabilities must be in [0,1]: apply softmax/sigmoid to logits first"


@dataclass
class Volume:
    """A 3D array (numpy ``(z, y, x)`` order) on its physical grid, and the file it came from."""

    array: np.ndarray
    geometry: Geometry
    path: str | PathLike[str] | None
    geometry_known: bool = True  # False for .npy / sibling-less .npz: identity geometry was assumed


# ----------------------------------------------------------------------------- helpers


def volume_extension(path: PathLikeStr) -> str | None:
    """The supported format extension of ``path`` (lower case), or None."""
    name = Path(path).name.lower()
    return next((ext for ext in VOLUME_EXTENSIONS if name.endswith(ext)), None)


def geometry_from_sitk(img: sitk.Image) -> Geometry:
    """Geometry of a 3D SimpleITK image (shape reversed into numpy order)."""
    if img.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
    return Geometry(
        shape=tuple(reversed(img.GetSize())),
        spacing=img.GetSpacing(),
        origin=img.GetOrigin(),
        direction=img.GetDirection(),
    )


def sitk_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of ``array`` (numpy order) with ``geometry``; bool is stored as uint8."""
    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    img = sitk.GetImageFromArray(array, isVector=False)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def _require_file(path: PathLikeStr, what: str) -> Path:
    path = require_utf8_path(path, what)
    if not path.exists():
        problem = "is a broken link (its target does not exist)" if path.is_symlink() else "not found"
        raise ConformalSegError(f"{what} {problem}", path=path, fix="check the file name and folder")
    if not path.is_file():
        raise ConformalSegError(f"{what} is not a file", path=path, fix="give the path of a file")
    if not os.access(path, os.R_OK):
        raise ConformalSegError(
            f"permission denied: cannot read the {what}", path=path, fix="make the file readable (chmod u+r)"
        )
    return path


def _unreadable(path: Path, what: str, exc: BaseException, *, truncated: bool = False) -> ConformalSegError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = (lines[-1] if lines else type(exc).__name__)[:200]
    kind = volume_extension(path) or "image"
    problem = (
        f"the {kind} file is truncated or corrupt" if truncated else f"the file is corrupt or not a valid {kind} file"
    )
    return ConformalSegError(
        f"cannot read the {what}: {problem} ({reason})",
        path=path,
        fix="re-export or re-copy the file",
    )


def _unsupported(path: Path, what: str, allowed: Iterable[str]) -> ConformalSegError:
    return ConformalSegError(f"unsupported {what} format", path=path, fix=f"use one of: {' '.join(allowed)}")


def _read_sitk(path: Path, what: str) -> sitk.Image:
    _read_header(path, what)  # the memory guard, before any voxel is allocated
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(path, what, exc) from exc


def _read_header(path: Path, what: str) -> sitk.ImageFileReader:
    """A SimpleITK reader that has read the image header only (no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, what, exc) from exc
    check_allocation(tuple(reader.GetSize()), _bytes_per_voxel(reader), path, what)
    return reader


def _bytes_per_voxel(reader: sitk.ImageFileReader) -> int:
    """Bytes of one voxel (all components) of the image a header describes (8 when unknown)."""
    sizes = {
        sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
        sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat64: 8,
    }  # fmt: skip
    return sizes.get(reader.GetPixelIDValue(), 8) * max(1, reader.GetNumberOfComponents())


def _header_geometry(reader: sitk.ImageFileReader, path: Path, what: str) -> Geometry:
    """Geometry of the first three axes of an image header (the 3x3 block of a 4D direction)."""
    dim = reader.GetDimension()
    if dim < 3:
        raise ConformalSegError(f"{what} is {dim}D, expected 3D", path=path, fix="give a 3D image")
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    return Geometry(
        shape=tuple(reversed(reader.GetSize()[:3])),
        spacing=reader.GetSpacing()[:3],
        origin=reader.GetOrigin()[:3],
        direction=tuple(direction.reshape(-1)),
    )


NUMPY_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


def _load_numpy(path: Path, what: str, *, archive: bool) -> Any:  # np.ndarray, or a LazyNpz when archive
    """A ``.npy`` array (size checked from its header first) or a lazily read ``.npz`` (``archive``);
    no pickles either way."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise _unreadable(path, what, exc) from exc
    if archive != is_zip:
        expected, got = (".npz archive", "single .npy array") if archive else (".npy array", ".npz archive")
        raise ConformalSegError(
            f"{what} should be a {expected} but the file holds a {got}",
            path=path,
            fix="give the file the extension that matches its content",
        )
    return LazyNpz(path, what) if archive else load_npy(path, what)


def _identity_geometry(shape: tuple[int, ...], spacing: Sequence[float] | None, path: Path) -> Geometry:
    try:
        return Geometry(shape=tuple(shape), spacing=tuple(spacing) if spacing else (1.0, 1.0, 1.0))
    except ValueError as exc:
        raise ConformalSegError(
            f"invalid spacing {spacing}", path=path, fix="give three positive numbers (x, y, z) in mm"
        ) from exc


def _require_3d(array: np.ndarray, path: Path, what: str) -> None:
    if array.ndim != 3:
        raise ConformalSegError(
            f"{what} is {array.ndim}D with shape {array.shape}, expected a 3D volume",
            path=path,
            fix="save one 3D (z, y, x) array per file",
        )


# ----------------------------------------------------------------------------- probability maps


def _channel_index(channel: int | None, n_channels: int, path: Path) -> int:
    if channel is None:
        if n_channels == 1:
            return 0
        raise ConformalSegError(
            f"the probability map has {n_channels} channels (classes 0..{n_channels - 1})",
            path=path,
            fix="pass --channel with the lesion class index (e.g. --channel 1)",
        )
    if not 0 <= channel < n_channels:
        raise ConformalSegError(
            f"channel {channel} does not exist: the file has {n_channels} channel(s)",
            path=path,
            fix=f"pass --channel between 0 and {n_channels - 1}",
        )
    return channel


def _read_nifti(path: Path, what: str, channel: int | None, *, channels: bool) -> tuple[np.ndarray, Geometry]:
    """NIfTI voxels via nibabel, geometry via SimpleITK's header reader.

    SimpleITK (ITK < 6) silently replaces NaN and +-Inf voxels of NIfTI files with 0 when reading,
    and zero-fills a truncated file (a ``.nii.gz`` cut in half reads without error); nibabel keeps
    NaN/Inf and raises on missing data. ``channels``: a 4th axis holds classes (probability maps);
    otherwise only 3D volumes are accepted.
    """
    import nibabel as nib

    reader = _read_header(path, what)  # also the memory guard
    try:
        proxy = nib.load(str(path)).dataobj  # type: ignore[attr-defined]  # the stub's base class lacks it
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise _unreadable(path, what, exc) from exc
    shape = tuple(proxy.shape)
    extra = [n for n in shape[3:] if n != 1]  # time / vector axes: the classes
    if len(shape) < 3 or len(extra) > (1 if channels else 0):
        raise ConformalSegError(
            f"{what} is {len(shape)}D with shape {shape} (x, y, z, ...), expected a 3D volume"
            + (" or one channel axis" if channels else ""),
            path=path,
            fix="give a 3D probability map (or a 4D one with --channel)" if channels else "give a single 3D volume",
        )
    n_channels = extra[0] if extra else 1
    index = _channel_index(channel, n_channels, path)
    try:
        data = np.asanyarray(proxy).reshape(shape[:3] + (n_channels,), order="F")[..., index]
    except Exception as exc:  # EOFError / OSError for a truncated file
        raise _unreadable(path, what, exc, truncated=True) from exc
    array = np.array(data.T) if n_channels > 1 else np.ascontiguousarray(data.T)  # (x,y,z) -> (z,y,x)
    geometry = _header_geometry(reader, path, what)
    if geometry.shape != array.shape:
        raise ConformalSegError(
            f"NIfTI header size {geometry.shape} disagrees with the data {array.shape}",
            path=path,
            fix="re-export the file",
        )
    return array, geometry


def _is_nifti(path: Path) -> bool:
    return volume_extension(path) in (".nii", ".nii.gz") and _nibabel_available()


def _nibabel_available() -> bool:
    try:
        import nibabel  # noqa: F401
    except ImportError:  # fall back to SimpleITK (NaN/Inf in NIfTI files then go undetected)
        return False
    return True


def _read_probability_image(path: Path, channel: int | None) -> tuple[np.ndarray, Geometry]:
    if _is_nifti(path):
        return _read_nifti(path, "probability map", channel, channels=True)
    img = _read_sitk(path, "probability map")
    if img.GetNumberOfComponentsPerPixel() > 1:  # vector image: one component per class
        index = _channel_index(channel, img.GetNumberOfComponentsPerPixel(), path)
        img = sitk.VectorIndexSelectionCast(img, index)
    elif img.GetDimension() == 4:  # 4th axis = classes
        size = list(img.GetSize())
        index = _channel_index(channel, size[3], path)
        extract = sitk.ExtractImageFilter()
        extract.SetSize(size[:3] + [0])
        extract.SetIndex([0, 0, 0, index])
        extract.SetDirectionCollapseToStrategy(extract.DIRECTIONCOLLAPSETOSUBMATRIX)
        img = extract.Execute(img)
    else:
        _channel_index(channel, 1, path)
    if img.GetDimension() != 3:
        raise ConformalSegError(
            f"probability map is {img.GetDimension()}D, expected a 3D volume",
            path=path,
            fix="give a 3D probability map (or a 4D/vector one with --channel)",
        )
    array = sitk.GetArrayFromImage(img)
    return array, geometry_from_sitk(img)


def nnunet_sibling(npz_path: PathLikeStr) -> Path | None:
    """The segmentation nnU-Net writes next to ``CASE.npz`` (``CASE.nii.gz``, ``CASE.nrrd``...), if any."""
    npz_path = Path(npz_path)
    stem = npz_path.name[: -len(".npz")]
    candidates = (npz_path.with_name(stem + ext) for ext in IMAGE_EXTENSIONS)
    return next((c for c in candidates if c.is_file()), None)


def _read_npz(path: Path, channel: int | None) -> np.ndarray:
    with _load_numpy(path, "probability map", archive=True) as data:
        if NPZ_KEY not in data:
            raise ConformalSegError(
                f"the .npz has no '{NPZ_KEY}' array (arrays: {', '.join(data) or 'none'})",
                path=path,
                fix="use the .npz written by nnU-Net predict --save_probabilities",
            )
        shape, _dtype = data.header(NPZ_KEY)
        if len(shape) == 4 and shape[-1] < shape[0]:
            raise ConformalSegError(
                f"'{NPZ_KEY}' has shape {shape}: it looks channels-last (z, y, x, C), expected (C, z, y, x)",
                path=path,
                fix="save np.moveaxis(probabilities, -1, 0) (nnU-Net's own .npz is channels-first)",
            )
        probabilities = data[NPZ_KEY]
    if probabilities.ndim == 3:
        _channel_index(channel, 1, path)
        return probabilities
    if probabilities.ndim != 4:
        raise ConformalSegError(
            f"'{NPZ_KEY}' has shape {probabilities.shape}, expected (C, z, y, x)",
            path=path,
            fix="use the .npz written by nnU-Net predict --save_probabilities",
        )
    index = _channel_index(channel, probabilities.shape[0], path)
    return np.array(probabilities[index])  # copy, so the other channels are freed


def _npz_geometry(path: Path, shape: tuple[int, ...], spacing: Sequence[float] | None) -> tuple[Geometry, bool]:
    sibling = nnunet_sibling(path)
    if sibling is None:
        return _identity_geometry(shape, spacing, path), False
    what = "nnU-Net segmentation next to the .npz"
    geometry = _header_geometry(_read_header(sibling, what), sibling, what)
    if geometry.shape != tuple(shape):
        raise ConformalSegError(
            f"probabilities have shape {tuple(shape)} but the nnU-Net segmentation "
            f"{sibling.name} next to it has shape {geometry.shape}",
            path=path,
            fix="keep the .npz and the segmentation of the same nnU-Net prediction together",
        )
    return geometry, True


def _check_probabilities(array: np.ndarray, path: Path) -> np.ndarray:
    """Validate finiteness and range (clipping rounding noise); return float32/float64 array."""
    if not np.issubdtype(array.dtype, np.floating):
        kind = "integer" if array.dtype == bool or np.issubdtype(array.dtype, np.integer) else "non-numeric"
        raise ConformalSegError(
            f"probability map has {kind} voxels ({array.dtype}): it looks like a segmentation, not probabilities",
            path=path,
            fix="give floating point probabilities (nnU-Net: predict with --save_probabilities and use the .npz)",
        )
    if array.dtype != np.float64:
        array = array.astype(np.float32, copy=False)
    n_bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise ConformalSegError(
            f"probability map contains {n_bad} NaN or infinite voxel(s)",
            path=path,
            fix="re-run the prediction; every voxel needs a probability in [0,1]",
        )
    if array.size == 0:
        raise ConformalSegError("probability map is empty (0 voxels)", path=path, fix="give a non-empty volume")
    low, high = float(array.min()), float(array.max())
    if low < -PROBABILITY_TOLERANCE or high > 1 + PROBABILITY_TOLERANCE:
        raise ConformalSegError(f"probability values range from {low:.6g} to {high:.6g}", path=path, fix=LOGITS_FIX)
    if low < 0 or high > 1:
        array = np.clip(array, 0, 1, out=array if array.flags.writeable else None)
    return array


def load_probability_map(
    path: PathLikeStr, *, channel: int | None = None, spacing: Sequence[float] | None = None
) -> Volume:
    """Read a 3D probability map (see module docstring for formats and checks).

    ``channel`` selects the class of a multi-channel file (4D image, vector image, nnU-Net ``.npz``);
    it is required when there is more than one channel. ``spacing`` (x, y, z mm) is used only for
    files without geometry (``.npy``, ``.npz`` without nnU-Net sibling).
    """
    path = _require_file(path, "probability map")
    ext = volume_extension(path)
    known = True
    if ext in IMAGE_EXTENSIONS:
        array, geometry = _read_probability_image(path, channel)
    elif ext == ".npy":
        array = _load_numpy(path, "probability map", archive=False)
        _require_3d(array, path, "probability map")
        _channel_index(channel, 1, path)
        geometry, known = _identity_geometry(array.shape, spacing, path), False
    elif ext == ".npz":
        array = _read_npz(path, channel)
        _require_3d(array, path, "probability map")
        geometry, known = _npz_geometry(path, array.shape, spacing)
    else:
        raise _unsupported(path, "probability map", VOLUME_EXTENSIONS)
    return Volume(_check_probabilities(array, path), geometry, str(path), geometry_known=known)


# ----------------------------------------------------------------------------- label maps


def _integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Return integer labels; float labels must be integer-valued."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ConformalSegError(
            f"label map has voxel type {array.dtype}", path=path, fix="save the label map with integer voxels"
        )
    n_nan = array.size - int(np.count_nonzero(np.isfinite(array)))
    if n_nan:
        raise ConformalSegError(
            f"label map has {n_nan} NaN or infinite voxel(s)",
            path=path,
            fix="give an integer label map: every voxel needs a label (0 for background)",
        )
    n_bad = int(np.count_nonzero(array != np.round(array)))
    if n_bad:
        raise ConformalSegError(
            f"label map has {n_bad} non-integer voxel value(s) (e.g. {array[array != np.round(array)].flat[0]:.6g})",
            path=path,
            fix="give an integer label map (not probabilities or a resampled "
            "label map with linear interpolation; use nearest neighbour)",
        )
    if array.size and (float(array.min()) < -(2**31) or float(array.max()) >= 2**31):
        raise ConformalSegError(
            f"label map values range from {float(array.min()):.6g} to {float(array.max()):.6g}: not label values",
            path=path,
            fix="give an integer label map with values that fit in 32 bits",
        )
    return array.astype(np.int32)


def _read_scalar_image(path: Path, what: str, fix: str) -> tuple[np.ndarray, Geometry]:
    """A 3D scalar image's voxels and geometry (NIfTI through nibabel: NaN kept, truncation detected)."""
    if _is_nifti(path):
        return _read_nifti(path, what, None, channels=False)
    img = _read_sitk(path, what)
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != 3:
        raise ConformalSegError(
            f"{what} is {img.GetDimension()}D with {img.GetNumberOfComponentsPerPixel()} "
            "component(s), expected a 3D scalar image",
            path=path,
            fix=fix,
        )
    return sitk.GetArrayFromImage(img), geometry_from_sitk(img)


def load_image(path: PathLikeStr) -> Volume:
    """Read any 3D scalar image (e.g. the CT a probability map was computed from) as float32."""
    path = _require_file(path, "image")
    if volume_extension(path) not in IMAGE_EXTENSIONS:
        raise _unsupported(path, "image", IMAGE_EXTENSIONS)
    array, geometry = _read_scalar_image(path, "image", "give a single 3D volume")
    if not np.issubdtype(array.dtype, np.number) or array.dtype == bool:
        raise ConformalSegError(f"image has voxel type {array.dtype}", path=path, fix="give a numeric 3D volume")
    return Volume(array.astype(np.float32, copy=False), geometry, str(path))


def load_label_map(
    path: PathLikeStr, reference: Geometry | None = None, segments: dict[str, int] | None = None
) -> Volume:
    """Read a 3D integer label map (dtype as stored; integer-valued floats become int32; NaN is refused).

    A ``.dcm`` file is a DICOM SEG (:mod:`ConformalSegLib.io.dicom_seg_input`: value = segment number, or
    the value ``segments`` gives the segment's name), placed on ``reference`` (the grid of the image it
    labels) when given; other formats carry their own grid and values and ignore ``reference`` and
    ``segments`` (:func:`check_same_geometry` compares the grids).
    """
    path = _require_file(path, "label map")
    ext = volume_extension(path)
    if ext is None and path.name.lower().endswith(".dcm"):
        from .dicom_seg_input import load_dicom_seg_labels  # imports this module

        array, geometry = load_dicom_seg_labels(path, reference, segments)
        return Volume(array, geometry, str(path))
    if ext in IMAGE_EXTENSIONS:
        array, geometry = _read_scalar_image(path, "label map", "export a single 3D labelmap (no overlapping segments)")
        known = True
    elif ext == ".npy":
        array = _load_numpy(path, "label map", archive=False)
        _require_3d(array, path, "label map")
        geometry, known = _identity_geometry(array.shape, None, path), False
    else:
        raise _unsupported(path, "label map", IMAGE_EXTENSIONS + (".npy", ".dcm (DICOM SEG)"))
    return Volume(_integer_labels(array, path), geometry, str(path), geometry_known=known)


def label_values(array: np.ndarray) -> set[int]:
    """The distinct label values of an integer (or bool) array.

    Small integer types are counted in chunks with ``bincount`` (much faster than ``np.unique``).
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.view(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        offset = int(np.iinfo(array.dtype).min)
        counts = np.zeros(int(np.iinfo(array.dtype).max) - offset + 1, dtype=np.int64)
        flat = array.reshape(-1)
        chunk = 1 << 22
        for start in range(0, flat.size, chunk):
            counts += np.bincount(flat[start : start + chunk].astype(np.int64) - offset, minlength=counts.size)
        return {int(v) + offset for v in np.flatnonzero(counts)}
    return {int(v) for v in np.unique(array)}


def mask_from_labels(labels: np.ndarray, lesion_labels: Sequence[int]) -> np.ndarray:
    """Bool mask: voxel is lesion iff its label value is in ``lesion_labels``."""
    return np.isin(labels, np.asarray(list(lesion_labels), dtype=np.int64))


def validate_lesion_labels(lesion_labels: Sequence[int]) -> tuple[int, ...]:
    """Check that lesion labels are a non-empty sequence of integers; return them as a tuple."""
    values = tuple(lesion_labels) if not isinstance(lesion_labels, (int, np.integer)) else (lesion_labels,)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ConformalSegError(
            f"lesion labels must be integers, got {lesion_labels!r}",
            fix="pass the lesion label value(s) with --lesion-label, e.g. --lesion-label 1",
        )
    if any(not -(2**31) <= int(v) < 2**31 for v in values):
        raise ConformalSegError(
            f"lesion label {lesion_labels!r} is out of range (label maps hold 32-bit integers at most)",
            fix="pass the lesion label value(s) with --lesion-label, e.g. --lesion-label 1",
        )
    return tuple(int(v) for v in values)


def load_label_mask(path: PathLikeStr, lesion_labels: Sequence[int]) -> Volume:
    """Read a label map and return the bool lesion mask (label value in ``lesion_labels``)."""
    labels = validate_lesion_labels(lesion_labels)
    label_map = load_label_map(path)
    return Volume(
        mask_from_labels(label_map.array, labels),
        label_map.geometry,
        label_map.path,
        geometry_known=label_map.geometry_known,
    )


def check_same_geometry(a: Volume, b: Volume, *, what: str = "probability map and label map") -> None:
    """Raise :class:`ConformalSegError` naming both files when ``a`` and ``b`` are on different grids.

    When either volume has no stored geometry (``geometry_known=False``) only the shapes are compared.
    """
    if a.geometry_known and b.geometry_known:
        mismatch = a.geometry.mismatch(b.geometry)
    elif a.geometry.shape != b.geometry.shape:
        mismatch = f"shape {a.geometry.shape} != {b.geometry.shape}"
    else:
        mismatch = None
    if mismatch:
        raise ConformalSegError(
            f"{what} are on different voxel grids ({mismatch}): {a.path} vs {b.path}",
            fix="resample one onto the other's grid (e.g. with SimpleITK.Resample) before calibration",
        )


# ----------------------------------------------------------------------------- writing


def save_volume(
    array: np.ndarray, geometry: Geometry, path: PathLikeStr, *, force: bool = False, compress: bool = True
) -> Path:
    """Write ``array`` (numpy order) with ``geometry`` atomically; the format follows the extension.

    Bool arrays are written as uint8. Refuses to overwrite an existing file unless ``force``.
    """
    path = Path(path)
    name = path.name.lower()
    if not any(name.endswith(ext) for ext in WRITABLE_EXTENSIONS):
        raise _unsupported(path, "output", WRITABLE_EXTENSIONS)
    require_utf8_path(path, "output")
    img = sitk_image(array, geometry)
    nbytes = int(np.asarray(array).size) * (1 if array.dtype == bool else int(array.dtype.itemsize))
    with atomic_output(path, force=force) as tmp:
        try:
            sitk.WriteImage(img, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise ConformalSegError(
                f"cannot write the image ({str(exc).strip().splitlines()[-1][:200]})",
                path=path,
                fix="choose a writable output location with enough space",
            ) from exc
        _verify_written(tmp, path, nbytes)
    return path


def _verify_written(tmp: Path, path: Path, nbytes: int) -> None:
    """SimpleITK ignores short writes (a full disk, a file size limit): check what was written before it is
    renamed into place. NIfTI: the (decompressed) size must hold every voxel; other formats: re-read."""
    name = tmp.name.lower()
    try:
        if name.endswith(".gz"):
            size = 0
            with gzip.open(tmp, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    size += len(chunk)
            complete = size >= nbytes
        elif name.endswith(".nii"):
            complete = tmp.stat().st_size >= nbytes
        else:
            sitk.ReadImage(str(tmp))  # the NRRD and MetaImage readers fail on short data
            complete = True
    except (OSError, EOFError, RuntimeError):
        complete = False
    if not complete:
        raise ConformalSegError(
            "cannot write the image: the file came out incomplete (disk full or file size limit?); nothing was written",
            path=path,
            fix="free disk space or choose an output location with enough space",
        )
