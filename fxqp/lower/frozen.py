"""Frozen inference forms of activation ops, and how each trained op freezes.

Each frozen op computes exactly what its trained op computes in eval mode at the step the
model was lowered at (same functions, same operand values), so outputs are bit-identical:

* :class:`FrozenQuantize` — fixed scale (and zero point): ``affine``, ``symmetric`` or ``lsq``;
* :class:`FrozenMask` — a static activation mask: ``x · mask``;
* :class:`TopK` — dynamic per-sample top-k at the sparsity reached when lowered.

An op that is the identity when lowered (not yet started, never observed, an all-ones mask,
zero target sparsity) is dropped. Every frozen op converts to a JSON record plus named
tensors (:meth:`record`, :meth:`tensors`) and back (:func:`frozen_from_record`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fxqp.lower.packing import MaskCode, decode_mask, encode_mask, mask_bound_bits
from fxqp.ops import ActivationPruner, ActivationQuantizer, DorefaActivationQuantizer, LsqQuantizer, Pow2ActivationQuantizer, ScheduledOp
from fxqp.ops.base import compute_dtype
from fxqp.ops.numerics import (
    MIN_SCALE,
    affine_qparams,
    fake_quantize_affine,
    fake_quantize_lsq,
    fake_quantize_symmetric,
    magnitude_keep_mask,
    prune_count,
)

__all__ = ["FrozenQuantize", "FrozenMask", "TopK", "freeze_op", "frozen_from_record"]


class FrozenQuantize(nn.Module):
    """Fake quantization with fixed parameters (see :mod:`fxqp.ops.numerics` for formulas).

    Buffers: ``scale``; ``zero_point`` (affine); ``qn``, ``qp`` (lsq, whose effective step
    also depends on the features per sample, as in training).
    """

    wants_latent = False

    def __init__(self, scheme: str, bits: int, tensors: dict[str, Tensor]):
        super().__init__()
        if scheme not in ("affine", "symmetric", "lsq"):
            raise ValueError(f"scheme: {scheme!r} is not one of affine, symmetric, lsq")
        self.scheme = scheme
        self.bits = bits
        for name in self.tensor_names(scheme):
            self.register_buffer(name, tensors[name])

    @staticmethod
    def tensor_names(scheme: str) -> tuple[str, ...]:
        return {"affine": ("scale", "zero_point"), "symmetric": ("scale",), "lsq": ("scale", "qn", "qp")}[scheme]

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(compute_dtype(x))
        if self.scheme == "affine":
            q = fake_quantize_affine(xf, self.scale.to(xf.dtype), self.zero_point.to(xf.dtype), self.bits)
        elif self.scheme == "symmetric":
            q = fake_quantize_symmetric(xf, self.scale.to(xf.dtype), self.bits)
        else:
            q = fake_quantize_lsq(xf, self.scale.to(xf.dtype), self.qn, self.qp, torch.rsqrt(self.qp * xf[0].numel()))
        return q.to(x.dtype)

    def record(self) -> dict[str, Any]:
        return {"kind": "quantize", "scheme": self.scheme, "bits": self.bits}

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.tensor_names(self.scheme)}

    def bound_bits(self) -> float:
        return sum(8 * t.numel() * t.element_size() for t in self.tensors().values())

    def extra_repr(self) -> str:
        return f"{self.scheme} {self.bits}b"


class FrozenMask(nn.Module):
    """A static activation mask: ``x · mask``.

    Stored packed (buffer ``payload``, a :func:`~fxqp.lower.packing.encode_mask` encoding of
    the flattened mask; ``code`` its metadata); decoded once into the non-persistent bool
    buffer ``mask`` of the activation's per-sample shape.
    """

    wants_latent = False

    def __init__(self, shape: tuple[int, ...], code: MaskCode, tensors: dict[str, Tensor]):
        super().__init__()
        self.shape = tuple(shape)
        self.code = code
        self.register_buffer("payload", tensors["payload"])
        self.register_buffer("mask", decode_mask(code, self.payload).view(self.shape), persistent=False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> "FrozenMask":
        code, payload = encode_mask(mask.reshape(-1))
        return cls(tuple(mask.shape), code, {"payload": payload})

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask

    def record(self) -> dict[str, Any]:
        return {"kind": "mask", "shape": list(self.shape), "code": self.code.to_dict()}

    def tensors(self) -> dict[str, Tensor]:
        return {"payload": self.payload}

    def bound_bits(self) -> float:
        return mask_bound_bits(self.code.n, self.code.nnz)


class TopK(nn.Module):
    """Zero the ``round(s·n)`` smallest ``|x|`` of every sample (ties by ``|latent|`` when
    ``tiebreak``, then by index); ``s`` is the float64 buffer ``target``."""

    def __init__(self, tiebreak: bool, tensors: dict[str, Tensor]):
        super().__init__()
        self.wants_latent = tiebreak
        self.register_buffer("target", tensors["target"])

    def forward(self, x: Tensor, latent: Tensor | None = None) -> Tensor:
        k = prune_count(self.target, x[0].numel())
        tiebreak = latent.detach().abs().to(compute_dtype(x)) if self.wants_latent else None
        keep = magnitude_keep_mask(x.detach().abs().to(compute_dtype(x)), k, tiebreak=tiebreak, batch_dims=1)
        return x * keep

    def record(self) -> dict[str, Any]:
        return {"kind": "topk", "tiebreak": self.wants_latent}

    def tensors(self) -> dict[str, Tensor]:
        return {"target": self.target}

    def bound_bits(self) -> float:
        return 8 * self.target.numel() * self.target.element_size()


# --------------------------------------------------------------------------- freezing

_FREEZERS: dict[type, Callable[[ScheduledOp], nn.Module | None]] = {}


def _freezes(op_type: type):
    def decorate(fn):
        _FREEZERS[op_type] = fn
        return fn

    return decorate


def freeze_op(op: ScheduledOp) -> nn.Module | None:
    """The frozen form of a trained activation op, or ``None`` where it is the identity."""
    try:
        freezer = _FREEZERS[type(op)]
    except KeyError:
        raise TypeError(f"no frozen form for {type(op).__name__} (site {op.site!r})") from None
    with torch.no_grad():
        return freezer(op)


@_freezes(Pow2ActivationQuantizer)
def _freeze_pow2(op: Pow2ActivationQuantizer) -> nn.Module | None:
    if not bool(op.active() & op.observed):
        return None
    return FrozenQuantize("symmetric", op.config.bits, {"scale": op.pow2_scale().clone()})


@_freezes(ActivationQuantizer)
@_freezes(DorefaActivationQuantizer)
def _freeze_observed(op: ActivationQuantizer) -> nn.Module | None:
    if not bool(op.active() & op.observed):
        return None
    bits = op.config.bits
    if op.symmetric:
        amax = torch.maximum(op.lo.abs(), op.hi.abs())
        scale = (amax / (2 ** (bits - 1) - 1)).clamp_min(MIN_SCALE)
        return FrozenQuantize("symmetric", bits, {"scale": scale.clone()})
    scale, zero_point = affine_qparams(op.lo, op.hi, bits)
    return FrozenQuantize("affine", bits, {"scale": scale.clone(), "zero_point": zero_point.clone()})


@_freezes(LsqQuantizer)
def _freeze_lsq(op: LsqQuantizer) -> nn.Module | None:
    if not bool(op.active() & op.initialized):
        return None
    qn = torch.where(op.signed, op.qn_signed, torch.zeros_like(op.qn_signed))
    qp = torch.where(op.signed, op.qp_signed, op.qp_unsigned)
    return FrozenQuantize("lsq", op.config.bits, {"scale": op.scale.detach().clone(), "qn": qn.clone(), "qp": qp.clone()})


@_freezes(ActivationPruner)
def _freeze_pruner(op: ActivationPruner) -> nn.Module | None:
    if op.dynamic:
        target = op.target()
        if float(target) == 0.0:
            return None
        return TopK(op.wants_latent, {"target": target.clone()})
    if op.mask.numel() == 0 or bool(op.mask.all()):
        return None
    return FrozenMask.from_mask(op.mask)


def frozen_from_record(record: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """Rebuild a frozen op from :meth:`record` and :meth:`tensors` (``KeyError``/``ValueError``
    on a malformed record; the caller reports where)."""
    kind = record["kind"]
    if kind == "quantize":
        return FrozenQuantize(record["scheme"], int(record["bits"]), tensors)
    if kind == "mask":
        shape = tuple(int(d) for d in record["shape"])
        code = MaskCode.from_dict(record["code"])
        if math.prod(shape) != code.n:
            raise ValueError(f"shape: {list(shape)} does not hold the mask's {code.n} elements")
        return FrozenMask(shape, code, tensors)
    if kind == "topk":
        return TopK(bool(record["tiebreak"]), tensors)
    raise ValueError(f"kind: {kind!r} is not one of quantize, mask, topk")
