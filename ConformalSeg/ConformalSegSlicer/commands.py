"""Command lines of the ``conformalseg`` CLI as the Slicer module runs them (out of process).

The module runs ``PythonSlicer -m ConformalSegLib COMMAND ...``: Slicer's own Python (so torch from
the PyTorch extension and the packages installed from ``Resources/requirements.txt`` are there), in
a separate process (so a long inference never blocks the GUI and can be cancelled). The child finds
``ConformalSegLib`` through ``PYTHONPATH`` (:func:`child_environment`): in an installed extension
the package sits next to ``ConformalSeg.py`` in the scripted-modules folder.

Output layout of ``conformalseg infer --out OUT`` (see ``ConformalSegLib/cli/infer_cmd.py``):
``OUT/probs/CASE.nii.gz`` and, with ``--mc-dropout N``, ``OUT/uncertainty/CASE_variance.nii.gz``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

#: Case id of the volume the module exports for inference (file ``images/input.nrrd``: uncompressed, exact geometry).
INPUT_CASE_ID = "input"
#: What the calibration-method combo box shows for each ``--method`` (the parameter node keeps the identifiers).
METHOD_LABELS = {
    "cls": "CLS: misses at most epsilon of the lesion, with probability 1 - alpha",
    "crc": "Expected FNR at most epsilon (risk control)",
    "sets": "Inner / outer confidence sets",
}
#: What the calibration-score combo box shows for each ``--score`` (cls and crc; confidence sets have their own).
SCORE_LABELS = {
    "identity": "Probability",
    "margin:0.5": "Margin: the 0.5 mask grown by calibrated mm",
    "gaussian:2.0": "Smoothed probability (Gaussian, 2 mm)",
}
#: Default grids of ``conformalseg evaluate`` run from the panel (ECR / PC versus alpha plots).
EVALUATION_ALPHAS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
EVALUATION_EPSILONS = (0.05, 0.1, 0.2, 0.3)


def library_root() -> Path:
    """The folder that contains the ``ConformalSegLib`` package (what the child needs on its path)."""
    import ConformalSegLib

    return Path(ConformalSegLib.__file__).resolve().parent.parent


def child_environment(
    base: Mapping[str, str] | None = None, *, library_dir: str | PathLike[str] | None = None
) -> dict[str, str]:
    """Environment of the child: ``base`` (default ``os.environ``) with the library folder first on
    ``PYTHONPATH``, unbuffered UTF-8 output (progress arrives as it happens) and no user site."""
    env = dict(os.environ if base is None else base)
    folder = str(library_root() if library_dir is None else library_dir)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != folder]
    env["PYTHONPATH"] = os.pathsep.join([folder, *paths])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def find_python_slicer(
    which=shutil.which, *, slicer_home: str | PathLike[str] | None = None, fallback: str | None = None
) -> str:
    """Path of ``PythonSlicer`` (Slicer's Python launcher): on ``PATH`` inside Slicer, else in
    ``slicer_home/bin``; ``fallback`` (default ``sys.executable``) outside Slicer."""
    found = which("PythonSlicer")
    if found:
        return str(found)
    if slicer_home is not None:
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            candidate = Path(slicer_home) / "bin" / name
            if candidate.is_file():
                return str(candidate)
    return fallback or sys.executable


def module_command(python: str, command: str, *args: str) -> list[str]:
    """``python -m ConformalSegLib COMMAND ARGS...``."""
    return [str(python), "-m", "ConformalSegLib", command, *[str(a) for a in args]]


def infer_command(
    python: str,
    *,
    model: str | PathLike[str],
    images: str | PathLike[str],
    out_dir: str | PathLike[str],
    mc_dropout: int = 0,
    device: str = "auto",
    force: bool = True,
    profile: str | PathLike[str] | None = None,
    trust_model_code: bool = False,
) -> list[str]:
    """``conformalseg infer``; with ``profile``, the profile's recorded pipeline (MC passes, flips, seed)
    is used and a model with another fingerprint is refused, so ``mc_dropout`` is not passed.
    ``trust_model_code`` passes ``--trust-model-code`` (only after the user confirmed: :mod:`.trust`)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if int(mc_dropout) < 0:
        raise ValueError("mc_dropout must be >= 0")
    args = [
        "--model",
        str(model),
        "--images",
        str(images),
        "--out",
        str(out_dir),
        *(["--profile", str(profile)] if profile is not None else ["--mc-dropout", str(int(mc_dropout))]),
        "--device",
        device,
    ]
    if trust_model_code:
        args.append("--trust-model-code")
    return module_command(python, "infer", *args, *(["--force"] if force else []))


def _label_args(lesion_labels: int | Sequence[int]) -> list[str]:
    labels = [lesion_labels] if isinstance(lesion_labels, int) else list(lesion_labels)
    if not labels or any(int(v) != v or v < 1 for v in labels):
        raise ValueError(f"lesion labels must be positive integers, got {lesion_labels!r}")
    return ["--lesion-label", *[str(int(v)) for v in labels]]


def calibrate_command(
    python: str,
    *,
    data_dir: str | PathLike[str],
    method: str,
    out_profile: str | PathLike[str],
    lesion_labels: int | Sequence[int] = 1,
    epsilon: float | None = None,
    alpha: float | None = None,
    alpha_inner: float | None = None,
    alpha_outer: float | None = None,
    force: bool = False,
    score: str = "identity",
) -> list[str]:
    """``conformalseg calibrate`` on a dataset folder with ``probs/`` and ``labels/``; ``score`` (cls and crc:
    ``calibrate --score``) is left out for the confidence sets, which choose their own transforms."""
    if method not in ("cls", "crc", "sets"):
        raise ValueError(f"method must be cls, crc or sets, got {method!r}")
    if score not in SCORE_LABELS:
        raise ValueError(f"score must be one of {', '.join(SCORE_LABELS)}, got {score!r}")
    args = ["--data", str(data_dir), *_label_args(lesion_labels), "--method", method]
    if method in ("cls", "crc"):
        args += ["--epsilon", repr(float(epsilon))]
    if method == "cls":
        args += ["--alpha", repr(float(alpha))]
    if method == "sets":
        args += ["--alpha-inner", repr(float(alpha_inner)), "--alpha-outer", repr(float(alpha_outer))]
    elif score != "identity":
        args += ["--score", score]
    args += ["--out", str(out_profile)]
    return module_command(python, "calibrate", *args, *(["--force"] if force else []))


def evaluation_grid(values: Sequence[float], extra: float | None) -> list[float]:
    """``values`` plus ``extra`` (the current slider value, so the plots contain it), sorted, unique."""
    grid = {round(float(v), 6) for v in values}
    if extra is not None and 0 < float(extra) < 1:
        grid.add(round(float(extra), 6))
    return sorted(grid)


def evaluate_command(
    python: str,
    *,
    data_dir: str | PathLike[str],
    out_dir: str | PathLike[str],
    lesion_labels: int | Sequence[int] = 1,
    splits: int = 100,
    epsilon: float | None = None,
    alpha: float | None = None,
    hd95: bool = False,
    force: bool = True,
) -> list[str]:
    """``conformalseg evaluate`` over the panel's epsilon/alpha grids (plus the current sliders)."""
    if int(splits) < 1:
        raise ValueError("splits must be >= 1")
    epsilons = evaluation_grid(EVALUATION_EPSILONS, epsilon)
    alphas = evaluation_grid(EVALUATION_ALPHAS, alpha)
    args = [
        "--data",
        str(data_dir),
        *_label_args(lesion_labels),
        "--splits",
        str(int(splits)),
        "--epsilons",
        *[repr(e) for e in epsilons],
        "--alphas",
        *[repr(a) for a in alphas],
    ]
    if epsilon is not None and round(float(epsilon), 6) in epsilons:
        args += ["--main-epsilon", repr(round(float(epsilon), 6))]
    if alpha is not None and round(float(alpha), 6) in alphas:
        args += ["--main-alpha", repr(round(float(alpha), 6))]
    if not hd95:
        args.append("--no-hd95")
    args += ["--out", str(out_dir)]
    return module_command(python, "evaluate", *args, *(["--force"] if force else []))


def add_case_command(
    python: str,
    *,
    profile: str | PathLike[str],
    prob: str | PathLike[str],
    label: str | PathLike[str],
    out: str | PathLike[str],
    case_id: str,
) -> list[str]:
    """``conformalseg profile add-case``: a new profile ``out`` with the reviewed case added (label value 1)."""
    args = ["--profile", str(profile), "--prob", str(prob), "--label", str(label), "--out", str(out)]
    return module_command(python, "profile", "add-case", *args, "--case-id", str(case_id), "--lesion-label", "1")


def grown_profile_path(profile: str | PathLike[str]) -> Path:
    """Where the panel writes a profile grown by one reviewed case: ``NAME_added1.json`` beside ``NAME.json``
    (``NAME_added2.json`` when the profile is itself ``NAME_added1.json``, and the next free number)."""
    path = Path(profile)
    stem, count = path.stem, 0
    head, sep, tail = stem.rpartition("_added")
    if sep and tail.isdigit():
        stem, count = head, int(tail)
    while True:
        count += 1
        candidate = path.with_name(f"{stem}_added{count}.json")
        if not candidate.exists() and not candidate.with_suffix(".npz").exists():
            return candidate


def case_id_from_name(name: str) -> str:
    """A case id from a node name (letters, digits, ``-``, ``_`` and ``.``; others become ``_``)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("_.")
    return cleaned or "reviewed"


@dataclass(frozen=True)
class InferenceOutputs:
    probability: Path | None
    variance: Path | None


def find_inference_outputs(out_dir: str | PathLike[str], case_id: str = INPUT_CASE_ID) -> InferenceOutputs:
    """``OUT/probs/CASE.nii.gz`` and ``OUT/uncertainty/CASE_variance.nii.gz`` when they exist; with
    a single probability map of another name (a renamed case), that one and its variance."""
    out = Path(out_dir)
    probability = out / "probs" / f"{case_id}.nii.gz"
    if not probability.is_file():
        candidates = sorted((out / "probs").glob("*.nii.gz")) if (out / "probs").is_dir() else []
        if len(candidates) != 1:
            return InferenceOutputs(None, None)
        probability = candidates[0]
        case_id = probability.name[: -len(".nii.gz")]
    variance = out / "uncertainty" / f"{case_id}_variance.nii.gz"
    return InferenceOutputs(probability, variance if variance.is_file() else None)


def progress_stages(command: str) -> tuple[str, ...]:
    """Labels of the tqdm bars a command draws, in order (for :class:`~ConformalSegSlicer.process.StagedProgress`)."""
    if command == "evaluate":
        try:
            from ConformalSegLib.evaluation.progress import TqdmProgress

            labels = TqdmProgress.LABELS
            return (labels["statistics"], labels["splits"], labels["sizes"])
        except (ImportError, AttributeError, KeyError):  # pragma: no cover - library changed
            return ()
    if command == "calibrate":
        return ("calibrating",)
    return ()
