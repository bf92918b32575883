"""ConformalSegLib: statistical guarantees for any 3D segmentation network.

Everything that does not need 3D Slicer lives here and runs headless (see the ``conformalseg`` CLI).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
