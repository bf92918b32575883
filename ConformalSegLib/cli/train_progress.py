"""The progress bar of ``conformalseg train`` (tqdm over steps, on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def step_bar(description: str) -> Callable[[int, int, str], None]:
    """A tqdm bar over training steps (on stderr)."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int, label: str = "") -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(
                total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0
            )
        bar.set_postfix_str(label, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state.pop("bar")

    return update
