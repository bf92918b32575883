"""The model folder a trainer writes: checked before training, staged beside it, published in one rename.

``OUT/model_card.json`` (the card), ``OUT/weights.pt`` (float32 ``state_dict``, loadable with
``torch.load(weights_only=True)``) and ``OUT/training.json`` (the log). Nothing appears at ``OUT``
unless the whole folder is complete: it is written into a hidden staging folder beside ``OUT`` and
renamed into place (an existing ``OUT`` is replaced only with ``force``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ..common.errors import ConformalSegError
from ..io.atomic import OVERWRITE_FIX

WEIGHTS_FILE = "weights.pt"
LOG_FILE = "training.json"
LOG_FORMAT = "conformalseg-training-log"


def check_output_folder(out: str | PathLike[str], *, force: bool = False) -> Path:
    """Raise :class:`ConformalSegError` when ``out`` may not be written (exists without ``force``,
    or is a file); return it as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConformalSegError(
            "the output path is an existing file, not a folder", path=out, fix="give a new folder name with --out"
        )
    if out.exists() and not force:
        raise ConformalSegError("the output folder already exists", path=out, fix=OVERWRITE_FIX)
    return out


@contextlib.contextmanager
def staged_model_folder(out: Path, network: torch.nn.Module, *, force: bool) -> Iterator[Path]:
    """A hidden staging folder beside ``out`` holding ``network``'s float32 state dict
    (:data:`WEIGHTS_FILE`); the caller adds the card and logs, and on a clean exit the folder
    replaces ``out`` in one rename (:func:`_publish`). On any error it is removed and ``out`` is
    left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(staging, _default_dir_mode())
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
        torch.save(state, staging / WEIGHTS_FILE)
        yield staging
        _publish(staging, out, force)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to ``out`` (replacing an old ``out`` only with ``force``)."""
    check_output_folder(out, force=force)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _default_dir_mode() -> int:
    """Permissions a normally created folder would get (0o777 minus the umask; mkdtemp uses 0o700)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
