"""Phantoms on disk: the nnU-Net v2 raw layout (``imagesTr``, ``labelsTr``, ``dataset.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np

from ..common.errors import ConformalSegError
from ..io.atomic import OVERWRITE_FIX, atomic_output
from ..io.volumes import save_volume
from .generator import make_phantoms, validate_options
from .imaging import HU_MAX, HU_MIN
from .labels import LABEL_NAMES, LESION

__all__ = ["dataset_json", "write_phantom_dataset"]


def dataset_json(n: int, *, seed: int = 0, options: dict | None = None) -> dict:
    """The nnU-Net v2 ``dataset.json`` of a phantom dataset of ``n`` cases."""
    return {
        "name": "ConformalSegPhantoms",
        "description": "Deterministic synthetic abdominal/thoracic CT phantoms (ConformalSegLib.phantoms)",
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in sorted(LABEL_NAMES.items())},
        "numTraining": int(n),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
        "phantom": {"seed": int(seed), "lesion_label": LESION, "options": options or {}},
    }


def write_phantom_dataset(
    out_dir: str | PathLike[str],
    n: int,
    seed: int = 0,
    *,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    image_dtype: str = "int16",
    **kw,
) -> Path:
    """Generate ``n`` phantoms and write them in the nnU-Net v2 raw layout; return ``out_dir``.

    ``out_dir/imagesTr/CASE_0000.nii.gz`` (HU; ``image_dtype`` ``"int16"``, rounded, or
    ``"float32"``), ``out_dir/labelsTr/CASE.nii.gz`` (uint8, :data:`LABEL_NAMES`) and
    ``out_dir/dataset.json``. Every file is written atomically; nothing is written when any output
    already exists, unless ``force``. ``progress(done, n, case_id)`` is called after each case;
    other keyword arguments go to :func:`make_phantom`.
    """
    if image_dtype not in ("int16", "float32"):
        raise ConformalSegError(f"image_dtype must be 'int16' or 'float32', got {image_dtype!r}.")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ConformalSegError(f"the number of phantoms must be a non-negative integer, got {n}.")
    n = int(n)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConformalSegError("output path is an existing file, not a folder", path=out, fix="give a folder name")
    width = max(3, len(str(n - 1)))
    ids = [f"phantom_{i:0{width}d}" for i in range(n)]
    targets = [out / "dataset.json"]
    for cid in ids:
        targets += [out / "imagesTr" / f"{cid}_0000.nii.gz", out / "labelsTr" / f"{cid}.nii.gz"]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise ConformalSegError(f"output file already exists{more}", path=existing[0], fix=OVERWRITE_FIX)
    # validate the options (and fail early) before writing anything
    validate_options(
        tuple(kw.get("shape", (48, 96, 96))),
        tuple(kw.get("spacing", (1.6, 1.6, 3.0))),
        kw.get("n_lesions", (1, 4)),
        kw.get("empty_probability", 0.1),
    )
    for done, phantom in enumerate(make_phantoms(n, seed=seed, **kw), start=1):
        image = phantom.image
        if image_dtype == "int16":
            image = np.rint(np.clip(image, HU_MIN, HU_MAX)).astype(np.int16)
        save_volume(image, phantom.geometry, out / "imagesTr" / f"{phantom.case_id}_0000.nii.gz", force=force)
        save_volume(phantom.labels, phantom.geometry, out / "labelsTr" / f"{phantom.case_id}.nii.gz", force=force)
        if progress is not None:
            progress(done, n, phantom.case_id)
    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    text = json.dumps(dataset_json(n, seed=seed, options=options), indent=2) + "\n"
    with atomic_output(out / "dataset.json", force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
