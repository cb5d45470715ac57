"""Coupled filter pruning: one decision per channel group (see :mod:`passes.channels`).

When :func:`fxqp.transform` gets ``example_inputs`` and the spec prunes weights with
``Prune(structure="filter")``, the output channels that must go together — joined by
residual adds, products (squeeze-excitation), batch norms, depthwise convolutions and
reused modules — are found on the graph, and every prunable group whose producers all
carry the same filter-pruning op gets one :class:`FilterGroup`:

* at each refresh the group scores channel ``c`` as the sum over its producers of their
  filter scores (L1, L2 or the quantization angle, on the latent weights) and keeps the
  ``C − round(s_t·C)`` best; every producer's filter pruner uses that channel mask;
* :class:`ChannelMask` parametrizations zero the same channels of the producers' biases
  and of the followers' per-channel parameters (batch-norm scale and shift, depthwise
  kernels and biases), so a pruned channel is exactly zero wherever it is read.

The groups that cannot be coupled (blocked by the analysis, or with producers the spec
prunes differently) keep per-layer filter masks; ``fxqp.summary`` says which and why.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from fxqp.ops.base import compute_dtype, eager, mask_as
from fxqp.ops.numerics import magnitude_keep_mask, prune_count, quantization_angles
from fxqp.ops.quantize import WeightQuantizer
from fxqp.ops.prune import WeightPruner, _RefreshSchedule
from passes import ChannelGroup, parametrize

__all__ = ["FilterGroup", "ChannelMask", "couple_filter_groups", "GROUPS_NAME"]

GROUPS_NAME = "fxqp_groups"
"""Parent module of the :class:`FilterGroup` modules: ``fxqp_groups.g<k>``."""


class FilterGroup(_RefreshSchedule):
    """The shared channel mask of one coupled group (buffer ``keep``, bool, ``size``)."""

    def __init__(self, config: Any, site: str, size: int, pruners: Sequence[WeightPruner], device: torch.device | None = None):
        super().__init__(config, site)
        self.register_buffer("keep", torch.ones(size, dtype=torch.bool, device=device))
        self.__dict__["_pruners"] = list(pruners)

    def _scores(self) -> Tensor:
        if self.config.score_from == "next":
            total = self._reader_scores()
            if total is not None:
                return total
        total = None
        for pruner in self.__dict__["_pruners"]:
            latent = pruner.latent_weight()
            score = pruner._channel_scores(latent, latent, pruner.out_axis).to(torch.float64)
            total = score if total is None else total + score
        return total

    def _reader_scores(self) -> Tensor | None:
        """Sum over the consumers of their per-input-channel scores of the group's channels
        (L1, L2, or minus the mean quantization angle of the kernels reading the channel)."""
        size, total = self.keep.numel(), None
        criterion = self.config.criterion
        for module, offset, repeat in self.__dict__.get("_readers", ()):
            container = getattr(module, "parametrizations", None)
            chain = list(container["weight"]) if container is not None and "weight" in container else []
            latent = (container["weight"].original if chain else module.weight).detach()
            w = _reader_slice(latent, offset, size, repeat)
            if criterion == "angle":
                quantizers = [op for op in chain if isinstance(op, WeightQuantizer)]
                if not quantizers:
                    continue
                q = _reader_slice(quantizers[0].quantize(latent.to(compute_dtype(latent))).detach().to(latent.dtype), offset, size, repeat)
                score = -quantization_angles(w, q, 0, 1, 1)
            else:
                dims = [d for d in range(w.dim()) if d != 1]
                score = w.abs().sum(dims) if criterion == "l1" else w.pow(2).sum(dims).sqrt()
            score = score.to(torch.float64)
            total = score if total is None else total + score
        return total

    def _compute(self) -> Tensor:
        return magnitude_keep_mask(self._scores(), prune_count(self.target(), self.keep.numel()))

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the channel mask when due (training mode; once per step)."""
        if eager():
            if self.host_due():
                self.keep.copy_(self._compute())
                self.host_advance_refresh()
            return
        due = self.due()
        keep = self.keep.view(torch.uint8)
        refreshed = torch.cond(due, lambda keep: self._compute().view(torch.uint8), lambda keep: keep.clone(), (keep,))
        keep.copy_(refreshed)
        self.advance_refresh(due)

    def channel_mask(self, shape: Sequence[int], axis: int, dtype: torch.dtype) -> Tensor:
        """The mask broadcast along ``axis`` of a tensor of ``shape``."""
        view = [1] * len(shape)
        view[axis] = self.keep.numel()
        if eager():
            return mask_as(self, "keep", dtype).view(view)  # converted once per refresh
        return self.keep.view(torch.uint8).view(view).to(dtype)  # Inductor's CPU code mishandles bool



def _reader_slice(weight: Tensor, offset: int, size: int, repeat: int) -> Tensor:
    """The input channels ``offset .. offset + size`` of a reader's weight; after a flatten
    (``repeat`` features per channel) as ``(out, size, repeat)``."""
    if repeat == 1:
        return weight.narrow(1, offset, size)
    return weight.narrow(1, offset * repeat, size * repeat).reshape(weight.shape[0], size, repeat)


class ChannelMask(nn.Module):
    """Parametrization zeroing the pruned channels of a group along ``axis`` of a
    per-channel tensor (a bias, a batch-norm scale or shift, a depthwise kernel)."""

    def __init__(self, group: FilterGroup, axis: int):
        super().__init__()
        self.__dict__["_group"] = group  # not a submodule: the group lives in fxqp_groups
        self.axis = axis

    def forward(self, x: Tensor) -> Tensor:
        return x * self.__dict__["_group"].channel_mask(x.shape, self.axis, x.dtype)


def _filter_pruner(gm: fx.GraphModule, path: str) -> WeightPruner | None:
    module = gm.get_submodule(path)
    container = getattr(module, "parametrizations", None)
    if container is None or "weight" not in container:
        return None
    pruners = [op for op in container["weight"] if isinstance(op, WeightPruner) and op.config.structure == "filter"]
    return pruners[0] if pruners else None


def couple_filter_groups(gm: fx.GraphModule, groups: Sequence[ChannelGroup], schedule: nn.Module) -> list[str]:
    """Attach a :class:`FilterGroup` to every group that can be coupled (see module doc).

    Returns one note per producer whose filter pruning stays per layer, with the reason.
    """
    notes: list[str] = []
    container = nn.Module()
    count = 0
    for group in groups:
        pruners = [_filter_pruner(gm, m.module) for m in group.producers]
        if not any(pruners):
            continue
        names = [f"{m.module}.weight" for m, p in zip(group.producers, pruners) if p is not None]
        if group.blocked is not None:
            notes.extend(f"{n}: filters pruned per layer, not removable ({group.blocked})" for n in names)
            continue
        if not all(pruners) or len({p.config for p in pruners}) != 1:
            others = [f"{m.module}.weight" for m in group.producers]
            notes.extend(f"{n}: filters pruned per layer: its channel group {others} is not pruned by one and the same filter op" for n in names)
            continue
        device = pruners[0].mask.device
        filter_group = FilterGroup(pruners[0].config, f"group of {', '.join(names)}", group.size, pruners, device).to(device)
        filter_group.bind(schedule)
        filter_group.producers, filter_group.followers, filter_group.consumers = list(group.producers), list(group.followers), list(group.consumers)
        filter_group.__dict__["_readers"] = [(gm.get_submodule(m.module), m.offset, m.repeat) for m in group.consumers]
        container.add_module(f"g{count}", filter_group)
        count += 1
        for pruner in pruners:
            pruner.use_group(filter_group)
        for member in group.followers:  # a depthwise convolution's own filter pruner follows the group
            follower = _filter_pruner(gm, member.module)
            if follower is None:
                continue
            if follower.config == pruners[0].config:
                follower.use_group(filter_group)
            else:
                notes.append(f"{member.module}.weight: its filter pruning differs from its channel group's ({', '.join(names)}); both masks apply")
        for member in group.producers:
            if getattr(gm.get_submodule(member.module), "bias", None) is not None:
                parametrize(gm, f"{member.module}.bias", [ChannelMask(filter_group, 0)], check=False)
        for member in group.followers:
            module = gm.get_submodule(member.module)
            for name in ("weight", "bias"):
                if isinstance(getattr(module, name, None), torch.Tensor):
                    parametrize(gm, f"{member.module}.{name}", [ChannelMask(filter_group, 0)], check=False)
    if count:
        gm.add_submodule(GROUPS_NAME, container)
    return notes
