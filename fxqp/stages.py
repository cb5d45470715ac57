"""The stage module inserted after a graph node: the ops of one activation site."""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn

from fxqp.ops import accelerate
from fxqp.ops.base import ScheduledOp
from fxqp.ops.quantize import check_floating

__all__ = ["ActivationStage"]


def _module_list(ops: Iterable[ScheduledOp]) -> nn.ModuleList:
    """``nn.ModuleList(ops)``, with a clear error for an op that is no module."""
    ops = list(ops)
    for op in ops:
        if not isinstance(op, nn.Module):
            raise TypeError(f"ActivationStage ops must be nn.Module instances, got {type(op).__name__}")
    return nn.ModuleList(ops)


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
        super().__init__()
        self.site = site
        self.target = target
        self.ops = _module_list(ops)
        accelerate.planned(self, self.ops)  # runs of ops, accelerated or plain

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, self.site)
        return accelerate.run_chain(self, self.ops, x, latent=x)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, target={self.target!r}"
