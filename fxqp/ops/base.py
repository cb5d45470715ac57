"""The base class of every op module that the transform attaches to a site."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fxqp.errors import FxqpError

__all__ = ["ScheduledOp", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the numerics run in: float32 for half types, else the input's own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class ScheduledOp(nn.Module):
    """An op (quantizer or pruner) of one site, switched on by the model's step counter.

    All schedule state is in buffers: ``start`` (and ``end`` where the op has one) here, the
    step counter in the model's :class:`fxqp.schedule.Schedule`, to which the op holds a plain
    (unregistered) reference set by :meth:`bind`. Before ``start`` the op is the identity.

    Attributes:
        config: the spec op (``Quantize`` / ``Prune``) this module implements.
        site: the site name (parameter path for weights, graph node name for activations).
    """

    wants_latent = False
    """Activation ops set this to receive the stage input as ``forward(x, latent)``."""

    def __init__(self, config: Any, site: str):
        super().__init__()
        self.config = config
        self.site = site
        self.register_buffer("start", torch.tensor(int(config.start), dtype=torch.int64))
        self.__dict__["_schedule"] = None

    def bind(self, schedule: nn.Module) -> None:
        """Attach the model's schedule, whose ``step`` buffer drives this op."""
        self.__dict__["_schedule"] = schedule

    @property
    def step(self) -> Tensor:
        """The model's step counter (an int64 scalar tensor)."""
        schedule = self.__dict__["_schedule"]
        if schedule is None:
            raise FxqpError(
                f"op {type(self).__name__} of site {self.site!r} is not bound to a schedule; "
                "ops are created and bound by fxqp.transform"
            )
        return schedule.step

    def active(self) -> Tensor:
        """Boolean scalar tensor: ``step >= start``."""
        return self.step >= self.start

    def skip_when_not(self, due: Tensor) -> bool:
        """Whether work guarded by the scalar ``due`` can be skipped.

        In eager mode, a Python check of ``due`` (one scalar read) skips work such as a mask
        refresh that would be discarded by ``torch.where``; under torch.compile the check is
        never made, so the compiled graph stays free of data-dependent branches.
        """
        return not torch.compiler.is_compiling() and not bool(due)

    def describe(self) -> dict[str, Any]:
        """Facts for reports: op text, bits, target and actual sparsity, start and end."""
        return {"op": self.config.kind, "start": int(self.config.start)}

    def extra_repr(self) -> str:
        return f"site={self.site!r}, config={self.config!r}"
