"""Trust confirmation for models whose loading runs code (issue 16), free of Slicer.

The CLI refuses TorchScript archives and MONAI bundles (whose configs run ``$`` Python expressions)
unless ``--trust-model-code`` is given. The panel asks the user first: :func:`trust_request` says
whether a model needs it (the library's :func:`~ConformalSegLib.inference.networks.runs_code`, the
same test the CLI applies) and builds the question naming the folder and what runs; a "Yes" is kept
in :class:`TrustedModels` for the model's pipeline fingerprint, in memory only (never saved in the
scene or the settings), and the panel passes ``--trust-model-code`` to the child process
(:func:`~ConformalSegSlicer.commands.infer_command`), where the CLI's own option does the rest.
A model whose weights or bundle config change gets another fingerprint and is asked about again.

Reading a model card imports ``ConformalSegLib.inference`` and so torch: the panel keeps torch out of
Slicer's process (the model runs in a child), so it asks a short child too
(:func:`request_in_child`: ``python -m ConformalSegSlicer.trust MODEL`` prints the request as JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

#: Title of the confirmation dialog.
TITLE = "Run code from the model folder?"


@dataclass(frozen=True)
class TrustRequest:
    """A model that runs code when loaded: what to ask and what to remember."""

    name: str  # the model card's name
    folder: Path  # the folder whose code runs (the bundle folder, or the TorchScript file's folder)
    what: str  # the library's phrase: "a MONAI bundle (its config runs Python expressions)", ...
    fingerprint: str  # the card's pipeline SHA-256 (weights, bundle config, preprocessing...)

    @property
    def message(self) -> str:
        return (
            f"The model {self.name!r} is {self.what}.\n\n"
            f"Running it executes code from the folder\n{self.folder}\n"
            "with your user account's rights, like running a program from that folder.\n\n"
            "Run it only if you trust where this folder comes from. "
            "The answer is remembered for this model until Slicer is closed.\n\n"
            "Run this model?"
        )


def trust_request(model_path: str | PathLike[str]) -> TrustRequest | None:
    """None when ``model_path`` (what ``conformalseg infer --model`` accepts) loads plain weights;
    else the confirmation to ask. Raises ConformalSegError for a missing or invalid model card."""
    from ConformalSegLib.inference.model_card import resolve_model
    from ConformalSegLib.inference.networks import runs_code

    card = resolve_model(model_path)
    what = runs_code(card.source)
    if what is None:
        return None
    source = card.source.path
    folder = source if source.is_dir() else source.parent
    return TrustRequest(name=card.name, folder=folder, what=what, fingerprint=card.pipeline_sha256())


def request_in_child(
    model_path: str | PathLike[str], python: str, env: Mapping[str, str] | None = None, timeout: float = 300
) -> TrustRequest | None:
    """:func:`trust_request` run in ``python -m ConformalSegSlicer.trust`` (no torch in the caller);
    raises ConformalSegError with the child's error line when the model card is missing or invalid."""
    from ConformalSegLib.common.errors import ConformalSegError

    from .commands import child_environment

    env = child_environment(env)  # ConformalSegLib first on PYTHONPATH; this package's folder next
    here = str(Path(__file__).resolve().parent.parent)
    paths = env["PYTHONPATH"].split(os.pathsep)
    if here not in paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, here])
    argv: Sequence[str] = [python, "-m", "ConformalSegSlicer.trust", str(model_path)]
    done = subprocess.run(argv, capture_output=True, text=True, encoding="utf-8", env=env, timeout=timeout)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise ConformalSegError(f"cannot read the model card ({reason.removeprefix('error: ')})", path=model_path)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    if data is None:
        return None
    return TrustRequest(
        name=data["name"], folder=Path(data["folder"]), what=data["what"], fingerprint=data["fingerprint"]
    )


class TrustedModels:
    """Fingerprints the user confirmed in this session (memory only: a new session asks again)."""

    def __init__(self) -> None:
        self._fingerprints: set[str] = set()

    def __contains__(self, request: object) -> bool:
        return isinstance(request, TrustRequest) and request.fingerprint in self._fingerprints

    def remember(self, request: TrustRequest) -> None:
        self._fingerprints.add(request.fingerprint)

    def forget_all(self) -> None:
        self._fingerprints.clear()


#: The Slicer session's confirmations (every Logic shares it; gone when Slicer closes).
SESSION = TrustedModels()


def decide(request: TrustRequest | None, trusted: TrustedModels, ask) -> bool | None:
    """Whether to pass ``--trust-model-code``: False for plain weights, True when confirmed now or
    earlier in the session, None when the user said no (do not run). ``ask(title, message) -> bool``
    is the dialog (the panel's ``slicer.util.confirmYesNoDisplay``)."""
    if request is None:
        return False
    if request in trusted:
        return True
    if not ask(TITLE, request.message):
        return None
    trusted.remember(request)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ConformalSegSlicer.trust MODEL``: the request as one JSON line (``null``: no trust needed)."""
    from ConformalSegLib.common.errors import ConformalSegError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m ConformalSegSlicer.trust MODEL", file=sys.stderr)
        return 2
    try:
        request = trust_request(args[0])
    except ConformalSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    payload = None if request is None else {**asdict(request), "folder": str(request.folder)}
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a child
    sys.exit(main())
