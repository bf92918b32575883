"""The network a model card names, built on the CPU: MONAI class + state dict, TorchScript, or MONAI bundle.

State dicts are loaded with ``torch.load(weights_only=True)`` (no code runs); TorchScript archives and
bundle configs contain code: load only trusted files (see :mod:`~ConformalSegLib.inference.model_card`).
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any

from ..common.errors import ConformalSegError
from .card_format import BUNDLE_CONFIGS, BUNDLE_WEIGHTS, CARD_FIX, STATE_DICT_WRAPPERS, ModelSource

__all__ = [
    "bundle_config",
    "load_network",
    "network_class",
    "require_trust",
    "runs_code",
    "trust_model_code",
]


def network_class(name: str) -> type:
    """The class ``name`` of :mod:`monai.networks.nets`; :class:`LookupError` with a hint when there is none."""
    import torch
    from monai.networks import nets

    cls = getattr(nets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        available = sorted(
            n for n in dir(nets) if isinstance(getattr(nets, n), type) and issubclass(getattr(nets, n), torch.nn.Module)
        )
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(available[:8])} ..."
        raise LookupError(f"network {name!r} is not a class of monai.networks.nets ({hint})")
    return cls


def _read_state_dict(path: Path, card_path: Path | None) -> dict[str, Any]:
    import pickle

    import torch

    if not path.is_file():
        raise ConformalSegError(
            "model weights file not found",
            path=path,
            fix=f"check the weights path in the model card {card_path or ''}".rstrip(),
        )
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConformalSegError(
            f"cannot read the weights as a plain state dict ({reason})",
            path=path,
            fix="save the weights with torch.save(model.state_dict(), path); pickled whole models are not loaded",
        ) from exc

    def is_state(obj: Any) -> bool:
        return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())

    if not is_state(loaded) and isinstance(loaded, dict):
        loaded = next((loaded[k] for k in STATE_DICT_WRAPPERS if is_state(loaded.get(k))), loaded)
    if not is_state(loaded):
        raise ConformalSegError(
            "the weights file does not hold a state dict (name -> tensor)",
            path=path,
            fix="save the weights with torch.save(model.state_dict(), path)",
        )
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return loaded


def _apply_state_dict(net: Any, state: dict[str, Any], weights: Path, card_path: Path | None) -> None:
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise ConformalSegError(
            f"the weights do not match the network of the model card ({detail[:300]})",
            path=weights,
            fix=f"check the network and args in {card_path or 'the model card'}",
        ) from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise ConformalSegError(
            f"the weights do not match the network of the model card: {'; '.join(problems)}",
            path=weights,
            fix=f"check the network and args in {card_path or 'the model card'}",
        )


def bundle_config(folder: Path, card_path: Path | None = None, *, required: bool = True) -> Path | None:
    """The bundle's ``configs/inference.json`` (or ``.yaml``); None when absent and not ``required``."""
    for name in BUNDLE_CONFIGS:
        if (folder / name).is_file():
            return folder / name
    if required:
        raise ConformalSegError(
            "the MONAI bundle has no configs/inference.json",
            path=folder,
            fix=f"check the bundle path in {card_path or 'the model card'}",
        )
    return None


#: Set to ``1`` to allow model folders whose loading runs code (the CLI's ``--trust-model-code`` sets it).
TRUST_ENV = "CONFORMALSEG_TRUST_MODEL_CODE"


def trust_model_code(trusted: bool = True) -> None:
    """Allow (or forbid again) loading TorchScript archives and MONAI bundles in this process."""
    if trusted:
        os.environ[TRUST_ENV] = "1"
    else:
        os.environ.pop(TRUST_ENV, None)


def runs_code(source: ModelSource) -> str | None:
    """What code loading ``source`` runs (one phrase), or None for a state_dict card (plain weights)."""
    if source.kind == "torchscript":
        return "a TorchScript archive (it contains code)"
    if source.kind == "bundle":
        return "a MONAI bundle (its config runs Python expressions)"
    return None


def require_trust(source: ModelSource, card_path: Path | None) -> None:
    """TorchScript archives hold code, and a MONAI bundle's config runs Python (``$`` expressions,
    ``_target_`` of any importable callable) when the network is built: both only after an explicit opt-in."""
    what = runs_code(source)
    if what is None or os.environ.get(TRUST_ENV) == "1":
        return
    raise ConformalSegError(
        f"this model is {what}: loading it runs code from the model folder {source.path}",
        path=card_path,
        fix="pass --trust-model-code if you trust where the model folder comes from "
        f"(library: set {TRUST_ENV}=1), or use a state_dict model card",
    )


def load_network(source: ModelSource, card_path: Path | None) -> Any:
    """Build the network of ``source`` on the CPU, in eval mode (``card_path`` names the card in errors).

    TorchScript and MONAI bundle sources run code when loaded: :func:`require_trust` first."""
    import torch

    require_trust(source, card_path)
    where = card_path or "the model card"
    if source.kind == "torchscript":
        if not source.path.is_file():
            raise ConformalSegError(
                "TorchScript model file not found", path=source.path, fix=f"check the torchscript path in {where}"
            )
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; it still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(source.path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConformalSegError(
                f"cannot load the TorchScript model ({reason})",
                path=source.path,
                fix="export it with torch.jit.script(model).save(path)",
            ) from exc
        return net.eval()
    if source.kind == "state_dict":
        try:
            assert source.network is not None  # state_dict sources name their network
            cls = network_class(source.network)
        except LookupError as exc:
            raise ConformalSegError(f"invalid model card: {exc}", path=card_path, fix=CARD_FIX) from exc
        try:
            net = cls(**source.args)
        except (TypeError, ValueError, AssertionError, KeyError) as exc:
            raise ConformalSegError(
                f"cannot build {source.network}(**args): {exc}",
                path=card_path,
                fix=f"correct source.state_dict.args for monai.networks.nets.{source.network}",
            ) from exc
        _apply_state_dict(net, _read_state_dict(source.path, card_path), source.path, card_path)
        return net.eval()
    # bundle
    if not source.path.is_dir():
        raise ConformalSegError(
            "MONAI bundle folder not found", path=source.path, fix=f"check the bundle path in {where}"
        )
    config = bundle_config(source.path, card_path)
    from monai.bundle import ConfigParser

    try:
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["bundle_root"] = str(source.path)
        if "network_def" not in parser.get():
            raise KeyError("network_def")
        net = parser.get_parsed_content("network_def", instantiate=True)
    except KeyError as exc:
        raise ConformalSegError(
            f"the bundle config has no usable 'network_def' ({exc})",
            path=config,
            fix="define the network under 'network_def' in configs/inference.json",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - config instantiation raises anything
        raise ConformalSegError(
            f"cannot build the bundle's network_def ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})",
            path=config,
            fix="check network_def in the bundle's configs/inference.json",
        ) from exc
    if not isinstance(net, torch.nn.Module):
        raise ConformalSegError(
            f"the bundle's network_def is a {type(net).__name__}, not a torch network",
            path=config,
            fix="define the network under 'network_def'",
        )
    weights = source.path / BUNDLE_WEIGHTS
    _apply_state_dict(net, _read_state_dict(weights, card_path), weights, card_path)
    return net.eval()
