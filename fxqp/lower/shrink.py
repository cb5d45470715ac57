"""Physical removal of pruned channels: the lowered model's layers get smaller.

For every coupled filter group (:mod:`fxqp.groups`) with pruned channels, lowering keeps
only the surviving channels: the producers' filters and biases, the followers' per-channel
parameters and statistics (batch norm) or kernels (depthwise convolution), and the
consumers' input channels at each place the group appears in their input. Because the
masked model's pruned channels are exactly zero wherever they are read (that is what the
group masks guarantee), the smaller model computes the same outputs up to the order of
floating-point sums.

A :class:`Removal` is recorded in the artifact header, so :func:`fxqp.load` shrinks a
fresh instance of the architecture the same way before filling it.

Removal is skipped (the channels stay as zeros in the sparsity encoding) when the model
prunes activations: a static activation mask or a per-sample top-k counts the pruned
channels' zeros, so it would change with the channel count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fxqp.errors import LoweringError
from passes import ChannelRule, ChannelRuleError, rule_for

__all__ = ["Removal", "removals_of", "channel_slices", "filter_axis", "slice_weight", "shrink_modules", "shrink_originals", "count_macs"]


@dataclass(frozen=True)
class Removal:
    """The channels one group keeps (``kept`` indices of ``size``) and its members."""

    size: int
    kept: tuple[int, ...]
    producers: tuple[str, ...]
    followers: tuple[tuple[str, int], ...]  # (module, channel offset)
    consumers: tuple[tuple[str, int, int], ...]  # (module, channel offset, features per channel)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "kept": list(self.kept),
            "producers": list(self.producers),
            "followers": [list(f) for f in self.followers],
            "consumers": [list(c) for c in self.consumers],
        }


def removals_of(groups: Sequence[nn.Module]) -> list[Removal]:
    """The removals of the coupled groups that prune some but not all of their channels."""
    out = []
    for group in groups:
        keep = group.keep
        if bool(keep.all()) or not bool(keep.any()):
            continue
        kept = tuple(int(i) for i in torch.nonzero(keep).flatten())
        followers = tuple((m.module, m.offset) for m in group.followers)
        consumers = tuple((m.module, m.offset, m.repeat) for m in group.consumers)
        out.append(Removal(keep.numel(), kept, tuple(m.module for m in group.producers), followers, consumers))
    return out


def _rule(model: nn.Module, path: str) -> ChannelRule:
    """The channel rule of a removal's member (:mod:`passes.layers`)."""
    module = model.get_submodule(path)
    rule = rule_for(module)
    if rule is None:
        raise LoweringError(
            f"channel removal: {path} ({type(module).__name__}) has no channel rule; register one with fxqp.register_channel_rule"
        )
    return rule


def _check_fits(model: nn.Module, removal: Removal) -> None:
    """``ValueError`` unless every member of ``removal`` has the channels it names (a
    removal read from a file is checked before anything of its size is allocated)."""
    members = [(p, 0, 1, "out") for p in removal.producers] + [(p, o, 1, "out") for p, o in removal.followers]
    members += [(p, o, r, "in") for p, o, r in removal.consumers]
    for path, offset, repeat, side in members:
        module = model.get_submodule(path)
        rule = _rule(model, path)
        count = rule.out_count(module) if side == "out" else rule.in_count(module)
        if (offset + removal.size) * repeat > count:
            raise ValueError(
                f"a group of {removal.size} channels at offset {offset} ({repeat} features each) does not fit the {count} "
                f"{'output' if side == 'out' else 'input'} channels of {type(module).__name__} {path!r}"
            )


def channel_slices(model: nn.Module, removals: Sequence[Removal]) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Per module path, the kept output-channel and input-channel indices (``None``: all).

    A follower or consumer may read several groups side by side (after a concatenation):
    each group clears its pruned channels at its offset.
    """
    out_keep: dict[str, Tensor] = {}
    in_keep: dict[str, Tensor] = {}

    def clear(table: dict[str, Tensor], path: str, channels: int, start: int, pruned: Tensor) -> None:
        if path not in table:
            table[path] = torch.ones(channels, dtype=torch.bool)
        table[path][start : start + len(pruned)] &= ~pruned

    for removal in removals:
        _check_fits(model, removal)
        pruned = torch.ones(removal.size, dtype=torch.bool)
        pruned[torch.tensor(removal.kept, dtype=torch.int64)] = False
        for path, offset in [(p, 0) for p in removal.producers] + list(removal.followers):
            clear(out_keep, path, _rule(model, path).out_count(model.get_submodule(path)), offset, pruned)
        for path, offset, repeat in removal.consumers:
            # channel j of the group is input features (offset + j)·repeat .. + repeat − 1
            clear(in_keep, path, _rule(model, path).in_count(model.get_submodule(path)), offset * repeat, pruned.repeat_interleave(repeat))

    def indices(table: dict[str, Tensor], path: str) -> Tensor | None:
        return torch.nonzero(table[path]).flatten() if path in table else None

    return {p: (indices(out_keep, p), indices(in_keep, p)) for p in set(out_keep) | set(in_keep)}


def filter_axis(module: nn.Module) -> int | None:
    """The weight axis of the module's output channels (its channel rule's); ``None`` without a rule."""
    rule = rule_for(module)
    return None if rule is None else rule.weight_out_axis(module)


def slice_weight(module: nn.Module, weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
    """``weight`` of ``module`` with only the kept output and input channels, on the axes
    its channel rule gives (:meth:`passes.layers.ChannelRule.slice_weight`).

    A grouped convolution's filters of group ``j`` read its input channels
    ``j·in/g .. (j+1)·in/g − 1`` along its input axis: each group keeps its own kept inputs
    (every group keeps as many, which the channel groups' balanced decisions guarantee).
    """
    rule = rule_for(module)
    if rule is None:
        raise LoweringError(f"channel removal: {type(module).__name__} has no channel rule; register one with fxqp.register_channel_rule")
    try:
        return rule.slice_weight(module, weight, out_idx, in_idx)
    except ChannelRuleError as err:
        raise LoweringError(str(err)) from None


def shrink_modules(model: nn.Module, slices: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Slice every weight that is a plain parameter, the other per-channel tensors of the
    layers' channel rules (bias, batch-norm parameters and statistics), and set their
    channel-count attributes (:meth:`passes.layers.ChannelRule.shrink`)."""
    for path, (out_idx, in_idx) in slices.items():
        module = model.get_submodule(path)
        if "weight" in module._parameters and module._parameters["weight"] is not None:
            module._parameters["weight"] = nn.Parameter(
                slice_weight(module, module._parameters["weight"].detach(), out_idx, in_idx), requires_grad=False
            )
        _rule(model, path).shrink(module, out_idx, in_idx)


def shrink_originals(model: nn.Module, slices: dict[str, tuple[Tensor | None, Tensor | None]]) -> None:
    """Slice the parametrized weights' originals (a fresh model being loaded), then the rest."""
    for path, (out_idx, in_idx) in slices.items():
        module = model.get_submodule(path)
        container = getattr(module, "parametrizations", None)
        if container is not None and "weight" in container:
            chain = container["weight"]
            chain.original = nn.Parameter(slice_weight(module, chain.original.detach(), out_idx, in_idx), requires_grad=False)
    shrink_modules(model, slices)


def count_macs(model: nn.Module, inputs: Sequence[Tensor]) -> int:
    """Multiply-accumulates of the layers with a channel rule that read their inputs across
    channels (convolutions, linear layers; not norms) in one eval forward: per output value,
    the weights of one filter.

    Floating-point ``inputs`` run in the dtype of the model's floating-point parameters: the
    example inputs recorded at transform time keep their dtype when the model is cast later
    (``.to(torch.bfloat16)``, ``.double()``)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and p.numel()), None)
    if dtype is not None:
        inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    total = 0

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        nonlocal total
        total += output.numel() * (module.weight.numel() // rule_for(module).out_count(module))

    counted = [m for m in model.modules() if _multiplies(m)]
    hooks = [m.register_forward_hook(hook) for m in counted]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return total


def _multiplies(module: nn.Module) -> bool:
    rule = rule_for(module)
    return rule is not None and not rule.elementwise and isinstance(getattr(module, "weight", None), Tensor)
