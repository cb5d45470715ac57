"""The base class of every op module that the transform attaches to a site."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fxqp.errors import FxqpError
from fxqp.ops.state import set_state

__all__ = [
    "ScheduledOp",
    "compute_dtype",
    "eager",
    "host_value",
    "set_host_value",
    "mask_as",
    "forward_hooked",
    "TransientCache",
    "transient_cache",
]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the numerics run in: float32 for half types, else the input's own dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def eager() -> bool:
    """Whether this code runs eagerly (not being traced by torch.compile / torch.export).

    Eagerly, schedule decisions (is an op on, is a mask refresh due) are Python branches on
    host copies of the schedule buffers (:func:`host_value`): work that would be discarded is
    skipped, and no device sync is needed. Under compilation they are ``torch.where`` /
    ``torch.cond`` on the buffers themselves, so one graph serves the whole schedule.
    """
    return not (torch.compiler.is_compiling() or torch.jit.is_scripting())


def forward_hooked(*modules: nn.Module) -> bool:
    """Whether calling ``modules`` runs forward hooks (their own or global ones): then they
    must be called one by one, not fused into one op that would skip the hooks."""
    globals_ = nn.modules.module
    return bool(globals_._global_forward_hooks or globals_._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules
    )


class TransientCache(dict):
    """A module's cache of values derived from its tensors (host copies of scalar buffers,
    converted masks, reusable result memory): a copy of the module (``copy.deepcopy``,
    pickling, ``torch.save``) starts with an empty one.

    Entries are keyed by the identity and ``_version`` of the tensor they were derived from;
    a copied tensor starts at another version, which later writes could bring back to the
    cached one, so a carried-over entry could be taken for current. Nor is the cache worth
    copying or storing."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "TransientCache":
        return type(self)()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return type(self), ()


def transient_cache(owner: nn.Module, name: str) -> TransientCache:
    """The :class:`TransientCache` ``owner.<name>``, made empty on first use."""
    cache = owner.__dict__.get(name)
    if cache is None:
        cache = owner.__dict__[name] = TransientCache()
    return cache


def host_value(owner: nn.Module, name: str) -> int:
    """The value of the scalar buffer ``owner.<name>`` as a Python int, without a device sync
    in the steady state.

    The value is cached with the buffer object and its ``_version`` (bumped by every
    in-place write): it is read from the device again only after someone else wrote the
    buffer (``load_state_dict``, ``fill_``, ``.to()``, a deep copy). Writers that know the new
    value call :func:`set_host_value` so that even their own writes cost no read.
    """
    tensor = owner._buffers[name]
    cache = transient_cache(owner, "_host_cache")
    entry = cache.get(name)
    if entry is None or entry[0] is not tensor or entry[1] != tensor._version:
        entry = (tensor, tensor._version, int(tensor))
        cache[name] = entry
    return entry[2]


def mask_as(owner: nn.Module, name: str, dtype: torch.dtype) -> Tensor:
    """The bool buffer ``owner.<name>`` as ``dtype``, converted once per change of the mask.

    Multiplying by a bool mask converts it at every forward and backward; the converted copy
    is cached with the buffer object and its ``_version``, so a refresh, a state_dict load or
    a device move is picked up.
    """
    mask = owner._buffers[name]
    cache = transient_cache(owner, "_mask_cache")
    entry = cache.get(name)
    if entry is None or entry[0] is not mask or entry[1] != mask._version or entry[2].dtype != dtype:
        entry = (mask, mask._version, mask.to(dtype))
        cache[name] = entry
    return entry[2]


def set_host_value(owner: nn.Module, name: str, value: int) -> None:
    """Write ``value`` into the scalar buffer ``owner.<name>`` and into its host cache."""
    tensor = owner._buffers[name]
    tensor.fill_(value)
    transient_cache(owner, "_host_cache")[name] = (tensor, tensor._version, int(value))


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

    quantizes = False
    """The op maps its input onto a grid whose codes :meth:`encode` gives (lowering stores
    the codes of a weight's last active quantizer)."""

    prunes = False
    """The op multiplies its input by a 0/1 mask."""

    def link(self, chain: Sequence["ScheduledOp"], position: int, owner: nn.Module | None = None, name: str = "weight") -> None:
        """Wire this op into its site's chain of ops (``chain[position]`` is this op), once,
        when the transform attaches the chain: ``owner`` is the module whose tensor ``name``
        a weight chain parametrizes (``None`` for an activation stage). Nothing by default."""

    def fused_forward(self, after: "ScheduledOp", x: Tensor) -> Tensor | None:
        """Eagerly, ``after(self(x))`` in one step where this op and the next one of its chain
        run fused (the same values), else ``None``: they run one after the other."""
        return None

    def runs_native(self, x: Tensor) -> bool:
        """Whether this op's eager forward on ``x`` runs on the native kernels."""
        return False

    def __init__(self, config: Any, site: str):
        super().__init__()
        self.set_plain(config=config, site=site)
        self.add_buffers(start=torch.full((), int(config.start), dtype=torch.int64))
        self.__dict__["_schedule"] = None

    def add_buffers(self, *, persistent: bool = True, **tensors: Tensor) -> None:
        """Register ``tensors`` as buffers under the given names (in ``state_dict`` when
        ``persistent``), or replace the buffers of those names: ``register_buffer`` for
        each, without its per-name checks (:func:`fxqp.ops.state.set_state`). Only for the
        fixed buffer names of the op classes themselves."""
        set_state(self, tensors, persistent=persistent)

    def set_plain(self, **values: Any) -> None:
        """Set plain attributes (flags, ints, configs: never a tensor or a module):
        ``self.name = value`` for each, without ``nn.Module.__setattr__``'s search of the
        parameter, buffer and submodule dicts (:func:`fxqp.ops.state.set_state`)."""
        set_state(self, plain=values)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        """Moves (``.to(device)``, ``.cuda()``, ``.to(memory_format=...)``) apply to the op's
        state as to any module's; dtype casts (``.to(torch.bfloat16)``, ``.half()``,
        ``.double()``, ``.type(...)``) do not: the state keeps the dtypes the transform gave
        it, whatever the model's dtype. Observers and moving averages stay float32 (in
        bfloat16 a moving average with momentum 0.1 stops moving once the batch statistics
        are within about 2% of it), LSQ's grid bounds stay exact (2^15 - 1 is not a
        bfloat16 value) and its learned step sizes float32, masks stay bool and counters
        int64; the ops compute in
        :func:`compute_dtype` of their input either way. So a model cast after
        ``fxqp.transform`` holds the same op state as one transformed after the cast."""

        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)  # a cast's result is only looked at: the state is moved, not rounded
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def bind(self, schedule: nn.Module) -> None:
        """Attach the model's schedule, whose ``step`` buffer drives this op."""
        self.__dict__["_schedule"] = schedule

    @property
    def step(self) -> Tensor:
        """The model's step counter (an int64 scalar tensor)."""
        schedule = self.__dict__["_schedule"]
        if schedule is None:
            raise FxqpError(
                f"op {type(self).__name__} of site {self.site!r} is not bound to a schedule; ops are created and bound by fxqp.transform"
            )
        return schedule.step

    def active(self) -> Tensor:
        """Boolean scalar tensor: ``step >= start``."""
        return self.step >= self.start

    def host_step(self) -> int:
        """The model's step as a Python int (see :func:`host_value`)."""
        return host_value(self.__dict__["_schedule"], "step")

    def started(self) -> bool:
        """Eager-mode ``step >= start`` on the host."""
        return self.host_step() >= self.config.start

    def describe(self) -> dict[str, Any]:
        """Facts for reports: op text, bits, target and actual sparsity, start and end."""
        return {"op": self.config.kind, "start": int(self.config.start)}

    def extra_repr(self) -> str:
        return f"site={self.site!r}, config={self.config!r}"
