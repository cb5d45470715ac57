"""The declarative search space of :func:`fxqp.search.schedules`: per rule group, the order
of quantization and pruning (weights and activations separately), when each starts (a
fraction of the run), how long a pruning ramp lasts, and optionally bits and sparsity.

In YAML (``fxqp search schedules --space space.yaml``)::

    groups:
      - name: weights                      # optional; names the Optuna parameters
        modules: [Conv2d, Linear]          # selectors, as in a spec rule
        weight:
          order: [prune_first, quantize_first]       # a choice, or one of them
          quantize: {bits: 8, start: ["20%", "95%"]}
          prune: {sparsity: 0.5, start: ["20%", "90%"], length: ["5%", "40%"], refreshes: 4}
      - name: relus
        modules: [ReLU]
        functions: [relu]
        activation:
          order: [prune_first, quantize_first]
          quantize: {bits: [4, 8], start: ["20%", "95%"]}
          prune: {sparsity: [0.3, 0.7], start: ["20%", "90%"], length: ["5%", "40%"]}
    constraints:
      bytes: 30000                         # the saved artifact, at most this many bytes

A value is fixed (``8``, ``"40%"``), a range (``[low, high]`` or ``{low, high, step}``) or a
choice (``{choices: [4, 8]}``). Ranges of fractions of the run step by 1% and give integer
percentages; ``bits`` ranges step by 1; ``sparsity`` ranges by 0.05 unless ``step`` says
otherwise. A pruning ramp ends ``length`` after its start (at 100% at the latest) and
refreshes its mask ``refreshes`` times (``every = length / refreshes``, the seed paper's
4 by default); ``length: 0`` prunes at once. Any other field of :class:`fxqp.Quantize` or
:class:`fxqp.Prune` (``method``, ``dynamic``, ``granularity``, ...) is passed on, fixed.

Errors are :class:`~fxqp.search.SearchError` naming the field (``groups[1].activation.prune.start``)
and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import fractions
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

from fxqp.errors import SpecError
from fxqp.limits import MAX_SPEC_DEPTH, MAX_SPEC_VALUES, load_yaml_document, nesting_problem, quote
from fxqp.search.study import SearchError
from fxqp.spec import Prune, Quantize, Rule, Spec

__all__ = ["Choice", "Range", "OpSpace", "SiteSpace", "GroupSpace", "SearchSpace", "ORDERS"]

ORDERS = ("prune_first", "quantize_first")
"""``prune_first``: ``[Prune, Quantize]``, ``Q(P(x))``; ``quantize_first``: ``[Quantize, Prune]``."""

_SELECTORS = ("modules", "names", "functions", "exclude")
_DECIMAL = re.compile(r"[+-]?(?:\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})")
_TIMES = ("start", "length")


@dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A number in ``[low, high]`` on a grid of ``step`` (integers when all three are)."""

    low: Any
    high: Any
    step: Any


Param = Union[Any, Choice, Range]


def _percent(where: str, value: Any) -> int:
    """A fraction of the run as a whole percentage: ``"40%"`` → 40."""
    if isinstance(value, str) and value.strip().endswith("%"):
        text = value.strip()[:-1].strip()
        number = None
        if _DECIMAL.fullmatch(text):  # no exponent: Fraction("1e999999999") would take forever
            number = fractions.Fraction(text)
        if number is not None and number.denominator == 1 and 0 <= number <= 100:
            return int(number)
    raise SearchError(f"{where}: {quote(value)} is not accepted; expected a whole percentage of the run from '0%' to '100%', such as '40%'")


def _number(where: str, value: Any, integer: bool, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not isinstance(value, numbers.Integral)):
        raise SearchError(f"{where}: {quote(value)} is not accepted; expected {'an integer' if integer else 'a number'} in {low}..{high}")
    if not low <= value <= high:
        raise SearchError(f"{where}: {quote(value)} is outside {low}..{high}")
    return int(value) if integer else float(value)


def _param(where: str, value: Any, kind: str) -> Param:
    """Check a value of field kind ``bits``, ``sparsity``, ``percent`` or ``refreshes``."""
    parse = {
        "bits": lambda w, v: _number(w, v, True, 1, 16),
        "sparsity": lambda w, v: _number(w, v, False, 0.0, 0.99),
        "percent": _percent,
        "refreshes": lambda w, v: _number(w, v, True, 1, 1000),
    }[kind]
    default_step = {"bits": 1, "sparsity": 0.05, "percent": 1, "refreshes": 1}[kind]
    if isinstance(value, Mapping) and set(value) == {"choices"}:
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchError(f"{where}.choices: expected a non-empty list, got {quote(choices)}")
        return Choice(tuple(parse(f"{where}.choices[{i}]", v) for i, v in enumerate(choices)))
    if isinstance(value, Mapping):
        unknown = set(value) - {"low", "high", "step"}
        if unknown or not {"low", "high"} <= set(value):
            raise SearchError(
                f"{where}: expected a value, [low, high], {{low, high, step}} or {{choices: [...]}}, got keys {quote(sorted(value, key=str))}"
            )
        low, high = parse(f"{where}.low", value["low"]), parse(f"{where}.high", value["high"])
        step = value.get("step", default_step)
        if kind == "percent":
            step = _percent(f"{where}.step", step) if isinstance(step, str) else step
        step = _number(f"{where}.step", step, kind in ("bits", "percent", "refreshes"), 1e-9 if kind == "sparsity" else 1, 100)
    elif isinstance(value, list):
        if len(value) != 2:
            raise SearchError(f"{where}: a range is [low, high]; got {len(value)} values (a choice is {{choices: [...]}})")
        low, high, step = parse(f"{where}[0]", value[0]), parse(f"{where}[1]", value[1]), default_step
    else:
        return parse(where, value)
    if high < low:
        raise SearchError(f"{where}: low {quote(low)} is above high {quote(high)}")
    return low if low == high else Range(low, high, step)


def _param_dict(value: Param, kind: str) -> Any:
    def plain(v: Any) -> Any:
        return f"{v}%" if kind == "percent" else v

    if isinstance(value, Choice):
        return {"choices": [plain(v) for v in value.values]}
    if isinstance(value, Range):
        return {"low": plain(value.low), "high": plain(value.high), "step": plain(value.step) if kind == "percent" else value.step}
    return plain(value)


def _suggest(trial: Any, name: str, value: Param) -> Any:
    if isinstance(value, Choice):
        return trial.suggest_categorical(name, list(value.values))
    if isinstance(value, Range):
        if all(isinstance(v, int) for v in (value.low, value.high, value.step)):
            return trial.suggest_int(name, value.low, value.high, step=value.step)
        return round(trial.suggest_float(name, value.low, value.high, step=value.step), 12)  # 0.6, not 0.6000000000000001
    return value


def _bounds(value: Param) -> tuple[Any, Any]:
    """The smallest and the largest value ``value`` can take."""
    if isinstance(value, Choice):
        return min(value.values), max(value.values)
    if isinstance(value, Range):
        return value.low, value.high
    return value, value


_KINDS = {"start": "percent", "length": "percent", "bits": "bits", "sparsity": "sparsity", "refreshes": "refreshes"}
_SEARCHED = {"quantize": ("bits", "start"), "prune": ("sparsity", "start", "length", "refreshes")}
_OP_CLASSES = {"quantize": Quantize, "prune": Prune}


@dataclass(frozen=True)
class OpSpace:
    """The space of one op: searched fields (``bits``/``sparsity``, ``start``, ``length``,
    ``refreshes``) and fixed fields of the op passed on as they are."""

    kind: str
    params: dict[str, Param]
    fixed: dict[str, Any]

    @classmethod
    def from_dict(cls, kind: str, d: Any, where: str) -> "OpSpace":
        if not isinstance(d, Mapping):
            raise SearchError(f"{where}: expected a mapping of the op's fields, got {type(d).__name__}")
        op_class = _OP_CLASSES[kind]
        op_fields = {f.name for f in dataclasses.fields(op_class)}
        searched = _SEARCHED[kind]
        params, fixed = {}, {}
        for key, value in d.items():
            if key in searched:
                params[key] = _param(f"{where}.{key}", value, _KINDS[key])
            elif key in op_fields and key not in ("start", "end", "every"):
                fixed[key] = value
            else:
                accepted = sorted(set(searched) | (op_fields - {"start", "end", "every"}))
                raise SearchError(f"{where}: unknown field {quote(key)}; accepted: {', '.join(accepted)}")
        required = "bits" if kind == "quantize" else "sparsity"
        if required not in params:
            raise SearchError(f"{where}.{required}: missing; give a value, a range or a choice")
        params.setdefault("start", 0)
        if kind == "prune":
            params.setdefault("length", 0)
            params.setdefault("refreshes", 4)
            if _bounds(params["length"])[0] == 0 and params["length"] != 0:
                raise SearchError(f"{where}.length: a searched ramp length must be above 0% (0 alone means pruning at once)")
            if params["length"] != 0 and _bounds(params["start"])[1] >= 100:
                raise SearchError(f"{where}.start: a ramp must start before 100% of the run")
        space = cls(kind, params, fixed)
        try:  # the fixed fields must make a valid op with the lowest values
            space.op(f"{where}", {name: _bounds(v)[0] for name, v in params.items()})
        except SpecError as err:
            raise SearchError(f"{where}: {err}") from None
        return space

    def to_dict(self) -> dict[str, Any]:
        return {**{k: _param_dict(v, _KINDS[k]) for k, v in self.params.items()}, **self.fixed}

    def sample(self, trial: Any, prefix: str) -> dict[str, Any]:
        return {name: _suggest(trial, f"{prefix}.{name}", value) for name, value in self.params.items()}

    def op(self, where: str, values: Mapping[str, Any]) -> Quantize | Prune:
        """The op of the sampled ``values``, its times as fractions of the run."""
        if self.kind == "quantize":
            return Quantize(bits=values["bits"], start=f"{values['start']}%", **self.fixed)
        start, length = values["start"], values["length"]
        if length == 0:
            return Prune(sparsity=values["sparsity"], start=f"{start}%", **self.fixed)
        end = min(start + length, 100)
        every = fractions.Fraction(end - start, values["refreshes"])
        return Prune(sparsity=values["sparsity"], start=f"{start}%", end=f"{end}%", every=f"{float(every):g}%", **self.fixed)


@dataclass(frozen=True)
class SiteSpace:
    """The ops of one site kind (weight or activation) of a group, and their order."""

    order: tuple[str, ...]
    quantize: OpSpace | None
    prune: OpSpace | None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "SiteSpace":
        if not isinstance(d, Mapping):
            raise SearchError(f"{where}: expected a mapping with quantize, prune and order, got {type(d).__name__}")
        unknown = set(d) - {"order", "quantize", "prune"}
        if unknown:
            raise SearchError(f"{where}: unknown key {quote(sorted(unknown, key=str)[0])}; accepted: order, quantize, prune")
        quantize = OpSpace.from_dict("quantize", d["quantize"], f"{where}.quantize") if d.get("quantize") is not None else None
        prune = OpSpace.from_dict("prune", d["prune"], f"{where}.prune") if d.get("prune") is not None else None
        if quantize is None and prune is None:
            raise SearchError(f"{where}: give quantize and/or prune")
        order = d.get("order", list(ORDERS) if quantize and prune else [ORDERS[0]])
        order = [order] if isinstance(order, str) else order
        if not isinstance(order, list) or not order or any(o not in ORDERS for o in order):
            raise SearchError(
                f"{where}.order: {quote(d.get('order'))} is not accepted; expected {ORDERS[0]!r}, {ORDERS[1]!r} or a list of both"
            )
        return cls(tuple(dict.fromkeys(order)), quantize, prune)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"order": list(self.order) if len(self.order) > 1 else self.order[0]}
        if self.quantize is not None:
            out["quantize"] = self.quantize.to_dict()
        if self.prune is not None:
            out["prune"] = self.prune.to_dict()
        return out

    def sample(self, trial: Any, prefix: str, where: str) -> list[Quantize | Prune]:
        ops = {}
        for space in (self.quantize, self.prune):
            if space is not None:
                ops[space.kind] = space.op(where, space.sample(trial, f"{prefix}.{space.kind}"))
        if len(ops) == 1:
            return list(ops.values())
        order = trial.suggest_categorical(f"{prefix}.order", list(self.order)) if len(self.order) > 1 else self.order[0]
        return [ops["prune"], ops["quantize"]] if order == "prune_first" else [ops["quantize"], ops["prune"]]

    def ramps(self) -> list[int]:
        """The shortest ramp this site can sample, in whole percent of the run (none:
        pruning at once); a ramp that would end after 100% ends there."""
        if self.prune is None or self.prune.params["length"] == 0:
            return []
        return [int(min(_bounds(self.prune.params["length"])[0], 100 - _bounds(self.prune.params["start"])[1]))]


@dataclass(frozen=True)
class GroupSpace:
    """One rule of the sampled spec: its selectors and the spaces of its weight and
    activation ops."""

    name: str
    selectors: dict[str, tuple[str, ...]]
    weight: SiteSpace | None
    activation: SiteSpace | None

    def sample(self, trial: Any, where: str) -> Rule:
        ops = {}
        for kind in ("weight", "activation"):
            site = getattr(self, kind)
            if site is not None:
                ops[kind] = site.sample(trial, f"{self.name}.{kind}", f"{where}.{kind}")
        return Rule(**{k: list(v) for k, v in self.selectors.items()}, **ops)


@dataclass(frozen=True)
class SearchSpace:
    """Per rule group, what :func:`fxqp.search.schedules` may choose (see the module doc),
    and the constraints every trial must meet (``{"bytes": B}``: at most ``B`` artifact
    bytes)."""

    groups: tuple[GroupSpace, ...]
    constraints: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> "SearchSpace":
        problem = nesting_problem(d, MAX_SPEC_DEPTH, MAX_SPEC_VALUES)
        if problem is not None:
            raise SearchError(f"space: {problem}; expected at most {MAX_SPEC_VALUES} values nested at most {MAX_SPEC_DEPTH} levels")
        if not isinstance(d, Mapping):
            raise SearchError(f"space: expected a mapping with 'groups', got {type(d).__name__}")
        unknown = set(d) - {"groups", "constraints"}
        if unknown:
            raise SearchError(f"space: unknown key {quote(sorted(unknown, key=str)[0])}; accepted: groups, constraints")
        groups = d.get("groups")
        if not isinstance(groups, list) or not groups:
            raise SearchError("space.groups: expected a non-empty list of rule groups")
        parsed, names = [], set()
        for i, g in enumerate(groups):
            where = f"groups[{i}]"
            if not isinstance(g, Mapping):
                raise SearchError(f"{where}: expected a mapping, got {type(g).__name__}")
            unknown = set(g) - {"name", "weight", "activation", *_SELECTORS}
            if unknown:
                raise SearchError(
                    f"{where}: unknown key {quote(sorted(unknown, key=str)[0])}; accepted: name, {', '.join(_SELECTORS)}, weight, activation"
                )
            name = g.get("name", f"g{i}")
            if not isinstance(name, str) or not name.isidentifier() or name in names:
                raise SearchError(f"{where}.name: {quote(name)} is not accepted; expected a unique identifier such as 'weights'")
            names.add(name)
            selectors = {}
            for key in _SELECTORS:
                if key in g:
                    value = [g[key]] if isinstance(g[key], str) else g[key]
                    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                        raise SearchError(f"{where}.{key}: expected a string or a list of strings, got {quote(g[key])}")
                    selectors[key] = tuple(value)
            weight = SiteSpace.from_dict(g["weight"], f"{where}.weight") if g.get("weight") is not None else None
            activation = SiteSpace.from_dict(g["activation"], f"{where}.activation") if g.get("activation") is not None else None
            if weight is None and activation is None:
                raise SearchError(f"{where}: give weight and/or activation")
            group = GroupSpace(name, selectors, weight, activation)
            try:
                Rule(**{k: list(v) for k, v in selectors.items()}, weight=[] if weight else None, activation=[] if activation else None)
            except SpecError as err:
                raise SearchError(f"{where}: {err}") from None
            parsed.append(group)
        constraints = d.get("constraints") or {}
        if not isinstance(constraints, Mapping) or set(constraints) - {"bytes"}:
            raise SearchError(
                f"space.constraints: {quote(constraints)} is not accepted; expected {{bytes: B}} (the saved artifact at most B bytes)"
            )
        checked = {key: float(_number(f"constraints.{key}", value, False, 1, 1e15)) for key, value in constraints.items()}
        return cls(tuple(parsed), checked)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "SearchSpace":
        """Load a YAML file, read within the limits of a spec file
        (:func:`fxqp.limits.load_yaml_document`: at most
        :data:`~fxqp.limits.MAX_SPEC_BYTES` bytes of UTF-8, safe loading, bounded nesting
        and value count, no key twice in a mapping); errors name the file."""
        name = os.fspath(path)
        try:
            data = load_yaml_document(path, "search space")
        except SpecError as err:
            raise SearchError(str(err)) from None
        try:
            return cls.from_dict(data)
        except SearchError as err:
            raise SearchError(f"{name}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        groups = []
        for g in self.groups:
            entry: dict[str, Any] = {"name": g.name, **{k: list(v) for k, v in g.selectors.items()}}
            for kind in ("weight", "activation"):
                if getattr(g, kind) is not None:
                    entry[kind] = getattr(g, kind).to_dict()
            groups.append(entry)
        out: dict[str, Any] = {"groups": groups}
        if self.constraints:
            out["constraints"] = dict(self.constraints)
        return out

    def sample(self, trial: Any) -> Spec:
        """A spec, timed in fractions of the run, from the trial's suggestions."""
        return Spec(rules=[g.sample(trial, f"groups[{i}]") for i, g in enumerate(self.groups)])

    def check_run_length(self, total_steps: int) -> None:
        """Every ramp the space can sample must span at least one step of a run of
        ``total_steps`` (percentages are whole, so 1% must be a step or more)."""
        shortest = [length for g in self.groups for site in (g.weight, g.activation) if site is not None for length in site.ramps()]
        if shortest and min(shortest) * total_steps < 100:
            raise SearchError(
                f"space: a ramp of {min(shortest)}% of a run of {total_steps} steps is shorter than one step; lengthen the run or the shortest ramp"
            )
