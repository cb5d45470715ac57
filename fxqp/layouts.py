"""What fxqp knows of a layer type's channels: weight layouts and channel rules.

Per-channel quantization scales, filter pruning and the packed artifact all work per output
channel. ``torch.nn`` keeps them on axis 0 (``Conv``, ``Linear``, ``Embedding``) or 1
(``ConvTranspose``); other libraries differ: Hugging Face's ``Conv1D`` (GPT-2) stores its
weight as ``(in, out)``. Two registries say so, looked up along a class's MRO:

* a :class:`~passes.layers.ChannelRule` (:func:`register_channel_rule`) is everything the
  channel passes need to prune a layer type's filters across layers and remove them at
  lowering: channel counts, weight axes, groups, the per-channel tensors that follow the
  filters. ``Conv``, ``Linear`` and ``BatchNorm`` have one built in; its ``out_axis`` is the
  weight's channel axis;
* a weight layout (:func:`register_weight_layout`) gives the output-channel axis only, for a
  class by object or by qualified name, so that its library need not be imported.

Classes neither knows use axis 0.

>>> import fxqp
>>> fxqp.register_weight_layout("mylib.layers.TransposedLinear", channel_axis=1)
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from fxqp.errors import ChannelRuleError, SpecError
from passes import ChannelRule
from passes import ChannelRuleError as PassChannelRuleError
from passes.layers import CHANNEL_RULES
from passes.layers import register_channel_rule as register_rule

__all__ = ["register_weight_layout", "register_channel_rule", "channel_axis_of", "ChannelRule", "WEIGHT_LAYOUTS"]

WEIGHT_LAYOUTS: dict[str, int] = {
    "torch.nn.modules.conv._ConvTransposeNd": 1,
    "transformers.pytorch_utils.Conv1D": 1,
}
"""Qualified class name → output-channel axis of its ``weight``."""


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_weight_layout(cls: type | str, channel_axis: int) -> None:
    """Declare that ``cls`` (a module class or its qualified name, ``"pkg.module.Class"``)
    and its subclasses keep the output channels of their ``weight`` on ``channel_axis``.

    Raises:
        SpecError: ``cls`` is neither an ``nn.Module`` subclass nor a dotted name, or
            ``channel_axis`` is not a non-negative int.
    """
    if isinstance(cls, type):
        if not issubclass(cls, nn.Module):
            raise SpecError(f"register_weight_layout: {cls.__name__} is not an nn.Module subclass")
        key = _qualified(cls)
    elif isinstance(cls, str) and "." in cls.strip("."):
        key = cls
    else:
        raise SpecError(
            f"register_weight_layout: expected an nn.Module subclass or a qualified class name such as 'pkg.module.Class', got {cls!r}"
        )
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int) or channel_axis < 0:
        raise SpecError(f"register_weight_layout: channel_axis: expected a non-negative int, got {channel_axis!r}")
    WEIGHT_LAYOUTS[key] = channel_axis


def channel_axis_of(module: nn.Module | type, weight_shape: Sequence[int]) -> int | None:
    """Output-channel axis of a module's (or module class's) weight of ``weight_shape``: from
    the channel rule or weight layout of the class or its nearest registered base, else 0;
    None for a 1-D weight.

    Raises:
        SpecError: the registered axis does not exist in a weight of this shape.
    """
    if len(weight_shape) < 2:
        return None
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        rule = CHANNEL_RULES.get(base)
        axis = rule.out_axis if rule is not None else WEIGHT_LAYOUTS.get(_qualified(base))
        if axis is not None:
            if axis >= len(weight_shape):
                raise SpecError(
                    f"weight layout of {_qualified(cls)}: channel axis {axis} does not exist in a weight of shape {tuple(weight_shape)}"
                )
            return axis
    return 0


def register_channel_rule(cls: type, rule: ChannelRule) -> None:
    """Make a layer type of one's own prunable like a convolution: ``rule`` says how the
    channels of ``cls`` (and of its subclasses) are laid out.

    With the rule, filter pruning (``Prune(structure="filter")`` and ``"channel"``) couples
    the layer's channels with the layers around it (:mod:`passes.channels`), the group's
    masks zero its bias and other per-channel tensors, lowering removes the pruned channels
    from it, and its weight's channel axis is the rule's ``out_axis``. Registered classes
    are kept as one call (a leaf) when a model is traced, so that the analysis sees the
    layer rather than the functions its ``forward`` calls. Register before
    :func:`fxqp.transform`.

    Args:
        cls: an ``nn.Module`` subclass.
        rule: a :class:`~passes.layers.ChannelRule` (``fxqp.ChannelRule``): the attributes
            holding the channel counts and groups (or ``None``: read off the weight's
            shape), the weight's output and input axes, the per-output-channel tensors
            (``per_channel``, default ``("bias",)``), whether the layer keeps its input's
            channels (``elementwise``, a norm) and the rank of the input it reads
            (``input_rank=2`` for a linear layer).

    Raises:
        ChannelRuleError: ``cls`` is not an ``nn.Module`` subclass, or ``rule`` is not a
            well-formed ``ChannelRule`` (the message lists each malformed field and what it
            accepts).

    Example:
        A convolution written with its own weight (``(out, in, k, k)``) and bias::

            class MyConv(nn.Module):
                def __init__(self, n_in, n_out):
                    super().__init__()
                    self.weight = nn.Parameter(torch.randn(n_out, n_in, 3, 3) / 3)
                    self.bias = nn.Parameter(torch.zeros(n_out))

                def forward(self, x):
                    return F.conv2d(x, self.weight, self.bias, padding=1)

            fxqp.register_channel_rule(MyConv, fxqp.ChannelRule())  # the defaults: axes 0 and 1, bias
            fxqp.register_channel_rule(MyLinear, fxqp.ChannelRule(in_channels="n_in", out_channels="n_out", input_rank=2))
    """
    try:
        register_rule(cls, rule)
    except PassChannelRuleError as err:
        raise ChannelRuleError(str(err)) from None
