"""``fxqp.export_onnx``: a lowered model as an ONNX file that stays low-bit in the runtime.

The graph is exported by torch's ONNX exporter (``torch.onnx.export(..., dynamo=True)``)
from a copy of the lowered model, then rewritten:

**Weights** are stored as integer codes feeding ``DequantizeLinear``, which computes the
float weight in the runtime:

* ``symmetric`` / ``lsq``: codes ``q = c + qmin`` as ``INT4`` (codes in ``[-8, 7]``) or
  ``INT8``, zero point 0: ``w = q · s``;
* ``affine``: codes ``c`` as ``UINT4`` (``bits ≤ 4``) or ``UINT8``, with the rounded zero
  point ``z``: ``w = (c - z) · s``; a pruned element is stored as ``z``; DoReFa's
  half-integer ``z`` is stored as doubled signed codes and a halved scale,
  ``(c - z)·s = (2c - 2z)·(s/2)``;
* ``sign`` (binary weights): ``q = ±1`` (0 where pruned) as ``INT4``: ``w = q · s``;

with the per-channel scale on the weight's channel axis (``axis``) or one scale. Without
batch-norm folding the values are those of :meth:`fxqp.lower.packed.PackedWeight.decode`,
bit for bit. ``INT4``/``UINT4`` are packed two codes per byte, so 1- to 4-bit weights all
cost 4 bits per element in this form (ONNX has no narrower type the runtime dequantizes);
``min_weight_bits=8`` stores them as 8-bit codes instead, which ONNX Runtime's integer
convolution kernels read (it has none for 4-bit weights, so it dequantizes those at every
call and convolves in float);
ONNX Runtime keeps no sparse weights, so pruned elements are zero codes (a structured
pruning's removed channels are gone from the lowered model, hence from the file).
With ``linear_kernel="matmul_nbits"`` the weights of ``nn.Linear`` layers are instead
ONNX Runtime's ``MatMulNBits`` (domain ``com.microsoft``): unsigned 4- or 8-bit codes in
blocks of :data:`MATMUL_NBITS_BLOCK` along the input features, every block of a row with
the row's scale and zero point.

**Batch norms** that follow a convolution are folded into it (``fold_batch_norm``): with
``f = γ / sqrt(σ² + ε)`` per output channel, the scale becomes ``s · f`` (the codes do not
change; a channel with ``f < 0`` has its codes negated, ``c' = Q - c``, ``z' = Q - z`` for
unsigned ones) and the bias ``(b - μ) · f + β``. The runtime does this for float weights,
never for dequantized ones, and without it no convolution meets its output quantizer.
The products are rounded once more than in fxqp (``(q·s)·f`` against ``q·(s·f)``).

**Activation quantizers** (``affine``, ``symmetric``, ``lsq``, up to 8 bits) become a
``QuantizeLinear``/``DequantizeLinear`` pair with the stage's scale and zero point, of type
``UINT8`` (affine, unsigned LSQ) or ``INT8`` (symmetric, signed LSQ): ONNX Runtime fuses
``DequantizeLinear → Conv/MatMul/Gemm → QuantizeLinear`` into integer kernels
(``QLinearConv``, ``QLinearMatMul``, ...; see :func:`onnxruntime_op_counts`). A grid narrower
than its type (fewer than 8 bits, or the narrow symmetric range) is clipped first, in
float, to its dequantized ends ``[(qmin - z)·s, (qmax - z)·s]``, which keeps the codes
exact but stops that fusion; the 8-bit narrow symmetric grid is not clipped, so that it
fuses, and the report notes that ``INT8`` admits the code ``-128`` there. ONNX divides
by the scale where fxqp multiplies by its float32 reciprocal, so an activation that lies
within an ulp of a rounding boundary may take the neighbouring code.

**Activation pruning** stays float: a static mask is a ``Mul`` by a constant mask, dynamic
top-k is ``TopK`` plus a scatter.

What is exported as float, and why, is listed in the returned :class:`OnnxReport`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize as torch_parametrize

from fxqp._extras import require
from fxqp.atomic import atomic_path
from fxqp.errors import LoweringError
from fxqp.lower.frozen import FrozenMask, FrozenQuantize, TopK
from fxqp.lower.lower import is_lowered, weight_sites
from fxqp.lower.packed import PackedWeight
from fxqp.lower.packing import decode_mask, pack_bits, scatter_nonzeros, unpack_bits
from fxqp.ops.chain import is_tied
from fxqp.stages import ActivationStage, stage_inputs

__all__ = ["export_onnx", "OnnxReport", "onnxruntime_op_counts", "DEFAULT_OPSET", "LINEAR_KERNELS", "MATMUL_NBITS_BLOCK"]

#: ONNX opset of the exported graph (21: ``INT4``/``UINT4`` in ``DequantizeLinear``).
DEFAULT_OPSET = 21
#: How ``nn.Linear`` weights are exported: ``DequantizeLinear`` feeding the float op, or
#: ONNX Runtime's ``MatMulNBits``.
LINEAR_KERNELS = ("dequantize", "matmul_nbits")
#: Input features per block of a ``MatMulNBits`` weight (a power of 2, at least 16).
MATMUL_NBITS_BLOCK = 32


@dataclass(frozen=True)
class OnnxReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        integer_weights: site → how its codes are stored (``"INT4"``, ``"UINT8"``,
            ``"MatMulNBits 4-bit"``, ...).
        float_weights: site → why its weight is stored as floats.
        quantized_activations: activation stage → its ``QuantizeLinear`` type (and clip).
        float_activations: activation stage → the ops exported as float arithmetic.
        folded_batch_norms: convolution site → the batch norm folded into it.
        notes: stage or site → where the ONNX model may differ from the lowered model
            beyond float rounding.
        bytes: the file's size.
    """

    path: str
    integer_weights: dict[str, str] = field(default_factory=dict)
    float_weights: dict[str, str] = field(default_factory=dict)
    quantized_activations: dict[str, str] = field(default_factory=dict)
    float_activations: dict[str, str] = field(default_factory=dict)
    folded_batch_norms: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {self.bytes:,} bytes; {len(self.integer_weights)} weights as integers, "
            f"{len(self.quantized_activations)} activations as QuantizeLinear/DequantizeLinear, "
            f"{len(self.folded_batch_norms)} batch norms folded"
        ]
        lines += [f"  float weight {site}: {why}" for site, why in self.float_weights.items()]
        lines += [f"  float activation ops {stage}: {ops}" for stage, ops in self.float_activations.items()]
        lines += [f"  note {where}: {what}" for where, what in self.notes.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------- custom ops
# Two ops whose ONNX translation is given to the exporter (``custom_translation_table``);
# their eager forms compute what the runtime computes, for anyone running the export copy.


@torch.library.custom_op("fxqp_onnx::quantize_dequantize", mutates_args=())
def _quantize_dequantize(x: Tensor, scale: Tensor, zero_point: Tensor, lo: Optional[Tensor], hi: Optional[Tensor]) -> Tensor:
    """``DequantizeLinear(QuantizeLinear(clip(x, lo, hi), s, z), s, z)``: ``q = sat(round(x / s) + z)``
    to the range of ``z``'s dtype (round half to even), then ``(q - z) · s``."""
    if lo is not None and hi is not None:
        x = torch.clamp(x, lo, hi)
    info = torch.iinfo(zero_point.dtype)
    z = zero_point.to(x.dtype)
    q = torch.clamp(torch.round(x / scale) + z, info.min, info.max)
    return (q - z) * scale


@_quantize_dequantize.register_fake
def _(x, scale, zero_point, lo, hi):
    return torch.empty_like(x)


@torch.library.custom_op("fxqp_onnx::matmul_nbits", mutates_args=())
def _matmul_nbits(x: Tensor, blob: Tensor, scales: Tensor, zero_points: Tensor, k: int, n: int, bits: int, block_size: int) -> Tensor:
    """ONNX Runtime's ``MatMulNBits``: ``x @ wᵀ`` with ``w[r, j] = (c[r, j] - z[r, b]) · s[r, b]``,
    ``b = j // block_size``; ``blob`` holds each row's codes LSB-first (two 4-bit codes a byte)."""
    blocks = blob.shape[1]
    codes = unpack_bits(blob.reshape(-1), bits, n * blocks * block_size).view(n, blocks, block_size).to(x.dtype)
    zeros = unpack_bits(zero_points.reshape(-1), bits, n * _zero_point_row_bytes(blocks, bits) * 8 // bits)
    zeros = zeros.view(n, -1)[:, :blocks].to(x.dtype)
    w = (codes - zeros[..., None]) * scales.view(n, blocks, 1).to(x.dtype)
    return x @ w.reshape(n, -1)[:, :k].T


@_matmul_nbits.register_fake
def _(x, blob, scales, zero_points, k, n, bits, block_size):
    return x.new_empty((*x.shape[:-1], n))


def _zero_point_row_bytes(blocks: int, bits: int) -> int:
    return math.ceil(blocks * bits / 8)


def _register_matmul_nbits(onnx: Any) -> None:
    """Register the schema of ONNX Runtime's contrib op ``com.microsoft.MatMulNBits`` (the
    inputs and attributes fxqp writes) with ``onnx.defs``, once: the exporter and the checker
    look ops up there, and ONNX itself does not define it."""
    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    schema = onnx.defs.OpSchema
    param = schema.FormalParameter
    onnx.defs.register_schema(
        schema(
            "MatMulNBits",
            "com.microsoft",
            1,
            "A @ dequantize(B)^T, B in blocks of block_size along K (ONNX Runtime contrib op).",
            inputs=[
                param("A", "T1"),
                param("B", "T2"),
                param("scales", "T1"),
                param("zero_points", "T3", param_option=schema.FormalParameterOption.Optional),
            ],
            outputs=[param("Y", "T1")],
            type_constraints=[
                ("T1", ["tensor(float)", "tensor(float16)"], "float"),
                ("T2", ["tensor(uint8)"], "codes"),
                ("T3", ["tensor(uint8)", "tensor(float)"], "zero points"),
            ],
            attributes=[
                schema.Attribute(name, schema.AttrType.INT, description)
                for name, description in (
                    ("K", "input features"),
                    ("N", "output features"),
                    ("bits", "code width"),
                    ("block_size", "block length"),
                )
            ],
        )
    )


def _translations(onnx: Any, onnxscript: Any) -> dict:
    """The ONNX functions of the custom ops, for ``torch.onnx.export``."""
    _register_matmul_nbits(onnx)
    op = onnxscript.opset21
    microsoft = onnxscript.values.Opset("com.microsoft", 1)

    def quantize_dequantize(x, scale, zero_point, lo=None, hi=None):
        if lo is not None:
            x = op.Clip(x, lo, hi)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def matmul_nbits(x, blob, scales, zero_points, k: int, n: int, bits: int, block_size: int):
        return microsoft.MatMulNBits(x, blob, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size)

    return {
        torch.ops.fxqp_onnx.quantize_dequantize.default: quantize_dequantize,
        torch.ops.fxqp_onnx.matmul_nbits.default: matmul_nbits,
    }


# --------------------------------------------------------------------------- activations


class _QuantizeDequantize(nn.Module):
    """A :class:`~fxqp.lower.frozen.FrozenQuantize` as the ``quantize_dequantize`` op:
    buffers ``scale`` (float32 scalar), ``zero_point`` (``uint8``/``int8`` scalar) and, when
    the grid ``[qmin, qmax]`` is narrower than that type, the clip ends ``lo``/``hi``."""

    def __init__(self, scale: Tensor, zero_point: int, qmin: int, qmax: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(()).clone())
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=dtype))
        info = torch.iinfo(dtype)
        self.clipped = (qmin, qmax) != (info.min, info.max)
        self.register_buffer("lo", (torch.tensor(float(qmin - zero_point)) * self.scale) if self.clipped else None)
        self.register_buffer("hi", (torch.tensor(float(qmax - zero_point)) * self.scale) if self.clipped else None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.fxqp_onnx.quantize_dequantize(x, self.scale, self.zero_point, self.lo, self.hi)


def _activation_qdq(op: FrozenQuantize) -> tuple[_QuantizeDequantize, str, str | None] | str:
    """``(module, description, note)`` of a frozen quantizer as a Q/DQ pair, or why it stays float."""
    if op.scale.numel() != 1 or op.scale.dtype != torch.float32:
        return f"a {op.scale.dtype} scale of {op.scale.numel()} values (Q/DQ needs one float32 scale)"
    if op.bits > 8:
        return f"{op.bits} bits (Q/DQ activations have at most 8)"
    note = None
    if op.scheme == "affine":
        zero_point, qmin, qmax, dtype = int(op.zero_point.round()), 0, 2**op.bits - 1, torch.uint8
    elif op.scheme == "symmetric":
        qmax = 2 ** (op.bits - 1) - 1
        zero_point, qmin, dtype = 0, -qmax, torch.int8
        if op.bits == 8:
            qmin = -128  # not clipped, so that the runtime fuses it
            note = "8-bit symmetric: INT8 admits the code -128, which fxqp's grid (-127..127) does not: inputs below -127.5·scale differ by one step"
    else:  # lsq
        zero_point, qmin, qmax = 0, int(op.qn), int(op.qp)  # round(clamp(x/s, qn, qp)): qn is the lower end
        dtype = torch.int8 if qmin < 0 else torch.uint8
    info = torch.iinfo(dtype)
    if not info.min <= qmin <= qmax <= info.max:
        return f"grid [{qmin}, {qmax}] outside {dtype}"
    module = _QuantizeDequantize(op.scale, zero_point, qmin, qmax, dtype)
    element = "UINT8" if dtype == torch.uint8 else "INT8"
    clip = f", clipped to codes [{qmin}, {qmax}]" if module.clipped else ""
    return module, f"{element} (scale {float(module.scale):.4g}, zero point {zero_point}{clip})", note


class _TopKByOrder(nn.Module):
    """:class:`~fxqp.lower.frozen.TopK` as ops every exporter translates (``topk`` and
    ``scatter``, not stable sorts): the ``round(s·n)`` smallest ``|x|`` of each sample are
    zeroed; among equal magnitudes the runtime's ``TopK`` picks (not the latent, not the
    index), which changes an output only where equal non-zero magnitudes straddle the cut."""

    def __init__(self, op: TopK):
        super().__init__()
        self.sparsity = float(op.target)
        self.wants_latent = op.wants_latent

    def forward(self, x: Tensor, latent: Tensor | None = None) -> Tensor:
        n = x[0].numel()
        k = round(self.sparsity * n)  # round half to even, as prune_count
        if k == 0:
            return x
        flat = x.reshape(x.shape[0], n)
        _, smallest = torch.topk(flat.abs(), k, dim=1, largest=False)
        return (flat * torch.ones_like(flat).scatter(1, smallest, 0.0)).reshape(x.shape)


def _describe(op: nn.Module) -> str:
    if isinstance(op, FrozenQuantize):
        return f"FrozenQuantize({op.scheme} {op.bits}b as Round/Clip arithmetic)"
    if isinstance(op, FrozenMask):
        return "FrozenMask(Mul by a constant mask)"
    if isinstance(op, _TopKByOrder):
        return f"TopK({op.sparsity:.3g} of each sample by ONNX TopK; ties in the runtime's order)"
    return type(op).__name__


def _export_activations(model: nn.Module, dtypes: dict[str, torch.dtype], report: dict[str, dict[str, str]]) -> None:
    """Replace the frozen activation ops of ``model`` (the export copy) by their export
    forms; record the Q/DQ pairs, what they change, and every op left as float arithmetic
    (with why, for a quantizer)."""
    for stage in model.modules():
        if not isinstance(stage, ActivationStage) or not len(stage.ops):
            continue
        ops, floats = [], []
        for op in stage.ops:
            if isinstance(op, TopK):
                op = _TopKByOrder(op)
                floats.append(_describe(op))
            elif isinstance(op, FrozenQuantize):
                dtype = dtypes.get(stage.site)
                qdq = _activation_qdq(op) if dtype == torch.float32 else f"a {dtype} input (Q/DQ here take float32)"
                if isinstance(qdq, str):
                    floats.append(f"{_describe(op)} ({qdq})")
                else:
                    op, description, note = qdq
                    report["quantized_activations"][stage.site] = description
                    if note:
                        report["notes"][stage.site] = note
                    ops.append(op)
                    continue
            else:
                floats.append(_describe(op))
            ops.append(op)
        if floats:
            report["float_activations"][stage.site] = ", ".join(floats)
        stage.ops = nn.ModuleList(ops)


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class _Codes:
    """A weight as ``DequantizeLinear`` inputs: dense integer codes (the weight's shape) of
    ONNX type ``element``, the float32 scale (one, or one per channel of ``axis``) and, for
    unsigned codes, the zero point (shaped as the scale)."""

    values: Tensor
    element: str
    scale: Tensor
    zero_point: Tensor | None = None
    axis: int | None = None


_TYPE_RANGE = {"INT4": (-8, 7), "INT8": (-128, 127), "UINT4": (0, 15), "UINT8": (0, 255)}


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
    scale = packed.scale.detach().reshape(-1)
    axis = layout.channel_axis if layout.channel_axis is not None and scale.numel() > 1 else None
    if layout.scheme == "sign":
        return _Codes(scatter_nonzeros(2 * stored - 1, keep).view(layout.shape), "INT4", scale, None, axis)
    if layout.scheme == "affine":
        zero_point = packed.zero_point.round().to(torch.int64)
        if not torch.equal(zero_point.to(packed.zero_point.dtype), packed.zero_point):
            return _half_integer_affine(packed, stored, keep, axis)
        pruned_as = zero_point.view(layout.scale_shape()).expand(layout.shape).reshape(-1)
        codes = torch.where(keep, scatter_nonzeros(stored + layout.qmin, keep), pruned_as)
        element = "UINT4" if layout.bits <= 4 else "UINT8"
        return _Codes(codes.view(layout.shape), element, scale, zero_point.reshape(-1), axis)
    codes = scatter_nonzeros(stored + layout.qmin, keep)
    return _Codes(codes.view(layout.shape), "INT4" if layout.bits <= 4 else "INT8", scale, None, axis)


def _half_integer_affine(packed: PackedWeight, stored: Tensor, keep: Tensor, axis: int | None) -> _Codes | str:
    """An affine grid whose zero point is a half integer (DoReFa's ``z = L/2`` with ``L``
    odd): ``(c - z)·s = (2c - 2z)·(s/2)``, both sides the one rounding of the same real
    product, so the doubled signed codes and the halved scale decode bit for bit."""
    layout = packed.layout
    doubled = packed.zero_point * 2
    if not torch.equal(doubled.round(), doubled):
        return "a zero point that is neither an integer nor a half integer"
    twice_z = doubled.round().to(torch.int64).view(layout.scale_shape()).expand(layout.shape).reshape(-1)
    codes = torch.where(keep, scatter_nonzeros(2 * (stored + layout.qmin), keep) - twice_z, 0)
    element = _signed_type(int(codes.min()), int(codes.max()))
    if element is None:
        return f"doubled codes in [{int(codes.min())}, {int(codes.max())}] do not fit 8 bits"
    return _Codes(codes.view(layout.shape), element, packed.scale.detach().reshape(-1) / 2, None, axis)


def _widened(codes: _Codes | str, min_bits: int) -> _Codes | str:
    """4-bit codes as 8-bit ones when ``min_bits`` is 8 (the same values)."""
    if isinstance(codes, str) or min_bits <= 4 or codes.element not in ("INT4", "UINT4"):
        return codes
    return dataclasses.replace(codes, element=codes.element.replace("4", "8"))


def _signed_type(lo: int, hi: int) -> str | None:
    return next((t for t in ("INT4", "INT8") if _TYPE_RANGE[t][0] <= lo and hi <= _TYPE_RANGE[t][1]), None)


def _fold_into_codes(codes: _Codes, factor: Tensor) -> _Codes | str:
    """Codes whose decoded weight is the old one times ``factor`` per output channel (axis
    0), or why not: scales ``s·|f|``; a channel with ``f < 0`` negated (``q' = -q``, or
    ``c' = Q - c`` and ``z' = Q - z`` for unsigned codes)."""
    channels = codes.values.shape[0]
    if codes.axis not in (None, 0):
        return f"its scales are per channel of axis {codes.axis}, not of the output channels"
    scale = codes.scale.reshape(-1).expand(channels)
    values, element, zero_point = codes.values.clone(), codes.element, codes.zero_point
    negative = factor < 0
    if bool(negative.any()):
        if zero_point is None:
            values[negative] = -values[negative]
            element = _signed_type(int(values.min()), int(values.max())) or element
            if int(values.max()) > _TYPE_RANGE[element][1]:
                return "a channel with a negative batch-norm factor holds the code -128, which INT8 cannot negate"
        else:
            top = _TYPE_RANGE[element][1]
            zero_point = zero_point.reshape(-1).expand(channels).clone()
            values[negative] = top - values[negative]
            zero_point[negative] = top - zero_point[negative]
    if zero_point is not None:
        zero_point = zero_point.reshape(-1).expand(channels)
    return _Codes(values, element, scale * factor.abs(), zero_point, 0)


def _integer_tensor(onnx: Any, name: str, element: int, values: Tensor) -> Any:
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


# --------------------------------------------------------------------------- MatMulNBits


class _LinearNBits(nn.Module):
    """An ``nn.Linear`` whose weight is ``MatMulNBits`` codes (see the module doc): buffers
    ``blob`` (``[N, blocks, block bytes]`` uint8), ``scales`` (``N · blocks`` float32),
    ``zero_points`` (each row's packed, ``N · ceil(blocks · bits / 8)`` uint8) and ``bias``."""

    def __init__(self, codes: _Codes, bias: Tensor | None):
        super().__init__()
        n, k = codes.values.shape
        offset = {"INT4": 8, "INT8": 128}.get(codes.element, 0)
        self.bits = 4 if codes.element.endswith("INT4") else 8
        self.k, self.n, self.block = k, n, MATMUL_NBITS_BLOCK
        blocks = math.ceil(k / self.block)
        zero = codes.zero_point.reshape(-1).expand(n) if codes.zero_point is not None else torch.zeros(n, dtype=torch.int64)
        zero = zero + offset
        padded = zero[:, None].expand(n, blocks * self.block).clone()  # padding decodes to 0
        padded[:, :k] = codes.values + offset
        self.register_buffer("blob", pack_bits(padded.reshape(-1), self.bits).view(n, blocks, self.block * self.bits // 8))
        self.register_buffer("scales", codes.scale.reshape(-1).expand(n)[:, None].expand(n, blocks).reshape(-1).clone())
        row = _zero_point_row_bytes(blocks, self.bits) * 8 // self.bits
        zeros = torch.zeros(n, row, dtype=torch.int64)
        zeros[:, :blocks] = zero[:, None]
        self.register_buffer("zero_points", pack_bits(zeros.reshape(-1), self.bits))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.fxqp_onnx.matmul_nbits(x, self.blob, self.scales, self.zero_points, self.k, self.n, self.bits, self.block)
        return y if self.bias is None else y + self.bias


def _use_matmul_nbits(
    model: fx.GraphModule, path: str, module: nn.Linear, packed: PackedWeight, min_bits: int
) -> tuple[str | None, str | None]:
    """Replace the ``nn.Linear`` at ``path`` of the export copy by a :class:`_LinearNBits`:
    ``(the MatMulNBits form of its weight, None)``, or ``(None, why it keeps DequantizeLinear)``."""
    if packed.layout.channel_axis not in (None, 0):
        return None, f"its scales are per channel of axis {packed.layout.channel_axis}, not of the rows MatMulNBits scales"
    if any(node.op == "get_attr" and str(node.target).startswith(f"{path}.") for node in model.graph.nodes):
        return None, "its weight is also read as a tensor"
    codes = _widened(_integer_codes(packed), min_bits)
    if isinstance(codes, str):
        return None, codes
    replacement = _LinearNBits(codes, module.bias)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, replacement)
    return f"MatMulNBits {replacement.bits}-bit", None


# --------------------------------------------------------------------------- batch norms


def _fold_batch_norms(model: fx.GraphModule, codes: dict[str, _Codes | str], notes: dict[str, str]) -> dict[str, str]:
    """Fold every eval-mode batch norm that alone reads a convolution's output into that
    convolution of the export copy (see the module doc): its integer codes in ``codes``
    (site → codes), or its float weight, and its bias; the norm's node goes. Returns
    convolution site → folded norm."""
    modules = dict(model.named_modules())
    shared = {id(m.parametrizations["weight"][0].source) for m in modules.values() if is_tied(m)}  # weights others read
    calls = collections.Counter(node.target for node in model.graph.nodes if node.op == "call_module")
    folded = {}
    for node in list(model.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) or norm.training or norm.running_var is None:
            continue
        conv_node = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = modules.get(conv_node.target) if isinstance(conv_node, fx.Node) and conv_node.op == "call_module" else None
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or len(conv_node.users) != 1:
            continue
        site = f"{conv_node.target}.weight"
        if calls[conv_node.target] != 1 or calls[node.target] != 1:
            notes[site] = f"batch norm {node.target} not folded: the convolution or the norm is called more than once"
            continue
        if id(conv) in shared or is_tied(conv):
            notes[site] = f"batch norm {node.target} not folded: the weight is shared with another module"
            continue
        packed = conv.parametrizations["weight"][0] if torch_parametrize.is_parametrized(conv, "weight") else None
        with torch.no_grad():
            factor = torch.rsqrt(norm.running_var.float() + norm.eps)
            if norm.weight is not None:
                factor = factor * norm.weight.float()
            per_channel = (-1,) + (1,) * (conv.weight.dim() - 1)
            if packed is None:
                conv.weight = nn.Parameter(conv.weight * factor.view(per_channel), requires_grad=False)
            else:
                if not isinstance(codes[site], str):  # integer codes: the scales take the factor
                    folded_codes = _fold_into_codes(codes[site], factor)
                    if isinstance(folded_codes, str):
                        notes[site] = f"batch norm {node.target} not folded: {folded_codes}"
                        continue
                    codes[site] = folded_codes
                packed.cached = packed.cached * factor.view(per_channel)
            bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(factor)
            shift = norm.bias.float() if norm.bias is not None else 0.0
            conv.bias = nn.Parameter((bias - norm.running_mean.float()) * factor + shift, requires_grad=False)
        node.replace_all_uses_with(conv_node)
        model.graph.erase_node(node)
        folded[site] = str(node.target)
    model.recompile()
    return folded


# --------------------------------------------------------------------------- export


def export_onnx(
    model: fx.GraphModule,
    example_inputs: tuple[Any, ...],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    fold_batch_norm: bool = True,
    linear_kernel: str = "dequantize",
    min_weight_bits: int = 4,
) -> OnnxReport:
    """Write a lowered model to ``path`` as ONNX with its quantized weights as integers and
    its activation quantizers as ``QuantizeLinear``/``DequantizeLinear`` pairs (see the module
    doc), written atomically.

    Args:
        model: a lowered model (:func:`fxqp.lower` or :func:`fxqp.load`); not modified.
        example_inputs: positional example inputs.
        path: the ``.onnx`` file.
        dynamic_batch: the first dimension of every tensor input is dynamic (``"batch"``).
        opset: the ONNX opset (at least 21, for 4-bit integer weights).
        fold_batch_norm: fold each batch norm that follows a convolution into its scales
            and bias (what lets the runtime fuse the convolution with its quantizers), and
            let the exporter's optimizer fold constants (unless it would fold a weight).
            ``False`` exports the graph as it is, with the weights decoded bit for bit as
            fxqp decodes them.
        linear_kernel: ``"dequantize"`` (``DequantizeLinear`` feeding the float op) or
            ``"matmul_nbits"`` (``nn.Linear`` weights as ONNX Runtime's ``MatMulNBits``,
            which only ONNX Runtime runs).
        min_weight_bits: 4 stores codes of up to 4 bits as ``INT4``/``UINT4`` (the smallest
            file); 8 stores every weight as ``INT8``/``UINT8`` codes, which ONNX Runtime's
            8-bit integer kernels run (it has none for 4-bit convolutions).

    Returns:
        An :class:`OnnxReport` listing the integer weights, the Q/DQ activations, the folded
        batch norms and everything exported as float.

    Raises:
        LoweringError: ``model`` is not a lowered model, ``opset`` is below 21,
            ``linear_kernel`` is not one of :data:`LINEAR_KERNELS`, ``min_weight_bits``
            is not 4 or 8, or the exported graph fails ONNX's checker (e.g. an op on a
            dtype the opset does not define).
        MissingExtraError: the ``onnx`` extra is not installed.
    """
    onnx = require("onnx", "fxqp.export_onnx", "onnx")
    onnxscript = require("onnxscript", "fxqp.export_onnx", "onnx")
    if not is_lowered(model):
        raise LoweringError(f"fxqp.export_onnx expects a lowered model (from fxqp.lower or fxqp.load), got {type(model).__name__}")
    if opset < DEFAULT_OPSET:
        raise LoweringError(f"fxqp.export_onnx: opset {opset} is below {DEFAULT_OPSET}, the first with 4-bit integer weights")
    if linear_kernel not in LINEAR_KERNELS:
        raise LoweringError(f"fxqp.export_onnx: linear_kernel {linear_kernel!r} is not one of {', '.join(LINEAR_KERNELS)}")
    if min_weight_bits not in (4, 8):
        raise LoweringError(f"fxqp.export_onnx: min_weight_bits {min_weight_bits!r} is not 4 or 8")
    program_model = copy.deepcopy(model).eval()
    found: dict[str, dict[str, str]] = {key: {} for key in ("quantized_activations", "float_activations", "notes")}
    stages = dict(program_model.named_modules())
    dtypes = {stages[path].site: dtype for path, (_, dtype) in stage_inputs(program_model, *example_inputs).items()}
    _export_activations(program_model, dtypes, found)
    integer, floats = {}, {}
    codes: dict[str, _Codes | str] = {}
    for path_, module, params in list(weight_sites(program_model)):
        weight = params[0]
        if linear_kernel == "matmul_nbits" and isinstance(module, nn.Linear):
            nbits, why = _use_matmul_nbits(program_model, path_, module, weight, min_weight_bits)
            if nbits is not None:
                integer[f"{path_}.weight"] = nbits
                continue
            found["notes"][f"{path_}.weight"] = f"not MatMulNBits: {why}"
        weight.set_decode("cache")
        codes[f"{path_}.weight"] = _widened(_integer_codes(weight), min_weight_bits)
    folded = _fold_batch_norms(program_model, codes, found["notes"]) if fold_batch_norm else {}
    dynamic = tuple({0: "batch"} if isinstance(x, torch.Tensor) else None for x in example_inputs) if dynamic_batch else None
    cached = {site: site.removesuffix(".weight") + ".parametrizations.weight.0.cached" for site in codes}
    # The exporter's optimizer folds constants (a relu6's bounds, shapes...). Where it also
    # folds a decoded weight into another constant (a batch norm left, a transpose), that
    # weight's initializer is no longer the codes': export again without it.
    for optimize in dict.fromkeys((fold_batch_norm, False)):
        with torch.no_grad():
            program = torch.onnx.export(
                program_model,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic,
                optimize=optimize,
                custom_translation_table=_translations(onnx, onnxscript),
                verbose=False,
            )
        names = {init.name for init in program.model_proto.graph.initializer}
        if all(name in names for site, name in cached.items() if not isinstance(codes[site], str)):
            break
    proto = program.model_proto
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    dequantize = []
    for site, site_codes in codes.items():
        name = cached[site]
        if isinstance(site_codes, str):
            floats[site] = site_codes
        elif name not in initializers:
            floats[site] = "the exporter folded the weight into another constant"
        else:
            dequantize.append(_dequantize_node(onnx, graph, site, name, site_codes))
            graph.initializer.remove(initializers[name])
            integer[site] = site_codes.element
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize + nodes)
    for node in graph.node:  # the exporter's per-node provenance (stack traces, fx names): bytes no runtime reads
        del node.metadata_props[:]
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise LoweringError(
            f"fxqp.export_onnx: the exported graph fails ONNX's checker at opset {opset} ({first}); "
            "a model in bfloat16 or float16 may need model.float() before fxqp.lower, or a later opset"
        ) from None
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
    return OnnxReport(
        os.fspath(path),
        integer_weights=integer,
        float_weights=floats,
        quantized_activations=found["quantized_activations"],
        float_activations=found["float_activations"],
        folded_batch_norms=folded,
        notes=found["notes"],
        bytes=os.path.getsize(path),
    )


def _dequantize_node(onnx: Any, graph: Any, site: str, output: str, codes: _Codes) -> Any:
    """Add the initializers of ``codes`` to ``graph``; the ``DequantizeLinear`` node that
    decodes them into ``output``."""
    element = getattr(onnx.TensorProto, codes.element)
    per_channel = codes.axis is not None
    inputs = [f"{site}.codes", f"{site}.scale"]
    graph.initializer.extend(
        [
            _integer_tensor(onnx, f"{site}.codes", element, codes.values),
            onnx.numpy_helper.from_array((codes.scale if per_channel else codes.scale.reshape(())).numpy(), f"{site}.scale"),
        ]
    )
    if codes.zero_point is not None:
        zero_point = codes.zero_point.reshape(-1) if per_channel else codes.zero_point.reshape(())
        graph.initializer.append(_integer_tensor(onnx, f"{site}.zero_point", element, zero_point))
        inputs.append(f"{site}.zero_point")
    attrs = {"axis": codes.axis} if per_channel else {}
    return onnx.helper.make_node("DequantizeLinear", inputs, [output], name=f"{site}.dequantize", **attrs)


def onnxruntime_op_counts(path: str | os.PathLike, *, threads: int = 1) -> collections.Counter:
    """Op types (``domain.`` prefixed outside the default domain) of the graph ONNX Runtime's
    CPU provider runs for the model at ``path``, after all its graph optimizations: which
    quantized groups it fused into integer kernels (``com.microsoft.QLinearConv``...)."""
    ort = require("onnxruntime", "fxqp.lower.onnx.onnxruntime_op_counts", "onnx")
    onnx = require("onnx", "fxqp.lower.onnx.onnxruntime_op_counts", "onnx")
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # not the warning that an ENABLE_ALL graph is machine-specific: it is read here only
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(f"{node.domain}.{node.op_type}" if node.domain else node.op_type for node in graph.node)
