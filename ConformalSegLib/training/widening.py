"""Widen a trained DynUNet without changing what it computes (Net2WiderNet, Chen et al., ICLR 2016).

``conformalseg train --init-weights MODEL --channels ...`` with more filters per level than ``MODEL``
starts the wider network from the narrow one's *function*: every new channel of a level is a copy of
one of the old channels, and every layer that reads the level divides the copies' contributions so that
they sum to the old one. Training then goes on with the extra capacity instead of from scratch, which
is what makes a wider lesion network affordable on a CPU.

The construction, for one level with ``c`` old and ``C >= c`` new channels: the map ``g(j) = j mod c``
sends new channel ``j`` to the old channel it copies. A layer that *writes* the level takes the old
layer's output filter ``g(j)`` for its output ``j`` (convolution, transposed convolution, and the
instance norm's scale and shift). A layer that *reads* the level takes, for its input ``i``, the old
input weights of channel ``g(i)`` times a fraction ``f_i``, where the fractions of the copies of one
old channel sum to 1.

**Why it is exact.** By induction over the layers in the forward order: if every new channel ``j`` of a
level's input equals old channel ``g(j)``, a reading layer's pre-activation is
``sum_i f_i w[., g(i)] x[g(i)] = sum_c (sum of f_i over the copies i of c) w[., c] x[c] = sum_c w[., c] x[c]``,
the old pre-activation, and the writing side copies whole filters, so each new output channel equals its old
channel. Instance norm normalises each channel by its own statistics, so a copied channel stays equal
to its original; the leaky ReLU acts voxel by voxel. Dropout and deep supervision do not enter the
argument (eval mode has no dropout; every head reads a level like any other layer). The decoder's
first convolution reads the concatenation ``[upsampled, skip]``: the two halves are two levels of the
same width, each with its own map. So the widened network's eval-mode output equals the old one's up to
float rounding (the tests check it to 1e-4).

**Breaking the symmetry.** Copies with equal fractions would receive equal gradients (up to dropout)
and stay copies. The fractions are drawn instead: for an old channel with ``m`` copies, a uniform
random point of the simplex (``Dirichlet(1, ..., 1)``) drawn from a seeded generator; the sum is what
the exactness needs, not the equality. Copies then get different gradients from the first step on,
while the starting function is the old one.

Only the filters may differ: kernel sizes, strides, norm, activation, deep supervision and dropout must
match (:func:`widening_difference`), and no level may get narrower.
"""

from __future__ import annotations

from typing import Any

import torch

from ..common.errors import ConformalSegError


def widening_difference(old_args: dict[str, Any], new_args: dict[str, Any]) -> str | None:
    """``None`` when ``new_args`` is ``old_args`` with each level's filters the same or more, else why not.

    Both are DynUNet keyword arguments as written in a model card (:func:`.networks.network_args`).
    """
    others = sorted((set(old_args) | set(new_args)) - {"filters"})
    changed = [k for k in others if _plain(old_args.get(k)) != _plain(new_args.get(k))]
    if changed:
        return "widening changes the filters only; these differ too: " + ", ".join(changed)
    old, new = [int(c) for c in old_args["filters"]], [int(c) for c in new_args["filters"]]
    if len(old) != len(new):
        return f"widening keeps the number of levels: {len(old)} (model) vs {len(new)} (this run)"
    narrower = [level for level, (a, b) in enumerate(zip(old, new, strict=True)) if b < a]
    if narrower:
        level = narrower[0]
        return f"widening cannot remove filters: level {level} has {old[level]} (model) vs {new[level]}"
    return None


def widen_dynunet(old: Any, new: Any, *, seed: int) -> None:
    """Set ``new``'s weights (a DynUNet with each level at least as wide as ``old``'s) so that it computes
    what ``old`` computes (module docstring). ``seed`` draws the copies' fractions; ``old`` is not changed.
    """
    old_filters = [int(b.conv2.conv.out_channels) for b in _encoder(old)]
    new_filters = [int(b.conv2.conv.out_channels) for b in _encoder(new)]
    if len(old_filters) != len(new_filters) or any(b < a for a, b in zip(old_filters, new_filters, strict=True)):
        raise ConformalSegError(
            f"cannot widen filters {old_filters} to {new_filters}",
            fix="give every level at least the model's filters, with the same number of levels",
        )
    maps = [torch.arange(b) % a for a, b in zip(old_filters, new_filters, strict=True)]
    generator = torch.Generator().manual_seed(int(seed))
    image = torch.arange(int(_encoder(old)[0].conv1.conv.in_channels))
    classes = torch.arange(int(old.output_block.conv.conv.out_channels))

    with torch.no_grad():
        inputs = [image, *maps[:-1]]
        for level, (block_old, block_new) in enumerate(zip(_encoder(old), _encoder(new), strict=True)):
            _basic_block(block_old, block_new, inputs[level], maps[level], generator)
        last = len(maps) - 1
        for k, (up_old, up_new) in enumerate(zip(old.upsamples, new.upsamples, strict=True)):
            level = last - 1 - k
            _conv(up_old.transp_conv.conv, up_new.transp_conv.conv, maps[level + 1], maps[level], generator)
            concat = torch.cat([maps[level], maps[level] + old_filters[level]])
            _basic_block(up_old.conv_block, up_new.conv_block, concat, maps[level], generator)
        _conv(old.output_block.conv.conv, new.output_block.conv.conv, maps[0], classes, generator)
        # MONAI's head k reads the decoder's output at level k + 1 (DynUNetSkipLayer: heads[index - 1])
        for k, (head_old, head_new) in enumerate(
            zip(old.deep_supervision_heads, new.deep_supervision_heads, strict=True)
        ):
            _conv(head_old.conv.conv, head_new.conv.conv, maps[k + 1], classes, generator)


def _encoder(network: Any) -> list[Any]:
    """The DynUNet's encoder blocks from full resolution to the bottleneck."""
    return [network.input_block, *network.downsamples, network.bottleneck]


def _basic_block(
    old: Any,
    new: Any,
    in_map: torch.Tensor,
    out_map: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """One ``UnetBasicBlock`` (conv, norm, act, conv, norm, act). For a decoder block ``in_map`` maps the
    concatenated ``[upsampled, skip]`` channels (indices into the old concatenation)."""
    _conv(old.conv1.conv, new.conv1.conv, in_map, out_map, generator)
    _norm(old.norm1, new.norm1, out_map)
    _conv(old.conv2.conv, new.conv2.conv, out_map, out_map, generator)
    _norm(old.norm2, new.norm2, out_map)


def _conv(
    old: Any,
    new: Any,
    in_map: torch.Tensor,
    out_map: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Copy the old filters of ``out_map`` and split the old input weights of ``in_map`` over the copies."""
    transposed = isinstance(old, torch.nn.ConvTranspose3d)
    weight = old.weight.detach()
    if transposed:  # (in, out, k...) -> (out, in, k...)
        weight = weight.transpose(0, 1)
    fractions = _fractions(in_map, generator).to(weight.dtype)
    widened = weight[out_map][:, in_map] * fractions.view(1, -1, *([1] * (weight.dim() - 2)))
    if transposed:
        widened = widened.transpose(0, 1)
    _assign(new.weight, widened)
    if old.bias is not None:
        _assign(new.bias, old.bias.detach()[out_map])


def _norm(old: Any, new: Any, out_map: torch.Tensor) -> None:
    """Instance norm: each copy keeps its original's scale and shift."""
    if old.weight is not None:
        _assign(new.weight, old.weight.detach()[out_map])
        _assign(new.bias, old.bias.detach()[out_map])


def _fractions(in_map: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per new input channel, its share of the old channel it copies: the shares of one old channel's
    copies are a uniform random point of the simplex (normalised exponentials), so they sum to 1."""
    draws = -torch.log(1.0 - torch.rand(in_map.numel(), generator=generator, dtype=torch.float64))
    totals = torch.zeros(int(in_map.max()) + 1, dtype=torch.float64).index_add_(0, in_map, draws)
    return (draws / totals[in_map]).float()


def _assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(parameter.shape) != tuple(value.shape):
        raise ConformalSegError(
            f"widening built a tensor of shape {tuple(value.shape)} for one of {tuple(parameter.shape)}",
            fix="widen DynUNets of the same architecture (conformalseg train's dynunet)",
        )
    parameter.copy_(value)


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (as they do once written in a card)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
