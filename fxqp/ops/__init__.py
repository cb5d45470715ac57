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
from fxqp.rules import prune_site_problem, quantize_site_problem
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


# the quantizer class of each method, per kind of site (what each accepts: fxqp.rules)
_WEIGHT_METHODS = {
    "uniform": WeightQuantizer,
    "pow2": Pow2WeightQuantizer,
    "dorefa": DorefaWeightQuantizer,
    "binary": BinaryWeightQuantizer,
    "ternary": TernaryWeightQuantizer,
}
_ACTIVATION_METHODS = {"uniform": ActivationQuantizer, "pow2": Pow2ActivationQuantizer, "dorefa": DorefaActivationQuantizer}


def _check_site(config: Any, site: Any) -> None:
    """Raise the :mod:`fxqp.rules` reason why ``config`` does not go on a site of this kind."""
    problem = (quantize_site_problem if isinstance(config, Quantize) else prune_site_problem)(config, site.kind)
    if problem is not None:
        raise SpecError(f"{problem[0]}: {problem[1]}")


@register_op(Quantize, "weight")
def _weight_quantizer(config: Quantize, site: Any, weight: Tensor) -> ScheduledOp:
    _check_site(config, site)
    per_channel = True if config.per_channel is None else config.per_channel
    axis = site.channel_axis if per_channel else None
    if config.learned or config.method == "lsq":
        return LsqQuantizer(config, site.name, weight=weight, channel_axis=axis)
    return _WEIGHT_METHODS[config.method](config, site.name, axis)


@register_op(Quantize, "activation")
def _activation_quantizer(config: Quantize, site: Any, weight: None) -> ScheduledOp:
    _check_site(config, site)
    if config.learned or config.method == "lsq":
        return LsqQuantizer(config, site.name)
    return _ACTIVATION_METHODS[config.method](config, site.name)


@register_op(Prune, "weight")
def _weight_pruner(config: Prune, site: Any, weight: Tensor) -> ScheduledOp:
    _check_site(config, site)
    return WeightPruner(config, site.name, weight.shape, weight.device, site.channel_axis)


@register_op(Prune, "activation")
def _activation_pruner(config: Prune, site: Any, weight: None) -> ScheduledOp:
    _check_site(config, site)
    return ActivationPruner(config, site.name)
