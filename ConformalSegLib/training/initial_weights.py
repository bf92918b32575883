"""Start a training run from a trained model's weights (fine-tuning; nnU-Net's ``-pretrained_weights``).

``--init-weights MODEL`` loads the state dict of a model folder written by ``conformalseg train`` (or any
card whose source is a plain state dict) into the new run's network before the first step. The two
networks must be the same: the card's network class and its arguments must equal the run's, else one
error names both. One exception: a DynUNet may be started from a *narrower* DynUNet that differs in its
filters only (``--channels`` with at least the model's filters per level); the wider network then starts
from the narrow one's function (:mod:`.widening`, Net2WiderNet: exact up to float rounding).
Only the weights are taken over: the optimiser, learning-rate schedule, data stream and epoch count are
the new run's own, so a fine-tuning run is a fresh run that starts from better weights (a warm restart),
not a resumed one (``--resume`` is that).

Provenance: the run's configuration records the SHA-256 of the initial weights file
(``TrainingConfig.init_weights_sha256``: a resumed run refuses a different start), and the card's
``training`` section records the model path and that checksum, so the chain of runs that produced a
shipped model can be followed back to the first one's reproducing command.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError


def initial_weights(
    model: str | PathLike[str], network: str, args: dict[str, Any], *, seed: int = 0
) -> tuple[dict[str, Any], str]:
    """The state dict of ``model`` and its weights' SHA-256, checked to fit ``network(**args)``.

    Weights are read with ``torch.load(weights_only=True)`` (no code runs); TorchScript and bundle
    sources are refused (fine-tuning needs the network's class and arguments). A narrower DynUNet is
    widened to ``args`` (module docstring); ``seed`` draws the widening's fractions.
    """
    from ..inference.model_card import resolve_model
    from .networks import build_network, card_network_name
    from .widening import widen_dynunet, widening_difference

    card = resolve_model(model)
    if card.source.kind != "state_dict":
        raise ConformalSegError(
            f"--init-weights needs a model whose card holds a plain state dict, not a {card.source.kind}",
            path=card.path or Path(model),
            fix="give a model folder written by conformalseg train",
        )
    wanted = card_network_name(network)
    widen = (
        wanted == "DynUNet"
        and card.source.network == wanted
        and _canonical(card.source.args) != _canonical(args)
        and widening_difference(card.source.args, args) is None
    )
    if widen:
        wider = build_network(network, args)
        widen_dynunet(card.load_network(), wider, seed=seed)
        return {k: v.detach().clone() for k, v in wider.state_dict().items()}, card.sha256()
    if card.source.network != wanted or _canonical(card.source.args) != _canonical(args):
        differences = _differences(card.source.network, card.source.args, wanted, args)
        if wanted == "DynUNet" and card.source.network == wanted:
            differences += f" ({widening_difference(card.source.args, args)})"
        raise ConformalSegError(
            f"the initial weights are for another network: {differences}",
            path=card.path or Path(model),
            fix="train with the same --network, --channels, --strides, --dropout and deep supervision as that "
            "model (a dynunet may have more --channels per level: it is then widened)",
        )
    state = card.load_network().state_dict()
    return {k: v.detach().clone() for k, v in state.items()}, card.sha256()


def _canonical(args: dict[str, Any]) -> str:
    """Arguments as canonical JSON (tuples and lists compare equal, as they do once written in a card)."""
    return json.dumps(args, sort_keys=True, default=list)


def _differences(theirs: str | None, their_args: dict[str, Any], ours: str, our_args: dict[str, Any]) -> str:
    """What differs, as ``key: model's value -> this run's value`` (the network class first)."""
    if theirs != ours:
        return f"the model is a {theirs}, this run builds a {ours}"
    keys = sorted(set(their_args) | set(our_args))
    changed = [k for k in keys if _canonical({"v": their_args.get(k)}) != _canonical({"v": our_args.get(k)})]
    return "; ".join(f"{k}: {their_args.get(k)!r} (model) vs {our_args.get(k)!r} (this run)" for k in changed)
