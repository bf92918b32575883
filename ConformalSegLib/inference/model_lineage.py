"""Which phantom streams a model's weights learnt from, following fine-tuning back to its first run.

A model trained with ``conformalseg train --init-weights PARENT`` records the SHA-256 of the starting
weights (``training.init_weights_sha256``) and its own run's data (``training.data.phantom_seed``), not
the parent's. Its weights have nonetheless seen the parent's training phantoms. The lineage is
recovered from the cards that lie beside the model (the other folders of ``Resources/models``, or any
folder of model folders): the parent is the card whose ``training.weights_sha256`` equals the child's
``init_weights_sha256``, and so on until a card has no starting weights or its parent is not found
there. A parent that cannot be found ends the chain: the seeds returned are then those known, a
subset of the true ones (``complete`` says which).

An intermediate run whose weights are not shipped (a fine-tune that was only a step towards the shipped
model) keeps its card, as written by ``conformalseg train``, in the shipped model's ``ancestors/`` folder
(``Resources/models/NAME/ancestors/RUN.model_card.json``): those cards are read like the sibling folders'
ones, so the chain passes through the run without its weights being in the repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card_format import CARD_FILE
from .model_card import ModelCard

#: The folder, inside a model folder, that holds the cards of unshipped runs on its chain (module docstring).
ANCESTORS_DIR = "ancestors"


@dataclass(frozen=True)
class TrainingLineage:
    """The phantom seeds of a model and its ancestors, newest first (``complete``: every parent found)."""

    phantom_seeds: tuple[int, ...]
    models: tuple[str, ...]
    complete: bool


def training_lineage(card: ModelCard) -> TrainingLineage:
    """The phantom seeds ``card``'s weights learnt from, its own run's first (see the module docstring).

    A card without ``training`` (a model from elsewhere) has no seeds and a complete lineage: nothing is
    known and nothing is missing from what ConformalSeg recorded.
    """
    seeds: list[int] = []
    names: list[str] = []
    training: dict[str, Any] = card.training or {}
    siblings = _sibling_cards(card.path)
    seen: set[str] = set()
    name = card.name
    while True:
        names.append(name)
        seed = _phantom_seed(training)
        if seed is not None and seed not in seeds:
            seeds.append(seed)
        parent_sha = training.get("init_weights_sha256")
        if not parent_sha:
            return TrainingLineage(tuple(seeds), tuple(names), True)
        if parent_sha in seen or parent_sha not in siblings:
            return TrainingLineage(tuple(seeds), tuple(names), False)
        seen.add(parent_sha)
        name, training = siblings[parent_sha]


def _phantom_seed(training: dict[str, Any]) -> int | None:
    data = training.get("data")
    seed = data.get("phantom_seed") if isinstance(data, dict) else None
    return int(seed) if seed is not None else None


def _sibling_cards(card_path: Path | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{weights_sha256: (name, training)}`` of the cards in the folders beside the model's folder and in
    their ``ancestors/`` folders (see the module docstring).

    Read as plain JSON (nothing is loaded or executed); unreadable or foreign cards are skipped.
    """
    if card_path is None:
        return {}
    models = Path(card_path).resolve().parent.parent
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    # ancestors first, so that a shipped folder's own card wins where both record the same weights
    candidates = sorted(models.glob(f"*/{ANCESTORS_DIR}/*.json")) + sorted(models.glob(f"*/{CARD_FILE}"))
    for candidate in candidates:
        try:
            document = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        training = document.get("training") if isinstance(document, dict) else None
        if isinstance(training, dict) and isinstance(training.get("weights_sha256"), str):
            fallback = candidate.parent.name if candidate.name == CARD_FILE else candidate.name.split(".")[0]
            found[training["weights_sha256"]] = (str(document.get("name", fallback)), training)
    return found
