"""The parametrization list of a weight with fxqp ops, which fuses a pruner and the
quantizer after it eagerly; and the parametrization of a weight tied to another module's."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from fxqp.ops import accelerate

__all__ = ["WeightChain", "TiedWeight", "is_tied"]


class WeightChain(ParametrizationList):
    """``module.parametrizations.weight`` of a weight with fxqp ops: reads as
    ``p_n(...p_1(w))``, exactly as torch's ``ParametrizationList``.

    Eagerly, runs of ops that an accelerator computes faster (:mod:`fxqp.ops.accelerate`: a
    pruner followed by a quantizer on the native kernels is one op ``Q(w·m)`` with gradient
    ``g·m``, one pass over memory for a per-channel grid) run through it; the values are the
    same. Under torch.compile the ops run one after the other. The plan of runs is made
    when the transform attaches the chain (:meth:`plan_runs`).
    """

    def plan_runs(self) -> None:
        """Plan the runs of this chain's ops (:func:`fxqp.ops.accelerate.planned`)."""
        accelerate.planned(self, self)

    def forward(self) -> Tensor:
        if not self.is_tensor:
            return super().forward()
        return accelerate.run_chain(self, self, self.original)


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
