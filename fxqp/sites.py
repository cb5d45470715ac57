"""Sites of a traced model and the matching of spec rules to them.

A *weight site* is a module parameter named ``weight`` (Conv, ConvTranspose, Linear,
Embedding, norms, any module with such a parameter); a ``Parameter`` shared by several
modules (tied weights) is one site. An *activation site* is the output of
one graph node that calls a module, a function, a method or an operator and whose output
is read by another node. Each call site is its own site: a module object called twice gives
two activation sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxqp.errors import SpecError
from fxqp.layouts import channel_axis_of
from fxqp.limits import name_regex_fullmatch, quote
from fxqp.spec import Rule, Spec
from passes import SOURCE_CLASSES_KEY, called_module, canonical_name, canonical_target_name, non_tensor_nodes, propagate_shapes, qualify

__all__ = [
    "Site",
    "Assignment",
    "Plan",
    "discover_sites",
    "plan_sites",
    "selector_problems",
    "rule_matches",
    "channel_axis_of",
    "known_module_classes",
    "known_functions",
    "glob_match",
    "ACTIVATION_CLASSES",
    "is_activation_name",
    "is_activation_class",
    "is_activation_module",
    "activation_leaf_classes",
]

WEIGHT, ACTIVATION = "weight", "activation"

# Functions and methods whose output is a tuple or list of tensors, never one tensor.
_MULTI_OUTPUT = frozenset(
    {
        "chunk",
        "split",
        "unbind",
        "tensor_split",
        "split_with_sizes",
        "hsplit",
        "vsplit",
        "dsplit",
        "sort",
        "topk",
        "aminmax",
        "unique",
        "meshgrid",
        "broadcast_tensors",
    }
)


@dataclass(frozen=True)
class Site:
    """One place an op chain can be attached.

    Attributes:
        kind: ``"weight"`` or ``"activation"``.
        name: parameter path (``layer1.0.conv1.weight``) or graph node name (``layer1_0_relu_1``).
        module_path: owning module (weight) or called module (activation of a module call).
        module_classes: class names of that module's type and its bases (simple and qualified).
        function: canonical name of the called function/method/operator (``relu``, ``add``).
        target: short text for reports: module class name or function name.
        shape: weight shape (weights only).
        channel_axis: output-channel axis of the weight (:func:`fxqp.layouts.channel_axis_of`: the
            class's channel rule or weight layout; 1 for ConvTranspose, none for 1-D).
        part: path of the traced part whose graph holds the node (activations of a model
            traced in parts, :mod:`passes.descend`; ``""`` for the root's graph). ``name`` and
            ``module_path`` are then paths in the whole model, ``part.<node>``.
        tied: paths of the other modules whose ``weight`` is the same ``Parameter`` (tied
            weights: one site, one op chain, which those modules read).
    """

    kind: str
    name: str
    target: str
    module_path: str | None = None
    module_classes: frozenset[str] = frozenset()
    function: str | None = None
    shape: tuple[int, ...] | None = None
    channel_axis: int | None = None
    part: str = ""
    tied: tuple[str, ...] = ()

    @property
    def node(self) -> str:
        """The graph node's name in its part's graph (activation sites)."""
        return self.name[len(self.part) + 1 :] if self.part else self.name

    def names(self) -> tuple[str, ...]:
        """The strings that ``names`` / ``exclude`` globs are matched against."""
        out = [self.name]
        if self.module_path is not None and self.module_path != self.name:
            out.append(self.module_path)
        for path in self.tied:
            out += [f"{path}.weight", path]
        return tuple(out)


@dataclass(frozen=True)
class Assignment:
    """The ops a site gets, and from which rule (``rule_index``; the last matching rule wins)."""

    site: Site
    rule_index: int
    ops: tuple


@dataclass(frozen=True)
class Plan:
    """All sites of a model and the ops the spec assigns to each."""

    weight_sites: tuple[Site, ...]
    activation_sites: tuple[Site, ...]
    weights: tuple[Assignment, ...]
    activations: tuple[Assignment, ...]

    def unmatched(self) -> list[Site]:
        """Sites no rule said anything about."""
        assigned = {a.site for a in self.weights} | {a.site for a in self.activations}
        return [s for s in self.weight_sites + self.activation_sites if s not in assigned]


def class_names(module: nn.Module | type) -> frozenset[str]:
    """Simple and qualified names of the module's class (or of the class) and every base class."""
    return _class_names(module if isinstance(module, type) else type(module))


@functools.lru_cache(maxsize=1024)
def _class_names(of: type) -> frozenset[str]:
    names = set()
    for cls in of.__mro__:
        if cls is object:
            continue
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
    return frozenset(names)


#: Class names of activation modules: ``torch.nn``'s, and those of the same name elsewhere
#: (timm's ``GELU``).
ACTIVATION_CLASSES = frozenset(
    name
    for name, cls in vars(nn.modules.activation).items()
    if isinstance(cls, type) and cls.__module__ == nn.modules.activation.__name__ and cls is not nn.MultiheadAttention
)


def is_activation_name(name: str) -> bool:
    """Whether a module class name names an activation: one of ``torch.nn``'s
    (:data:`ACTIVATION_CLASSES`) or ``...Activation`` (Hugging Face's ``GELUActivation``,
    ``NewGELUActivation``, ...)."""
    return name in ACTIVATION_CLASSES or (name.endswith("Activation") and name != "Activation")


def is_activation_class(cls: type) -> bool:
    """:func:`is_activation_name` of the class's name."""
    return is_activation_name(cls.__name__)


def is_activation_module(module: nn.Module) -> bool:
    """An activation module: of an activation class (:func:`is_activation_class`) and without
    parameters (torchvision's ``Conv2dNormActivation`` is a block, not an activation)."""
    return is_activation_class(type(module)) and not any(True for _ in module.parameters())


def activation_leaf_classes(model: nn.Module) -> list[type]:
    """The activation classes of ``model`` outside ``torch.nn`` that hold no parameters: traced
    as leaves, each call is one activation site of that class (a GELU written as ``0.5 · x ·
    (1 + tanh(...))`` would otherwise be a chain of arithmetic sites)."""
    return sorted(
        {type(m) for m in model.modules() if not type(m).__module__.startswith("torch.nn.") and is_activation_module(m)},
        key=lambda c: f"{c.__module__}.{c.__qualname__}",
    )


#: ``node.meta`` key set by :func:`record_value_types`: the node's value was a floating-point tensor.
FLOATING_KEY = "fxqp_floating"


def record_value_types(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``gm`` once in eval mode on ``example_inputs`` and record in each call node's
    ``meta`` whether its value is a floating-point tensor (:data:`FLOATING_KEY`), so that
    :func:`discover_sites` leaves out nodes that produce integers, booleans or Python values
    (``x.shape`` arithmetic inside wrapped functions, flags returned beside tensors). The
    shapes it records (``meta["tensor_meta"]``) serve :func:`passes.channel_groups` too."""
    propagate_shapes(gm, example_inputs)
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        node.meta[FLOATING_KEY] = isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def discover_sites(model: nn.Module, parts: Mapping[str, fx.GraphModule] | None = None) -> tuple[tuple[Site, ...], tuple[Site, ...]]:
    """Weight sites (in module order) and activation sites (in graph order) of a traced model.

    ``parts``: for a model traced in parts (:func:`passes.descend.trace_parts`), the
    ``GraphModule`` of each traced module by path; by default the model is one
    ``GraphModule``. Weight sites are found in every module, traced or not (a weight op is a
    parametrization and needs no graph); activation sites only in graphs, named
    ``<part>.<node>``.

    Activation sites are the call nodes that may produce a tensor (static inference, see
    :func:`passes.nodes.non_tensor_nodes`) and that some node reads; after
    :func:`record_value_types`, only nodes whose example value was a floating-point tensor.
    """
    if parts is None:
        parts = {"": model}
    # a module traced through is held as a plain nn.Module: select it by what it was
    source_classes = {
        qualify(prefix, path): cls for prefix, part in parts.items() for path, cls in part.meta.get(SOURCE_CLASSES_KEY, {}).items()
    }
    weights: dict[int, Site] = {}  # by the Parameter's identity: a tied weight is one site
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if not isinstance(weight, nn.Parameter):
            continue
        first = weights.get(id(weight))
        if first is not None:
            weights[id(weight)] = dataclasses.replace(first, tied=(*first.tied, path))
            continue
        shape = tuple(weight.shape)
        cls = source_classes.get(path, type(module))
        weights[id(weight)] = Site(
            kind=WEIGHT,
            name=f"{path}.weight" if path else "weight",
            target=cls.__name__,
            module_path=path,
            module_classes=class_names(cls),
            shape=shape,
            channel_axis=channel_axis_of(cls, shape),
        )
    activations = [site for prefix, part in parts.items() for site in _activation_sites(part, prefix)]
    return tuple(weights.values()), tuple(activations)


def _activation_sites(gm: fx.GraphModule, prefix: str) -> list[Site]:
    modules = dict(gm.named_modules())  # one walk of the tree instead of a get_submodule per call node
    activations = []
    scalars = non_tensor_nodes(gm.graph)
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node in scalars or not node.users:
            continue  # not a call, not a tensor, or an output nobody reads (side effects only)
        if node.meta.get(FLOATING_KEY) is False:
            continue  # the example run saw no floating-point tensor here
        module = None
        if node.op == "call_module":
            module = modules.get(node.target)
            if module is None:  # a module registered under two paths: named_modules lists the first
                module = called_module(gm, node)
        if returns_sequence(gm, node, module):
            continue
        name = qualify(prefix, node.name)
        if module is not None:
            site = Site(
                kind=ACTIVATION,
                name=name,
                target=type(module).__name__,
                module_path=qualify(prefix, str(node.target)),
                module_classes=class_names(module),
                part=prefix,
            )
        else:
            function = canonical_target_name(node)
            if function is None or function in _MULTI_OUTPUT:
                continue
            site = Site(kind=ACTIVATION, name=name, target=function, function=function, part=prefix)
        activations.append(site)
    return activations


# Module types whose call returns a tuple: (output, weights) or (output, hidden state).
_TUPLE_MODULES = (nn.MultiheadAttention, nn.RNNBase)


def returns_sequence(gm: fx.GraphModule, node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether ``node`` certainly or most likely returns a tuple or list, not one tensor.

    True for calls of ``nn.MultiheadAttention`` and RNNs, and for any other call (except a
    built-in ``torch.nn`` module, which returns a tensor) whose every user unpacks it with
    an integer ``getitem`` — those ``getitem`` nodes are the activation sites instead.
    ``module``: the module a ``call_module`` node calls, when the caller has it at hand.
    """
    if module is None:
        module = called_module(gm, node)
    if isinstance(module, _TUPLE_MODULES):
        return True
    if module is not None and type(module).__module__.startswith("torch.nn."):
        return False
    return all(
        user.op == "call_function" and user.target is operator.getitem and len(user.args) > 1 and isinstance(user.args[1], int)
        for user in node.users
    )


def glob_match(pattern: str, text: str) -> bool:
    """Whether a ``names`` / ``exclude`` entry matches ``text``: an fnmatch glob, or a regular
    expression after ``re:``, matched by :func:`fxqp.limits.name_regex_fullmatch` (compiled
    once, each match bounded in time).

    Raises:
        SpecError: the regular expression is refused, or backtracks catastrophically on
            ``text``.
    """
    if pattern.startswith("re:"):
        return name_regex_fullmatch(pattern[3:], text)
    return fnmatch.fnmatchcase(text, pattern)


def _any_name(patterns: Iterable[str], site: Site) -> bool:
    return any(glob_match(p, n) for p in patterns for n in site.names())


def rule_matches(rule: Rule, site: Site) -> bool:
    """Whether ``rule`` selects ``site``: (modules OR functions) AND names AND NOT exclude."""
    if rule.modules or rule.functions:
        by_module = any(m in site.module_classes for m in rule.modules)
        by_function = site.function is not None and site.function in rule.functions
        if not (by_module or by_function):
            return False
    if rule.names and not _any_name(rule.names, site):
        return False
    return not (rule.exclude and _any_name(rule.exclude, site))


def _sites_for(rule: Rule, weight_sites: Sequence[Site], activation_sites: Sequence[Site]) -> list[Site]:
    sites: list[Site] = []
    if rule.weight is not None:
        sites.extend(weight_sites)
    if rule.activation is not None:
        sites.extend(activation_sites)
    return sites


def _public(name: str) -> bool:
    """Whether ``name`` (simple or dotted) is one to suggest: no part of it private (torch's
    ``_ConvNd`` and ``_NormBase`` bases, ``torch.nn.modules.conv._ConvNd``)."""
    return not any(part.startswith("_") for part in name.split("."))


def _hint(value: str, candidates: Iterable[str]) -> str:
    """`` (closest: ...)`` or `` (available: ...)`` among the public ``candidates``; ``""``
    when there are none."""
    pool = sorted({name for name in candidates if _public(name)})
    close = difflib.get_close_matches(value, pool, n=3, cutoff=0.4)
    if close:
        return f" (closest: {', '.join(close)})"
    if not pool:
        return ""
    return f" (available: {', '.join(pool[:12])}{', ...' if len(pool) > 12 else ''})"


def _entry_matches(field_name: str, value: str, site: Site) -> bool:
    if field_name == "modules":
        return value in site.module_classes
    if field_name == "functions":
        return site.function == value
    return _any_name([value], site)


def _candidates(field_name: str, sites: Sequence[Site]) -> list[str]:
    if field_name == "modules":
        return [c for s in sites for c in s.module_classes if "." not in c]  # simple names
    if field_name == "functions":
        return [s.function for s in sites if s.function]
    return [n for s in sites for n in s.names()]


def known_module_classes() -> frozenset[str]:
    """Simple and qualified names of every ``nn.Module`` subclass defined so far (torch's,
    and those of every library imported: timm's ``GELU``, a user's blocks)."""
    names: set[str] = set()
    stack = [nn.Module]
    seen: set[type] = set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        names.add(cls.__name__)
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        stack.extend(cls.__subclasses__())
    return frozenset(names)


@functools.lru_cache(maxsize=1)
def known_functions() -> frozenset[str]:
    """Canonical names of the functions, tensor methods and operators a graph can call
    (``torch``, ``torch.nn.functional``, ``torch.special``/``linalg``/``fft``, ``Tensor``
    methods, :mod:`operator`, :mod:`math`, built-ins)."""
    import builtins
    import math

    import torch

    spaces = (torch, torch.nn.functional, torch.special, torch.linalg, torch.fft, torch.Tensor, operator, math, builtins)
    return frozenset(canonical_name(name) for space in spaces for name in dir(space) if name.strip("_"))


def _known_names(field_name: str) -> frozenset[str] | None:
    """What a ``modules`` or ``functions`` entry may name; None for the other fields (any
    text may name something)."""
    if field_name == "modules":
        return known_module_classes()
    if field_name == "functions":
        return known_functions()
    return None


def selector_problems(spec: Spec, weight_sites: Sequence[Site], activation_sites: Sequence[Site]) -> tuple[list[str], list[str]]:
    """What is wrong or idle in the spec's selectors for this model, with the closest names
    as a hint.

    Returns ``(errors, notes)``. Errors:

    * a ``modules`` entry that names no ``nn.Module`` class defined anywhere, or a
      ``functions`` entry that names no function, method or operator (a typo), unless the
      model has it anyway (a function of the user's);
    * a rule that selects no site at all.

    Notes: each entry that matches no site of this model while the rule still selects some
    (``functions=["relu", "gelu"]`` on a model without GELU; a reusable spec), and each
    ``exclude`` entry that excludes nothing.

    Raises:
        SpecError: a ``re:`` selector backtracks catastrophically on a site's name
            (:func:`glob_match`); the message starts with ``rules[i]``.
    """
    errors, notes = [], []
    for index, rule in enumerate(spec.rules):
        with _located(f"rules[{index}]"):
            _rule_problems(index, rule, weight_sites, activation_sites, errors, notes)
    return errors, notes


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefix the message of a SpecError raised inside (a ``re:`` selector that
    backtracks catastrophically) with the rule's location."""
    try:
        yield
    except SpecError as e:
        raise type(e)(f"{where}: {e}") from None


def _rule_problems(
    index: int, rule: Rule, weight_sites: Sequence[Site], activation_sites: Sequence[Site], errors: list[str], notes: list[str]
) -> None:
    """The errors and notes of :func:`selector_problems` for rule ``index``, appended."""
    sites = _sites_for(rule, weight_sites, activation_sites)
    kinds = " or ".join(k for k in (WEIGHT, ACTIVATION) if getattr(rule, k) is not None)
    absent: list[str] = []
    for field_name in ("modules", "functions", "names", "exclude"):
        values = getattr(rule, field_name)
        missing = [v for v in values if not any(_entry_matches(field_name, v, s) for s in sites)]
        pool = _candidates(field_name, sites)
        known = _known_names(field_name) if missing else None  # one walk of the class tree per field
        for value in missing:
            if known is not None and value not in known:
                kind = "module class" if field_name == "modules" else "function, method or operator"
                public = [name for name in pool if _public(name)]
                hint = _hint(value, public) if difflib.get_close_matches(value, public, n=1, cutoff=0.4) else _hint(value, known)
                errors.append(f"rules[{index}].{field_name}: {quote(value)} is no known {kind}{hint}")
            else:
                absent.append(f"rules[{index}].{field_name}: {quote(value)} matches no {kinds} site{_hint(value, pool)}")
    if not any(rule_matches(rule, site) for site in sites):
        why = f": {'; '.join(absent)}" if absent else ""
        errors.append(f"rules[{index}] selects no {kinds} site of this model{why}")
    else:
        notes.extend(absent)


def plan_sites(model: nn.Module, spec: Spec, check: bool = True, parts: Mapping[str, fx.GraphModule] | None = None) -> Plan:
    """Discover sites (:func:`discover_sites`, ``parts`` as there) and assign each the ops of
    the last rule that matches it.

    Raises:
        SpecError: (with ``check``) a rule selects no site, or a selector entry names no known
            class or function (:func:`selector_problems`); the message names the rule index,
            the field and the closest names. A ``re:`` selector that backtracks
            catastrophically on a site's name (:func:`glob_match`), with or without ``check``.
    """
    weight_sites, activation_sites = discover_sites(model, parts)
    if check:
        errors, _ = selector_problems(spec, weight_sites, activation_sites)
        if errors:
            raise SpecError("; ".join(errors))
    assigned: dict[str, dict[Site, Assignment]] = {WEIGHT: {}, ACTIVATION: {}}
    for kind, sites in ((WEIGHT, weight_sites), (ACTIVATION, activation_sites)):
        for index, rule in enumerate(spec.rules):
            ops = getattr(rule, kind)
            if ops is None:
                continue
            with _located(f"rules[{index}]"):
                for site in sites:
                    if rule_matches(rule, site):
                        assigned[kind][site] = Assignment(site, index, tuple(ops))
    order = {s: i for i, s in enumerate(weight_sites + activation_sites)}
    return Plan(
        weight_sites=weight_sites,
        activation_sites=activation_sites,
        weights=tuple(sorted(assigned[WEIGHT].values(), key=lambda a: order[a.site])),
        activations=tuple(sorted(assigned[ACTIVATION].values(), key=lambda a: order[a.site])),
    )
