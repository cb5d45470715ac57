"""Size accounting of a lowered model: packed bytes against the information bound.

For a weight site with ``n`` elements of which ``nnz`` are non-zero, quantized to ``bits``:

    bound = nnz·bits + min(n, n·H(nnz/n)) + (bits of its scales and zero points)

where ``H`` is the binary entropy: the codes at their exact width, the positions of the
non-zeros at their entropy (or a plain bitmask, whichever is less), and the per-channel
scales as they are (32-bit floats). A site with no active quantizer counts its values at
their float width. Every other tensor of the model (biases, norm parameters and statistics,
frozen activation scales and masks) counts at its own size, so the ratio of a file to the
bound measures exactly the cost of the encodings and of the file's headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fxqp.lower.artifact import float_state
from fxqp.lower.lower import weight_sites
from fxqp.lower.packed import PackedWeight
from fxqp.lower.packing import mask_bound_bits
from fxqp.stages import ActivationStage

__all__ = [
    "SiteSize",
    "site_sizes",
    "stage_size",
    "state_bytes",
    "total_bound_bytes",
    "bound_bits",
    "seed_size_bytes",
    "parameter_count",
    "MB",
]

#: Bytes in the "MB" of :func:`seed_size_bytes` (2^20).
MB = 2**20


@dataclass(frozen=True)
class SiteSize:
    """Packed size of one weight site (bytes) and its information bound (bits)."""

    site: str
    target: str
    scheme: str
    bits: int
    encoding: str
    n: int
    nnz: int
    packed_bytes: int
    bound_bits: float

    @property
    def bits_per_param(self) -> float:
        return 8 * self.packed_bytes / max(self.n, 1)

    @property
    def float32_ratio(self) -> float:
        """How many times smaller than the float32 weight."""
        return 4 * self.n / max(self.packed_bytes, 1)


def bound_bits(packed: PackedWeight) -> float:
    """The information bound of one packed weight (see the module doc), in bits."""
    layout = packed.layout
    side = sum(
        getattr(packed, name).numel() * getattr(packed, name).element_size() * 8
        for name in ("scale", "zero_point")
        if hasattr(packed, name)
    )
    return layout.mask.nnz * layout.bits + mask_bound_bits(layout.mask.n, layout.mask.nnz) + side


def site_sizes(model: nn.Module) -> list[SiteSize]:
    """One :class:`SiteSize` per packed weight of a lowered model, in module order."""
    sizes = []
    for _, module, params in weight_sites(model):
        packed = params[0]
        if not isinstance(packed, PackedWeight):
            continue
        layout = packed.layout
        base = type(module).__bases__[0] if type(module).__name__.startswith("Parametrized") else type(module)
        sizes.append(
            SiteSize(
                packed.site,
                base.__name__,
                layout.scheme,
                layout.bits,
                layout.mask.kind,
                layout.mask.n,
                layout.mask.nnz,
                packed.nbytes(),
                bound_bits(packed),
            )
        )
    return sizes


def stage_size(model: nn.Module) -> tuple[int, float]:
    """Stored bytes and bound (bits) of the frozen activation ops of a lowered model; a
    static mask's bound is ``min(n, n·H)``, other tensors count at their size."""
    ops = [op for m in model.modules() if isinstance(m, ActivationStage) for op in m.ops]
    stored = sum(t.numel() * t.element_size() for op in ops for t in op.tensors().values())
    return stored, sum(op.bound_bits() for op in ops)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors of a lowered model stored as they are (biases, norms, ...)."""
    return sum(t.numel() * t.element_size() for t in float_state(model).values())


def total_bound_bytes(model: nn.Module) -> float:
    """The information bound of a whole lowered model, in bytes."""
    return (sum(s.bound_bits for s in site_sizes(model)) + stage_size(model)[1]) / 8 + state_bytes(model)


def seed_size_bytes(model: nn.Module) -> float:
    """Model size by the convention of the seed paper on pruning quantized networks
    (Guerra et al. 2020), in bytes: every weight at its bit width, zeros included (only
    removed filters do not count), its per-channel scales and zero points at 32 bits, and
    every other tensor (biases, norm parameters and statistics, frozen activation scales)
    at 32 bits per element. The width is the stored code width: 1 for binary, and for
    ternary too, whose zeros are in the sparsity encoding; a float site counts at its float
    width. Divide by :data:`MB` for the paper's megabytes."""
    bits = 0.0
    for _, _, params in weight_sites(model):
        packed = params[0]
        if not isinstance(packed, PackedWeight):
            continue
        bits += packed.layout.mask.n * packed.layout.bits
        bits += 32 * sum(getattr(packed, name).numel() for name in ("scale", "zero_point") if hasattr(packed, name))
    ops = [op for m in model.modules() if isinstance(m, ActivationStage) for op in m.ops]
    bits += 32 * sum(t.numel() for op in ops for name, t in op.tensors().items() if t.is_floating_point())
    bits += 32 * sum(t.numel() for t in float_state(model).values())
    return bits / 8


def parameter_count(model: nn.Module) -> int:
    """Parameters of a lowered model: every packed weight at its stored shape (removed
    channels do not count, pruned zeros do), and every plain parameter (biases, norms)."""
    packed = sum(s.n for s in site_sizes(model))
    plain = sum(p.numel() for name, p in model.named_parameters() if "parametrizations" not in name)
    return packed + plain
