"""The forward of a weight's parametrization list with fxqp ops, which fuses a pruner and the
quantizer after it eagerly; and the parametrization of a weight tied to another module's."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from fxqp.ops import accelerate

__all__ = ["WeightChain", "fuse_weight_chain", "TiedWeight", "is_tied"]


class WeightChain:
    """The ``forward`` of ``module.parametrizations.weight``, torch's ``ParametrizationList``,
    for a weight with fxqp ops (set by :func:`fuse_weight_chain`): reads as
    ``p_n(...p_1(w))``, exactly as the list's own ``forward``.

    Eagerly, runs of ops that an accelerator computes faster (:mod:`fxqp.ops.accelerate`: a
    pruner followed by a quantizer on the native kernels is one op ``Q(w·m)`` with gradient
    ``g·m``, one pass over memory for a per-channel grid) run through it; the values are the
    same. Under torch.compile the ops run one after the other. The plan of runs is made
    when the transform attaches the chain (:func:`fuse_weight_chain`).
    """

    def __init__(self, chain: ParametrizationList) -> None:
        self.chain = chain

    def __call__(self) -> Tensor:
        chain = self.chain
        if not chain.is_tensor:
            return ParametrizationList.forward(chain)
        return accelerate.run_chain(chain, chain, chain.original)


def fuse_weight_chain(module: nn.Module, name: str = "weight") -> None:
    """Give ``module.parametrizations[name]`` (the list torch's ``register_parametrization``
    built) a :class:`WeightChain` as its ``forward``: an attribute of that one list, as any
    module's ``forward`` may be replaced; torch's class is left as it is. Copies (deep
    copies, pickling) carry it with the list."""
    chain = module.parametrizations[name]
    chain.forward = WeightChain(chain)
    accelerate.planned(chain, chain)


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
