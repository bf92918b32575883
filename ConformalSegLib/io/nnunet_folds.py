"""nnU-Net fold ensembles: the per-fold ``--save_probabilities`` outputs of each case, averaged.

Layout: ``FOLDS/<fold>/CASE.npz`` (with nnU-Net's ``CASE.nii.gz`` beside it for the geometry), one
sub-folder per fold (``fold_0`` ... ``fold_4``, any names; sorted), every fold holding the same cases
(files matched by case id as in :mod:`ConformalSegLib.io.dataset`; any probability format is accepted).

For a case with fold maps ``p_f`` (``f = 1..F``; ``p_f[c]`` the probability of class ``c``):

* **probability**: ``mean_f p_f[lesion]`` (float64 sum, stored float32), the map every method uses,
  exactly as ``nnUNetv2_ensemble`` averages folds;
* **variance**: ``mean_f (p_f[lesion] - mean)^2`` (population variance over the folds), the fold
  disagreement on the lesion class;
* **mutual information** (BALD, nats) of the lesion / not-lesion decision: ``H(mean) - mean_f H(p_f)``
  with the Bernoulli entropy ``H(p) = -p log p - (1 - p) log(1 - p)`` (``0 log 0 = 0``): zero where the
  folds agree, up to ``log 2`` where they disagree most.

**Fold score** (``--fold-score``): the map handed to the methods is ``mean`` (default), or
``lower:K`` = ``clip(mean - K sd, 0, 1)`` / ``upper:K`` = ``clip(mean + K sd, 0, 1)`` with ``sd`` the square
root of the variance: the disagreement as a score transform (``upper`` ranks voxels the folds disagree on
earlier, ``lower`` later). Each is computed from the scan's own fold maps, the same way for calibration
and test scans, so every guarantee holds for it unchanged (only the tightness differs); the profile
records it and ``apply`` uses the same.

The per-fold maps are folded into running sums, so memory stays near one fold's map plus four maps.
Every fold of a case must be on the same grid (checked). Calibration and test scans must both use the
same folds (same count and networks): the ensemble is then one fixed pipeline and the guarantees hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from ..common.errors import ConformalSegError
from .dataset import CalibrationDataset, Case, scan_folder
from .volumes import Volume, check_same_geometry, label_values, load_label_map, load_probability_map, mask_from_labels

MIN_FOLDS = 2


def fold_folders(folds_dir: str | PathLike[str]) -> list[Path]:
    """The fold sub-folders of ``folds_dir`` (sorted; hidden ones ignored); at least two."""
    folds_dir = Path(folds_dir)
    if not folds_dir.is_dir():
        raise ConformalSegError("folds folder not found", path=folds_dir, fix="give the folder holding fold_0/ ...")
    folders = sorted(p for p in folds_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < MIN_FOLDS:
        raise ConformalSegError(
            f"the folds folder holds {len(folders)} fold sub-folder(s); an ensemble needs at least {MIN_FOLDS}",
            path=folds_dir,
            fix="put each fold's predictions (nnUNetv2_predict -f F --save_probabilities) in its own sub-folder",
        )
    return folders


def fold_files(folds_dir: str | PathLike[str]) -> dict[str, list[Path]]:
    """``case id -> [file of each fold]`` (fold order = sorted sub-folder names); every fold has every case."""
    folders = fold_folders(folds_dir)
    per_fold = [scan_folder(folder, probability=True) for folder in folders]
    ids = set(per_fold[0])
    for folder, files in zip(folders[1:], per_fold[1:]):
        differ = sorted(ids ^ set(files))
        if differ:
            raise ConformalSegError(
                f"fold {folder.name} and fold {folders[0].name} hold different cases (e.g. {differ[0]})",
                path=folder,
                fix="predict every case with every fold",
            )
    return {cid: [files[cid] for files in per_fold] for cid in sorted(ids)}


@dataclass
class FoldEnsemble:
    """The averaged probability map of one case and the folds' disagreement (see the module docstring)."""

    probability: Volume
    variance: np.ndarray
    mutual_information: np.ndarray
    n_folds: int


def _bernoulli_entropy(p: np.ndarray) -> np.ndarray:
    """``-p log p - (1 - p) log(1 - p)`` in nats, with ``0 log 0 = 0``."""
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0) + np.where(q > 0, q * np.log(q), 0.0)
    return -terms


def load_fold_ensemble(paths: list[Path], channel: int | None = None) -> FoldEnsemble:
    """Average the fold files ``paths`` of one case (``channel``: the lesion class of multi-channel files)."""
    if len(paths) < MIN_FOLDS:
        raise ConformalSegError(f"an ensemble needs at least {MIN_FOLDS} folds, got {len(paths)}")
    first: Volume | None = None
    total = squares = entropies = np.zeros(0)
    for path in paths:
        fold = load_probability_map(path, channel=channel)
        p = fold.array.astype(np.float64)
        if first is None:
            first = fold
            total, squares, entropies = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
        else:
            check_same_geometry(first, fold, what=f"fold maps {Path(paths[0]).name} and {Path(path).name}")
        total += p
        squares += p * p
        entropies += _bernoulli_entropy(p)
    assert first is not None
    n = len(paths)
    mean = total / n
    variance = np.maximum(squares / n - mean * mean, 0.0)
    information = np.maximum(_bernoulli_entropy(mean) - entropies / n, 0.0)
    source = str(Path(paths[0]).parent.parent)
    probability = Volume(np.clip(mean, 0.0, 1.0).astype(np.float32), first.geometry, source, first.geometry_known)
    return FoldEnsemble(probability, variance.astype(np.float32), information.astype(np.float32), n)


def parse_fold_score(text: str) -> tuple[str, float]:
    """``"mean"`` -> ``("mean", 0.0)``; ``"upper:1.5"`` -> ``("upper", 1.5)`` (K finite, >= 0)."""
    kind, _, value = str(text).strip().lower().partition(":")
    try:
        if kind == "mean" and not value:
            return "mean", 0.0
        k = float(value)
        if kind in ("lower", "upper") and np.isfinite(k) and k >= 0:
            return kind, k
    except ValueError:
        pass
    raise ConformalSegError(f"unknown fold score {text!r}", fix="use mean, lower:K or upper:K (K >= 0, e.g. upper:1)")


def fold_score_map(ensemble: FoldEnsemble, score: str = "mean") -> np.ndarray:
    """The map a fold ensemble hands to the methods (see the module docstring), float32 in [0, 1]."""
    kind, k = parse_fold_score(score)
    mean = ensemble.probability.array.astype(np.float64)
    if kind == "mean":
        return ensemble.probability.array
    sd = np.sqrt(ensemble.variance.astype(np.float64))
    shifted = mean + k * sd if kind == "upper" else mean - k * sd
    return np.clip(shifted, 0.0, 1.0).astype(np.float32)


class FoldDataset(CalibrationDataset):
    """A calibration dataset whose probability maps are fold ensembles (``FOLDS/<fold>/CASE.npz``)."""

    def __init__(
        self,
        folds_dir: str | PathLike[str],
        labels_dir: str | PathLike[str],
        lesion_labels: tuple[int, ...] | list[int],
        channel: int | None = None,
        *,
        score: str = "mean",
        progress=None,  # noqa: ANN001 - the parent's ProgressCallback
    ):
        parse_fold_score(score)
        self.score = score
        self.fold_names = [folder.name for folder in fold_folders(folds_dir)]
        self.folds = fold_files(folds_dir)
        labels = scan_folder(labels_dir, probability=False)
        missing = sorted(set(self.folds) ^ set(labels))
        if missing:
            raise ConformalSegError(
                f"{len(missing)} case id(s) are in only one of the folds and the labels (e.g. {missing[0]})",
                path=folds_dir,
                fix="give every case a label map and fold predictions with the same case id",
            )
        pairs = {cid: (files[0], labels[cid]) for cid, files in self.folds.items()}
        super().__init__(folds_dir, labels_dir, lesion_labels, channel, progress=progress, pairs=pairs)

    def load(self, case_id: str) -> Case:
        ensemble = load_fold_ensemble(self.folds[case_id], self.channel)
        ensemble.probability.array = fold_score_map(ensemble, self.score)
        known = ensemble.probability.geometry_known
        grid = ensemble.probability.geometry if known else None
        label_map = load_label_map(self.paths(case_id)[1], grid, self.seg_segments)
        check_same_geometry(ensemble.probability, label_map, what=f"fold ensemble and label map of case {case_id!r}")
        self.labels_seen[case_id] = frozenset(label_values(label_map.array))
        lesion = Volume(mask_from_labels(label_map.array, self.lesion_labels), label_map.geometry, label_map.path)
        if not ensemble.probability.geometry_known:
            ensemble.probability.geometry = label_map.geometry
        return Case(case_id, ensemble.probability, lesion)
