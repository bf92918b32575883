"""The networks shipped in ``Resources/models`` and which of them each part of the project uses.

One name per role, so that shipping a new model version changes one line here (and the model's own
folder and README) instead of every caller: the demo, the Slicer module's sample and its model lookup, the
benchmarks and the tests read these names. The extension's ``CMakeLists.txt`` cannot import Python; its
install rule names the same folder, and ``Testing/test_slicer_cmake.py`` checks it against
:data:`LESION_MODEL`.
"""

from __future__ import annotations

from pathlib import Path

#: ``Resources/models`` of a source checkout (the Slicer extension installs its model under the module's
#: own ``Resources/models``; see ``ConformalSegSlicer.logic.SHIPPED_MODEL``).
MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "models"

#: The lesion network of the demo, the Slicer sample data and ``benchmarks/eval_lesion_model.py``.
LESION_MODEL = "phantom_lesion_unet_v11"
#: The quantile denoiser of the demo's sem-CRC part.
DENOISER_MODEL = "phantom_denoiser_quantile"


def shipped_model(name: str) -> Path:
    """The folder of the shipped model ``name`` in a source checkout."""
    return MODELS_DIR / name
