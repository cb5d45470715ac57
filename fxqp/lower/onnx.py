"""``fxqp.export_onnx``: a lowered model as an ONNX file whose weights stay low-bit integers.

The graph is exported by torch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``)
from the lowered model with every weight decoded once; then each quantized weight's float
initializer is replaced by its integer codes and a ``DequantizeLinear`` node that computes
the same float weight at load time of the runtime's session:

* ``symmetric`` / ``lsq``: codes ``q = c + qmin`` as ``INT4`` (codes in ``[-8, 7]``) or
  ``INT8``, zero point 0: ``w = q · s``;
* ``affine``: codes ``c`` as ``UINT4`` (``bits ≤ 4``) or ``UINT8``, with the rounded zero
  point ``z``: ``w = (c - z) · s``; a pruned element is stored as ``z``;
* ``sign`` (binary weights): ``q = ±1`` (0 where pruned) as ``INT4``: ``w = q · s``;

with the per-channel scale on the weight's channel axis (``axis``) or one scale. The values
are those of :meth:`fxqp.lower.packed.PackedWeight.decode`, bit for bit (the same float32
products). ``INT4``/``UINT4`` are packed two codes per byte, so 1- to 4-bit weights all cost
4 bits per element in this form (ONNX has no narrower type ONNX Runtime's CPU provider
dequantizes); ONNX Runtime keeps no sparse weights, so pruned elements are zero codes.

What is exported as float, and why, is listed in the returned :class:`OnnxReport`: weights
of more than 8 bits or kept as floats (``float`` layouts), and every activation op (the
quantizers as ``Round``/``Clip`` arithmetic, masks as a ``Mul``, top-k as ``TopK``-based ops).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxqp._extras import require
from fxqp.atomic import atomic_path
from fxqp.errors import LoweringError
from fxqp.lower.frozen import FrozenMask, FrozenQuantize, TopK
from fxqp.lower.lower import is_lowered, weight_sites
from fxqp.lower.packed import PackedWeight
from fxqp.lower.packing import decode_mask, pack_bits, scatter_nonzeros, unpack_bits
from fxqp.stages import ActivationStage

__all__ = ["export_onnx", "OnnxReport", "DEFAULT_OPSET"]

#: ONNX opset of the exported graph (21: ``INT4``/``UINT4`` in ``DequantizeLinear``).
DEFAULT_OPSET = 21


@dataclass(frozen=True)
class OnnxReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        integer_weights: site → ONNX element type of its codes (``"INT4"``, ``"UINT8"``, ...).
        float_weights: site → why its weight is stored as floats.
        float_activations: activation stage → the ops exported as float arithmetic.
        bytes: the file's size.
    """

    path: str
    integer_weights: dict[str, str] = field(default_factory=dict)
    float_weights: dict[str, str] = field(default_factory=dict)
    float_activations: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.bytes:,} bytes; {len(self.integer_weights)} weights as integers"]
        lines += [f"  float weight {site}: {why}" for site, why in self.float_weights.items()]
        lines += [f"  float activation ops {stage}: {ops}" for stage, ops in self.float_activations.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Codes:
    """A weight as ``DequantizeLinear`` inputs: dense integer codes (the weight's shape) of
    ONNX type ``element``, the float32 scale and, for unsigned codes, the zero point."""

    values: torch.Tensor
    element: str
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None


def _integer_codes(packed: PackedWeight) -> _Codes | str:
    """The weight's :class:`_Codes`, or why it cannot be stored as integers."""
    layout = packed.layout
    if layout.scheme == "float":
        return "kept as floats (no quantizer was active when lowered)"
    if layout.bits > 8:
        return f"{layout.bits}-bit codes: ONNX integer weights have at most 8 bits"
    if layout.dtype != "float32" or layout.compute_dtype != "float32":
        return f"a {layout.dtype} weight: the dequantized values would be float32"
    keep = decode_mask(layout.mask, packed.mask)
    stored = unpack_bits(packed.codes, layout.bits, layout.mask.nnz).to(torch.int64)
    scale = packed.scale.detach()
    if layout.scheme == "sign":
        return _Codes(scatter_nonzeros(2 * stored - 1, keep).view(layout.shape), "INT4", scale)
    if layout.scheme == "affine":
        zero_point = packed.zero_point.round().to(torch.int64)
        if not torch.equal(zero_point.to(packed.zero_point.dtype), packed.zero_point):
            return _half_integer_affine(packed, stored, keep)
        pruned_as = zero_point.view(layout.scale_shape()).expand(layout.shape).reshape(-1)
        codes = torch.where(keep, scatter_nonzeros(stored + layout.qmin, keep), pruned_as)
        return _Codes(codes.view(layout.shape), "UINT4" if layout.bits <= 4 else "UINT8", scale, zero_point)
    codes = scatter_nonzeros(stored + layout.qmin, keep)
    return _Codes(codes.view(layout.shape), "INT4" if layout.bits <= 4 else "INT8", scale)


class _TopKByOrder(torch.nn.Module):
    """:class:`~fxqp.lower.frozen.TopK` as ops every exporter translates (``topk`` and
    ``scatter``, not stable sorts): the ``round(s·n)`` smallest ``|x|`` of each sample are
    zeroed; among equal magnitudes the runtime's ``TopK`` picks (not the latent, not the
    index), which changes an output only where equal non-zero magnitudes straddle the cut."""

    def __init__(self, op: TopK):
        super().__init__()
        self.sparsity = float(op.target)
        self.wants_latent = op.wants_latent

    def forward(self, x: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        n = x[0].numel()
        k = round(self.sparsity * n)  # round half to even, as prune_count
        if k == 0:
            return x
        flat = x.reshape(x.shape[0], n)
        _, smallest = torch.topk(flat.abs(), k, dim=1, largest=False)
        return (flat * torch.ones_like(flat).scatter(1, smallest, 0.0)).reshape(x.shape)


def _describe(op: torch.nn.Module) -> str:
    if isinstance(op, FrozenQuantize):
        return f"FrozenQuantize({op.scheme} {op.bits}b as Round/Clip arithmetic)"
    if isinstance(op, FrozenMask):
        return "FrozenMask(Mul by a constant mask)"
    if isinstance(op, _TopKByOrder):
        return f"TopK({op.sparsity:.3g} of each sample by ONNX TopK; ties in the runtime's order)"
    return type(op).__name__


def _half_integer_affine(packed: PackedWeight, stored: torch.Tensor, keep: torch.Tensor) -> _Codes | str:
    """An affine grid whose zero point is a half integer (DoReFa's ``z = L/2`` with ``L``
    odd): ``(c - z)·s = (2c - 2z)·(s/2)``, both sides the one rounding of the same real
    product, so the doubled signed codes and the halved scale decode bit for bit."""
    layout = packed.layout
    doubled = packed.zero_point * 2
    if not torch.equal(doubled.round(), doubled):
        return "a zero point that is neither an integer nor a half integer"
    twice_z = doubled.round().to(torch.int64).view(layout.scale_shape()).expand(layout.shape).reshape(-1)
    codes = torch.where(keep, scatter_nonzeros(2 * (stored + layout.qmin), keep) - twice_z, 0)
    lo, hi = int(codes.min()), int(codes.max())
    element = "INT4" if -8 <= lo and hi <= 7 else "INT8" if -128 <= lo and hi <= 127 else None
    if element is None:
        return f"doubled codes in [{lo}, {hi}] do not fit 8 bits"
    return _Codes(codes.view(layout.shape), element, packed.scale.detach() / 2)


def _integer_tensor(onnx: Any, name: str, element: int, values: torch.Tensor) -> Any:
    """An ONNX integer tensor in raw little-endian bytes: 4-bit types packed two per byte,
    the first element in the low half (:func:`fxqp.lower.packing.pack_bits` order)."""
    flat = values.reshape(-1)
    if element in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        raw = pack_bits(flat & 0xF, 4).numpy().tobytes()
    elif element == onnx.TensorProto.INT8:
        raw = flat.to(torch.int8).numpy().tobytes()
    else:
        raw = flat.to(torch.uint8).numpy().tobytes()
    return onnx.helper.make_tensor(name, element, list(values.shape), raw, raw=True)


def export_onnx(
    model: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
) -> OnnxReport:
    """Write a lowered model to ``path`` as ONNX with its quantized weights as integers
    (see the module doc), written atomically.

    Args:
        model: a lowered model (:func:`fxqp.lower` or :func:`fxqp.load`); not modified.
        example_inputs: positional example inputs.
        path: the ``.onnx`` file.
        dynamic_batch: the first dimension of every tensor input is dynamic (``"batch"``).
        opset: the ONNX opset (at least 21, for 4-bit integer weights).

    Returns:
        An :class:`OnnxReport` listing the integer weights and everything exported as float.

    Raises:
        LoweringError: ``model`` is not a lowered model, or ``opset`` is below 21.
        MissingExtraError: the ``onnx`` extra is not installed.
    """
    onnx = require("onnx", "fxqp.export_onnx", "onnx")
    require("onnxscript", "fxqp.export_onnx", "onnx")
    if not is_lowered(model):
        raise LoweringError(f"fxqp.export_onnx expects a lowered model (from fxqp.lower or fxqp.load), got {type(model).__name__}")
    if opset < DEFAULT_OPSET:
        raise LoweringError(f"fxqp.export_onnx: opset {opset} is below {DEFAULT_OPSET}, the first with 4-bit integer weights")
    program_model = copy.deepcopy(model).eval()
    for stage in program_model.modules():
        if isinstance(stage, ActivationStage):
            stage.ops = torch.nn.ModuleList(_TopKByOrder(op) if isinstance(op, TopK) else op for op in stage.ops)
    packed = {}
    for path_, _, params in weight_sites(program_model):
        params[0].set_decode("cache")
        packed[f"{path_}.parametrizations.weight.0.cached"] = (f"{path_}.weight", params[0])
    dynamic = tuple({0: "batch"} if isinstance(x, torch.Tensor) else None for x in example_inputs) if dynamic_batch else None
    with torch.no_grad():
        program = torch.onnx.export(
            program_model,
            tuple(example_inputs),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            optimize=False,  # the optimizer folds batch norms into the weights, which then are no longer the codes' values
            verbose=False,
        )
    proto = program.model_proto
    integer, floats = {}, {}
    initializers = {init.name: init for init in proto.graph.initializer}
    new_nodes = []
    for name, (site, weight) in packed.items():
        if name not in initializers:
            floats[site] = "the exporter folded the weight into another constant"
            continue
        codes = _integer_codes(weight)
        if isinstance(codes, str):
            floats[site] = codes
            continue
        layout = weight.layout
        element = getattr(onnx.TensorProto, codes.element)
        scale = codes.scale.reshape(-1)
        axis = layout.channel_axis if layout.channel_axis is not None and scale.numel() > 1 else None
        inputs = [f"{site}.codes", f"{site}.scale"]
        tensors = [
            _integer_tensor(onnx, f"{site}.codes", element, codes.values),
            onnx.numpy_helper.from_array((scale if axis is not None else scale.reshape(())).numpy(), f"{site}.scale"),
        ]
        if codes.zero_point is not None:
            zp = codes.zero_point.reshape(-1) if axis is not None else codes.zero_point.reshape(())
            tensors.append(_integer_tensor(onnx, f"{site}.zero_point", element, zp))
            inputs.append(f"{site}.zero_point")
        attrs = {"axis": axis} if axis is not None else {}
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", inputs, [name], name=f"{site}.dequantize", **attrs))
        proto.graph.initializer.remove(initializers[name])
        proto.graph.initializer.extend(tensors)
        integer[site] = codes.element
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes + nodes)
    onnx.checker.check_model(proto, full_check=True)
    stages = {}
    for stage in program_model.modules():
        if isinstance(stage, ActivationStage) and len(stage.ops):
            stages[stage.site] = ", ".join(_describe(op) for op in stage.ops)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
    return OnnxReport(os.fspath(path), integer, floats, stages, os.path.getsize(path))
