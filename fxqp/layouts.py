"""Weight layouts: along which axis a module class keeps its output channels.

Per-channel quantization scales, filter pruning and the packed artifact all work per output
channel. ``torch.nn`` keeps them on axis 0 (``Conv``, ``Linear``, ``Embedding``) or 1
(``ConvTranspose``); other libraries differ: Hugging Face's ``Conv1D`` (GPT-2) stores its
weight as ``(in, out)``. The registry maps a class — by object or by qualified name, so that
the library need not be imported — to that axis; subclasses inherit it. Classes it does not
know use axis 0.

>>> import fxqp
>>> fxqp.register_weight_layout("mylib.layers.TransposedLinear", channel_axis=1)
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from fxqp.errors import SpecError

__all__ = ["register_weight_layout", "channel_axis_of", "WEIGHT_LAYOUTS"]

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
    the registry for the class or its nearest registered base, else 0; None for a 1-D weight.

    Raises:
        SpecError: the registered axis does not exist in a weight of this shape.
    """
    if len(weight_shape) < 2:
        return None
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        axis = WEIGHT_LAYOUTS.get(_qualified(base))
        if axis is not None:
            if axis >= len(weight_shape):
                raise SpecError(
                    f"weight layout of {_qualified(cls)}: channel axis {axis} does not exist in a weight of shape {tuple(weight_shape)}"
                )
            return axis
    return 0
