"""Op modules and the registry that builds one from a spec op and a site.

Handlers are found by ``(type(config), site.kind)`` in a registry — no ``isinstance``
ladder — so a new op kind registers its own handlers with :func:`register_op`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from fxqp.errors import SpecError
from fxqp.ops.base import ScheduledOp
from fxqp.ops.lowbit import (
    BinaryWeightQuantizer,
    DorefaActivationQuantizer,
    DorefaWeightQuantizer,
    Pow2ActivationQuantizer,
    Pow2WeightQuantizer,
    TernaryWeightQuantizer,
)
from fxqp.ops.prune import ActivationPruner, WeightPruner
from fxqp.ops.quantize import ActivationQuantizer, LsqQuantizer, WeightQuantizer
from fxqp.spec import Prune, Quantize

__all__ = [
    "ScheduledOp",
    "WeightQuantizer",
    "ActivationQuantizer",
    "LsqQuantizer",
    "Pow2WeightQuantizer",
    "DorefaWeightQuantizer",
    "BinaryWeightQuantizer",
    "TernaryWeightQuantizer",
    "Pow2ActivationQuantizer",
    "DorefaActivationQuantizer",
    "WeightPruner",
    "ActivationPruner",
    "register_op",
    "build_op",
]

Handler = Callable[..., ScheduledOp]
_HANDLERS: dict[tuple[type, str], Handler] = {}


def register_op(config_type: type, site_kind: str) -> Callable[[Handler], Handler]:
    """Register ``handler(config, site, weight)`` building the module of an op for a site kind."""

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[(config_type, site_kind)] = handler
        return handler

    return decorate


def build_op(config: Any, site: Any, weight: Tensor | None = None) -> ScheduledOp:
    """Build the op module of ``config`` for ``site`` (a :class:`fxqp.sites.Site`).

    Raises:
        SpecError: the op has no handler for this kind of site, or an option does not apply.
    """
    handler = _HANDLERS.get((type(config), site.kind))
    if handler is None:
        kinds = sorted({kind for (t, kind) in _HANDLERS if t is type(config)})
        raise SpecError(f"op {type(config).__name__} cannot be applied to {site.kind} sites (accepted: {', '.join(kinds)})")
    return handler(config, site, weight)


_WEIGHT_METHODS = {
    "uniform": WeightQuantizer,
    "pow2": Pow2WeightQuantizer,
    "dorefa": DorefaWeightQuantizer,
    "binary": BinaryWeightQuantizer,
    "ternary": TernaryWeightQuantizer,
}
_ACTIVATION_METHODS = {"uniform": ActivationQuantizer, "pow2": Pow2ActivationQuantizer, "dorefa": DorefaActivationQuantizer}


@register_op(Quantize, "weight")
def _weight_quantizer(config: Quantize, site: Any, weight: Tensor) -> ScheduledOp:
    per_channel = True if config.per_channel is None else config.per_channel
    axis = site.channel_axis if per_channel else None
    if config.learned or config.method == "lsq":
        return LsqQuantizer(config, site.name, weight=weight, channel_axis=axis)
    return _WEIGHT_METHODS[config.method](config, site.name, axis)


@register_op(Quantize, "activation")
def _activation_quantizer(config: Quantize, site: Any, weight: None) -> ScheduledOp:
    if config.per_channel:
        raise SpecError("per_channel: activation quantization is per tensor; accepted: null or false")
    if config.learned or config.method == "lsq":
        if config.symmetric and config.bits == 1:
            raise SpecError("bits: symmetric 1-bit activations are not supported; accepted: bits 2..16, or symmetric false")
        return LsqQuantizer(config, site.name)
    if config.method not in _ACTIVATION_METHODS:
        accepted = ", ".join(repr(m) for m in _ACTIVATION_METHODS)
        raise SpecError(f"method: {config.method!r} quantizes weights only; accepted for activations: {accepted}, 'lsq'")
    if config.method == "uniform" and config.symmetric and config.bits == 1:
        raise SpecError("bits: symmetric 1-bit activations are not supported; accepted: bits 2..16, or symmetric false")
    return _ACTIVATION_METHODS[config.method](config, site.name)


@register_op(Prune, "weight")
def _weight_pruner(config: Prune, site: Any, weight: Tensor) -> ScheduledOp:
    return WeightPruner(config, site.name, weight.shape, weight.device, site.channel_axis)


@register_op(Prune, "activation")
def _activation_pruner(config: Prune, site: Any, weight: None) -> ScheduledOp:
    if config.structure != "element":
        raise SpecError(
            f"structure: {config.structure!r} prunes weights; activations accept 'element' (and granularity='channel' for channels)"
        )
    return ActivationPruner(config, site.name)
