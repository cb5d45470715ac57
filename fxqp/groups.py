"""Coupled filter pruning: one decision per channel group (see :mod:`passes.channels`).

When :func:`fxqp.transform` gets ``example_inputs`` and the spec prunes weights with
``Prune(structure="filter")``, the output channels that must go together — joined by
residual adds, products (squeeze-excitation), batch norms, depthwise convolutions and
reused modules — are found on the graph, and every prunable group whose producers all
carry the same filter-pruning op gets one :class:`FilterGroup`:

* at each refresh the group scores channel ``c`` as the sum over its producers of their
  filter scores (L1, L2 or the quantization angle, on the latent weights) and keeps the
  ``C − round(s_t·C)`` best; every producer's filter pruner uses that channel mask;
* when grouped convolutions produce or read the channels (``blocks = g`` runs of ``C/g``),
  each run keeps its ``C/g − round(s_t·C/g)`` best, so every convolution group loses as
  many channels and the layer stays a grouped convolution;
* :class:`ChannelMask` parametrizations zero the same channels of the producers' biases
  and of the followers' per-channel parameters (batch-norm scale and shift, depthwise
  kernels and biases), so a pruned channel is exactly zero wherever it is read. A
  follower after a concatenation reads several groups side by side; its mask joins
  theirs.

The groups that cannot be coupled (blocked by the analysis, or with producers the spec
prunes differently) keep per-layer filter masks; ``fxqp.summary`` says which and why.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from fxqp.ops import clock
from fxqp.ops.base import compute_dtype
from fxqp.ops.numerics import magnitude_keep_mask, prune_count, quantization_angles
from fxqp.ops.prune import RefreshSchedule, WeightPruner
from fxqp.ops.quantize import WeightQuantizer
from passes import ChannelGroup, ChannelRule, parametrize, rule_for

__all__ = ["FilterGroup", "ChannelMask", "couple_filter_groups", "GROUPS_NAME"]

GROUPS_NAME = "fxqp_groups"
"""Parent module of the :class:`FilterGroup` modules: ``fxqp_groups.<name>``, named after the
group's first producer (``layer1.0.conv1`` → ``layer1_0_conv1``), or for coupled input
channels ``in_`` and its first reader, so that a group keeps its state-dict keys whichever
other groups a spec prunes."""


def _group_name(path: str, container: nn.Module) -> str:
    """A child name of ``container`` for the group named after module ``path``."""
    name = path.replace(".", "_") or "root"
    while hasattr(container, name):
        name += "_"
    return name


class FilterGroup(RefreshSchedule):
    """The shared channel mask of one coupled group (buffer ``keep``, bool, ``size``)."""

    def __init__(
        self, config: Any, site: str, size: int, pruners: Sequence[WeightPruner], device: torch.device | None = None, blocks: int = 1
    ):
        super().__init__(config, site)
        self.register_buffer("keep", torch.ones(size, dtype=torch.bool, device=device))
        self.__dict__["_pruners"] = list(pruners)
        self.blocks = blocks

    def _scores(self) -> Tensor:
        if self.config.structure == "channel":  # coupled input channels: the readers' own scores
            return self._reader_scores()
        if self.config.score_from == "next":
            total = self._reader_scores()
            if total is not None:
                return total
        total = None
        for pruner in self.__dict__["_pruners"]:
            latent = _whole(pruner.latent_weight())
            score = pruner.channel_scores(latent, latent, pruner.out_axis).to(torch.float64)
            total = score if total is None else total + score
        return total

    def _reader_scores(self) -> Tensor | None:
        """Sum over the consumers of their per-input-channel scores of the group's channels
        (L1, L2, or minus the mean quantization angle of the kernels reading the channel)."""
        size, total = self.keep.numel(), None
        criterion = self.config.criterion
        for holder, name, quantizer, (groups, out_axis, in_axis), offset, repeat in self.__dict__.get("_readers", ()):
            weight = _whole(holder[name])
            latent = weight.detach().movedim((out_axis, in_axis), (0, 1))
            w = _reader_slice(latent, groups, offset, size, repeat)
            if criterion == "angle":
                if quantizer is None:
                    continue
                quantized = quantizer.quantize(weight.detach().to(compute_dtype(latent))).detach().to(latent.dtype)
                q = _reader_slice(quantized.movedim((out_axis, in_axis), (0, 1)), groups, offset, size, repeat)
                score = -quantization_angles(w, q, 0, 1, 1)
            else:
                dims = [d for d in range(w.dim()) if d != 1]
                score = w.abs().sum(dims) if criterion == "l1" else w.pow(2).sum(dims).sqrt()
            score = score.to(torch.float64)
            total = score if total is None else total + score
        return total

    def _compute(self) -> Tensor:
        """Keep the best channels: ``C − round(s_t·C)`` of them, or with ``blocks = g`` the
        ``C/g − round(s_t·C/g)`` best of every run of ``C/g`` channels."""
        scores = self._scores().view(self.blocks, -1)
        return magnitude_keep_mask(scores, prune_count(self.target(), scores.shape[1]), batch_dims=1).view(-1)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the channel mask when due (training mode; once per step)."""
        due = clock.due(self)
        if not clock.maybe(due):
            return
        keep = self.keep.view(torch.uint8)
        keep.copy_(clock.cond(due, lambda keep: self._compute().view(torch.uint8), _unchanged, (keep,)))
        clock.advance_refresh(self, due)

    def channel_mask(self, shape: Sequence[int], axis: int, dtype: torch.dtype) -> Tensor:
        """The mask broadcast along ``axis`` of a tensor of ``shape``."""
        view = [1] * len(shape)
        view[axis] = self.keep.numel()
        return self.keep.view(torch.uint8).view(view).to(dtype)  # Inductor's CPU code mishandles bool


def _unchanged(keep: Tensor) -> Tensor:
    """The false branch of a refresh: the mask stays (a branch returns a fresh tensor)."""
    return keep.clone()


def _reader_slice(weight: Tensor, groups: int, offset: int, size: int, repeat: int) -> Tensor:
    """The kernels reading input channels ``offset .. offset + size`` of a reader's weight
    laid out ``(out, in, ...)``; after a flatten (``repeat`` features per channel) as
    ``(out, size, repeat)``.

    A grouped convolution's weight ``(out, in/g, ...)`` is first laid out as
    ``(out/g, in, ...)``: input channel ``j·in/g + l`` is read by kernels ``l`` of the
    filters of group ``j``.
    """
    if groups > 1:
        out, per_group = weight.shape[0], weight.shape[1]
        blocked = weight.reshape(groups, out // groups, per_group, *weight.shape[2:]).movedim(0, 1)
        weight = blocked.reshape(out // groups, groups * per_group, *weight.shape[2:])
    if repeat == 1:
        return weight.narrow(1, offset, size)
    return weight.narrow(1, offset * repeat, size * repeat).reshape(weight.shape[0], size, repeat)


class ChannelMask(nn.Module):
    """Parametrization zeroing the pruned channels of a per-channel tensor (a bias, a
    batch-norm scale or shift, a depthwise kernel) along ``axis``.

    The tensor's channels are ``segments``: runs of ``(group, length)`` side by side, as a
    concatenation lays them out; a run whose ``group`` is ``None`` is never pruned. The mask
    is the concatenation of the groups' channel masks (ones for the ``None`` runs).
    """

    def __init__(self, segments: Sequence[tuple[FilterGroup | None, int]], axis: int):
        super().__init__()
        self.__dict__["_segments"] = list(segments)  # groups live in fxqp_groups, not here
        self.axis = axis

    def mask(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        segments = self.__dict__["_segments"]
        if len(segments) == 1 and segments[0][0] is not None:
            return segments[0][0].channel_mask(shape, self.axis, dtype)
        parts = [
            group.channel_mask([length], 0, dtype) if group is not None else torch.ones(length, dtype=dtype, device=self._device(segments))
            for group, length in segments
        ]
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        return torch.cat(parts).view(view)

    @staticmethod
    def _device(segments: Sequence[tuple[FilterGroup | None, int]]) -> torch.device:
        return next(group.keep.device for group, _ in segments if group is not None)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask(x.shape, x.dtype)


def _filter_pruner(gm: fx.GraphModule, path: str, structure: str = "filter") -> WeightPruner | None:
    module = gm.get_submodule(path)
    container = getattr(module, "parametrizations", None)
    if container is None or "weight" not in container:
        return None
    pruners = [op for op in container["weight"] if getattr(op, "prunes", False) and op.config.structure == structure]
    return pruners[0] if pruners else None


def _couple_channel_groups(gm: fx.GraphModule, groups: Sequence[ChannelGroup], schedule: nn.Module, container: nn.Module) -> list[str]:
    """Couple input-channel pruning (``structure="channel"``): a group whose consumers all
    prune input channels with one op, and whose producers do not prune filters, gets one
    decision from the consumers' scores; each consumer's mask is the concatenation of the
    groups it reads, so a consumer is coupled only when every group it reads is. The
    producers still compute the pruned channels, which nothing reads: lowering removes them
    with the consumers' input channels."""
    reasons: dict[int, str] = {}
    for i, group in enumerate(groups):
        pruners = [_filter_pruner(gm, m.module, "channel") for m in group.consumers]
        if group.blocked is not None:
            reasons[i] = group.blocked
        elif not group.producers or any(_filter_pruner(gm, m.module) for m in group.producers):
            reasons[i] = "its producers prune filters" if group.producers else "no layer produces it"
        elif not all(pruners) or len({p.config for p in pruners}) != 1:
            reasons[i] = f"its readers {[m.module for m in group.consumers]} do not all prune input channels with one op"
        elif any(_rule(gm, m.module).group_count(gm.get_submodule(m.module)) > 1 for m in group.consumers):
            reasons[i] = "a grouped convolution reads it"
    reads: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        for member in group.consumers:
            reads.setdefault(member.module, []).append(i)
    changed = True
    while changed:  # a consumer is coupled only if every group it reads is
        changed = False
        for path, indices in reads.items():
            if any(i in reasons for i in indices) and not all(i in reasons for i in indices):
                for i in indices:
                    if i not in reasons:
                        reasons[i], changed = f"{path} also reads channels that cannot be coupled", True
    notes: list[str] = []
    segments: dict[str, list[tuple[FilterGroup, int, int]]] = {}
    for i, group in enumerate(groups):
        pruners = [_filter_pruner(gm, m.module, "channel") for m in group.consumers]
        if not any(pruners):
            continue
        if i in reasons:
            notes.extend(
                f"{m.module}.weight: input channels pruned per layer, not removable ({reasons[i]})"
                for m, p in zip(group.consumers, pruners)
                if p is not None
            )
            continue
        names = [f"{m.module}.weight" for m in group.consumers]
        device = pruners[0].mask.device
        channel_group = FilterGroup(pruners[0].config, f"channels read by {', '.join(names)}", group.size, [], device, group.blocks).to(
            device
        )
        channel_group.bind(schedule)
        channel_group.producers, channel_group.followers, channel_group.consumers = (
            list(group.producers),
            list(group.followers),
            list(group.consumers),
        )
        channel_group.__dict__["_readers"] = [(*_reader_weight(gm, m.module), m.offset, m.repeat) for m in group.consumers]
        container.add_module(_group_name("in_" + group.consumers[0].module, container), channel_group)
        for member in group.consumers:
            segments.setdefault(member.module, []).append((channel_group, member.offset, member.repeat))
    for path, parts in segments.items():
        _filter_pruner(gm, path, "channel").use_channel_groups(parts)
    return notes


def couple_filter_groups(gm: fx.GraphModule, groups: Sequence[ChannelGroup], schedule: nn.Module) -> list[str]:
    """Attach a :class:`FilterGroup` to every group that can be coupled (see module doc).

    Returns one note per producer whose filter pruning stays per layer, with the reason.
    """
    notes: list[str] = []
    container = nn.Module()
    follows: dict[str, list[tuple[int, int, FilterGroup]]] = {}  # follower -> (offset, size, group)
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
            notes.extend(
                f"{n}: filters pruned per layer: its channel group {others} is not pruned by one and the same filter op" for n in names
            )
            continue
        device = pruners[0].mask.device
        filter_group = FilterGroup(pruners[0].config, f"group of {', '.join(names)}", group.size, pruners, device, group.blocks).to(device)
        filter_group.bind(schedule)
        filter_group.producers, filter_group.followers, filter_group.consumers = (
            list(group.producers),
            list(group.followers),
            list(group.consumers),
        )
        filter_group.__dict__["_readers"] = [(*_reader_weight(gm, m.module), m.offset, m.repeat) for m in group.consumers]
        container.add_module(_group_name(group.producers[0].module, container), filter_group)
        for pruner in pruners:
            pruner.use_group(filter_group)
        for member in group.followers:  # a depthwise convolution's own filter pruner follows the group
            follower = _filter_pruner(gm, member.module)
            if follower is None:
                continue
            if follower.config != pruners[0].config:
                notes.append(
                    f"{member.module}.weight: its filter pruning differs from its channel group's ({', '.join(names)}); both masks apply"
                )
            elif member.offset != 0 or follower.mask.shape[0] != group.size:
                notes.append(f"{member.module}.weight: its channels join several groups; its own filter mask and theirs both apply")
            else:
                follower.use_group(filter_group)
        for member in group.producers:  # their biases and other per-channel parameters
            for name in _masked_tensors(gm, member.module, ()):
                parametrize(gm, f"{member.module}.{name}", [ChannelMask([(filter_group, group.size)], 0)], check=False)
        for member in group.followers:
            follows.setdefault(member.module, []).append((member.offset, group.size, filter_group))
    for path, segments in follows.items():
        module = gm.get_submodule(path)
        masks = _follower_segments(segments, _rule(gm, path).out_count(module))
        for name in _masked_tensors(gm, path, ("weight",)):  # batch-norm scale and shift, depthwise kernels and biases
            parametrize(gm, f"{path}.{name}", [ChannelMask(masks, 0)], check=False)
    notes.extend(_couple_channel_groups(gm, groups, schedule, container))
    if any(True for _ in container.children()):
        gm.add_submodule(GROUPS_NAME, container)
    return notes


def _rule(gm: fx.GraphModule, path: str) -> ChannelRule:
    """The channel rule of a group's member (every member has one: the analysis found it by it)."""
    return rule_for(gm.get_submodule(path))


def _masked_tensors(gm: fx.GraphModule, path: str, own: tuple[str, ...]) -> list[str]:
    """The parameters of a member that a group's mask zeroes: ``own`` (a follower's weight)
    and its rule's per-channel tensors that are parameters (not batch-norm statistics)."""
    module = gm.get_submodule(path)
    buffers = {name for name, _ in module.named_buffers(recurse=False)}
    names = [*own, *_rule(gm, path).per_channel]
    return [name for name in names if name not in buffers and isinstance(getattr(module, name, None), torch.Tensor)]


def _reader_weight(gm: fx.GraphModule, path: str) -> tuple[dict[str, Tensor], str, WeightQuantizer | None, tuple[int, int, int]]:
    """Where a consumer's latent weight is held, its first uniform quantizer (for the angle
    score) and its convolution groups, output axis and input axis.

    The weight is given as the parameter dict that holds it (the module's, or that of its
    parametrization list) and its name there, read at each refresh: a weight replaced by
    another ``Parameter`` (``load_state_dict(assign=True)``, FSDP2's ``fully_shard``, which
    swaps in a sharded one and, around each forward, the gathered one) is read as it is
    then, not as it was at the transform. The group keeps these, not the module: a module
    would link the group to the consumer's own group, and so on through the network, which
    makes ``copy.deepcopy`` of a large model recurse once per link.
    """
    module, rule = gm.get_submodule(path), _rule(gm, path)
    layout = (rule.group_count(module), rule.out_axis, rule.in_axis)
    container = getattr(module, "parametrizations", None)
    if container is None or "weight" not in container:
        return module._parameters, "weight", None, layout
    quantizers = [op for op in container["weight"] if isinstance(op, WeightQuantizer)]
    return container["weight"]._parameters, "original", quantizers[0] if quantizers else None, layout


def _whole(weight: Tensor) -> Tensor:
    """``weight`` itself, or the whole tensor of a sharded ``DTensor`` (a weight of another
    module that FSDP2 has not gathered for this forward: an all-gather, which every rank
    runs at the same refresh of the same forward)."""
    if type(weight) in (Tensor, nn.Parameter) or not hasattr(weight, "full_tensor"):
        return weight
    return weight.full_tensor()


def _follower_segments(segments: list[tuple[int, int, FilterGroup]], channels: int) -> list[tuple[FilterGroup | None, int]]:
    """The runs of a follower's channels: its coupled groups at their offsets, unpruned
    runs (``None``) between them."""
    out: list[tuple[FilterGroup | None, int]] = []
    position = 0
    for offset, size, group in sorted(segments, key=lambda s: s[0]):
        if offset > position:
            out.append((None, offset - position))
        out.append((group, size))
        position = offset + size
    if position < channels:
        out.append((None, channels - position))
    return out
