"""The validity rules of the spec's ops, stated once, as data.

Which quantization methods take which bits and options, on which kind of site; which
pruning structures take which criteria and ``score_from``, on which kind of site and which
weight shapes; which options belong to weights or to activations. Three places read these
tables and nothing else states the rules:

* :mod:`fxqp.spec` checks every :class:`~fxqp.Quantize` and :class:`~fxqp.Prune` against
  them and words its errors from them (location, field, what is accepted);
* the op builders (:func:`fxqp.ops.build_op`) reject an op a kind of site does not take;
* :func:`fxqp.testing.specs` draws only the combinations they allow.

Every table is a read-only mapping of frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

__all__ = [
    "WEIGHT",
    "ACTIVATION",
    "SITE_KINDS",
    "BITS",
    "LEARNED_MIN_BITS",
    "QuantizeMethod",
    "QUANTIZE_METHODS",
    "QuantizeSiteRule",
    "QUANTIZE_SITES",
    "NofM",
    "n_of_m",
    "N_OF_M_MAX",
    "PruneStructure",
    "PRUNE_STRUCTURES",
    "prune_structure",
    "PruneCriterion",
    "PRUNE_CRITERIA",
    "SCORE_FROM",
    "PruneSiteRule",
    "PRUNE_SITES",
    "GRANULARITIES",
    "accepted",
    "quantize_site_problem",
    "prune_site_problem",
]

WEIGHT, ACTIVATION = "weight", "activation"
SITE_KINDS = (WEIGHT, ACTIVATION)
"""The kinds of site an op may be put on."""


def accepted(values: Sequence[str], last: str = "or") -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``: the accepted values in a message."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {last} {quoted[-1]}"


# ---------------------------------------------------------------------------------------
# Quantize
# ---------------------------------------------------------------------------------------

BITS = (1, 16)
"""The bit widths :class:`~fxqp.Quantize` takes, lowest and highest."""

LEARNED_MIN_BITS = 2
"""``learned=True`` (a learned step size) needs at least this many bits: 1 bit is sign
quantization, which has no step to learn."""


@dataclasses.dataclass(frozen=True)
class QuantizeMethod:
    """What one ``Quantize.method`` accepts.

    Attributes:
        name: the method, as ``Quantize.method`` names it.
        bits: lowest and highest ``bits`` it takes.
        sites: the kinds of site it quantizes (``"weight"``, ``"activation"``).
        learned: it takes ``learned=True`` (a learned step size, LSQ).
        fixed_grid: its grid is fixed: ``symmetric`` must be unset or true.
        scaled: it has the optional ``scaled`` flag.
    """

    name: str
    bits: tuple[int, int] = BITS
    sites: tuple[str, ...] = SITE_KINDS
    learned: bool = False
    fixed_grid: bool = False
    scaled: bool = False

    def takes_bits(self, bits: int) -> bool:
        return self.bits[0] <= bits <= self.bits[1]

    @property
    def accepted_bits(self) -> str:
        """``"bits=1"`` or ``"bits 2..16"``."""
        low, high = self.bits
        return f"bits={low}" if low == high else f"bits {low}..{high}"


QUANTIZE_METHODS: Mapping[str, QuantizeMethod] = MappingProxyType(
    {
        "uniform": QuantizeMethod("uniform", learned=True),
        "lsq": QuantizeMethod("lsq", bits=(2, 16), learned=True),
        "pow2": QuantizeMethod("pow2", bits=(2, 16), fixed_grid=True),
        "dorefa": QuantizeMethod("dorefa", fixed_grid=True),
        "binary": QuantizeMethod("binary", bits=(1, 1), sites=(WEIGHT,), fixed_grid=True, scaled=True),
        "ternary": QuantizeMethod("ternary", bits=(2, 2), sites=(WEIGHT,), fixed_grid=True),
    }
)
"""Every quantization method by name, in the order :data:`fxqp.spec.QUANTIZE_METHODS` lists them."""


@dataclasses.dataclass(frozen=True)
class QuantizeSiteRule:
    """What :class:`~fxqp.Quantize` accepts on one kind of site.

    Attributes:
        kind: ``"weight"`` or ``"activation"``.
        per_channel: ``per_channel=True`` is accepted.
        symmetric_min_bits: ``symmetric=True`` needs at least this many bits (methods whose
            grid is not fixed).
    """

    kind: str
    per_channel: bool
    symmetric_min_bits: int

    def methods(self) -> tuple[QuantizeMethod, ...]:
        """The methods that quantize this kind of site."""
        return tuple(m for m in QUANTIZE_METHODS.values() if self.kind in m.sites)


QUANTIZE_SITES: Mapping[str, QuantizeSiteRule] = MappingProxyType(
    {
        WEIGHT: QuantizeSiteRule(WEIGHT, per_channel=True, symmetric_min_bits=1),
        ACTIVATION: QuantizeSiteRule(ACTIVATION, per_channel=False, symmetric_min_bits=2),
    }
)
"""Per kind of site, what :class:`~fxqp.Quantize` accepts there."""


# ---------------------------------------------------------------------------------------
# Prune
# ---------------------------------------------------------------------------------------

N_OF_M_MAX = 64
"""The largest ``M`` of an ``"N:M"`` structure."""


@dataclasses.dataclass(frozen=True)
class NofM:
    """The ``"N:M"`` structure of a :class:`~fxqp.Prune`: keep ``n`` of every ``m`` consecutive
    weights along the input dimension (``0 < n < m <= 64``)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        """The fraction it zeroes, ``(m − n) / m``."""
        return (self.m - self.n) / self.m


@functools.lru_cache(maxsize=1024)
def n_of_m(structure: str) -> NofM | None:
    """The :class:`NofM` of a ``Prune.structure`` string, or ``None`` for ``"element"``,
    ``"filter"`` and ``"channel"`` (parsed once per string; the spec has checked it). ``N``
    and ``M`` have at most 9 digits each: a longer one is no pattern (``None``)."""
    match = re.fullmatch(r"(\d{1,9}):(\d{1,9})", structure)
    return NofM(int(match.group(1)), int(match.group(2))) if match else None


@dataclasses.dataclass(frozen=True)
class PruneCriterion:
    """How a filter or channel is scored (``Prune.criterion``).

    Attributes:
        name: the criterion.
        needs_quantizer: it compares the weight with its quantized version, so the site
            needs a :class:`~fxqp.Quantize` op too.
    """

    name: str
    needs_quantizer: bool = False


PRUNE_CRITERIA: Mapping[str, PruneCriterion] = MappingProxyType(
    {"l1": PruneCriterion("l1"), "l2": PruneCriterion("l2"), "angle": PruneCriterion("angle", needs_quantizer=True)}
)
"""Every scoring criterion by name; the first is the default."""

SCORE_FROM = ("own", "next")
"""The values of ``Prune.score_from``; the first is the default."""


@dataclasses.dataclass(frozen=True)
class PruneStructure:
    """What one ``Prune.structure`` accepts.

    Attributes:
        name: ``"element"``, ``"filter"``, ``"channel"``, or ``"N:M"`` for the patterns.
        sites: the kinds of site it prunes.
        criteria: the ``criterion`` values it takes.
        score_from: the ``score_from`` values it takes.
        ramp: it takes a ramp (``end``); without one its sparsity is fixed.
        out_channels: the weight needs output channels (a channel axis).
        in_channels: the weight needs input channels (a 2-D or larger weight).
        pattern: the :class:`NofM` of an ``"N:M"`` structure: the input dimension must be a
            multiple of ``m``, and ``sparsity`` must be ``(m − n)/m``.
    """

    name: str
    sites: tuple[str, ...] = (WEIGHT,)
    criteria: tuple[str, ...] = ("l1",)
    score_from: tuple[str, ...] = ("own",)
    ramp: bool = True
    out_channels: bool = False
    in_channels: bool = False
    pattern: NofM | None = None

    def fits(self, shape: Sequence[int], channel_axis: int | None) -> bool:
        """Whether a weight of ``shape`` with output-channel axis ``channel_axis`` (``None``
        for a 1-D weight) takes this structure."""
        if not (self.out_channels or self.in_channels or self.pattern):
            return True
        if channel_axis is None or len(shape) < 2:
            return False
        in_dim = shape[1 - channel_axis % len(shape)]
        return self.pattern is None or in_dim % self.pattern.m == 0


PRUNE_STRUCTURES: Mapping[str, PruneStructure] = MappingProxyType(
    {
        "element": PruneStructure("element", sites=SITE_KINDS),
        "filter": PruneStructure("filter", criteria=tuple(PRUNE_CRITERIA), score_from=SCORE_FROM, out_channels=True),
        "channel": PruneStructure("channel", criteria=tuple(PRUNE_CRITERIA), in_channels=True),
        "N:M": PruneStructure("N:M", ramp=False, in_channels=True),
    }
)
"""Every structure by name; ``"N:M"`` stands for every pattern (see :func:`prune_structure`)."""


@functools.lru_cache(maxsize=1024)
def prune_structure(structure: str) -> PruneStructure | None:
    """The rule of a ``Prune.structure`` value: the table's entry, or for a valid ``"N:M"``
    pattern (``0 < N < M <= 64``) the ``"N:M"`` entry with its :class:`NofM`; ``None`` for
    a value the spec does not accept."""
    if structure in PRUNE_STRUCTURES and structure != "N:M":
        return PRUNE_STRUCTURES[structure]
    pattern = n_of_m(structure)
    if pattern is None or not 0 < pattern.n < pattern.m <= N_OF_M_MAX:
        return None
    return dataclasses.replace(PRUNE_STRUCTURES["N:M"], name=structure, pattern=pattern)


@dataclasses.dataclass(frozen=True)
class PruneSiteRule:
    """What :class:`~fxqp.Prune` accepts on one kind of site.

    Attributes:
        kind: ``"weight"`` or ``"activation"``.
        granularities: the ``granularity`` values it takes.
        dynamic: ``dynamic=True`` is accepted (with ``granularity="element"``).
    """

    kind: str
    granularities: tuple[str, ...]
    dynamic: bool

    def structures(self) -> tuple[PruneStructure, ...]:
        """The structures that prune this kind of site (``"N:M"`` for every pattern)."""
        return tuple(s for s in PRUNE_STRUCTURES.values() if self.kind in s.sites)


PRUNE_SITES: Mapping[str, PruneSiteRule] = MappingProxyType(
    {
        WEIGHT: PruneSiteRule(WEIGHT, granularities=("element",), dynamic=False),
        ACTIVATION: PruneSiteRule(ACTIVATION, granularities=("element", "channel"), dynamic=True),
    }
)
"""Per kind of site, what :class:`~fxqp.Prune` accepts there."""

GRANULARITIES = tuple(dict.fromkeys(g for rule in PRUNE_SITES.values() for g in rule.granularities))
"""Every ``Prune.granularity`` value (of some kind of site)."""


# ---------------------------------------------------------------------------------------
# An op on a kind of site
# ---------------------------------------------------------------------------------------


def _plural(kinds: Sequence[str]) -> str:
    return " and ".join(f"{kind}s" for kind in kinds)


def quantize_site_problem(config: Any, kind: str) -> tuple[str, str] | None:
    """Why a spec-valid :class:`~fxqp.Quantize` does not go on a site of ``kind``, as
    ``(field, message)`` (the message says what the site accepts), or ``None``."""
    site = QUANTIZE_SITES[kind]
    method = QUANTIZE_METHODS["lsq" if config.learned else config.method]
    if config.per_channel and not site.per_channel:
        return "per_channel", f"{kind} quantization is per tensor; accepted: null or false"
    if kind not in method.sites:
        # 'lsq' last: it is the learned form of 'uniform'
        names = sorted((m.name for m in site.methods()), key=lambda name: name == "lsq")
        return "method", f"{config.method!r} quantizes {_plural(method.sites)} only; accepted for {kind}s: {', '.join(map(repr, names))}"
    if config.symmetric and not method.fixed_grid and config.bits < site.symmetric_min_bits:
        return (
            "bits",
            f"symmetric {config.bits}-bit {kind}s are not supported; accepted: bits {site.symmetric_min_bits}..{method.bits[1]}, "
            "or symmetric false",
        )
    return None


def prune_site_problem(config: Any, kind: str) -> tuple[str, str] | None:
    """Why a spec-valid :class:`~fxqp.Prune` does not go on a site of ``kind``, as
    ``(field, message)`` (the message says what the site accepts), or ``None``."""
    site = PRUNE_SITES[kind]
    others = [k for k in SITE_KINDS if k != kind]
    if config.granularity not in site.granularities:
        return "granularity", f"{config.granularity!r} is an {'/'.join(others)}-only option; {kind}s accept {accepted(site.granularities)}"
    if config.dynamic and not site.dynamic:
        return "dynamic", f"True is an {'/'.join(others)}-only option; {kind}s accept False"
    structure = prune_structure(config.structure)
    if kind not in structure.sites:
        names = [s.name for s in site.structures()]
        extra = "".join(f" (and granularity={g!r} for {g}s)" for g in site.granularities if g != "element")
        return "structure", f"{config.structure!r} prunes {_plural(structure.sites)}; {kind}s accept {accepted(names)}{extra}"
    return None
