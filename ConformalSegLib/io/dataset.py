"""Calibration datasets: pairs of probability maps and label maps, matched by case id.

Case id rule
------------
A file's case id is its name with the format extension removed (``.nii.gz``, ``.nii``,
``.seg.nrrd``, ``.nrrd``, ``.mha``, ``.mhd``, ``.npy``, ``.npz``, and ``.dcm`` for a label map given as a DICOM
SEG; matched case-insensitively). For
probability files a trailing ``_prob``, ``_probs``, ``_probability`` or ``_probabilities`` is also
removed, so ``probs/case01_probs.nii.gz`` pairs with ``labels/case01.nii.gz``.

Hidden files (name starting with ``.``), folders and ``.json .pkl .raw .zraw .csv .md .txt`` files
are ignored, as are files with any other unrecognised extension.

A **DICOM probability series** is the one kind of folder a probability folder may hold: a sub-folder
with exactly one DICOM image series is the case named after the folder (``probs/case01/`` pairs with
``labels/case01.nii.gz`` or ``labels/case01.dcm``). Its stored values go through the series' rescale
slope and intercept and must then lie in [0, 1], as in every probability map
(:func:`~ConformalSegLib.io.dicom_series.load_probability_input`): a map exported with a slope of 1/1000
comes in quantised to 1/1000, exactly as the same values written to NIfTI. A sub-folder with several
series is refused (one series per case folder); sub-folders with none are ignored.

In a probability folder holding nnU-Net outputs, ``CASE.npz`` (the probabilities) and its sibling
``CASE.nii.gz`` (nnU-Net's segmentation, same file stem) share an id: the ``.npz`` wins and the
sibling is only used for its geometry. Any other two files with the same id in one folder are an error.

Streaming
---------
:class:`CalibrationDataset` loads one case at a time when iterated, so peak memory stays near one
probability map plus one label map however many cases there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ..common.errors import ConformalSegError
from .dicom_series import load_probability_input
from .volumes import (
    IMAGE_EXTENSIONS,
    VOLUME_EXTENSIONS,
    Volume,
    check_same_geometry,
    label_values,
    load_label_map,
    mask_from_labels,
    validate_lesion_labels,
    volume_extension,
)

PROBABILITY_SUFFIXES: tuple[str, ...] = ("_probabilities", "_probability", "_probs", "_prob")
IGNORED_EXTENSIONS: tuple[str, ...] = (".json", ".pkl", ".raw", ".zraw", ".csv", ".md", ".txt")
MAX_LISTED = 10
ProgressCallback = Callable[[int, int, str], None]
CasePair = tuple[str, Path, Path]


def case_id(path: str | PathLike[str], *, probability: bool = False) -> str | None:
    """Case id of a file name per the module's rule, or None when the file is not a volume."""
    name = Path(path).name
    ext = volume_extension(name)
    if not probability and ext is None and name.lower().endswith(".dcm"):
        ext = ".dcm"  # a DICOM SEG label map
    if name.startswith(".") or ext is None:
        return None
    stem = name[: len(name) - len(ext)]
    if probability:
        for suffix in PROBABILITY_SUFFIXES:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                return stem[: -len(suffix)]
    return stem


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def _is_nnunet_pair(paths: list[Path]) -> bool:
    """True for exactly ``CASE.npz`` + ``CASE.<image ext>`` (nnU-Net probabilities and segmentation)."""
    if len(paths) != 2:
        return False
    npz = [p for p in paths if volume_extension(p) == ".npz"]
    other = [p for p in paths if volume_extension(p) in IMAGE_EXTENSIONS]
    return (
        len(npz) == 1
        and len(other) == 1
        and npz[0].name[: -len(".npz")] == other[0].name[: -len(volume_extension(other[0]) or "")]
    )


def _series_case_id(folder: Path) -> str | None:
    """The case id of a probability sub-folder holding one DICOM series (its name), None without one."""
    from .dicom_series import list_series

    uids = list_series(folder)
    if len(uids) > 1:
        raise ConformalSegError(
            f"the probability case folder holds {len(uids)} DICOM series ({', '.join(uids)}); a case folder "
            "needs exactly one",
            path=folder,
            fix="keep one probability series per case folder (move the others elsewhere)",
        )
    return folder.name if uids else None


def scan_folder(folder: str | PathLike[str], *, probability: bool) -> dict[str, Path]:
    """Map case id -> file for one folder (see module docstring); raise on missing/empty/duplicates."""
    folder = Path(folder)
    role = "probability" if probability else "label"
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ConformalSegError(
            f"{role} folder {problem}", path=folder, fix=f"give the folder that holds the {role} maps"
        )
    groups: dict[str, list[Path]] = {}
    skipped: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() and not entry.exists() and case_id(entry.name, probability=probability):
            raise ConformalSegError(
                f"the {role} map is a broken link (its target does not exist)",
                path=entry,
                fix="re-create the link or copy the file into the folder",
            )
        cid = case_id(entry.name, probability=probability) if entry.is_file() else None
        if probability and cid is None and entry.is_dir() and not entry.name.startswith("."):
            cid = _series_case_id(entry)
        if cid is None:
            skipped.append(entry.name)
        else:
            groups.setdefault(cid, []).append(entry)
    if not groups:
        seen = f" (ignored: {_listing(skipped)})" if skipped else ""
        raise ConformalSegError(
            f"{role} folder contains no {role} map files{seen}",
            path=folder,
            fix=f"put {role} maps ({' '.join(VOLUME_EXTENSIONS)}) in the folder",
        )
    files: dict[str, Path] = {}
    duplicates: list[str] = []
    for cid, paths in groups.items():
        if len(paths) == 1:
            files[cid] = paths[0]
        elif probability and _is_nnunet_pair(paths):
            files[cid] = next(p for p in paths if volume_extension(p) == ".npz")
        else:
            duplicates.append(f"{cid} ({', '.join(p.name for p in paths)})")
    if duplicates:
        raise ConformalSegError(
            f"{len(duplicates)} case id(s) have more than one {role} file: {_listing(duplicates)}",
            path=folder,
            fix="keep exactly one file per case in the folder (move the others elsewhere)",
        )
    return files


def discover_pairs(probs_dir: str | PathLike[str], labels_dir: str | PathLike[str]) -> list[CasePair]:
    """``(case_id, probability_path, label_path)`` for every case, sorted by case id.

    Raises :class:`ConformalSegError` for a missing/empty folder, duplicate case ids in one folder,
    and cases present in only one folder.
    """
    probs = scan_folder(probs_dir, probability=True)
    labels = scan_folder(labels_dir, probability=False)
    only_probs = sorted(set(probs) - set(labels))
    only_labels = sorted(set(labels) - set(probs))
    problems = []
    if only_probs:
        problems.append(
            f"{len(only_probs)} case(s) in {probs_dir} have no label file in {labels_dir}: {_listing(only_probs)}"
        )
    if only_labels:
        problems.append(
            f"{len(only_labels)} case(s) in {labels_dir} have no probability map in {probs_dir}: "
            f"{_listing(only_labels)}"
        )
    if problems:
        raise ConformalSegError(
            "; ".join(problems) + ".",
            fix="give every case both files with the same case id (file name without "
            "extension; a _prob/_probs/_probability/_probabilities suffix on "
            "probability files is ignored)",
        )
    return [(cid, probs[cid], labels[cid]) for cid in sorted(probs)]


@dataclass
class Case:
    """One calibration case: probability map and bool lesion mask on the same grid."""

    case_id: str
    probability: Volume
    lesion: Volume


#: The lesion label value when none is given (accepted only when no other non-zero value occurs).
DEFAULT_LESION_LABELS = (1,)


class CalibrationDataset:
    """Probability/label pairs of a calibration set, loaded lazily one case at a time.

    Iterating yields :class:`Case` objects in case-id order and, after the last case, raises
    :class:`ConformalSegError` if a requested lesion label value never occurred in any label file.
    ``progress(done, total, case_id)`` is called after each case is loaded, before it is yielded.
    ``labels_seen`` maps each case id loaded so far to the label values of its label file.
    ``seg_segments`` (``--seg-segments``): the label value of each named segment of DICOM SEG label maps
    (:mod:`ConformalSegLib.io.dicom_seg_input`); None reads segment numbers as label values.
    """

    seg_segments: dict[str, int] | None = None

    def __init__(
        self,
        probs_dir: str | PathLike[str],
        labels_dir: str | PathLike[str],
        lesion_labels: Sequence[int] | None,
        channel: int | None = None,
        *,
        progress: ProgressCallback | None = None,
        pairs: dict[str, tuple[Path, Path]] | None = None,
    ):
        """``pairs`` (``case_id -> (file, label_path)``) replaces the folder scan, for subclasses whose
        probability maps are made from other files (e.g. images run through a model). ``lesion_labels``
        None: label value 1, provided the label maps hold no other non-zero value (else an error asks
        which value is the lesion, so that an organ label is never calibrated by default)."""
        self.probs_dir = Path(probs_dir)
        self.labels_dir = Path(labels_dir)
        self.lesion_labels_given = lesion_labels is not None
        self.lesion_labels = validate_lesion_labels(DEFAULT_LESION_LABELS if lesion_labels is None else lesion_labels)
        self.channel = channel
        self.progress = progress
        if pairs is None:
            pairs = {cid: (prob, label) for cid, prob, label in discover_pairs(probs_dir, labels_dir)}
        self._pairs = dict(pairs)
        self.labels_seen: dict[str, frozenset[int]] = {}
        self.without_geometry: set[str] = set()  #: case ids whose map and label map are both bare arrays

    @classmethod
    def from_root(
        cls,
        root: str | PathLike[str],
        lesion_labels: Sequence[int] | None,
        channel: int | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> CalibrationDataset:
        """Dataset from ``root/probs`` and ``root/labels``."""
        root = Path(root)
        missing = [name for name in ("probs", "labels") if not (root / name).is_dir()]
        if missing:
            raise ConformalSegError(
                f"calibration folder has no {' or '.join(f'{m}/' for m in missing)} subfolder",
                path=root,
                fix=f"put probability maps in {root / 'probs'} and label maps in {root / 'labels'}",
            )
        return cls(root / "probs", root / "labels", lesion_labels, channel, progress=progress)

    @property
    def case_ids(self) -> list[str]:
        return list(self._pairs)

    def paths(self, case_id: str) -> tuple[Path, Path]:
        """``(probability_path, label_path)`` of a case."""
        if case_id not in self._pairs:
            raise ConformalSegError(
                f"unknown case id {case_id!r}", path=self.probs_dir, fix=f"use one of: {_listing(self.case_ids)}"
            )
        return self._pairs[case_id]

    def __len__(self) -> int:
        return len(self._pairs)

    def load(self, case_id: str) -> Case:
        """Load one case, checking that both files are on the same voxel grid."""
        prob_path, label_path = self.paths(case_id)
        probability = load_probability_input(prob_path, channel=self.channel)  # a file or a DICOM series folder
        # a DICOM SEG label map is placed on the map's grid (checked); other files carry their own
        grid = probability.geometry if probability.geometry_known else None
        label_map = load_label_map(label_path, grid, self.seg_segments)
        check_same_geometry(probability, label_map, what=f"probability map and label map of case {case_id!r}")
        if not probability.geometry_known:  # a bare array: adopt the label map's physical grid
            probability.geometry, probability.geometry_known = label_map.geometry, label_map.geometry_known
        if not probability.geometry_known:
            self.without_geometry.add(case_id)  # 1 mm spacing assumed: the caller decides if that matters
        self.labels_seen[case_id] = frozenset(label_values(label_map.array))
        lesion = Volume(
            mask_from_labels(label_map.array, self.lesion_labels),
            label_map.geometry,
            label_map.path,
            geometry_known=label_map.geometry_known,
        )
        return Case(case_id, probability, lesion)

    def __iter__(self) -> Iterator[Case]:
        total = len(self)
        for done, cid in enumerate(self._pairs, start=1):
            case = self.load(cid)
            if self.progress is not None:
                self.progress(done, total, cid)
            yield case
            del case  # do not hold the previous case while the next one loads
        self.check_lesion_labels_seen()

    def check_lesion_labels_seen(self) -> None:
        """Raise if a lesion label value occurred in none of the label files loaded so far."""
        seen = set().union(*self.labels_seen.values()) if self.labels_seen else set()
        others = sorted(seen - {0} - set(self.lesion_labels))
        if not self.lesion_labels_given and others:
            raise ConformalSegError(
                f"no --lesion-label given, and the label maps hold the values {', '.join(map(str, sorted(seen)))}: "
                "which one marks the lesion?",
                path=self.labels_dir,
                fix=f"pass --lesion-label V (e.g. --lesion-label {others[0]}); the default 1 is used only when "
                "no other non-zero value occurs",
            )
        missing = [v for v in self.lesion_labels if v not in seen]
        if not missing:
            return
        values = ", ".join(str(v) for v in sorted(seen)) or "none"
        subject = (
            f"label value {missing[0]} does not occur"
            if len(missing) == 1
            else f"label values {', '.join(map(str, missing))} do not occur"
        )
        raise ConformalSegError(
            f"{subject} in any label file (values seen: {values})",
            path=self.labels_dir,
            fix="pass the lesion label value(s) with --lesion-label",
        )
