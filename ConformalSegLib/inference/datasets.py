"""Input images for inference: a folder of images, one image file, or an MSD / nnU-Net raw dataset.

Accepted layouts
----------------
* **One image file** (``.nii.gz .nii .nrrd .seg.nrrd .mha .mhd``): one case.
* **A plain folder of images**: every image file in it (not recursive). Hidden files and
  non-image files (``.json``, ``.raw``, ``.npy``, ...) are ignored.
* **An MSD or nnU-Net raw dataset root** (a folder with ``dataset.json`` and/or ``imagesTr`` /
  ``imagesTs``): the images of ``imagesTr`` and ``imagesTs`` (``subset`` picks one or both;
  ``labelsTr`` is not read). A folder named ``imagesTr``/``imagesTs`` given directly is read with the
  same (dataset) rules, its parent's ``dataset.json`` included.

* **DICOM series** (callers that pass ``dicom=True``: ``infer``, ``calibrate/evaluate --images``): a folder
  holding one DICOM series is one case named after the folder (``series_uid`` picks one of several series);
  a folder without image files whose sub-folders each hold one series gives one case per sub-folder, named
  after it (:func:`ConformalSegLib.io.dicom_series.find_series_cases`). :meth:`ImageCase.load` reads either
  kind.

Case ids
--------
A case id is the file name without its format extension (the rule of
:func:`ConformalSegLib.io.dataset.case_id`) and without nnU-Net's 4-digit channel suffix ``_0000``.

* In a dataset (MSD/nnU-Net), ``CASE_0000.nii.gz`` is channel 0 of ``CASE``; MSD files have no suffix.
* In a plain folder the suffix is removed only when *every* image ends in ``_0000`` (so numbered
  scans like ``scan_0001.nii.gz`` keep their names).

Only **single-channel** inputs (e.g. CT) are supported: a dataset whose ``dataset.json`` declares
more than one channel (``channel_names`` in nnU-Net v2, ``modality`` in MSD / nnU-Net v1), or a
case with ``_0001`` (or higher) channel files, is an error that says so. Two files with the same
case id are an error too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from ..common.errors import ConformalSegError
from ..io.dataset import case_id as _file_case_id
from ..io.dicom_series import find_series_cases, image_input_sha256, load_image_input
from ..io.volumes import IMAGE_EXTENSIONS, Volume, volume_extension

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
SUBSETS = ("all", "tr", "ts")
DATASET_FOLDERS = {"tr": "imagesTr", "ts": "imagesTs"}
MAX_LISTED = 10
SINGLE_CHANNEL_FIX = (
    "only single-channel inputs (one CT per case) are supported; run a single-channel "
    "model, or predict the probability maps with your own pipeline and calibrate those"
)


@dataclass(frozen=True)
class ImageCase:
    """One input image: its case id, file (or DICOM series folder) and (for datasets) its subset folder."""

    case_id: str
    path: Path
    subset: str | None = None  # "imagesTr" / "imagesTs" for datasets
    series_uid: str | None = None  # the series to read when ``path`` is a folder holding several

    def load(self) -> Volume:
        """The image as float32 on its own grid (a file, or the DICOM series of a folder)."""
        return load_image_input(self.path, self.series_uid)

    def sha256(self) -> str:
        """The content key of the image (its bytes, or its series' files)."""
        return image_input_sha256(self.path, self.series_uid)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and volume_extension(path) in IMAGE_EXTENSIONS


def _stem(path: Path) -> str:
    cid = _file_case_id(path.name)
    if cid is None:  # pragma: no cover - filtered by _is_image
        raise ValueError(path)
    return cid


def is_dataset_root(folder: Path) -> bool:
    """True for an MSD / nnU-Net raw dataset folder (``dataset.json`` or ``imagesTr``/``imagesTs``)."""
    return folder.is_dir() and (
        (folder / "dataset.json").is_file() or any((folder / name).is_dir() for name in DATASET_FOLDERS.values())
    )


def dataset_channels(dataset_json: Path) -> dict[str, str] | None:
    """The input channels a ``dataset.json`` declares (``channel_names`` or ``modality``), or None."""
    try:
        data = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConformalSegError(
            f"cannot read dataset.json ({exc})", path=dataset_json, fix="give a valid MSD / nnU-Net dataset.json"
        ) from exc
    if not isinstance(data, dict):
        raise ConformalSegError(
            "dataset.json is not a JSON object", path=dataset_json, fix="give a valid MSD / nnU-Net dataset.json"
        )
    channels = data.get("channel_names", data.get("modality"))
    if channels is None:
        return None
    if not isinstance(channels, dict) or not channels:
        raise ConformalSegError(
            f"dataset.json has an invalid channel list {channels!r}",
            path=dataset_json,
            fix='channel_names (nnU-Net v2) / modality (MSD) must map \'0\' to a name, e.g. {"0": "CT"}',
        )
    return {str(k): str(v) for k, v in channels.items()}


def _check_single_channel(dataset_json: Path) -> None:
    if not dataset_json.is_file():
        return
    channels = dataset_channels(dataset_json)
    if channels is not None and len(channels) > 1:
        names = ", ".join(f"{k}: {v}" for k, v in sorted(channels.items()))
        raise ConformalSegError(
            f"the dataset has {len(channels)} input channels ({names})", path=dataset_json, fix=SINGLE_CHANNEL_FIX
        )


def _group(files: list[Path], *, dataset: bool, folder: Path) -> dict[str, Path]:
    """case id -> file, applying the channel-suffix rule and rejecting duplicates / extra channels."""
    stems = {f: _stem(f) for f in files}
    strip = dataset or all(s.endswith("_0000") for s in stems.values())
    cases: dict[str, list[Path]] = {}
    channel_files: dict[str, list[str]] = {}
    for path, stem in stems.items():
        match = CHANNEL_SUFFIX.match(stem)
        if strip and match:
            cid, channel = match.group("case"), match.group("channel")
            if channel != "0000":
                channel_files.setdefault(cid, []).append(path.name)
                continue
        else:
            cid = stem
        cases.setdefault(cid, []).append(path)
    if not dataset:
        # a plain folder: "a_0000" beside "a_0001" means channels even though not every file has a suffix
        for path, stem in stems.items():
            match = CHANNEL_SUFFIX.match(stem)
            if match and match.group("channel") != "0000" and f"{match.group('case')}_0000" in stems.values():
                channel_files.setdefault(match.group("case"), []).append(path.name)
    if channel_files:
        examples = sorted(name for names in channel_files.values() for name in names)
        raise ConformalSegError(
            f"{len(channel_files)} case(s) have more than one input channel (files {_listing(examples)})",
            path=folder,
            fix=SINGLE_CHANNEL_FIX,
        )
    duplicates = [f"{cid} ({', '.join(p.name for p in paths)})" for cid, paths in cases.items() if len(paths) > 1]
    if duplicates:
        raise ConformalSegError(
            f"{len(duplicates)} case id(s) have more than one image: {_listing(sorted(duplicates))}",
            path=folder,
            fix="keep exactly one image per case in the folder",
        )
    return {cid: paths[0] for cid, paths in cases.items()}


def _scan(folder: Path, *, dataset: bool) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if _is_image(p))
    return _group(files, dataset=dataset, folder=folder) if files else {}


def find_images(
    path: str | PathLike[str], *, subset: str = "all", dicom: bool = False, series_uid: str | None = None
) -> list[ImageCase]:
    """The input images under ``path`` (see the module docstring), sorted by case id.

    ``subset`` (datasets only): ``"all"`` (imagesTr and imagesTs), ``"tr"`` or ``"ts"``. ``dicom``: also
    accept DICOM series folders (``series_uid``: the series of a folder holding several).
    """
    path = Path(path)
    if subset not in SUBSETS:
        raise ConformalSegError(f"unknown subset {subset!r}", fix=f"use one of {', '.join(SUBSETS)}")
    if not path.exists():
        raise ConformalSegError(
            "image path does not exist",
            path=path,
            fix="give an image file, a folder of images or an MSD/nnU-Net dataset folder",
        )
    if series_uid is not None and not (dicom and path.is_dir()):
        raise ConformalSegError(
            "--series-uid applies to a DICOM series folder", path=path, fix="leave out --series-uid"
        )
    if path.is_file():
        if not _is_image(path):
            raise ConformalSegError(
                "unsupported image format", path=path, fix=f"use one of: {' '.join(IMAGE_EXTENSIONS)}"
            )
        stem = _stem(path)
        match = CHANNEL_SUFFIX.match(stem)
        cid = match.group("case") if match and match.group("channel") == "0000" else stem
        return [ImageCase(cid, path)]
    cases: list[ImageCase] = []
    if is_dataset_root(path):
        _check_single_channel(path / "dataset.json")
        wanted = DATASET_FOLDERS.values() if subset == "all" else (DATASET_FOLDERS[subset],)
        folders = [path / name for name in wanted if (path / name).is_dir()]
        if not folders:
            raise ConformalSegError(
                f"the dataset has no {' or '.join(wanted)} folder",
                path=path,
                fix="give the dataset root holding imagesTr/imagesTs, or a folder of images",
            )
        seen: dict[str, Path] = {}
        for folder in folders:
            for cid, file in _scan(folder, dataset=True).items():
                if cid in seen:
                    raise ConformalSegError(
                        f"case id {cid!r} is in both {seen[cid].parent.name} and {folder.name}",
                        path=path,
                        fix="pick one subset (--subset tr or ts)",
                    )
                seen[cid] = file
                cases.append(ImageCase(cid, file, folder.name))
    else:
        in_dataset = path.name in DATASET_FOLDERS.values()
        if in_dataset:
            _check_single_channel(path.parent / "dataset.json")
        cases = [
            ImageCase(cid, file, path.name if in_dataset else None)
            for cid, file in _scan(path, dataset=in_dataset).items()
        ]
        if not cases and dicom:
            series = find_series_cases(path, series_uid)
            cases = [ImageCase(cid, folder, None, series_uid) for cid, folder in series.items()]
    if not cases:
        kinds = f"images ({' '.join(IMAGE_EXTENSIONS)})" + (
            ", a DICOM series, or one folder per case holding its DICOM series" if dicom else ""
        )
        raise ConformalSegError("no images found", path=path, fix=f"put {kinds} in the folder")
    if series_uid is not None and not any(case.series_uid for case in cases):
        raise ConformalSegError(
            "--series-uid applies to a DICOM series folder, not to a folder of image files",
            path=path,
            fix="leave out --series-uid",
        )
    return sorted(cases, key=lambda c: c.case_id)
