"""Pruner modules: the ``Prune`` op of the spec, for weight and activation sites.

Semantics (``s`` = target sparsity, ``t`` = the model's step, ``n`` = elements of the site):

* target at step ``t``: :func:`fxqp.ops.numerics.agp_sparsity` — 0 before ``start``, the
  cubic ramp ``s·(1 - (1 - (t - start)/(end - start))^3)`` between ``start`` and ``end``,
  ``s`` after; without ``end``, ``s`` from ``start`` on.
* weights: unstructured magnitude pruning of the op's input: the mask zeroes exactly
  ``round(s_t·n)`` elements with the smallest ``|input|``; ties go by ``|w|`` of the latent
  (unparametrized) weight, then by flat index. The mask is refreshed in training mode at
  ``start``, then every ``every`` steps, always at ``end``, and is frozen after ``end`` (with
  no ``end``: computed once at ``start``, then frozen). The output is ``input · mask``.
* activations (static, the seed's scheme): a moving average (momentum 0.1) of ``|x|``
  averaged over the batch, per element (``granularity="element"``, all dims but the first)
  or per channel (``"channel"``, dim 1) is kept in training mode, a batch folded in at the
  end of its forward (reduced across ranks when training is distributed,
  :mod:`fxqp.ops.statistics`); at refresh steps (as for weights, but not before a first
  batch has been folded in) the mask zeroes the ``round(s_t·n)`` smallest entries of the
  average of the batches before; the output is ``x · mask``.
* activations, ``dynamic=True``: in every sample the ``round(s_t·n)`` smallest ``|x|`` are
  zeroed (per-sample top-k), at every forward.

Gradients flow through kept elements only.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from fxqp.errors import SiteError
from fxqp.ops import clock, statistics
from fxqp.ops.base import ScheduledOp, compute_dtype
from fxqp.ops.numerics import magnitude_keep_mask, n_of_m_keep_mask, prune_count, quantization_angles
from fxqp.ops.quantize import EMA_MOMENTUM, check_floating
from fxqp.spec import n_of_m

__all__ = ["WeightPruner", "ActivationPruner", "RefreshSchedule"]


class _FlatMaskMultiply(torch.autograd.Function):
    """``w · m`` with the gradient ``g · m``, for ``m`` given flat as uint8 (0/1) twice: the
    mask buffer, which the forward reads, and this step's mask in a tensor of its own, which
    the backward keeps (:meth:`WeightPruner.update`; the same values).

    The buffer may be written by a later forward's refresh before this backward runs. Through
    a plain multiply by the weight-shaped view, Inductor keeps a copy of the mask in the
    weight's channels-last layout instead, written every step (docs/performance.md, "What
    makes it fast").
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, flat: Tensor, kept: Tensor) -> Tensor:
        ctx.save_for_backward(kept)
        return w * flat.view(w.shape)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (kept,) = ctx.saved_tensors
        return g * kept.view(g.shape), None, None


class RefreshSchedule(ScheduledOp):
    """Shared schedule of mask refreshes: buffers ``end``, ``every`` and ``next_refresh``."""

    def __init__(self, config: Any, site: str):
        super().__init__(config, site)
        end = -1 if config.end is None else int(config.end)
        self.add_buffers(
            end=torch.full((), end, dtype=torch.int64),
            every=torch.full((), int(config.every), dtype=torch.int64),
            next_refresh=torch.full((), int(config.start), dtype=torch.int64),
        )

    def target(self) -> Tensor:
        """Target sparsity at the current step (float64 scalar; :func:`fxqp.ops.clock.target`)."""
        return clock.target(self)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        extra = "" if cfg.end is None else f"→{cfg.end}"
        structure = getattr(cfg, "structure", "element")
        detail = "" if structure == "element" else f" {structure}" + ("" if n_of_m(structure) else f"/{cfg.criterion}")
        return {
            "op": f"prune({cfg.sparsity:g}{detail})",
            "sparsity": cfg.sparsity,
            "start": f"{cfg.start}{extra}",
        }


class _MaskedOp(RefreshSchedule):
    """A pruner with the bool buffer ``mask`` and its uint8 alias ``mask_bytes``.

    ``mask_bytes`` is a non-persistent buffer, ``mask.view(torch.uint8)``: the same memory
    and version counter, 0/1 values as uint8. Compiled graphs read and write it in place of
    ``mask``. Made outside the graph, it is a plain uint8 graph input; a view made inside
    the graph is a bitcast of the bool buffer, which Inductor's CPU code converts element by
    element (scalar code), and a write through it copies the whole buffer
    (docs/performance.md, "What makes it fast"). It follows ``mask`` when the buffer is
    replaced (assignment, ``load_state_dict(assign=True)``, ``.to()``, pickling and deep
    copies); ``state_dict`` holds ``mask`` only.
    """

    def _alias_mask(self) -> None:
        """(Re)make ``mask_bytes`` over the memory of the current ``mask``, which is made
        contiguous first (``model.to(memory_format=torch.channels_last)`` gives a convolution's
        mask channels-last strides, and the compiled refresh reads and writes it flat)."""
        mask = self._buffers["mask"]
        if not mask.is_contiguous():
            mask = self._buffers["mask"] = mask.contiguous()
        self.add_buffers(persistent=False, mask_bytes=mask.view(torch.uint8))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "mask":
            self._alias_mask()

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        self._alias_mask()  # fn made a separate copy of each buffer
        return self

    def __getstate__(self) -> dict[str, Any]:
        # the alias is made again on unpickling: torch.save cannot store two tensors of
        # different dtypes over the same memory
        state = self.__dict__.copy()
        state["_buffers"] = {name: t for name, t in self._buffers.items() if name != "mask_bytes"}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._alias_mask()


class WeightPruner(_MaskedOp):
    """Unstructured magnitude pruning of a weight; see module doc. Buffer ``mask`` (bool), and
    its uint8 alias ``mask_bytes``."""

    prunes = True

    def link(self, chain: Sequence[ScheduledOp], position: int, owner: nn.Module | None = None, name: str = "weight") -> None:
        """Know the parametrized weight (``owner.<name>``); after another op, break ties by
        the latent weight; with the ``angle`` criterion, compare with the chain's first
        quantizer (the spec guarantees one)."""
        if position > 0:
            self.use_latent_tiebreak(owner, name)
        else:
            self.attach_owner(owner, name)
        if self.config.criterion == "angle":
            self.use_quantizer(next(op for op in chain if op.quantizes))

    def __init__(self, config: Any, site: str, shape: torch.Size, device: torch.device | None = None, channel_axis: int | None = 0):
        super().__init__(config, site)
        self.add_buffers(mask=torch.ones(shape, dtype=torch.bool, device=device))
        self._alias_mask()
        self.__dict__["_owner"] = None  # (module, name) of the parametrized weight
        self.__dict__["_tiebreak"] = False
        self.__dict__["_quantizer"] = None
        ndim = len(shape)
        out_axis = None if channel_axis is None else channel_axis % max(ndim, 1)
        self.set_plain(out_axis=out_axis, in_axis=None if out_axis is None or ndim < 2 else 1 - out_axis)
        structure, pattern = config.structure, config.n_of_m
        if structure == "channel" or pattern is not None:
            if self.in_axis is None:
                raise SiteError(
                    f"site {site!r}: structure {structure!r} needs a weight with input channels (Conv, Linear), got shape {tuple(shape)}"
                )
        if structure == "filter" and self.out_axis is None:
            raise SiteError(f"site {site!r}: structure 'filter' needs a weight with output channels, got shape {tuple(shape)}")
        if pattern is not None:
            if shape[self.in_axis] % pattern.m:
                raise SiteError(
                    f"site {site!r}: structure {structure!r} needs the input dimension ({shape[self.in_axis]}) to be a multiple of {pattern.m}"
                )

    def attach_owner(self, module: nn.Module, name: str = "weight") -> None:
        """The module whose parametrized ``name`` this pruner belongs to (for the latent weight)."""
        self.__dict__["_owner"] = (module, name)

    def latent_weight(self) -> Tensor:
        """The latent (trained, unparametrized) weight of the site."""
        module, name = self.__dict__["_owner"]
        return module.parametrizations[name].original.detach()

    def use_group(self, group: nn.Module) -> None:
        """Take the filter mask from a coupled :class:`fxqp.groups.FilterGroup`."""
        self.__dict__["_group"] = group
        self.__dict__["_group_version"] = -1

    def use_channel_groups(self, segments: list[tuple[nn.Module, int, int]]) -> None:
        """Take the input-channel mask (``structure="channel"``) from coupled groups:
        ``(group, offset, repeat)`` per group read, which together cover every input
        channel; group channel ``j`` is input features ``(offset + j)·repeat .. + repeat − 1``."""
        self.__dict__["_channel_groups"] = list(segments)
        self.__dict__["_group_version"] = -1

    def use_quantizer(self, quantizer: nn.Module) -> None:
        """The site's quantizer, whose ``quantize`` the ``angle`` criterion compares with."""
        self.__dict__["_quantizer"] = quantizer

    def use_latent_tiebreak(self, module: nn.Module, name: str) -> None:
        """Break ties by the latent weight ``module.parametrizations[name].original``.

        Used when the pruner is not the first op of its site, e.g. ``Q(w)·m'``: many
        quantized values are equal, and the latent ``|w|`` orders them.
        """
        self.attach_owner(module, name)
        self.__dict__["_tiebreak"] = True

    def _latent_weight(self) -> Tensor | None:
        return self.latent_weight() if self.__dict__["_tiebreak"] else None

    def _keep(self, w: Tensor, latent: Tensor | None) -> Tensor:
        structure = self.config.structure
        if structure == "element":
            k = prune_count(self.target(), self.mask.numel())
            return magnitude_keep_mask(w.detach().abs(), k, tiebreak=None if latent is None else latent.abs())
        pattern = self.config.n_of_m
        if pattern is not None:
            return n_of_m_keep_mask(w.detach().abs(), pattern.n, pattern.m, self.in_axis)
        axis = self.out_axis if structure == "filter" else self.in_axis
        score = self.channel_scores(w.detach(), latent, axis)
        keep = magnitude_keep_mask(score, prune_count(self.target(), score.numel()))
        shape = [1] * w.dim()
        shape[axis] = score.numel()
        return keep.view(shape).expand(w.shape).contiguous()

    def channel_scores(self, x: Tensor, latent: Tensor | None, axis: int) -> Tensor:
        """Per filter/channel score, larger = kept first: ``Σ|w|``, ``‖w‖₂`` or ``−θ``."""
        dims = tuple([d for d in range(x.dim()) if d != axis])
        criterion = self.config.criterion
        if criterion == "l1":
            return x.abs().sum(dim=dims)
        if criterion == "l2":
            return x.pow(2).sum(dim=dims).sqrt()
        real = latent if latent is not None else x
        quantized = self.__dict__["_quantizer"].quantize(real.to(compute_dtype(real))).detach().to(real.dtype)
        return -quantization_angles(real, quantized, self.out_axis, self.in_axis, axis)

    def _from_group(self, group: nn.Module) -> Tensor:
        """The filter mask of a coupled group, refreshed first when due, broadcast over the
        weight."""
        group.refresh()
        view = [1] * self.mask.dim()
        view[self.out_axis] = group.keep.numel()
        return group.keep.view(torch.uint8).view(view).expand(self.mask.shape)

    def _from_channel_groups(self, segments: list[tuple[nn.Module, int, int]]) -> Tensor:
        """The input-channel mask of coupled groups, each refreshed first when due."""
        for group, _, _ in segments:
            group.refresh()
        parts = sorted(segments, key=lambda segment: segment[1])
        keep = torch.cat([group.keep.view(torch.uint8).repeat_interleave(repeat) for group, _, repeat in parts])
        view = [1] * self.mask.dim()
        view[self.in_axis] = keep.numel()
        return keep.view(view).expand(self.mask.shape)

    @torch.no_grad()
    def update(self, w: Tensor) -> Tensor:
        """This forward's mask, flat, as uint8 (0/1). In training mode the mask is refreshed
        first when due, and the result is a tensor of its own (a later forward's refresh
        may write the buffer before this forward's backward runs); in evaluation mode, and
        once the mask is frozen, it is the buffer ``mask_bytes``.

        A coupled group's mask is copied in at every training forward. An own mask is
        recomputed under :func:`fxqp.ops.clock.cond` on ``due``: the true branch computes the
        new mask (the sort runs only at a refresh) and writes it into ``mask_bytes`` in
        place, the false branch copies the mask. Under torch.compile a branch may write its
        operands in place only with gradients off, as here, and every tensor the branches
        read or write is an operand (closures over mutated buffers miscompile). The operands
        go in flat: a 1-D tensor has one layout, while a weight's layout is Inductor's
        choice (channels-last in a channels-last model, even after .contiguous()) and the
        branches are compiled for another one."""
        flat = self.mask_bytes.view(-1)
        if not self.training:
            return flat
        group = self.__dict__.get("_group")
        segments = self.__dict__.get("_channel_groups")
        if group is not None or segments is not None:
            keep = (self._from_group(group) if group is not None else self._from_channel_groups(segments)).reshape(-1)
            flat.copy_(keep)
            return keep
        if not clock.maybe(clock.live(self)):
            return flat  # frozen (known eagerly): never written again
        due = clock.due(self)
        latent = self._latent_weight()
        shape = w.shape
        operands = (flat, w.detach().reshape(-1)) + (() if latent is None else (latent.reshape(-1),))

        def recompute(mask, w, *latent):
            keep = self._keep(w.view(shape), latent[0].view(shape) if latent else None).view(torch.uint8).view(-1)
            mask.copy_(keep)
            return keep

        kept = clock.cond(due, recompute, lambda mask, w, *latent: mask.clone(), operands)
        clock.advance_refresh(self, due)
        return kept

    def forward(self, w: Tensor) -> Tensor:
        if self.training:
            return _FlatMaskMultiply.apply(w, self.mask_bytes.view(-1), self.update(w))
        return w * self.mask_bytes

    def actual_sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()


def _moving_average(running: Tensor, batch_mean: Tensor, observed: clock.Predicate) -> Tensor:
    """``batch_mean`` on the first batch (``observed`` False), then ``running + m·(batch_mean − running)``."""
    return clock.where(observed, running + EMA_MOMENTUM * (batch_mean - running), batch_mean)


class ActivationPruner(_MaskedOp):
    """Static (moving-average |x|) or dynamic (per-sample top-k) activation pruning.

    For the static scheme the buffers ``running`` and ``mask`` take their shape from the first
    batch (per element: ``x.shape[1:]``; per channel: ``(C, 1, ...)``); until then they are
    empty, and loading a state_dict gives them the saved shape.

    After :meth:`use_latent_tiebreak` (the pruner follows another op of its stage, as in
    ``Q(x)·m'``), ties of ``|Q(x)|`` are broken by ``|x|`` of the stage input: per sample for
    dynamic pruning, and through the buffer ``running_latent`` (the moving average of the
    input's ``|x|``) for the static mask.
    """

    _shaped_buffers = ("running", "mask", "running_latent")

    def __init__(self, config: Any, site: str):
        super().__init__(config, site)
        dynamic = bool(config.dynamic)
        self.set_plain(dynamic=dynamic, per_channel=config.granularity == "channel", observes=not dynamic)
        self.add_buffers(running=torch.zeros(0), mask=torch.ones(0, dtype=torch.bool), observed=torch.full((), False))
        self._alias_mask()
        if not dynamic:
            statistics.add_statistics(self)

    prunes = True

    def link(self, chain: Sequence[ScheduledOp], position: int, owner: nn.Module | None = None, name: str = "weight") -> None:
        """After another op of its stage, break ties by the stage input's magnitude."""
        if position > 0:
            self.use_latent_tiebreak()

    def use_latent_tiebreak(self) -> None:
        """Break ties by the magnitude of the stage input (passed as ``latent`` to forward)."""
        self.set_plain(wants_latent=True)
        if not self.dynamic:
            self.add_buffers(running_latent=torch.zeros(0, device=self.running.device))

    def _stat_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.per_channel:
            if x.dim() < 2:
                raise SiteError(f"site {self.site!r}: channel pruning needs a (N, C, ...) tensor, got shape {tuple(x.shape)}")
            return (x.shape[1],) + (1,) * (x.dim() - 2)
        return tuple(x.shape[1:])

    def _materialize(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.running = torch.zeros(shape, dtype=torch.float32, device=device)
        self.mask = torch.ones(shape, dtype=torch.bool, device=device)
        if self.wants_latent:
            self.running_latent = torch.zeros(shape, dtype=torch.float32, device=device)
        n = self.running.numel()
        # Σ|x| per entry (and of the stage input's |x|), then the count of what was summed
        statistics.add_statistics(self, sums=n * (2 if self.wants_latent else 1) + 1, device=device)

    def check_shape(self, x: Tensor) -> None:
        """Check ``x`` against the static mask's shape; the first batch gives it its shape."""
        shape = self._stat_shape(x)
        if self.mask.numel() == 0:
            if clock.tracing():
                raise SiteError(
                    f"site {self.site!r}: a static activation mask takes its shape from the first batch; "
                    "run the model once before compiling it, or pass example_inputs to fxqp.transform"
                )
            self._materialize(shape, x.device)
        elif tuple(self.mask.shape) != shape:
            raise SiteError(
                f"site {self.site!r}: static activation pruning keeps a mask of shape "
                f"{tuple(self.mask.shape)} but got an activation of shape {tuple(x.shape)}; "
                "per-element masks need a fixed input size — use granularity='channel' or dynamic=True"
            )

    def _summed_dims(self, x: Tensor) -> tuple[int, ...]:
        """The dims of ``x`` one entry of ``running`` averages over."""
        return (0,) + tuple(range(2, x.dim())) if self.per_channel else (0,)

    def _keep(self, running: Tensor, running_latent: Tensor | None) -> Tensor:
        k = prune_count(self.target(), self.mask.numel())
        return magnitude_keep_mask(running, k, tiebreak=running_latent)

    @torch.no_grad()
    def update(self, x: Tensor, latent: Tensor | None = None) -> Tensor:
        """This forward's static mask as uint8 (0/1), of the mask's shape. In training mode
        the mask is refreshed first when due, from the moving averages of the batches before
        (a refresh waits for a first batch), and the batch's ``Σ|x|`` is recorded, to be
        folded into the averages at the end of the forward (:meth:`fold`); the result is a
        tensor of its own (see :meth:`WeightPruner.update`). Once the mask is frozen the
        averages are no longer needed and stay as they are. In evaluation mode, and once the
        mask is frozen, it is the buffer ``mask_bytes``.

        The batch sums are reduced here, outside :func:`fxqp.ops.clock.cond`: under
        torch.compile an activation reaches the graph in the layout Inductor chose for its
        producer (channels-last after a convolution), which the branch's inputs must not
        have. The refresh is a cond whose true branch writes the mask in place, so the sort
        runs only when a refresh is due (due implies live)."""
        live = clock.live(self)
        if not (self.training and clock.maybe(live)) or x.shape[0] == 0:  # an empty batch changes nothing
            return self.mask_bytes
        due = clock.both(clock.due(self), clock.read(self, "observed"))
        dims = self._summed_dims(x)
        sums = [x.detach().abs().float().sum(dim=dims).reshape(-1)]
        if self.wants_latent:  # of the stage input's |x|
            sums.append(latent.detach().abs().float().sum(dim=dims).reshape(-1))
        count = torch.full((1,), x.numel() // max(self.running.numel(), 1), dtype=torch.float32, device=x.device)
        statistics.record(self, sums=torch.cat([*sums, count]), when=live)
        averages = (self.running.view(-1),) + ((self.running_latent.view(-1),) if self.wants_latent else ())

        def refresh(mask, running, *latent):
            keep = self._keep(running, latent[0] if latent else None).view(torch.uint8)
            mask.copy_(keep)
            return keep

        mask = clock.cond(due, refresh, lambda mask, *rest: mask.clone(), (self.mask_bytes.view(-1), *averages))
        clock.advance_refresh(self, due)
        return mask.view(self.mask.shape)

    @torch.no_grad()
    def fold(self, on: clock.Predicate) -> None:
        """Fold the recorded batch means ``Σ|x| / count`` into the moving averages, while the
        mask is live (a refresh in this forward may have frozen it); the first batch sets
        them."""
        on = clock.both(on, clock.live(self))
        if not clock.maybe(on):
            return
        observed = clock.read(self, "observed")
        n, shape = self.running.numel(), self.running.shape
        means = self.pending_sum[:-1] / self.pending_sum[-1]
        names = ("running", "running_latent") if self.wants_latent else ("running",)
        for i, name in enumerate(names):
            batch = means[i * n : (i + 1) * n].view(shape)
            if not isinstance(on, Tensor) and not observed:
                batch = batch.clone()  # a tensor of its own: the buffers must not share memory
            statistics.store(self, name, clock.where(on, _moving_average(self._buffers[name], batch, observed), self._buffers[name]))
        statistics.store(self, "observed", torch.where(on, True, self.observed) if isinstance(on, Tensor) else True)

    def forward(self, x: Tensor, latent: Tensor | None = None) -> Tensor:
        check_floating(x, self.site)
        if self.wants_latent and latent is None:
            raise SiteError(f"site {self.site!r}: this pruner breaks ties by the stage input; call it through its ActivationStage")
        if self.dynamic:
            if x.shape[0] == 0:
                return x
            return clock.select(clock.active(self), lambda: x * self._dynamic_keep(x, latent), x)
        self.check_shape(x)
        return x * self.update(x, latent)

    def _dynamic_keep(self, x: Tensor, latent: Tensor | None) -> Tensor:
        """Per sample, False at the ``round(s_t·n)`` smallest ``|x|``."""
        k = prune_count(self.target(), x[0].numel())
        tiebreak = latent.detach().abs().to(compute_dtype(x)) if self.wants_latent else None
        return magnitude_keep_mask(x.detach().abs().to(compute_dtype(x)), k, tiebreak=tiebreak, batch_dims=1)

    def actual_sparsity(self) -> float | None:
        if self.dynamic:
            return float(self.target().item())
        if self.mask.numel() == 0:
            return None
        return 1.0 - self.mask.float().mean().item()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in self._shaped_buffers:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and getattr(self, name).shape != saved.shape and getattr(self, name).numel() == 0:
                self._materialize(tuple(saved.shape), getattr(self, name).device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.dynamic:
            info["op"] = f"prune({self.config.sparsity:g} top-k)"
        elif self.per_channel:
            info["op"] = f"prune({self.config.sparsity:g}/ch)"
        return info
