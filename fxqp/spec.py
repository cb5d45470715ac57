"""The declarative spec: which sites get which quantization and pruning ops, in which order.

A :class:`Spec` is data, not code: an ordered tuple of :class:`Rule`. Each rule selects
*sites* (module weights and node outputs) and gives the ordered list of ops for the weight
and/or the output activation of each. Ops are :class:`Quantize` and :class:`Prune`.

Everything here is a frozen dataclass, validated when built; errors are
:class:`~fxqp.errors.SpecError` whose message starts with the location of the problem
(``rules[1].weight[0].bits``, or ``Quantize.bits`` when built directly in Python) and says
what would be accepted. A spec converts to and from a plain dict, YAML and JSON::

    rules:
      - modules: [Conv2d, Linear]
        weight:
          - {op: prune, sparsity: 0.5, start: 100, end: 400}
          - {op: quantize, bits: 4, start: 500}
      - modules: [ReLU]
        functions: [relu, add]
        activation:
          - {op: quantize, bits: 8, start: 200}

``start``, ``end`` and ``every`` are step counts or fractions of the run, written ``"40%"``:
a spec in fractions is portable across data and batch sizes. :meth:`Spec.resolve` (which
:func:`fxqp.transform` calls with its ``total_steps``) turns them into steps; ``to_dict``
keeps them as written.
"""

from __future__ import annotations

import dataclasses
import difflib
import fractions
import json
import math
import numbers
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, ClassVar, Optional, Union

import torch
import yaml

from fxqp.atomic import write_atomically
from fxqp.errors import SpecError
from fxqp.limits import (
    MAX_PATTERN_CHARS,
    MAX_SPEC_DEPTH,
    MAX_SPEC_VALUES,
    MAX_STEP,
    load_json_document,
    load_yaml_document,
    name_regex,
    nesting_problem,
    quote,
)
from fxqp.rules import (
    BITS,
    GRANULARITIES,
    LEARNED_MIN_BITS,
    N_OF_M_MAX,
    PRUNE_SITES,
    PRUNE_STRUCTURES,
    SCORE_FROM,
    WEIGHT,
    NofM,
    accepted,
    n_of_m,
    prune_site_problem,
    prune_structure,
)
from fxqp.rules import PRUNE_CRITERIA as CRITERION_RULES
from fxqp.rules import QUANTIZE_METHODS as METHOD_RULES
from passes.nodes import canonical_name

__all__ = [
    "is_fraction",
    "resolve_step",
    "Quantize",
    "Prune",
    "Op",
    "OP_KINDS",
    "Rule",
    "Spec",
    "canonical_function_name",
    "NofM",
    "n_of_m",
]


# ---------------------------------------------------------------------------------------
# Small value checkers. Each takes the location of the value (e.g. "rules[0].weight[1].bits")
# and returns the value in its stored form, or raises SpecError.
# ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_int(where: str, value: Any, low: int, high: int, accepted: str = "") -> int:
    """An integer in ``low..high`` (every integer of a spec is bounded); ``accepted`` says
    so in words (default ``"an integer in low..high"``)."""
    words = accepted or f"an integer in {low}..{high}"
    if isinstance(value, bool):
        raise SpecError(f"{where}: {quote(value)} is a bool, not an integer; expected {words}")
    if not isinstance(value, numbers.Integral):
        raise SpecError(f"{where}: {quote(value)} is not an integer; expected {words}")
    value = int(value)
    if not low <= value <= high:
        if accepted:
            raise SpecError(f"{where}: {quote(value)} is too {'small' if value < low else 'large'}; expected {accepted}")
        raise SpecError(f"{where}: {quote(value)} is outside the accepted range {low}..{high} (an integer)")
    return value


_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*")


def _check_step(where: str, value: Any, low: int) -> int | str:
    """A step count (an integer in ``low..MAX_STEP``, :data:`fxqp.limits.MAX_STEP` being
    ``2**62 - 1``) or a fraction of the run written ``"40%"`` (0% to 100%, stored as
    ``f"{percent:g}%"``); fractions are resolved by :meth:`Spec.resolve`."""
    expected = f"expected {_steps(low)} or a fraction of the run such as '40%'"
    if isinstance(value, str):
        match = _PERCENT.fullmatch(value)
        if match is None:
            raise SpecError(f"{where}: {quote(value)} is not accepted; {expected}")
        percent = float(match.group(1))
        if not 0.0 <= percent <= 100.0 or (low > 0 and percent == 0.0):
            accepted = "0% (exclusive) to 100%" if low > 0 else "0% to 100%"
            raise SpecError(f"{where}: {quote(value)} is outside the accepted range {accepted} of the run")
        return f"{percent:g}%"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SpecError(f"{where}: {quote(value)} is not an integer; {expected}")
    return _check_int(where, value, low, MAX_STEP, _steps(low))


def _steps(low: int) -> str:
    """The step counts a field accepts, in words."""
    return f"an integer >= {low} and < 2**62"


def is_fraction(value: Any) -> bool:
    """Whether a ``start``/``end``/``every`` value is a fraction of the run (``"40%"``)."""
    return isinstance(value, str)


def resolve_step(value: int | str, total_steps: int) -> int:
    """The step of ``value``: an int as it is, a fraction ``"p%"`` as
    ``floor(p/100 · total_steps + 1/2)`` (computed exactly, halves rounded up)."""
    if not isinstance(value, str):
        return value
    exact = fractions.Fraction(value[:-1]) * total_steps / 100
    return math.floor(exact + fractions.Fraction(1, 2))


def _percent(value: str) -> fractions.Fraction:
    return fractions.Fraction(value[:-1])


def _check_fraction(where: str, value: Any) -> float:
    """A real number in [0, 1), stored as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecError(f"{where}: {quote(value)} is not a real number; expected a real number in [0, 1)")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the floats
        number = math.inf
    if not 0.0 <= number < 1.0:
        raise SpecError(f"{where}: {quote(value)} is outside the accepted range [0, 1) (a real number)")
    return number


def _check_bool(where: str, value: Any, optional: bool = False) -> bool | None:
    if optional and value is None:
        return None
    if not isinstance(value, bool):
        accepted = "None, True or False" if optional else "True or False"
        raise SpecError(f"{where}: {quote(value)} is not a bool; expected {accepted}")
    return value


def _check_choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise SpecError(f"{where}: {quote(value)} is not accepted; expected one of {accepted}")
    return value


def _reject_unknown_keys(where: str, keys: Any, accepted: Sequence[str], noun: str = "key", context: str = "") -> None:
    """Raise for the first key of ``keys`` that is not in ``accepted``."""
    for key in keys:
        if key in accepted:
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, accepted, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        raise SpecError(f"{where}: unknown {noun} {quote(key)}{context}{hint}; accepted {noun}s: {', '.join(accepted)}")


def _check_nesting(where: str, value: Any) -> None:
    """Refuse a dict form nested deeper than :data:`~fxqp.limits.MAX_SPEC_DEPTH` or of more
    than :data:`~fxqp.limits.MAX_SPEC_VALUES` values (YAML aliases counted as expanded), in
    time bounded by the limit, before any check formats a part of it."""
    problem = nesting_problem(value, MAX_SPEC_DEPTH, MAX_SPEC_VALUES)
    if problem is not None:
        raise SpecError(f"{where}: {problem}; expected at most {MAX_SPEC_VALUES} values nested at most {MAX_SPEC_DEPTH} levels")


def _own_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _set_fields(obj: Any, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


# ---------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------


class _OpForm:
    """What the op dataclasses share: validation when built, and the dict form."""

    kind: ClassVar[str]

    def __post_init__(self) -> None:
        _set_fields(self, self._checked(type(self).__name__, _own_fields(self)))

    def to_dict(self) -> dict[str, Any]:
        """``{"op": kind, **required fields, **fields that differ from their default}``."""
        return _op_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = ""):
        """Build from the dict form; errors are located at ``where`` (default: the class name).
        The limits of :meth:`Spec.from_dict` apply."""
        _check_nesting(where or cls.__name__, d)
        return _op_from_dict_of_class(cls, d, where or cls.__name__)


PRUNE_CRITERIA = tuple(CRITERION_RULES)
"""How :class:`Prune` scores a filter or channel (the criteria of :data:`fxqp.rules.PRUNE_CRITERIA`)."""


def _check_structure(where: str, value: Any) -> str:
    if isinstance(value, str) and prune_structure(value) is not None:
        return value
    raise SpecError(
        f"{where}: {quote(value)} is not accepted; expected {accepted(list(PRUNE_STRUCTURES))} with 0 < N < M <= {N_OF_M_MAX} (e.g. '2:4')"
    )


QUANTIZE_METHODS = tuple(METHOD_RULES)
"""The quantizers :class:`Quantize` ``method`` selects (the methods of :data:`fxqp.rules.QUANTIZE_METHODS`)."""


@dataclasses.dataclass(frozen=True)
class Quantize(_OpForm):
    """Fake-quantize a weight or an activation to ``bits`` bits from step ``start`` on.

    Before ``start`` the op is the identity (observers may already collect statistics).
    The gradient is straight-through: 1 inside the clipping range, 0 outside it.

    Weights (defaults ``symmetric=True``, ``per_channel=True``): narrow signed grid
    ``[-(2^(b-1)-1), 2^(b-1)-1]`` per output channel, with
    ``scale = max|w| of the channel / (2^(b-1)-1)``, recomputed at every forward.

    Activations (defaults ``symmetric=False``, ``per_channel=False``): per-tensor affine
    grid whose range comes from an exponential-moving-average min/max observer. The range
    always includes 0, so when the observed min is >= 0 the grid is the unsigned
    ``0..2^b-1``.

    ``learned=True`` is LSQ (learned step size, Esser et al.):
    ``x_q = round(clip(x/s, Q_n, Q_p))·s`` with a trainable step ``s`` whose gradient is
    scaled by ``1/sqrt(n·Q_p)`` (``n`` = weights sharing one step size, or the features of
    one sample for activations, LSQ's N_W and N_F). Needs ``bits >= 2``.

    ``bits=1`` on a weight with the default ``symmetric`` is binarization: ``sign(w)``
    times the per-channel mean of ``|w|`` over the non-zero weights (exact zeros — pruned
    weights — stay zero). With ``symmetric=False`` (the
    activation default) 1 bit is the two-level affine grid ``{lo', hi'}`` of the range
    widened to include 0, i.e. ``{0, hi}`` for non-negative inputs.

    ``method`` picks the quantizer (formulas in :mod:`fxqp.ops.lowbit`); per channel means
    per output channel for weights (``per_channel=False``: one value per tensor):

    * ``uniform`` (default): the grids above.
    * ``lsq``: the same as ``learned=True`` (see above).
    * ``pow2`` (qsparse's "decimal bits"): narrow signed grid with a power-of-two scale
      ``s = 2^-d``, so rescaling is a shift. Weights: ``d`` minimises ``‖Q(w) − w‖²`` per
      channel among the shifts from the largest that clips nothing to 4 finer ones
      (clipped values get no gradient). Activations: the largest unclipped shift of the
      moving-average range.
    * ``dorefa`` (Zhou et al. 2016): weights
      ``w_q = 2·round(L·(tanh(w)/(2·max|tanh(w)|) + 1/2))/L − 1`` with ``L = 2^b − 1``
      (max per channel, or per tensor); activations ``round(L·clip(x, 0, 1))/L``. Exact
      zeros (pruned weights) stay zero: the DoReFa grid has no zero level.
    * ``binary`` (weights, ``bits=1``): ``sign(w)``, times XNOR-Net's ``α = mean|w|`` (over
      the non-zero weights) per channel unless ``scaled=False``; STE gradient masked to
      ``|w| <= 1``.
    * ``ternary`` (weights, ``bits=2``; TWN, Li et al. 2016): ``Δ = 0.7·mean|w|``,
      ``w_q = α·sign(w)`` where ``|w| > Δ`` and 0 elsewhere, ``α = mean |w|`` over
      ``|w| > Δ`` (means over the non-zero weights); identity STE gradient. Lowered as one
      sign bit per non-zero weight plus the mask.

    Attributes:
        bits: width of the integer grid, 1..16.
        start: training step from which the op is active (>= 0 and < 2**62, as every step
            count of a spec), or a fraction of the run
            written ``"40%"`` (resolved by :meth:`Spec.resolve` against the ``total_steps``
            given to :func:`fxqp.transform`).
        symmetric: ``None`` picks the default for the site kind (see above).
        per_channel: ``None`` picks the default for the site kind (see above).
        learned: learn the step size (LSQ) instead of deriving it from the range.
        method: one of :data:`QUANTIZE_METHODS` (see above).
        scaled: ``binary`` only: multiply ``sign(w)`` by ``α`` (default ``True``).
    """

    kind: ClassVar[str] = "quantize"

    bits: int
    start: Union[int, str] = 0
    symmetric: Optional[bool] = None
    per_channel: Optional[bool] = None
    learned: bool = False
    method: str = "uniform"
    scaled: Optional[bool] = None

    @staticmethod
    def _checked(where: str, v: Mapping[str, Any]) -> dict[str, Any]:
        checked = {
            "bits": _check_int(f"{where}.bits", v["bits"], *BITS),
            "start": _check_step(f"{where}.start", v["start"], 0),
            "symmetric": _check_bool(f"{where}.symmetric", v["symmetric"], optional=True),
            "per_channel": _check_bool(f"{where}.per_channel", v["per_channel"], optional=True),
            "learned": _check_bool(f"{where}.learned", v["learned"]),
            "method": _check_choice(f"{where}.method", v["method"], QUANTIZE_METHODS),
            "scaled": _check_bool(f"{where}.scaled", v["scaled"], optional=True),
        }
        method, bits = checked["method"], checked["bits"]
        rule = METHOD_RULES[method]
        if checked["learned"] and not rule.learned:
            raise SpecError(f"{where}.learned: True is the 'lsq' method and conflicts with method={method!r}; expected learned=False")
        if not rule.takes_bits(bits):
            raise SpecError(f"{where}.bits: method {method!r} does not take bits={bits}; expected {rule.accepted_bits}")
        if checked["scaled"] is not None and not rule.scaled:
            scaled = [m.name for m in METHOD_RULES.values() if m.scaled]
            raise SpecError(
                f"{where}.scaled: only the {accepted(scaled)} method has an optional scale; expected scaled unset (null) with method={method!r}"
            )
        if rule.fixed_grid and checked["symmetric"] is False:
            raise SpecError(f"{where}.symmetric: method {method!r} has a fixed grid; expected symmetric unset (null) or true")
        if checked["learned"] and checked["bits"] < LEARNED_MIN_BITS:
            raise SpecError(
                f"{where}.learned: True needs bits >= {LEARNED_MIN_BITS} (bits=1 is sign quantization, "
                f"which has no step to learn); expected learned=False with bits={checked['bits']}"
            )
        return checked


@dataclasses.dataclass(frozen=True)
class Prune(_OpForm):
    """Zero the ``round(s_t·n)`` smallest-magnitude of ``n`` elements from step ``start`` on.

    Before ``start`` the op is the identity (observers may already collect statistics).

    Weights: unstructured magnitude pruning; the mask zeroes exactly ``round(s_t·n)``
    elements (the output has more zeros where the input already had some), ties broken
    deterministically. Between ``start`` and ``end`` the target sparsity follows the cubic
    AGP ramp (Zhu & Gupta)::

        s_t = sparsity · (1 - (1 - (t - start) / (end - start))^3)

    and the mask is refreshed every ``every`` steps; after ``end`` the mask is frozen.
    With ``end=None`` the mask is computed once at ``start`` (at the full ``sparsity``)
    and frozen. Weights accept only ``granularity="element"`` and ``dynamic=False``.

    Activations: a static mask from the running average of ``|x|``, kept per element
    (over all dims but the batch) or per channel (``granularity="channel"``), zeroing the
    ``round(s_t·n)`` smallest. ``dynamic=True`` instead zeroes the ``round(s_t·n)``
    smallest ``|x|`` of every sample (per-sample top-k); it is per element only.

    Structured weight pruning (``structure``; weights only):

    * ``"filter"``: zero whole output channels — ``round(s_t·C_out)`` of them, those with the
      lowest score; ``"channel"``: whole input channels likewise.
    * ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive weights along the input
      dimension keep the ``N`` largest ``|w|``; ``sparsity`` must be ``(M − N)/M`` and there
      is no ramp (``end=None``).

    Scores of a filter/channel (``criterion``): ``"l1"`` (``Σ|w|``), ``"l2"`` (``‖w‖₂``),
    or ``"angle"``, the criterion of the paper on pruning quantized networks (Guerra et al.
    2020): per kernel (the spatial slice ``w[o, i]``, or the row of a Linear) the angle
    ``θ = arccos(⟨w, Q(w)⟩ / (‖w‖·‖Q(w)‖))`` between the latent weight and its quantized
    version under the site's quantizer, averaged over the filter's (channel's) kernels;
    the largest angles are pruned first. It needs a ``Quantize`` op at the same site.
    With ``example_inputs`` given to :func:`fxqp.transform`, filters of one channel group
    (joined by residual adds, batch norms, depthwise convolutions, ...) are pruned together
    and :func:`fxqp.lower` removes them from the layers (:mod:`fxqp.groups`,
    :mod:`fxqp.lower.shrink`); otherwise they stay zeros in the sparsity encoding.

    Attributes:
        sparsity: final fraction of zeros, in [0, 1) (stored as float).
        start: step at which pruning begins (>= 0 and < 2**62), or a fraction of the run, ``"40%"`` (see
            :class:`Quantize`).
        end: step at which the ramp reaches ``sparsity`` (> start, < 2**62), or ``None`` for one shot;
            or a fraction of the run.
        every: refresh the mask every this many steps during the ramp (>= 1, < 2**62); or a fraction
            of the run, resolved to at least one step.
        granularity: ``"element"`` or ``"channel"`` (activations only).
        dynamic: per-sample top-k on activations instead of a static mask.
        structure: ``"element"`` (default), ``"filter"``, ``"channel"`` or ``"N:M"`` (weights).
        criterion: ``"l1"`` (default), ``"l2"`` or ``"angle"`` (filter and channel structures).
        score_from: ``"own"`` (default): a filter is scored by its own kernels; ``"next"``:
            by the kernels of the next layers that read its channel (their input channel;
            with ``angle``, only readers that are quantized count) — the seed paper's default;
            it needs coupled groups (``example_inputs``) and falls back to ``"own"`` where a
            channel has no such reader.
    """

    kind: ClassVar[str] = "prune"

    sparsity: float
    start: Union[int, str] = 0
    end: Union[int, str, None] = None
    every: Union[int, str] = 1
    granularity: str = "element"
    dynamic: bool = False
    structure: str = "element"
    criterion: str = "l1"
    score_from: str = "own"

    @property
    def n_of_m(self) -> NofM | None:
        """The ``"N:M"`` structure as a :class:`NofM`, or ``None`` for the other structures."""
        return n_of_m(self.structure)

    @staticmethod
    def _checked(where: str, v: Mapping[str, Any]) -> dict[str, Any]:
        checked = {
            "structure": _check_structure(f"{where}.structure", v["structure"]),
            "criterion": _check_choice(f"{where}.criterion", v["criterion"], PRUNE_CRITERIA),
            "score_from": _check_choice(f"{where}.score_from", v["score_from"], SCORE_FROM),
            "sparsity": _check_fraction(f"{where}.sparsity", v["sparsity"]),
            "start": _check_step(f"{where}.start", v["start"], 0),
            "end": None,
            "every": _check_step(f"{where}.every", v["every"], 1),
            "granularity": _check_choice(f"{where}.granularity", v["granularity"], GRANULARITIES),
            "dynamic": _check_bool(f"{where}.dynamic", v["dynamic"]),
        }
        if v["end"] is not None:
            end, start = _check_step(f"{where}.end", v["end"], 0), checked["start"]
            if is_fraction(end) == is_fraction(start) and (_percent(end) <= _percent(start) if is_fraction(end) else end <= start):
                raise SpecError(
                    f"{where}.end: {quote(end)} is not after start={quote(start)} (misordered "
                    f"steps); expected None or {'a fraction' if is_fraction(end) else 'an integer'} > start"
                )
            checked["end"] = end
        if checked["dynamic"] and checked["granularity"] == "channel":
            raise SpecError(
                f"{where}.dynamic: True is not accepted with granularity='channel' (dynamic "
                f"pruning is per element of each sample); expected dynamic=False, or "
                f"granularity='element'"
            )
        structure = checked["structure"]
        rule = prune_structure(structure)
        weights = PRUNE_SITES[WEIGHT]
        if rule.sites == (WEIGHT,) and (
            (checked["dynamic"] and not weights.dynamic) or checked["granularity"] not in weights.granularities
        ):
            raise SpecError(
                f"{where}.structure: {structure!r} prunes weights; it does not combine with dynamic or granularity (activation options)"
            )
        criterion, score_from = checked["criterion"], checked["score_from"]
        if criterion not in rule.criteria:
            structures = [s.name for s in PRUNE_STRUCTURES.values() if criterion in s.criteria]
            raise SpecError(
                f"{where}.criterion: {criterion!r} scores filters or channels; expected structure {accepted(structures)}, "
                f"or criterion {PRUNE_CRITERIA[0]!r}"
            )
        if score_from not in rule.score_from:
            structures = [s.name for s in PRUNE_STRUCTURES.values() if score_from in s.score_from]
            raise SpecError(
                f"{where}.score_from: {score_from!r} scores filters by the layers that read them; expected structure {accepted(structures)}, "
                f"or score_from {SCORE_FROM[0]!r}"
            )
        pattern = rule.pattern
        if pattern is not None:
            if abs(checked["sparsity"] - pattern.sparsity) > 1e-9:
                raise SpecError(
                    f"{where}.sparsity: structure {structure!r} keeps {pattern.n} of every {pattern.m} weights; "
                    f"expected sparsity {pattern.sparsity:g}"
                )
        if not rule.ramp and checked["end"] is not None:
            raise SpecError(f"{where}.end: structure {structure!r} has a fixed ratio and no ramp; expected end=None")
        return checked


Op = Union[Quantize, Prune]
"""One op of a site: :class:`Quantize` or :class:`Prune`."""

OP_KINDS: dict[str, type] = {"quantize": Quantize, "prune": Prune}
"""The op classes by the ``op`` key of their dict form."""


def _op_to_dict(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {"op": op.kind}
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            out[f.name] = value
    return out


def _op_from_dict_of_class(cls: type, d: Any, where: str) -> Op:
    """Check the dict form of an op of class ``cls`` (the "op" key is optional here)."""
    if not isinstance(d, Mapping):
        raise SpecError(f"{where}: expected a mapping with key 'op', got {_type_name(d)}")
    if "op" in d and d["op"] != cls.kind:
        raise SpecError(f"{where}.op: {quote(d['op'])} does not match; expected {cls.kind!r}")
    fields = dataclasses.fields(cls)
    accepted = ["op"] + [f.name for f in fields]
    _reject_unknown_keys(where, d.keys(), accepted, "field", f" for op {cls.kind!r}")
    values = {}
    for f in fields:
        if f.name in d:
            values[f.name] = d[f.name]
        elif f.default is dataclasses.MISSING:
            raise SpecError(f"{where}.{f.name}: missing; it is required for op {cls.kind!r}")
        else:
            values[f.name] = f.default
    return cls(**cls._checked(where, values))


def _op_from_dict(d: Any, where: str) -> Op:
    """Dict form of any op: the "op" key picks the class in OP_KINDS."""
    kinds = ", ".join(sorted(OP_KINDS))
    if not isinstance(d, Mapping):
        raise SpecError(f"{where}: expected a mapping with key 'op' (one of {kinds}), got {_type_name(d)}")
    if "op" not in d:
        raise SpecError(f"{where}: missing key 'op'; accepted kinds: {kinds}")
    kind = d["op"]
    if not isinstance(kind, str) or kind not in OP_KINDS:
        raise SpecError(f"{where}.op: {quote(kind)} is not an op kind; accepted kinds: {kinds}")
    return _op_from_dict_of_class(OP_KINDS[kind], d, where)


# ---------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------


def _function_name(value: Any, where: str) -> str:
    if isinstance(value, type) and issubclass(value, torch.nn.Module):
        raise SpecError(f"{where}: {value.__name__} is a module class, not a function; put module classes in modules")
    if isinstance(value, str):
        raw = value
    elif callable(value) and isinstance(getattr(value, "__name__", None), str):
        raw = value.__name__
    else:
        raise SpecError(
            f"{where}: {quote(value)} is not accepted; expected a function name such as 'relu' "
            f"or 'add', or a callable such as F.relu, torch.cat or operator.add"
        )
    name = canonical_name(raw)
    if not name.isidentifier():
        raise SpecError(f"{where}: {quote(raw)} is not a function name; expected a bare identifier such as 'relu', 'add' or 'cat'")
    return name


def canonical_function_name(fn_or_name: Union[Callable[..., Any], str]) -> str:
    """The name by which a rule's ``functions`` selector refers to a function.

    ``fn.__name__`` (or the string itself) with leading and trailing underscores stripped,
    and in-place / operator forms mapped to the base name: ``F.relu`` and ``"relu_"`` give
    ``"relu"``; ``operator.add``, ``operator.iadd``, ``torch.Tensor.add_`` and
    ``"__iadd__"`` give ``"add"``; ``operator.imatmul`` gives ``"matmul"``.

    Raises:
        SpecError: the argument has no usable name (e.g. a lambda or an empty string).
    """
    return _function_name(fn_or_name, "canonical_function_name")


def _module_name(value: Any, where: str) -> str:
    if isinstance(value, type):
        if not issubclass(value, torch.nn.Module):
            raise SpecError(
                f"{where}: {value.__qualname__} is not a subclass of torch.nn.Module; expected a module class or its name such as 'Conv2d'"
            )
        return f"{value.__module__}.{value.__qualname__}"
    if not isinstance(value, str) or not value or value != "".join(value.split()):
        raise SpecError(
            f"{where}: {quote(value)} is not accepted; expected a module class name such as "
            f"'Conv2d' (no spaces) or a subclass of torch.nn.Module"
        )
    return value


def _name_pattern(value: Any, where: str) -> str:
    """A ``names`` / ``exclude`` entry: a glob of at most :data:`~fxqp.limits.MAX_PATTERN_CHARS`
    characters, or ``re:`` and a regular expression that :func:`fxqp.limits.name_regex`
    accepts (the guard every match goes through)."""
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"{where}: {quote(value)} is not accepted; expected a non-empty glob such as 'layer1.*' or a regular expression prefixed with 're:'"
        )
    if value.startswith("re:"):
        if not value[3:]:
            raise SpecError(f"{where}: {quote(value)} has an empty regular expression after 're:'")
        name_regex(value[3:], where)
    elif len(value) > MAX_PATTERN_CHARS:
        raise SpecError(f"{where}: the glob {quote(value)} has {len(value)} characters; expected at most {MAX_PATTERN_CHARS}")
    return value


def _as_entries(value: Any, where: str, what: str) -> tuple[Any, ...]:
    """A list or tuple as a tuple; a single entry (anything else) as a one-element tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if value is None or isinstance(value, (Mapping, set, frozenset)):
        raise SpecError(f"{where}: expected a list of {what}, got {_type_name(value)}")
    return (value,)


def _check_ops(where: str, value: Any, site: str) -> tuple[Op, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"{where}: expected None or a list of ops (Quantize, Prune), got {_type_name(value)}; wrap a single op in a list")
    ops = tuple(value)
    for j, op in enumerate(ops):
        if not isinstance(op, (Quantize, Prune)):
            raise SpecError(f"{where}[{j}]: expected a Quantize or Prune op, got {_type_name(op)}")
        if site == WEIGHT and isinstance(op, Prune):
            problem = prune_site_problem(op, site)
            if problem is not None:
                raise SpecError(f"{where}[{j}].{problem[0]}: {problem[1]}")
    return ops


# ---------------------------------------------------------------------------------------
# Rule
# ---------------------------------------------------------------------------------------

_SELECTORS = ("modules", "names", "functions", "exclude")
_SITES = ("weight", "activation")
_RULE_KEYS = _SELECTORS + _SITES


@dataclasses.dataclass(frozen=True)
class Rule:
    """Select sites and give the ops of their weight and/or their output activation.

    Selectors:
        modules: module classes, by name or as the class itself. An entry matches a
            module whose class, or any of its base classes, has that name (``"Conv2d"``)
            or that qualified name (``"torch.nn.modules.conv.Conv2d"``). A class is
            stored as its qualified name ``f"{cls.__module__}.{cls.__qualname__}"``.
        names: :mod:`fnmatch` globs over module paths (``"layer1.*"``) and graph node
            names; an entry prefixed with ``re:`` is a regular expression instead (the
            syntax of :mod:`re`). An entry has at most 256 characters (after ``re:``); a
            regular expression is matched with a time limit per name, and one that
            backtracks catastrophically is a :class:`~fxqp.errors.SpecError`
            (:func:`fxqp.limits.name_regex_fullmatch`).
        functions: torch functions, tensor methods and operators, by canonical name
            (see :func:`canonical_function_name`): ``"relu"`` matches ``F.relu``,
            ``torch.relu``, ``x.relu()`` and ``x.relu_()``; ``"add"`` matches ``x + y``,
            ``x += y``, ``torch.add`` and ``x.add_(y)``. Callables are accepted and stored
            by their canonical name.
        exclude: globs / ``re:`` regular expressions, as ``names``, removing sites.

    A site matches a rule when it matches (``modules`` OR ``functions``, whichever are
    given) AND ``names`` (when given) AND is not excluded. With only ``names`` given, the
    names select. A rule needs at least one of ``modules``, ``names``, ``functions``.

    Ops:
        weight: ops of the weight of each selected module, or ``None`` when the rule says
            nothing about weights.
        activation: ops of the output of each selected call site (every call of a module
            or function is its own site), or ``None`` when the rule says nothing about
            activations.

    An empty list of ops means "this site gets no ops"; it overrides an earlier rule,
    whereas ``None`` leaves it alone. When several rules match a site, the last one that
    says something wins, separately for the weight and for the activation. List order is
    application order: ``weight=[Prune(0.5), Quantize(4)]`` means ``Q(P(w))``.

    Lists are stored as tuples, so rules are hashable and ``Rule(modules=["Conv2d"]) ==
    Rule(modules=("Conv2d",))``; a single string, class or callable counts as a list of one.
    """

    modules: Sequence[Union[str, type]] = ()
    names: Sequence[str] = ()
    functions: Sequence[Union[str, Callable[..., Any]]] = ()
    exclude: Sequence[str] = ()
    weight: Optional[Sequence[Op]] = None
    activation: Optional[Sequence[Op]] = None

    def __post_init__(self) -> None:
        _set_fields(self, _checked_rule("Rule", _own_fields(self)))

    def to_dict(self) -> dict[str, Any]:
        """Dict form: non-empty selectors as lists, and the op lists that are not None."""
        out: dict[str, Any] = {}
        for key in _SELECTORS:
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        for key in _SITES:
            ops = getattr(self, key)
            if ops is not None:
                out[key] = [op.to_dict() for op in ops]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> "Rule":
        """Build from the dict form; errors are located at ``where`` (default ``"Rule"``).
        The limits of :meth:`Spec.from_dict` apply."""
        where = where or cls.__name__
        _check_nesting(where, d)
        return _rule_from_dict(cls, d, where)


def _rule_from_dict(cls: type[Rule], d: Any, where: str) -> Rule:
    if not isinstance(d, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {_type_name(d)}")
    _reject_unknown_keys(where, d.keys(), _RULE_KEYS)
    values: dict[str, Any] = {}
    for key in _SELECTORS:
        values[key] = _strings_from_dict(d.get(key, []), f"{where}.{key}")
    for key in _SITES:
        values[key] = _ops_from_dict(d.get(key), f"{where}.{key}")
    return cls(**_checked_rule(where, values))


def _checked_rule(where: str, v: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the fields of a rule located at ``where``; return them in stored form."""
    checked: dict[str, Any] = {
        "modules": tuple(
            _module_name(m, f"{where}.modules[{i}]") for i, m in enumerate(_as_entries(v["modules"], f"{where}.modules", "module classes"))
        ),
        "names": tuple(
            _name_pattern(n, f"{where}.names[{i}]") for i, n in enumerate(_as_entries(v["names"], f"{where}.names", "patterns"))
        ),
        "functions": tuple(
            _function_name(f, f"{where}.functions[{i}]")
            for i, f in enumerate(_as_entries(v["functions"], f"{where}.functions", "functions"))
        ),
        "exclude": tuple(
            _name_pattern(n, f"{where}.exclude[{i}]") for i, n in enumerate(_as_entries(v["exclude"], f"{where}.exclude", "patterns"))
        ),
        "weight": _check_ops(f"{where}.weight", v["weight"], "weight"),
        "activation": _check_ops(f"{where}.activation", v["activation"], "activation"),
    }
    if not (checked["modules"] or checked["names"] or checked["functions"]):
        raise SpecError(f"{where}: give at least one selector among modules, names, functions")
    if checked["weight"] is None and checked["activation"] is None:
        raise SpecError(f"{where}: give weight or activation ops (a list; an empty list clears the ops of the selected sites)")
    return checked


def _strings_from_dict(value: Any, where: str) -> list[str]:
    """A selector in dict form: a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a string or a list of strings, got {_type_name(value)}")
    for i, entry in enumerate(value):
        if not isinstance(entry, str):
            raise SpecError(f"{where}[{i}]: expected a string, got {_type_name(entry)}")
    return value


def _ops_from_dict(value: Any, where: str) -> list[Op] | None:
    """An op list in dict form: None, or a list of op mappings."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of op mappings such as {{op: quantize, bits: 8}}, got {_type_name(value)}")
    return [_op_from_dict(entry, f"{where}[{j}]") for j, entry in enumerate(value)]


# ---------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """An ordered tuple of :class:`Rule`: what each site of a model gets.

    Rules are applied in list order, and for each site the last matching rule that gives
    weight (resp. activation) ops decides that site's weight (resp. activation) ops.
    Within a rule, list order of ops is application order.

    File forms: a mapping with the single key ``rules`` (a list of rule mappings), as a
    dict (:meth:`from_dict` / :meth:`to_dict`), YAML (:meth:`from_yaml` / :meth:`to_yaml`)
    or JSON (:meth:`from_json` / :meth:`to_json`). In dict form every op is a mapping with
    an ``op`` key (``quantize`` or ``prune``) and its fields; fields at their default are
    left out by ``to_dict``. ``Spec.from_dict(spec.to_dict()) == spec`` always holds.

    ``{}`` and ``{"rules": []}`` are the empty spec (:meth:`empty`).
    """

    rules: Sequence[Rule] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.rules, (list, tuple)):
            raise SpecError(f"Spec.rules: expected a list or tuple of Rule, got {_type_name(self.rules)}")
        rules = tuple(self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise SpecError(f"rules[{i}]: expected a Rule, got {_type_name(rule)}")
            _checked_rule(f"rules[{i}]", _own_fields(rule))
        object.__setattr__(self, "rules", rules)

    @classmethod
    def empty(cls) -> "Spec":
        """The spec without rules: the model is left as it is."""
        return cls(())

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    # -- fractions of the run ---------------------------------------------------------------

    def resolve(self, total_steps: int | None) -> "Spec":
        """The spec with every ``start``/``end``/``every`` given as a fraction of the run
        (``"40%"``) replaced by its step out of ``total_steps`` (see :func:`resolve_step`;
        ``every`` is at least 1). A spec without fractions is returned as it is, whatever
        ``total_steps`` is.

        Raises:
            SpecError: a fraction and no ``total_steps``; a ramp whose resolved ``end`` is not
                after its resolved ``start`` (the run is too short for it); a ``total_steps``
                that is not a positive integer.
        """
        if total_steps is not None:
            total_steps = _check_int("total_steps", total_steps, 1, MAX_STEP, _steps(1))
        rules, changed = [], False
        for i, rule in enumerate(self.rules):
            ops = {}
            for kind in _SITES:
                if getattr(rule, kind) is not None:
                    ops[kind] = tuple(_resolve_op(op, f"rules[{i}].{kind}[{j}]", total_steps) for j, op in enumerate(getattr(rule, kind)))
                    changed |= ops[kind] != getattr(rule, kind)
            rules.append(dataclasses.replace(rule, **ops))
        return Spec(tuple(rules)) if changed else self

    # -- dict ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"rules": [rule.to_dict(), ...]}``."""
        return {"rules": [rule.to_dict() for rule in self.rules]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Spec":
        """Build from ``{"rules": [...]}``; errors are located as ``rules[i]...``.

        The dict is checked as a file would be (it may come from one, or from an artifact's
        header): at most :data:`~fxqp.limits.MAX_SPEC_DEPTH` levels of nesting and
        :data:`~fxqp.limits.MAX_SPEC_VALUES` values, every integer bounded, every ``re:``
        selector guarded (:func:`fxqp.limits.name_regex`)."""
        _check_nesting("spec", d)
        if not isinstance(d, Mapping):
            raise SpecError(f"spec: expected a mapping with key 'rules', got {_type_name(d)}")
        _reject_unknown_keys("spec", d.keys(), ("rules",))
        rules = d.get("rules")
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise SpecError(f"rules: expected a list of rule mappings, got {_type_name(rules)}")
        return cls(tuple(_rule_from_dict(Rule, r, f"rules[{i}]") for i, r in enumerate(rules)))

    # -- YAML and JSON ------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "Spec":
        """Load a YAML file; errors name the file (and the line of a syntax error).

        Specs are files users share, so the reading is bounded
        (:func:`fxqp.limits.load_yaml_document`): safe loading of plain data, at most
        :data:`~fxqp.limits.MAX_SPEC_BYTES` bytes of UTF-8, at most
        :data:`~fxqp.limits.MAX_SPEC_DEPTH` levels of nesting and
        :data:`~fxqp.limits.MAX_SPEC_VALUES` values (aliases expanded), no key twice in a
        mapping; then the checks of :meth:`from_dict`."""
        return _from_file_data(cls, load_yaml_document(path, "spec"), path)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "Spec":
        """Load a JSON file; errors name the file (and the line of a syntax error). The
        limits of :meth:`from_yaml` apply (:func:`fxqp.limits.load_json_document`)."""
        return _from_file_data(cls, load_json_document(path, "spec"), path)

    def to_yaml(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The YAML text of the spec; also written to ``path`` (atomically) when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            write_atomically(path, text)
        return text

    def to_json(self, path: Union[str, os.PathLike, None] = None) -> str:
        """The JSON text of the spec; also written to ``path`` (atomically) when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            write_atomically(path, text)
        return text


def _resolve_op(op: Op, where: str, total_steps: int | None) -> Op:
    """``op`` with its fractions of the run resolved (see :meth:`Spec.resolve`)."""
    names = [name for name in ("start", "end", "every") if is_fraction(getattr(op, name, None))]
    if not names:
        return op
    if total_steps is None:
        value = getattr(op, names[0])
        raise SpecError(
            f"{where}.{names[0]}: {quote(value)} is a fraction of the run and no run length was given; "
            "pass total_steps=N (the training steps of the run) to fxqp.transform, or give a step count"
        )
    values = {name: resolve_step(getattr(op, name), total_steps) for name in names}
    if "every" in values:
        values["every"] = max(1, values["every"])
    start, end = values.get("start", op.start), values.get("end", getattr(op, "end", None))
    if end is not None and end <= start:
        raise SpecError(
            f"{where}.end: {quote(op.end)} of a run of {total_steps} steps is step {end}, not after start "
            f"{quote(op.start)} = step {start}; expected a run long enough for the ramp, or a later end"
        )
    return dataclasses.replace(op, **values)


def _from_file_data(cls: type[Spec], data: Any, path: Union[str, os.PathLike]) -> Spec:
    name = os.fspath(path)
    if data is None:
        raise SpecError(f"{name}: the file is empty; expected a mapping with key 'rules'")
    try:
        return cls.from_dict(data)
    except SpecError as e:
        raise SpecError(f"{name}: {e}") from e
