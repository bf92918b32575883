"""Profiles the slider cannot drive, applied through ``conformalseg apply`` (issue 18), free of Slicer.

* **Mask-only margin sets** (``calibrate --masks [--structures 1=liver,...]``): the score is the signed
  distance to the boundary of a *predicted label map* (TotalSegmentator, nnU-Net without probabilities),
  not a probability map, so the panel exports the label map and runs ``apply --mask``.
* **nnU-Net fold profiles** (``calibrate --folds``): the score is the fold ensemble of per-fold ``.npz``
  files on disk (the folds must be those of calibration), so the panel runs ``apply --folds DIR``; the
  averaged map and the fold variance / mutual information come back as volumes.

Both run in a PythonSlicer child through the CLI (the library's own checks and refusals, no logic twice);
the panel loads ``OUT/segmentation.seg.nrrd`` and shows the guarantee sentences of ``OUT/apply.json``
(:func:`read_apply_result`). With ``reference_dicom`` (the CT came from DICOM) the CLI also writes
``OUT/segmentation.dcm`` with the library's highdicom exporter, its descriptions stating the guarantee.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from .commands import module_command

#: What a profile is applied to: the slider path (a probability map), ``apply --mask`` or ``apply --folds``.
PROBABILITY, MASK, FOLDS = "probability", "mask", "folds"


def profile_input(path: str | PathLike[str]) -> str:
    """:data:`MASK`, :data:`FOLDS` or :data:`PROBABILITY` for a profile (or a ``--structures`` index),
    decided by the CLI's own test (``is_mask_apply``) and the profile's recorded folds."""
    from ConformalSegLib.cli.mask_options import is_mask_apply
    from ConformalSegLib.common.errors import ConformalSegError
    from ConformalSegLib.conformal.profile import load_profile

    try:
        if is_mask_apply(argparse.Namespace(profile=Path(path), mask=Path("mask"))):
            return MASK
    except ConformalSegError as exc:
        if "--mask needs a profile calibrated on predicted masks" not in str(exc):
            raise
    return FOLDS if load_profile(path).provenance.get("folds") else PROBABILITY


def apply_command(
    python: str,
    *,
    profile: str | PathLike[str],
    out_dir: str | PathLike[str],
    mask: str | PathLike[str] | None = None,
    folds: str | PathLike[str] | None = None,
    prob: str | PathLike[str] | None = None,
    case: str | None = None,
    channel: int | None = None,
    epsilon: float | None = None,
    alpha: float | None = None,
    alpha_inner: float | None = None,
    alpha_outer: float | None = None,
    slider_safe: bool = False,
    reference_dicom: str | PathLike[str] | None = None,
    series_uid: str | None = None,
) -> list[str]:
    """``conformalseg apply --mask LABELS``, ``--folds DIR [--case ID]`` or ``--prob MAP`` (the slider's
    result: ``epsilon``, ``alpha``s and ``slider_safe`` as on the sliders), optionally recalibrated to the panel's
    levels, with ``--dicom-seg --reference-dicom DIR`` when a DICOM series of the CT is known."""
    if sum(x is not None for x in (mask, folds, prob)) != 1:
        raise ValueError("give exactly one of mask, folds and prob")
    args = ["--profile", str(profile)]
    if mask is not None:
        args += ["--mask", str(mask)]
    elif folds is not None:
        args += ["--folds", str(folds)]
    else:
        args += ["--prob", str(prob)]
    if case is not None:
        if folds is None:
            raise ValueError("case goes with folds")
        args += ["--case", str(case)]
    if channel is not None:
        args += ["--channel", str(int(channel))]
    if epsilon is not None:
        if prob is None or not 0 <= float(epsilon) < 1:
            raise ValueError(f"epsilon goes with prob and must lie in [0, 1), got {epsilon!r}")
        args += ["--epsilon", repr(float(epsilon))]
    if slider_safe:
        if prob is None:
            raise ValueError("slider_safe goes with prob")
        args += ["--slider-safe"]
    for flag, value in (("--alpha", alpha), ("--alpha-inner", alpha_inner), ("--alpha-outer", alpha_outer)):
        if value is not None:
            if not 0 < float(value) < 1:
                raise ValueError(f"{flag[2:]} must lie in (0, 1), got {value!r}")
            args += [flag, repr(float(value))]
    if reference_dicom is not None:
        args += ["--dicom-seg", "--reference-dicom", str(reference_dicom)]
        if series_uid:
            args += ["--series-uid", str(series_uid)]
    args += ["--out", str(out_dir)]
    return module_command(python, "apply", *args, "--force")


@dataclass(frozen=True)
class ApplyResult:
    """What ``conformalseg apply`` wrote, as the panel loads it."""

    segmentation: Path  # OUT/segmentation.seg.nrrd (segment names from the library)
    guarantees: list[str]  # one sentence per structure ("liver: With probability ..."), or one
    note: str | None = None  # the per-structure note (union bound) of mask profiles
    dicom_seg: Path | None = None  # OUT/segmentation.dcm with --dicom-seg
    volumes: dict[str, Path] = field(default_factory=dict)  # folds: probability, fold_variance, ...


def read_apply_result(out_dir: str | PathLike[str]) -> ApplyResult:
    """Read ``OUT/apply.json`` and the files beside it; ValueError when the run wrote none."""
    out = Path(out_dir)
    summary_path = out / "apply.json"
    if not summary_path.is_file():
        raise ValueError(f"conformalseg apply wrote no {summary_path}")
    doc = json.loads(summary_path.read_text(encoding="utf-8"))
    if "structures" in doc:  # apply --mask
        structures = doc["structures"]
        single = list(structures) == ["structure"]
        guarantees = [
            entry["guarantee"] if single else f"{name}: {entry['guarantee']}" for name, entry in structures.items()
        ]
        note = None if single else doc.get("note")
    else:
        guarantees, note = [str(doc["guarantee"])], None
    dicom = out / "segmentation.dcm"
    volumes = {
        key: out / f"{key}.nii.gz"
        for key in ("probability", "fold_variance", "fold_mutual_information")
        if (out / f"{key}.nii.gz").is_file()
    }
    return ApplyResult(
        segmentation=out / "segmentation.seg.nrrd",
        guarantees=guarantees,
        note=note,
        dicom_seg=dicom if dicom.is_file() else None,
        volumes=volumes,
    )


def dicom_reference_files(instance_uids: str | None, file_for_instance) -> list[str]:
    """The files of the DICOM series a volume node was loaded from: its ``DICOM.instanceUIDs`` attribute
    through ``file_for_instance`` (``slicer.dicomDatabase.fileForInstance``); empty when the node did not come
    from DICOM or a file is no longer in the database.

    Format, as Slicer's ``DICOMScalarVolumePlugin.load`` writes it (Modules/Scripted/DICOMPlugins): the SOP
    instance UID of every loaded file, in slice order, joined by single spaces, with ``"Unknown"`` for a file
    without one; such a placeholder has no file, so the whole series is refused rather than half-referenced."""
    uids = (instance_uids or "").split()
    files = [file_for_instance(uid) for uid in uids]
    if not files or not all(files) or not all(Path(f).is_file() for f in files):
        return []
    return [str(f) for f in files]


def seg_export_argv(
    python: str,
    *,
    profile: str | PathLike[str],
    prob: str | PathLike[str],
    out_dir: str | PathLike[str],
    reference_dicom: str | PathLike[str],
    settings,
) -> list[str]:
    """The ``apply`` that writes the DICOM SEG of what the sliders show for ``profile`` at ``settings`` (a
    :class:`~ConformalSegSlicer.slider.SliderSettings`, snapped as the sliders snap it): the levels each method's
    sliders move (:func:`~ConformalSegSlicer.slider.recalibrate`), and the slider-safe band for CLS and
    lesion-level profiles when the panel uses it. The CLI recalibrates from the profile's summaries with the same
    library functions as the sliders, so the SEG holds the masks on screen."""
    from ConformalSegLib.conformal.profile import load_profile

    loaded = load_profile(profile)
    s = settings.snapped()
    method, calibration = loaded.method, loaded.calibration
    if method in ("cls", "lesion"):
        band = s.slider_safe and getattr(calibration, "tie_seed", None) is None
        levels: dict = {"epsilon": s.epsilon, "alpha": s.alpha, "slider_safe": band}
    elif method in ("crc", "rcps"):
        levels = {"epsilon": s.epsilon} | ({"alpha": s.alpha} if method == "rcps" else {})  # rcps: alpha = delta
    elif method == "ltt":
        levels = {}  # one target per risk: no slider
    elif getattr(calibration, "mode", None) == "joint-max":
        levels = {"alpha": s.alpha}
    else:
        levels = {"alpha_inner": s.alpha_inner, "alpha_outer": s.alpha_outer}
    return apply_command(python, profile=profile, prob=prob, out_dir=out_dir, reference_dicom=reference_dicom, **levels)


def seg_export_targets(dicom_seg_path: str | PathLike[str], profiles: list) -> list[tuple[str, str]]:
    """``(profile, SEG file)`` for every profile the panel exports: the first profile's SEG is
    ``dicom_seg_path`` itself, each further one's is ``<stem>.<profile stem><suffix>`` beside it (a number is
    appended when that name is taken). One SEG per profile: a SEG's descriptions state one calibration
    (its guarantee sentence, levels and the profile's SHA-256), so two profiles are never merged into one."""
    first = Path(dicom_seg_path)
    suffix = first.suffix or ".dcm"
    stem = first.name[: -len(first.suffix)] if first.suffix else first.name
    targets, taken = [], {first.name}
    for index, profile in enumerate(profiles):
        if index == 0:
            targets.append((str(profile), str(first)))
            continue
        name = f"{stem}.{Path(profile).stem}{suffix}"
        number = 2
        while name in taken:
            name = f"{stem}.{Path(profile).stem}-{number}{suffix}"
            number += 1
        taken.add(name)
        targets.append((str(profile), str(first.with_name(name))))
    return targets


def copy_atomically(source: str | PathLike[str], target: str | PathLike[str]) -> None:
    """Copy ``source`` to ``target`` through the library's atomic output (a temporary file beside ``target``,
    flushed, then renamed): a reader never sees a half-written DICOM SEG, and a failed copy leaves
    ``target`` as it was."""
    from ConformalSegLib.io.atomic import atomic_output

    with atomic_output(target, force=True) as tmp:
        shutil.copyfile(str(source), str(tmp))
