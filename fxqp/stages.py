"""The stage module inserted after a graph node: the ops of one activation site."""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn

from fxqp.module_state import empty_module_list, init_module_state
from fxqp.ops import accelerate
from fxqp.ops.base import ScheduledOp
from fxqp.ops.quantize import check_floating

__all__ = ["ActivationStage"]


def _module_list(ops: Iterable[ScheduledOp]) -> nn.ModuleList:
    """``nn.ModuleList(ops)``, without ``add_module``'s checks of each key (``"0"``, ``"1"``,
    ...: always valid) that make up most of its cost when the transform builds thousands."""
    modules = empty_module_list()
    for index, op in enumerate(ops):
        if not isinstance(op, nn.Module):
            raise TypeError(f"ActivationStage ops must be nn.Module instances, got {type(op).__name__}")
        modules._modules[str(index)] = op
    return modules


class ActivationStage(nn.Module):
    """Applies the ops of one activation site in spec order: ``op_n(...op_1(x))``.

    Ops that break ties by the unquantized activation (a pruner after a quantizer) also get
    the stage input ``x`` as ``latent``. Eagerly, runs of ops that an accelerator computes
    faster (:mod:`fxqp.ops.accelerate`, planned when the stage is built) run through it,
    with the same values and gradients.

    Inserted by :func:`fxqp.transform` as a ``call_module`` node right after the node that
    produces the activation; every call site has its own stage, even when one module object
    is called several times.

    Attributes:
        site: the graph node name of the producer (``layer1_0_relu``, ``add_1``, ...).
        target: what the producer calls (``ReLU``, ``relu``, ``add``, ...).
    """

    def __init__(self, site: str, target: str, ops: Iterable[ScheduledOp]):
        init_module_state(self)
        self.__dict__.update(site=site, target=target)  # plain strings: no nn.Module bookkeeping
        self.ops = _module_list(ops)
        accelerate.planned(self, self.ops)  # runs of ops, accelerated or plain

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, self.site)
        return accelerate.run_chain(self, self.ops, x, latent=x)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, target={self.target!r}"
