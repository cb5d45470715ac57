"""The parametrization list of a weight with fxqp ops, which fuses a pruner and the
quantizer after it eagerly."""

from __future__ import annotations

from torch import Tensor
from torch.nn.utils.parametrize import ParametrizationList

from fxqp.ops.base import eager, forward_hooked
from fxqp.ops.prune import WeightPruner
from fxqp.ops.quantize import WeightQuantizer

__all__ = ["WeightChain"]


class WeightChain(ParametrizationList):
    """``module.parametrizations.weight`` of a weight with fxqp ops: reads as
    ``p_n(...p_1(w))``, exactly as torch's ``ParametrizationList``.

    Eagerly, a :class:`WeightPruner` directly followed by a :class:`WeightQuantizer` whose
    forward runs on the native kernels (:meth:`WeightQuantizer.runs_native`) is one fused op,
    ``Q(w·m)`` with gradient ``g·m`` (one pass over memory for a per-channel grid), instead of
    ``w·m`` followed by the quantizer's range and rounding; the values are the same. Under
    torch.compile, and for any other pair, the ops run one after the other.
    """

    def forward(self) -> Tensor:
        if not eager() or not self.is_tensor:
            return super().forward()
        x = self.original
        count, i = len(self), 0
        while i < count:
            op = self[i]
            after = self[i + 1] if i + 1 < count else None
            if (
                isinstance(op, WeightPruner)
                and isinstance(after, WeightQuantizer)
                and not forward_hooked(op, after)
                and after.started()
                and after.runs_native(x)
            ):
                x = after.quantize_native(x, op.eager_mask(x))
                i += 2
            else:
                x = op(x)
                i += 1
        return x
