"""What the channel passes know of each layer type: one :class:`ChannelRule` per module class.

A rule says how many input and output channels a layer has, on which axes of its ``weight``
they lie, how many convolution groups it has, which other tensors of the layer follow its
output channels (a bias, batch-norm statistics) and whether it keeps its input's channels
(a batch norm, a depthwise convolution: channel ``c`` in is channel ``c`` out) or consumes
them and produces new ones (a convolution, a linear layer). Channel coupling
(:mod:`passes.channels`), coupled pruning, the removal of pruned channels at lowering and the
weights' channel axes all read the same rule, so a layer type registered here is handled by
all of them.

Rules for ``torch.nn``'s ``Conv1d/2d/3d``, ``Linear`` and ``BatchNorm1d/2d/3d`` are built in;
:func:`register_channel_rule` adds others (subclasses inherit their base's rule):

>>> class MyConv(nn.Module):            # weight (out, in, k, k), bias (out,)
...     def forward(self, x):
...         return F.conv2d(x, self.weight, self.bias, padding=1)
>>> register_channel_rule(MyConv, ChannelRule())   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

from passes.errors import ChannelRuleError

__all__ = ["ChannelRule", "ChannelRuleError", "register_channel_rule", "rule_for", "ruled_classes", "CHANNEL_RULES"]


@dataclass(frozen=True)
class ChannelRule:
    """How a layer's channels are laid out (see the module doc).

    Attributes:
        in_channels: name of the module attribute holding the number of input channels;
            ``None``: the weight's size along ``in_axis`` times the groups.
        out_channels: name of the attribute holding the number of output channels;
            ``None``: the weight's size along ``out_axis``.
        groups: name of the attribute holding the number of convolution groups (``None``: 1).
            A layer with ``groups == in_channels == out_channels`` (depthwise) keeps its
            input's channels; with other ``groups > 1`` its weight holds ``in/groups`` input
            channels along ``in_axis``, the filters of group ``j`` reading input channels
            ``j·in/g .. (j+1)·in/g − 1``.
        out_axis: the weight axis of the output channels.
        in_axis: the weight axis of the input channels; ``None`` for an element-wise layer.
        per_channel: other tensors (parameters or buffers, axis 0) with one entry per output
            channel, pruned and removed with the filters: a bias, batch-norm statistics.
        elementwise: channel ``c`` of the output depends on channel ``c`` of the input only
            (a batch norm): the layer keeps its input's channels.
        input_rank: the rank of the input the layer reads channels from dim 1 of: ``2`` for a
            linear layer (``(N, C)``, or a flattened ``(N, C, *spatial)`` map, channel-major);
            ``None``: any rank ≥ 2 with channels on dim 1 (a convolution).
    """

    in_channels: str | None = None
    out_channels: str | None = None
    groups: str | None = None
    out_axis: int = 0
    in_axis: int | None = 1
    per_channel: tuple[str, ...] = ("bias",)
    elementwise: bool = False
    input_rank: int | None = None

    def problems(self) -> list[str]:
        """What is malformed in this rule (empty when it is well formed)."""
        out = []
        for name in ("in_channels", "out_channels", "groups"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.isidentifier()):
                out.append(f"{name}: expected an attribute name or None, got {value!r}")
        if isinstance(self.out_axis, bool) or not isinstance(self.out_axis, int) or self.out_axis < 0:
            out.append(f"out_axis: expected a non-negative int, got {self.out_axis!r}")
        if self.in_axis is not None and (isinstance(self.in_axis, bool) or not isinstance(self.in_axis, int) or self.in_axis < 0):
            out.append(f"in_axis: expected a non-negative int or None, got {self.in_axis!r}")
        elif self.in_axis is not None and self.in_axis == self.out_axis:
            out.append(f"in_axis: must differ from out_axis ({self.out_axis})")
        if self.in_axis is None and not self.elementwise:
            out.append("in_axis: None is for element-wise layers (elementwise=True); a layer that reads input channels needs their axis")
        if not isinstance(self.per_channel, tuple) or not all(isinstance(n, str) and n.isidentifier() for n in self.per_channel):
            out.append(f"per_channel: expected a tuple of attribute names, got {self.per_channel!r}")
        if not isinstance(self.elementwise, bool):
            out.append(f"elementwise: expected a bool, got {self.elementwise!r}")
        if self.input_rank is not None and (
            isinstance(self.input_rank, bool) or not isinstance(self.input_rank, int) or self.input_rank < 2
        ):
            out.append(f"input_rank: expected an int ≥ 2 or None, got {self.input_rank!r}")
        return out

    # reading a module ---------------------------------------------------------------
    def _weight(self, module: nn.Module) -> Tensor:
        """The weight whose shape gives channel counts: of a parametrized weight the original,
        whose shape the parametrizations keep (reading ``module.weight`` would compute them,
        which a model being loaded cannot do between slicing its originals and the rest).
        A lowered weight's original is empty: then its decoded value."""
        if torch_parametrize.is_parametrized(module, "weight"):
            original = module.parametrizations["weight"].original
            if original.numel():
                return original
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ChannelRuleError(f"{type(module).__name__}: its channel rule reads the channels from a weight, and it has none")
        return weight

    def _read(self, module: nn.Module, name: str) -> int:
        value = getattr(module, name, None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ChannelRuleError(f"{type(module).__name__}: its channel rule names attribute {name!r}, which is {value!r}, not an int")
        return value

    def group_count(self, module: nn.Module) -> int:
        """The module's convolution groups (1 without a ``groups`` attribute)."""
        return 1 if self.groups is None else self._read(module, self.groups)

    def out_count(self, module: nn.Module) -> int:
        """The module's number of output channels."""
        if self.out_channels is not None:
            return self._read(module, self.out_channels)
        return int(self._axis_size(module, self.out_axis))

    def in_count(self, module: nn.Module) -> int:
        """The module's number of input channels."""
        if self.in_channels is not None:
            return self._read(module, self.in_channels)
        if self.in_axis is None:
            return self.out_count(module)
        return int(self._axis_size(module, self.in_axis)) * self.group_count(module)

    def _axis_size(self, module: nn.Module, axis: int) -> int:
        weight = self._weight(module)
        if axis >= weight.dim():
            raise ChannelRuleError(
                f"{type(module).__name__}: its channel rule puts channels on weight axis {axis}, weight shape {tuple(weight.shape)}"
            )
        return weight.shape[axis]

    def keeps_channels(self, module: nn.Module) -> bool:
        """Whether output channel ``c`` depends on input channel ``c`` only (a batch norm, a
        depthwise convolution): the layer follows its input's channels."""
        if self.elementwise:
            return True
        groups = self.group_count(module)
        return groups > 1 and groups == self.in_count(module) == self.out_count(module)

    def follower_tensors(self, module: nn.Module) -> list[str]:
        """The tensors of a layer that keeps its input's channels indexed by those channels
        (axis 0): its weight, then :attr:`per_channel`."""
        return [name for name in ("weight", *self.per_channel) if isinstance(getattr(module, name, None), Tensor)]

    def weight_out_axis(self, module: nn.Module) -> int:
        """The weight axis indexed by the module's output channels: :attr:`out_axis`, or 0
        for a layer that keeps its input's channels (a depthwise kernel, a norm's scale)."""
        return 0 if self.keeps_channels(module) else self.out_axis

    # slicing ------------------------------------------------------------------------
    def slice_weight(self, module: nn.Module, weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
        """``weight`` with only the kept output and input channels (``None``: all).

        Of a grouped layer, the filters of group ``j`` keep their own kept inputs among
        ``j·in/g .. (j+1)·in/g − 1``; every group must keep as many.
        """
        keeps = self.keeps_channels(module)
        out_axis = self.weight_out_axis(module)
        if out_idx is not None and weight.dim() > out_axis:
            weight = weight.index_select(out_axis, out_idx.to(weight.device))
        if in_idx is None or keeps or self.in_axis is None or weight.dim() <= self.in_axis:
            return weight
        in_idx = in_idx.to(weight.device)
        groups = self.group_count(module)
        if groups == 1:
            return weight.index_select(self.in_axis, in_idx)
        moved = weight.movedim((self.out_axis, self.in_axis), (0, 1))
        return _slice_grouped_inputs(moved, groups, in_idx).movedim((0, 1), (self.out_axis, self.in_axis))

    def shrink(self, module: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
        """Keep only the given channels of the module's :attr:`per_channel` tensors and set
        its channel-count attributes (its weight is sliced by :meth:`slice_weight`)."""
        if out_idx is not None:
            for name in self.per_channel:
                _slice_tensor(module, name, out_idx)
        if self.keeps_channels(module):
            count = len(out_idx) if out_idx is not None else None
            depthwise = not self.elementwise
            for attr in (self.in_channels, self.out_channels, self.groups if depthwise else None):
                if attr is not None and count is not None:
                    setattr(module, attr, count)
            return
        if out_idx is not None and self.out_channels is not None:
            setattr(module, self.out_channels, len(out_idx))
        if in_idx is not None and self.in_channels is not None:
            setattr(module, self.in_channels, len(in_idx))


def _slice_grouped_inputs(weight: Tensor, groups: int, in_idx: Tensor) -> Tensor:
    """``weight`` laid out ``(out, in/g, ...)``: group ``j``'s filters keep their kept inputs."""
    rows, per_group = weight.shape[0] // groups, weight.shape[1]
    parts = []
    for j in range(groups):
        local = in_idx[(in_idx >= j * per_group) & (in_idx < (j + 1) * per_group)] - j * per_group
        parts.append(weight[j * rows : (j + 1) * rows].index_select(1, local))
    if len({part.shape[1] for part in parts}) != 1:
        counts = [part.shape[1] for part in parts]
        raise ChannelRuleError(f"channel removal: a grouped convolution must keep as many input channels in every group, got {counts}")
    return torch.cat(parts)


def _slice_tensor(module: nn.Module, name: str, idx: Tensor) -> None:
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        return
    sliced = value.detach().index_select(0, idx.to(value.device))
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(sliced, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = sliced


_CONV = ChannelRule(in_channels="in_channels", out_channels="out_channels", groups="groups")
_NORM = ChannelRule(
    in_channels="num_features",
    out_channels="num_features",
    in_axis=None,
    per_channel=("bias", "running_mean", "running_var"),
    elementwise=True,
)

CHANNEL_RULES: dict[type, ChannelRule] = {
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.Linear: ChannelRule(in_channels="in_features", out_channels="out_features", input_rank=2),
    nn.BatchNorm1d: _NORM,
    nn.BatchNorm2d: _NORM,
    nn.BatchNorm3d: _NORM,
}
"""Module class → its rule. :func:`rule_for` looks a module's class up along its MRO."""


def register_channel_rule(cls: type, rule: ChannelRule) -> None:
    """Register ``rule`` for module class ``cls`` and its subclasses (replacing an earlier one).

    Raises:
        ChannelRuleError: ``cls`` is not an ``nn.Module`` subclass, or ``rule`` is not a
            well-formed :class:`ChannelRule` (the message lists what is wrong).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ChannelRuleError(f"register_channel_rule: expected an nn.Module subclass, got {cls!r}")
    if not isinstance(rule, ChannelRule):
        raise ChannelRuleError(f"register_channel_rule: expected a ChannelRule, got {type(rule).__name__}")
    problems = rule.problems()
    if problems:
        raise ChannelRuleError(f"register_channel_rule: the rule for {cls.__name__} is malformed: {'; '.join(problems)}")
    CHANNEL_RULES[cls] = rule


def rule_for(module: nn.Module | type | None) -> ChannelRule | None:
    """The rule of the module's (or class's) nearest registered class in its MRO; ``None``."""
    if module is None:
        return None
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        rule = CHANNEL_RULES.get(base)
        if rule is not None:
            return rule
    return None


def ruled_classes(model: nn.Module) -> list[type]:
    """The classes of ``model``'s submodules whose rule was registered for a class outside
    ``torch.nn`` (a layer of one's own, or its subclass): a tracer keeps them as leaves, so
    that the channel passes see each call as one layer. (``torch.nn``'s layers are leaves
    anyway; a subclass of one defined elsewhere is traced through, as before it had a rule.)"""
    found = {type(m) for m in model.modules() if not _registered_in_torch(type(m))}
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _registered_in_torch(cls: type) -> bool:
    """Whether the nearest class of ``cls``'s MRO with a rule is one of ``torch.nn``'s (or none has one)."""
    base = next((b for b in cls.__mro__ if b in CHANNEL_RULES), None)
    return base is None or base.__module__.startswith("torch.nn.")
