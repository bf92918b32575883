"""Score maps computed in a background process, never on Slicer's GUI thread.

A confidence-set profile with a ``distance`` or ``gaussian`` score transform, or a threshold profile calibrated
on a score (``calibrate --score margin``; map names ``score:NAME``), needs the transformed map
``T`` of the whole probability volume (a signed distance is two Euclidean distance transforms: about
45 s and 2 GB on a 512x512x300 CT, single-threaded). The panel therefore writes the probability map and
its geometry to a temporary folder, runs :data:`SCRIPT` in PythonSlicer (the library's own
:func:`~ConformalSegLib.conformal.threshold_scores.score_map_by_name`, so the maps are bit for bit what
:meth:`ConformalSegSlicer.slider.SliderState.scores` would compute), and hands the ``.npy`` results to
the slider state (:meth:`~ConformalSegSlicer.slider.SliderState.set_scores`) when the process ends.
Until then the segments that need them are not shown and the label says they are being computed; every
other segment updates as usual.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from ConformalSegLib.common.geometry import Geometry

#: The child's program (``python -c SCRIPT PROBABILITY.npy GEOMETRY.json OUT_DIR NAME...``).
SCRIPT = """
import json, os, sys
import numpy as np
from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.conformal.threshold_scores import score_map_by_name
probability_path, geometry_path, out_dir, *names = sys.argv[1:]
probability = np.load(probability_path)
with open(geometry_path, encoding="utf-8") as f:
    geometry = Geometry(**{key: tuple(value) for key, value in json.load(f).items()})
for i, name in enumerate(names):
    print(f"PROGRESS {i}/{len(names)} {name}", flush=True)
    partial = os.path.join(out_dir, f"score{i}.partial.npy")
    np.save(partial, np.asarray(score_map_by_name(name, probability, geometry)))
    os.replace(partial, os.path.join(out_dir, f"score{i}.npy"))
print(f"PROGRESS {len(names)}/{len(names)} done", flush=True)
"""


def write_inputs(folder: str | PathLike[str], probability: np.ndarray, geometry: Geometry) -> tuple[Path, Path]:
    """The probability map (``.npy``) and its geometry (``.json``) for the child."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probability_path, geometry_path = folder / "probability.npy", folder / "geometry.json"
    np.save(probability_path, np.ascontiguousarray(probability))
    document = {
        "shape": list(geometry.shape),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
    }
    geometry_path.write_text(json.dumps(document), encoding="utf-8")
    return probability_path, geometry_path


def command(python: str, folder: str | PathLike[str], names: Sequence[str]) -> list[str]:
    """The child's command line for the transforms ``names`` (inputs from :func:`write_inputs` in ``folder``)."""
    folder = Path(folder)
    inputs = [str(folder / "probability.npy"), str(folder / "geometry.json"), str(folder)]
    return [str(python), "-c", SCRIPT, *inputs, *[str(n) for n in names]]


def read_outputs(folder: str | PathLike[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The score maps the child wrote, ``{transform name: array}``."""
    return {name: np.load(Path(folder) / f"score{i}.npy") for i, name in enumerate(names)}
