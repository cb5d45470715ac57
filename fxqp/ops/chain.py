"""The parametrization list of a weight with fxqp ops, which fuses a pruner and the
quantizer after it eagerly; and the parametrization of a weight tied to another module's."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from fxqp.ops.base import ScheduledOp, eager

__all__ = ["WeightChain", "fuse_weight_chain", "TiedWeight", "is_tied"]


class WeightChain(ParametrizationList):
    """``module.parametrizations.weight`` of a weight with fxqp ops: reads as
    ``p_n(...p_1(w))``, exactly as torch's ``ParametrizationList``.

    Eagerly, each op may run fused with the next one (:meth:`ScheduledOp.fused_forward`: a
    pruner followed by a quantizer on the native kernels is one op ``Q(w·m)`` with gradient
    ``g·m``, one pass over memory for a per-channel grid); the values are the same. Under
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
            fused = op.fused_forward(after, x) if isinstance(op, ScheduledOp) and isinstance(after, ScheduledOp) else None
            if fused is not None:
                x, i = fused, i + 2
            else:
                x, i = op(x), i + 1
        return x


def fuse_weight_chain(module: nn.Module, name: str = "weight") -> bool:
    """Make ``module.parametrizations[name]``, the ``ParametrizationList`` that torch's
    ``register_parametrization`` built, a :class:`WeightChain`; whether it did.

    fxqp's one class swap of a torch object: torch builds the list itself and has no way to
    be given a subclass, and :class:`WeightChain` adds a ``forward`` and nothing else (no
    state, no other method), so the list is the same object with the same attributes. The
    fusion it enables earns its place in the training step (docs/developers.md gives the
    figure). A list of any other class (a torch that builds its lists otherwise) is left as
    it is: the same values, one op after the other. ``tests/test_weight_chain.py`` fails
    when torch's lists change underneath.
    """
    chain = module.parametrizations[name]
    if type(chain) is not ParametrizationList:
        return False
    chain.__class__ = WeightChain
    return True


class TiedWeight(nn.Module):
    """The only parametrization of a weight that is the same ``Parameter`` as another
    module's (a language model's output layer tied to its token embedding): it reads that
    module's weight, through that module's op chain.

    A tied weight is one site with one op chain (that of the module listed first in the
    model) and one entry in an artifact; the other modules read it. ``source`` is held
    without being registered as a submodule (it is registered where it belongs).
    """

    def __init__(self, source: nn.Module, site: str) -> None:
        super().__init__()
        self.__dict__["source"] = source
        self.site = site

    def forward(self, original: Tensor) -> Tensor:
        return self.source.weight

    def extra_repr(self) -> str:
        return f"tied to {self.site}"


def is_tied(module: nn.Module) -> bool:
    """Whether ``module.weight`` is tied to another module's (its parametrization is a
    :class:`TiedWeight`): it has no op chain, site or artifact entry of its own."""
    return parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations["weight"][0], TiedWeight)
