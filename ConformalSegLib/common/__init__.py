"""Plumbing every layer uses: user-facing errors, image geometry, seeded randomness, JSON values.

* :mod:`.errors`: :class:`~.errors.ConformalSegError` (message, file, fix) and the too-small warning;
* :mod:`.geometry`: :class:`~.geometry.Geometry`, a voxel grid in ITK/LPS terms;
* :mod:`.randomness`: seeded random rotations;
* :mod:`.jsonable`: :func:`~.jsonable.jsonable`, the one converter of results to plain JSON values;
* :mod:`.executors`: one task per scan, in order, serially, on a process pool or on Dask.
* :mod:`.shipped_models`: which shipped model (``Resources/models``) each part of the project uses.

Nothing here imports from the rest of the library.
"""
