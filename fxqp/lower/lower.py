"""``fxqp.lower``: a trained, transformed model → its frozen, packed inference form."""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from typing import Any, Iterator

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize as torch_parametrize

from fxqp.errors import LoweringError, ScheduleWarning
from fxqp.groups import GROUPS_NAME, ChannelMask
from fxqp.lower.frozen import freeze_op
from fxqp.lower.packed import DECODE_MODES, PackedWeight, WeightLayout, dtype_name
from fxqp.lower.packing import encode_mask, pack_bits
from fxqp.lower.shrink import channel_slices, count_macs, filter_axis, removals_of, shrink_modules, slice_weight
from fxqp.ops import ScheduledOp
from fxqp.ops.chain import TiedWeight, is_tied
from fxqp.schedule import SCHEDULE_NAME, find_schedule, pending_ops
from fxqp.stages import ActivationStage

__all__ = [
    "lower",
    "LOWERED_KEY",
    "weight_sites",
    "install_packed_weight",
    "is_lowered",
    "finish_lowered",
    "freeze_plain_parametrizations",
    "release_tied",
]

LOWERED_KEY = "fxqp"
"""Key of ``GraphModule.meta`` holding what a lowered model records: spec, step, leaves."""


def is_lowered(model: nn.Module) -> bool:
    """Whether ``model`` is the output of :func:`lower` or :func:`fxqp.load`."""
    return isinstance(getattr(model, "meta", None), dict) and LOWERED_KEY in model.meta


def weight_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[nn.Module]]]:
    """``(module path, module, parametrizations of its weight)`` for every parametrized weight
    but those tied to another module's (:class:`~fxqp.ops.chain.TiedWeight`), which read it."""
    for path, module in model.named_modules():
        if torch_parametrize.is_parametrized(module, "weight") and not is_tied(module):
            yield path, module, list(module.parametrizations["weight"])


def release_tied(model: nn.Module) -> None:
    """Drop the float ``original`` that modules with a tied weight still hold: the weight
    they read is the packed one of the module they are tied to."""
    for module in model.modules():
        if is_tied(module):
            chain = module.parametrizations["weight"]
            chain.original = nn.Parameter(chain.original.detach().new_empty(0), requires_grad=False)


def _freeze_weight(ops: list[ScheduledOp], original: Tensor) -> tuple[Tensor, Any, Tensor | None]:
    """Run the op chain in eval mode; return the frozen weight and the last active
    quantizer's grid and codes (``None`` when no quantizer is active)."""
    quantizers = [i for i, op in enumerate(ops) if getattr(op, "quantizes", False) and bool(op.active())]
    last = quantizers[-1] if quantizers else None
    grid = codes = None
    x = original.detach()
    for i, op in enumerate(ops):
        if i == last:
            grid, codes = op.encode(x)
        x = op(x)
    return x, grid, codes


def _pack(site: str, weight: Tensor, grid: Any, codes: Tensor | None, channel_axis: int | None) -> tuple[WeightLayout, dict[str, Tensor]]:
    flat = weight.reshape(-1)
    keep = flat != 0
    mask_code, mask_payload = encode_mask(keep)
    if grid is None:
        values = flat[keep].contiguous()
        layout = WeightLayout(
            tuple(weight.shape), dtype_name(weight.dtype), dtype_name(weight.dtype), "float", weight.element_size() * 8, 0, None, mask_code
        )
        return layout, {"codes": values.view(torch.uint8).clone(), "mask": mask_payload}
    stored = codes.reshape(-1)[keep] - grid.qmin
    scale = grid.scale.detach()
    axis = channel_axis if scale.numel() > 1 else None
    tensors = {
        "codes": pack_bits(stored, grid.bits),
        "mask": mask_payload,
        "scale": scale.reshape(-1) if axis is not None else scale.reshape(()),
    }
    if grid.zero_point is not None:
        zp = grid.zero_point.detach()
        tensors["zero_point"] = zp.reshape(-1) if axis is not None else zp.reshape(())
    layout = WeightLayout(
        tuple(weight.shape), dtype_name(weight.dtype), dtype_name(scale.dtype), grid.scheme, grid.bits, grid.qmin, axis, mask_code
    )
    return layout, {k: v.contiguous() for k, v in tensors.items()}


def install_packed_weight(module: nn.Module, packed: PackedWeight) -> None:
    """Make ``packed`` the only parametrization of ``module.weight``; the float weight is dropped.

    The parametrization list is emptied and refilled rather than removed: a deep copy of a
    parametrized module shares torch's generated ``Parametrized<Class>`` class with the
    original, and removing parametrizations edits that class (breaking the original).
    """
    chain = module.parametrizations["weight"]
    chain.original = nn.Parameter(chain.original.detach().new_empty(0), requires_grad=False)
    for key in list(chain._modules):
        del chain._modules[key]
    chain.append(packed)


def freeze_plain_parametrizations(low: nn.Module) -> None:
    """Replace by its current value every parametrized tensor whose parametrizations hold no
    spec op: the coupled-group channel masks of biases and batch-norm parameters, and
    parametrizations of the model's own (``weight_norm``, ``spectral_norm``), which are
    lowered as the float tensor they compute. A weight that also has spec ops keeps its
    channel mask in its op chain. Then the groups are dropped."""
    for module in list(low.modules()):
        container = getattr(module, "parametrizations", None)
        if container is None:
            continue
        names = [name for name in container.keys() if _plain(container[name])]
        if names:
            own_parametrized_class(module)
        for name in names:
            with torch.no_grad():
                torch_parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    if hasattr(low, GROUPS_NAME):
        low.delete_submodule(GROUPS_NAME)


def own_parametrized_class(module: nn.Module) -> None:
    """Give the parametrized ``module`` a class of its own, a copy of torch's generated
    ``Parametrized<Class>``, so that removing its parametrizations edits no other module.

    A deep copy of a parametrized module shares that class with the original (torch's
    ``__deepcopy__`` of it makes the copy an instance of the same class), and
    ``remove_parametrizations`` deletes the tensor's property from the class: done on a
    lowered copy, it would break the model it was copied from. torch has no public way to
    copy a parametrized module with a class of its own; ``tests/test_torch_workarounds.py``
    fails when a deep copy stops sharing the class.
    """
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)


def _plain(chain: nn.Module) -> bool:
    """Only channel masks, or no fxqp module at all."""
    ops = list(chain)
    return all(isinstance(op, ChannelMask) for op in ops) or not any(
        isinstance(op, (ScheduledOp, ChannelMask, PackedWeight, TiedWeight)) for op in ops
    )


def _slice_frozen(
    module: nn.Module, weight: Tensor, grid: Any, codes: Tensor | None, channel_axis: int | None, cut: tuple[Tensor | None, Tensor | None]
) -> tuple[Tensor, Any, Tensor | None]:
    """The frozen weight, its grid and codes with only the kept channels (see :mod:`fxqp.lower.shrink`)."""
    out_idx, in_idx = cut
    weight = slice_weight(module, weight, out_idx, in_idx)
    if codes is not None:
        codes = slice_weight(module, codes, out_idx, in_idx)
    if grid is not None and out_idx is not None and channel_axis == filter_axis(module) and grid.scale.numel() > 1:
        dim = channel_axis if grid.scale.dim() > channel_axis else 0  # a scale shaped as the weight, or flat
        zero_point = grid.zero_point
        if zero_point is not None and zero_point.numel() > 1:
            zero_point = zero_point.index_select(dim, out_idx)
        grid = dataclasses.replace(grid, scale=grid.scale.index_select(dim, out_idx), zero_point=zero_point)
    return weight, grid, codes


def _lower_weights(low: fx.GraphModule, decode: str, slices: dict[str, Any] | None = None) -> None:
    slices = slices or {}
    for path, module, ops in list(weight_sites(low)):
        site = f"{path}.weight"
        scheduled = [op for op in ops if isinstance(op, (ScheduledOp, ChannelMask))]
        if len(scheduled) != len(ops):
            raise LoweringError(
                f"site {site!r}: a weight with fxqp ops and parametrizations of another kind cannot be lowered: "
                f"{[type(p).__name__ for p in ops]}; expected fxqp ops only (a weight with no fxqp op is lowered as its float value)"
            )
        # the scale's axis is that of the quantizer whose grid is stored: the last active one
        active = [op for op in scheduled if getattr(op, "quantizes", False) and bool(op.active())]
        channel_axis = active[-1].channel_axis if active else None
        with torch.no_grad():
            original = module.parametrizations["weight"].original
            if not bool(torch.isfinite(original).all()):
                bad = int((~torch.isfinite(original)).sum())
                raise LoweringError(
                    f"site {site!r}: the trained weight has {bad} non-finite value(s) (NaN or ±Inf) of {original.numel()}; "
                    "a packed weight holds finite values only: find where training diverged (a lower learning rate, "
                    "gradient clipping) and lower a finite checkpoint"
                )
            weight, grid, codes = _freeze_weight(scheduled, original)
            if path in slices:
                weight, grid, codes = _slice_frozen(module, weight, grid, codes, channel_axis, slices[path])
            layout, tensors = _pack(site, weight, grid, codes, channel_axis)
            packed = PackedWeight(site, layout, tensors, decode=decode)
            decoded = packed.decode()
        if not torch.equal(decoded, weight):
            worst = (decoded.float() - weight.float()).abs().max().item()
            raise LoweringError(
                f"site {site!r}: the packed {layout.scheme} {layout.bits}-bit weight does not decode to the trained weight (max difference {worst:g})"
            )
        install_packed_weight(module, packed)


def _lower_stages(low: fx.GraphModule) -> None:
    for module in low.modules():
        if isinstance(module, ActivationStage):
            frozen = [f for f in (freeze_op(op) for op in module.ops) if f is not None]
            module.ops = nn.ModuleList(frozen)


def _drop_schedule(low: nn.Module) -> None:
    """Remove the step counter: its graph node, or (a model traced in parts) the module the
    root's forward hook calls, which then does nothing."""
    if isinstance(low, fx.GraphModule):
        for node in list(low.graph.nodes):
            if node.op == "call_module" and node.target == SCHEDULE_NAME:
                low.graph.erase_node(node)
        low.delete_submodule(SCHEDULE_NAME)
        low.graph.lint()
        low.recompile()
    else:
        delattr(low, SCHEDULE_NAME)


def lower(model: fx.GraphModule, *, decode: str = "cache") -> nn.Module:
    """The frozen inference form of a model returned by :func:`fxqp.transform`.

    Every weight site becomes a :class:`~fxqp.lower.packed.PackedWeight`: integer codes of
    the last active quantizer bit-packed at their exact width, per-channel scales (and zero
    points), and the positions of the non-zero weights as a bitmask or a Golomb-coded index,
    whichever is smaller; a site with no active quantizer keeps its non-zero values as
    floats. Every activation stage keeps only the frozen form of its active ops (fixed
    scale and zero point, static mask; dynamic top-k stays dynamic). The step counter is
    removed. In eval mode the result computes the same outputs as ``model.eval()``.

    Args:
        model: a transformed model (it is not modified).
        decode: ``"cache"`` decodes each weight once and keeps it (fast, float-sized
            memory); ``"on_the_fly"`` decodes at every forward (packed-sized memory).

    Raises:
        LoweringError: a weight cannot be represented exactly in packed form (or holds a
            non-finite value), or ``decode`` is not one of the decode modes.

    Warns:
        ScheduleWarning: some ops never ran in a training forward (``start >= step``):
            frozen as the identity, or applied without training; the warning names their sites
            and start steps.
    """
    if decode not in DECODE_MODES:
        raise LoweringError(f"decode: {decode!r} is not accepted; expected one of {', '.join(map(repr, DECODE_MODES))}")
    _refuse_sharded(model)
    schedule = find_schedule(model)
    _warn_pending(model, int(schedule.step))
    low = copy.deepcopy(model)
    low.eval()
    groups = list(getattr(low, GROUPS_NAME).children()) if hasattr(low, GROUPS_NAME) else []
    removals = removals_of(groups) if groups and not _prunes_activations(low) else []
    slices = channel_slices(low, removals)
    specs = getattr(schedule, "example_specs", None)
    example = [torch.zeros(shape, dtype=dtype, device=_device_of(low)) for shape, dtype in specs] if removals and specs else None
    macs_before = count_macs(low, example) if example else None
    freeze_plain_parametrizations(low)
    _lower_weights(low, decode, slices)
    release_tied(low)
    shrink_modules(low, slices)
    _lower_stages(low)
    record = {
        "spec": schedule.spec.to_dict() if schedule.spec is not None else None,
        "step": int(schedule.step),
        "fallback_leaves": list(schedule.fallback_leaves),
        "non_float_nodes": list(getattr(schedule, "non_float_nodes", ())),
        "example_inputs": getattr(schedule, "example_signature", None),
        "removed": [r.to_dict() for r in removals],
        "parts": list(getattr(schedule, "parts", ("",))),
    }
    if example:
        record["macs"] = [macs_before, count_macs(low, example)]
    return finish_lowered(low, record)


def _refuse_sharded(model: nn.Module) -> None:
    """A model that FSDP2 shards (``torch.distributed.fsdp.fully_shard``) holds a shard of each
    weight on each rank and cannot be copied: it is lowered through a full state dict loaded
    into an unsharded copy."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported here: loaded if it was used
    module_class = getattr(fsdp, "FSDPModule", None)
    if module_class is None:
        return
    sharded = [name or "the root" for name, m in model.named_modules() if isinstance(m, module_class)]
    if sharded:
        raise LoweringError(
            f"the model is sharded by torch.distributed.fsdp.fully_shard ({', '.join(sharded[:4])}"
            f"{', ...' if len(sharded) > 4 else ''}): load get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True)) into an unsharded transformed copy of the model and lower that"
        )


def _warn_pending(model: nn.Module, step: int) -> None:
    pending = pending_ops(model, step)
    if pending:
        shown = "; ".join(f"{site}: {op} starts at step {start}" for site, op, start in pending[:8])
        more = f"; and {len(pending) - 8} more" if len(pending) > 8 else ""
        warnings.warn(
            f"fxqp.lower at step {step}: {len(pending)} op(s) never ran in a training step ({shown}{more}): those that start "
            "after the step are frozen as the identity, those that start at it are applied untrained; train for longer or "
            "move their start earlier",
            ScheduleWarning,
            stacklevel=3,
        )


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in model.buffers()), torch.device("cpu"))


def _prunes_activations(model: nn.Module) -> bool:
    return any(op.prunes for m in model.modules() if isinstance(m, ActivationStage) for op in m.ops)


def finish_lowered(low: fx.GraphModule, record: dict[str, Any]) -> nn.Module:
    """Drop the step counter, freeze parameters, set eval mode, record spec/step/leaves."""
    _drop_schedule(low)
    for p in low.parameters():
        p.requires_grad_(False)
    low.eval()
    if not isinstance(getattr(low, "meta", None), dict):  # the root of a model traced in parts
        low.meta = {}
    low.meta[LOWERED_KEY] = record
    return low
