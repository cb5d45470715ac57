"""The stage module inserted after a graph node: the ops of one activation site."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from fxqp.ops import accelerate
from fxqp.ops.base import ScheduledOp
from fxqp.ops.quantize import check_floating

__all__ = ["ActivationStage", "stage_inputs"]


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


def stage_inputs(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Per activation stage of ``model`` (by module path): the shape and dtype of the tensor
    it reads in one forward of ``model(*args, **kwargs)`` without gradients (its first call,
    for a stage called twice). Errors of the forward propagate."""
    seen: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def hook(path: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                seen.setdefault(path, (inputs[0].shape, inputs[0].dtype))

        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in model.named_modules() if isinstance(m, ActivationStage)]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen
