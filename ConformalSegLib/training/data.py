"""Training data: cases from phantoms or an MSD / nnU-Net folder, preprocessed with the model card's
own pipeline, and seeded positive/negative balanced patch sampling.

Preprocessing (the exchangeability requirement)
-----------------------------------------------
Every image goes through :func:`ConformalSegLib.inference.preprocessing.build_preprocessing` -- the very
transforms :class:`~ConformalSegLib.inference.engine.InferenceEngine` applies at test time -- after
the engine's conversion to network axes (numpy ``(z, y, x)`` -> MONAI ``(x, y, z)`` with the RAS
affine of :func:`~ConformalSegLib.inference.preprocessing.network_affine`). The label map is brought onto
the resulting grid by nearest-neighbour resampling (``monai.transforms.ResampleToMatch``), so the
network is trained on exactly the tensors it will see at inference. When the card keeps the images' own
grid (``spacing_mm`` null: the spatial transform is the reorientation alone, axis flips and
permutations), the label map goes through that same reorientation instead: the same voxels on the same
grid as the resampling gives (tested), without the interpolation, which was about half of a fresh
phantom's preparation and 13 % of a training sample's data work (``benchmarks/bench_training_step.py``).
Volumes smaller than the patch are zero-padded symmetrically after preprocessing, like
``sliding_window_inference`` pads them.

Patches
-------
:class:`PatchSampler` draws, per case and epoch, ``samples_per_case`` crops of ``patch_size``
(network axes ``[d0, d1, d2]``) with lesion-balanced foreground oversampling (``fg_fraction`` of the
crops centred on a voxel of a uniformly chosen lesion, see :mod:`ConformalSegLib.training.patches`)
and optional seeded augmentation (:mod:`ConformalSegLib.training.augmentation`). All draws come from
``numpy.random.default_rng((seed, epoch))``, so an epoch's patches depend only on the seed and the
epoch number. Training on freshly generated phantoms instead of a fixed set is
:mod:`ConformalSegLib.training.phantom_stream`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..common.errors import ConformalSegError
from ..io.volumes import IMAGE_EXTENSIONS, Volume, check_same_geometry, load_image, load_label_map
from .augmentation import AugmentationConfig
from .patches import sample_patch

ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TrainingCase:
    """One labelled case: in memory (:class:`Volume` objects) or on disk (file paths, read on demand)."""

    case_id: str
    image: Volume | Path
    labels: Volume | Path

    def volumes(self) -> tuple[Volume, Volume]:
        """``(image, label map)`` as volumes on the same grid (files are read here)."""
        image = self.image if isinstance(self.image, Volume) else load_image(self.image)
        labels = self.labels if isinstance(self.labels, Volume) else load_label_map(self.labels)
        check_same_geometry(image, labels, what="image and label map")
        return image, labels


@dataclass
class PreparedCase:
    """A case on the network grid: ``image`` ``(1, d0, d1, d2)`` float32 (preprocessed) and
    ``lesion`` ``(1, d0, d1, d2)`` float32 0/1; ``lesion_voxels`` ``(K, 3)`` indices of its lesion
    voxels and ``lesion_component`` ``(K,)`` the 26-connected lesion (``0..n_components-1``) each
    belongs to; ``label_values`` the values found in its label map (for error messages)."""

    case_id: str
    image: torch.Tensor
    lesion: torch.Tensor
    lesion_voxels: np.ndarray
    label_values: tuple[int, ...] = ()
    lesion_component: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if len(self.lesion_component) != len(self.lesion_voxels):
            mask = np.zeros(tuple(self.lesion.shape[1:]), dtype=bool)
            if len(self.lesion_voxels):
                mask[tuple(self.lesion_voxels.T)] = True
            components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
            self.lesion_component = (
                (components[tuple(self.lesion_voxels.T)] - 1).astype(np.int64)
                if len(self.lesion_voxels)
                else np.zeros(0, dtype=np.int64)
            )

    @property
    def has_lesion(self) -> bool:
        return len(self.lesion_voxels) > 0

    @property
    def n_components(self) -> int:
        """Number of 26-connected lesions on the network grid."""
        return int(self.lesion_component.max()) + 1 if len(self.lesion_component) else 0


# ----------------------------------------------------------------------------- sources


def phantom_cases(n: int, seed: int, **phantom_options) -> list[TrainingCase]:
    """``n`` phantoms ``make_phantoms(n, seed, **phantom_options)`` as training cases (in memory)."""
    from ..phantoms.generator import make_phantoms

    return [
        TrainingCase(p.case_id, Volume(p.image, p.geometry, None), Volume(p.labels, p.geometry, None))
        for p in make_phantoms(n, seed=seed, **phantom_options)
    ]


def folder_cases(root: str | PathLike[str]) -> list[TrainingCase]:
    """The labelled cases of an MSD / nnU-Net raw dataset: ``imagesTr/CASE[_0000].ext`` with
    ``labelsTr/CASE.ext`` (files are read later, one at a time)."""
    from ..inference.datasets import find_images

    root = Path(root)
    if not root.is_dir():
        raise ConformalSegError(
            "training data folder not found" if not root.exists() else "training data is not a folder",
            path=root,
            fix="give an MSD/nnU-Net dataset folder holding imagesTr/ and labelsTr/",
        )
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise ConformalSegError(
            "the training data folder has no imagesTr/ and labelsTr/ folders",
            path=root,
            fix="give an MSD/nnU-Net dataset folder (imagesTr/CASE_0000.nii.gz, "
            "labelsTr/CASE.nii.gz), or use --phantoms N",
        )
    images = find_images(root, subset="tr")
    cases = []
    for image in images:
        label = next(
            (
                root / "labelsTr" / f"{image.case_id}{ext}"
                for ext in IMAGE_EXTENSIONS
                if (root / "labelsTr" / f"{image.case_id}{ext}").is_file()
            ),
            None,
        )
        if label is None:
            raise ConformalSegError(
                f"case {image.case_id!r} has no label map in labelsTr/",
                path=image.path,
                fix=f"add labelsTr/{image.case_id}.nii.gz or remove the image",
            )
        cases.append(TrainingCase(image.case_id, image.path, label))
    return cases


def split_cases(cases: Sequence[TrainingCase], n_val: int, seed: int) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Seeded split into ``(train, held-out)`` with ``n_val`` held-out cases (at least one case for training)."""
    if not 0 <= n_val < len(cases):
        raise ConformalSegError(
            f"cannot hold out {n_val} of {len(cases)} case(s) and still train",
            fix="use more cases or fewer held-out cases",
        )
    order = np.random.default_rng(seed).permutation(len(cases))
    held = sorted(int(i) for i in order[:n_val])
    return [c for i, c in enumerate(cases) if i not in held], [cases[i] for i in held]


# ----------------------------------------------------------------------------- preprocessing


def to_meta_tensor(volume: Volume, dtype: torch.dtype = torch.float32):
    """A channel-first ``MetaTensor`` ``(1, x, y, z)`` of a volume in network axes, with its RAS affine
    (the same conversion as the inference engine)."""
    from monai.data import MetaTensor

    from ..inference.preprocessing import network_affine, to_network_axes

    data = torch.from_numpy(np.ascontiguousarray(to_network_axes(np.asarray(volume.array)))).to(dtype)
    affine = torch.as_tensor(network_affine(volume.geometry), dtype=torch.float64)
    return MetaTensor(data[None], affine=affine)


def prepare_case(card, case: TrainingCase, lesion_labels: Sequence[int], patch_size: Sequence[int]) -> PreparedCase:
    """Preprocess one case with the card's pipeline (see the module docstring)."""
    from monai.transforms import ResampleToMatch

    from ..inference.preprocessing import build_preprocessing

    spatial, intensity = build_preprocessing(card)
    image_volume, label_volume = case.volumes()
    image = to_meta_tensor(image_volume)
    if not bool(torch.isfinite(image.as_tensor()).all()):
        raise ConformalSegError(
            "image contains NaN or infinite voxels",
            path=image_volume.path or case.case_id,
            fix="fix or re-export the image",
        )
    labels_np = np.asarray(label_volume.array)
    lesion_np = np.isin(labels_np, np.asarray(list(lesion_labels)))
    values = (
        tuple(int(v) for v in np.unique(labels_np)) if not lesion_np.any() else tuple(int(v) for v in lesion_labels)
    )
    label = to_meta_tensor(Volume(lesion_np.astype(np.float32), label_volume.geometry, None))
    if spatial is not None:
        image = spatial(image)
        if card.preprocessing.spacing_mm is None:  # reorientation only: exact on labels (module docstring)
            label = spatial(label)
        else:
            label = ResampleToMatch(mode="nearest", padding_mode="zeros")(label, img_dst=image)
    image_t = image.as_tensor() if hasattr(image, "as_tensor") else image
    if intensity is not None:
        image_t = intensity(image_t)
        image_t = image_t.as_tensor() if hasattr(image_t, "as_tensor") else image_t
    label_t = label.as_tensor() if hasattr(label, "as_tensor") else label
    image_t, label_t = (
        _pad_to(image_t.to(torch.float32), patch_size),
        _pad_to((label_t > 0.5).to(torch.float32), patch_size),
    )
    voxels = torch.nonzero(label_t[0]).numpy().astype(np.int64)
    return PreparedCase(case.case_id, image_t.contiguous(), label_t.contiguous(), voxels, values)


def _pad_to(tensor: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``(C, d0, d1, d2)`` symmetrically to at least ``patch_size`` (as sliding windows do)."""
    pads: list[int] = []
    for size, patch in reversed(list(zip(tensor.shape[1:], patch_size))):
        extra = max(int(patch) - int(size), 0)
        pads += [extra // 2, extra - extra // 2]
    return torch.nn.functional.pad(tensor, pads) if any(pads) else tensor


def prepare_cases(
    card,
    cases: Sequence[TrainingCase],
    lesion_labels: Sequence[int],
    patch_size: Sequence[int],
    *,
    progress: ProgressCallback | None = None,
    what: str = "training",
) -> list[PreparedCase]:
    """Preprocess every case; raise :class:`ConformalSegError` for an empty list or when no case
    contains the lesion label (naming the label values that are present)."""
    if not cases:
        raise ConformalSegError(f"the {what} set is empty", fix="give cases with --data DIR or --phantoms N (N >= 1)")
    prepared = []
    values: set[int] = set()
    for done, case in enumerate(cases, start=1):
        item = prepare_case(card, case, lesion_labels, patch_size)
        values |= set(item.label_values)
        prepared.append(item)
        if progress is not None:
            progress(done, len(cases), case.case_id)
    if what == "training" and not any(p.has_lesion for p in prepared):
        shown = ", ".join(str(int(v)) for v in sorted(values)[:20])
        raise ConformalSegError(
            f"no {what} case contains the lesion label {', '.join(map(str, lesion_labels))} "
            f"(label values present: {shown})",
            fix="pass the label value that marks the lesion with --lesion-label (6 for the phantoms)",
        )
    return prepared


# ----------------------------------------------------------------------------- patches


class PatchSampler:
    """Seeded, lesion-balanced crops from prepared cases (see the module docstring)."""

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: Sequence[int],
        *,
        samples_per_case: int = 2,
        fg_fraction: float = 0.5,
        batch_size: int = 2,
        seed: int = 0,
        augmentation: AugmentationConfig | None = None,
    ):
        if not cases:
            raise ConformalSegError("no training cases to sample patches from")
        if samples_per_case < 1 or batch_size < 1 or not 0.0 <= fg_fraction <= 1.0:
            raise ValueError("samples_per_case and batch_size must be >= 1 and fg_fraction in [0, 1]")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_case = int(samples_per_case)
        self.fg_fraction = float(fg_fraction)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.augmentation = augmentation

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.cases) * self.samples_per_case // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches ``(images (B, 1, *patch), lesion masks (B, 1, *patch))`` of one epoch, in a
        seeded random order."""
        rng = np.random.default_rng((self.seed, int(epoch)))
        crops = [
            sample_patch(case, self.patch_size, rng, fg_fraction=self.fg_fraction, augmentation=self.augmentation)[:2]
            for case in self.cases
            for _ in range(self.samples_per_case)
        ]
        order = rng.permutation(len(crops))
        for first in range(0, len(order), self.batch_size):
            chosen = [crops[int(i)] for i in order[first : first + self.batch_size]]
            yield torch.stack([c[0] for c in chosen]), torch.stack([c[1] for c in chosen])
