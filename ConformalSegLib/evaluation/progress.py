"""Progress of an evaluation: the callback type, its stages, and a tqdm drawing of them for the CLI."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["STAGES", "ProgressCallback", "TqdmProgress"]

#: Progress stages, in order: pass 1 over the cases, the calibration splits, pass 2 over the cases.
STAGES = ("statistics", "splits", "sizes")
#: ``progress(done, total, stage)``; ``total`` is None in pass 1 when the number of cases is unknown.
ProgressCallback = Callable[[int, "int | None", str], None]


class TqdmProgress:
    """A ``progress(done, total, stage)`` callback drawing one tqdm bar per stage (for the CLI).

    Use as a context manager, or call :meth:`close` at the end.
    """

    LABELS = {
        "statistics": "pass 1/2: case statistics",
        "splits": "calibration splits",
        "sizes": "pass 2/2: mask sizes",
    }

    def __init__(self, **tqdm_kwargs: Any):
        self._kwargs = {"leave": True, "dynamic_ncols": True, **tqdm_kwargs}
        self._bar: Any = None  # tqdm bar of the current stage
        self._stage: str | None = None

    def __call__(self, done: int, total: int | None, stage: str) -> None:
        from tqdm.auto import tqdm

        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            unit = "split" if stage == "splits" else "case"
            self._bar = tqdm(total=total, desc=self.LABELS.get(stage, stage), unit=unit, **self._kwargs)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._stage = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
