"""Hypothesis strategies for testing code built on fxqp.

Strategies are values that compose, like hypothesis' own::

    import fxqp
    from hypothesis import given, strategies as st
    from fxqp.testing.strategies import models, specs, schedules, run_schedule

    @given(st.data())
    def test_any_spec_trains(data):
        model, inputs = data.draw(models())
        gm = fxqp.transform(model, data.draw(specs(model)))
        run_schedule(gm, inputs, data.draw(schedules()))

* :func:`models` -- a small random network (a real :class:`DrawnNet`, built from a drawn
  :class:`NetPlan`) with example inputs for it;
* :func:`ops` -- a list of :class:`~fxqp.Quantize` / :class:`~fxqp.Prune` ops valid for
  weight or activation sites;
* :func:`specs` -- a valid :class:`~fxqp.Spec`, whose every selector matches a site of a
  given model when one is given;
* :func:`schedules` -- a list of actions (train, eval, step) that :func:`run_schedule`
  drives a transformed model through.

:func:`plans` draws the :class:`NetPlan` alone, without building the network. Every net is
tiny (at most 8 channels, 8x8 inputs, batch 2), so a forward and backward take a few
milliseconds.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import Tensor, nn

from fxqp.rules import (
    ACTIVATION,
    LEARNED_MIN_BITS,
    N_OF_M_MAX,
    PRUNE_CRITERIA,
    PRUNE_SITES,
    QUANTIZE_METHODS,
    QUANTIZE_SITES,
    SITE_KINDS,
    WEIGHT,
    prune_structure,
)
from fxqp.schedule import step as fxqp_step
from fxqp.sites import Site, discover_sites, glob_match, rule_matches
from fxqp.spec import Op, Prune, Quantize, Rule, Spec
from passes import trace

__all__ = [
    "ACTIVATIONS",
    "BLOCK_KINDS",
    "Block",
    "NetPlan",
    "DrawnNet",
    "ExampleInputs",
    "plans",
    "build_model",
    "models",
    "ops",
    "specs",
    "schedules",
    "run_schedule",
    "BATCH",
    "COMMON_MODULES",
    "COMMON_FUNCTIONS",
]

BATCH = 2
"""Batch size of the example inputs of every drawn model."""

ACTIVATIONS = ("relu", "gelu", "silu")
"""Activation kinds; each is called as a module (``nn.ReLU``) or a function (``F.relu``)."""

BLOCK_KINDS = ("conv", "depthwise", "residual", "cat", "shared_conv", "pool")
"""The kinds of :class:`Block` a :class:`NetPlan` is made of."""

COMMON_MODULES = ("Conv2d", "Linear", "ReLU")
"""Module class names that :func:`specs` selects when it is given no model."""

COMMON_FUNCTIONS = ("relu", "add")
"""Function names that :func:`specs` selects when it is given no model."""

_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
_ACTIVATION_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_POOL_MODULES = {(1, "avg"): nn.AvgPool1d, (1, "max"): nn.MaxPool1d, (2, "avg"): nn.AvgPool2d, (2, "max"): nn.MaxPool2d}
_POOL_FUNCTIONS = {(1, "avg"): F.avg_pool1d, (1, "max"): F.max_pool1d, (2, "avg"): F.avg_pool2d, (2, "max"): F.max_pool2d}
_ADAPTIVE_MODULES = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}
_ADAPTIVE_FUNCTIONS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


# ---------------------------------------------------------------------------------------
# The plan of a drawn network
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Block:
    """One block of a :class:`NetPlan`, at the net's width ``w`` (``x`` is its input).

    Kinds (``conv`` stands for the block's ``Conv1d``/``Conv2d``, 3-wide, padding 1, with
    ``groups`` groups; ``act`` for its activation, followed by a BatchNorm when ``norm``)::

        conv         x = act(conv(x))                  groups: any divisor of w
        depthwise    x = act(conv(x))                  groups == w
        residual     x = x + act(conv(x))              residual ``+`` (operator.add)
        cat          x = proj(torch.cat([x, act(conv(x))], 1))    proj: 1x1 conv, 2w -> w
        shared_conv  x = act(conv(act(conv(x))))       one conv (and norm) at two call sites
        pool         x = avg/max pool, kernel 2 (or 1 along a dim already of size 1)

    Attributes:
        kind: one of :data:`BLOCK_KINDS`.
        act: ``"relu"``, ``"gelu"`` or ``"silu"`` (ignored when ``call == "shared"`` and
            by pool blocks).
        call: how the activation is called: ``"module"`` (the block's own ``nn.ReLU``...),
            ``"function"`` (``F.relu``...) or ``"shared"`` (the net's shared activation
            module ``act``, called at many sites); pool blocks: ``"module"``
            (``nn.MaxPool2d``...) or ``"function"`` (``F.max_pool2d``...).
        norm: a BatchNorm after the conv (not for pool blocks).
        groups: groups of the conv, a divisor of the width (depthwise blocks always use the
            width; :func:`plans` stores it there too; pool blocks: 1).
        pool: ``"avg"`` or ``"max"`` (pool blocks only).
    """

    kind: str
    act: str = "relu"
    call: str = "module"
    norm: bool = False
    groups: int = 1
    pool: str = "avg"

    def __post_init__(self) -> None:
        _check_choice("Block.kind", self.kind, BLOCK_KINDS)
        _check_choice("Block.act", self.act, ACTIVATIONS)
        _check_choice("Block.call", self.call, ("module", "function") if self.kind == "pool" else ("module", "function", "shared"))
        _check_choice("Block.pool", self.pool, ("avg", "max"))
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"Block.groups: {self.groups!r} is not an int >= 1")

    def __repr__(self) -> str:
        """``Block('residual', act='gelu', call='function')``: the kind and the non-defaults."""
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)[1:] if getattr(self, f.name) != f.default]
        return f"Block({', '.join([repr(self.kind), *fields])})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def describe(self) -> str:
        """Short text such as ``residual(groups=2, bn, F.gelu)`` or ``pool(nn.max)``."""
        if self.kind == "pool":
            return f"pool({'nn' if self.call == 'module' else 'F'}.{self.pool})"
        parts = []
        if self.groups != 1 and self.kind != "depthwise":  # depthwise: groups == width
            parts.append(f"groups={self.groups}")
        if self.norm:
            parts.append("bn")
        if self.call == "shared":
            parts.append("shared act")
        else:
            parts.append(f"{'nn' if self.call == 'module' else 'F'}.{self.act}")
        return f"{self.kind}({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class NetPlan:
    """What :class:`DrawnNet` builds: a stem, blocks, and a classifier head.

    The forward is ``stem -> blocks -> act -> adaptive avg pool -> torch.flatten -> fc``,
    where the stem is ``act(norm?(conv(x)))`` (``in_channels -> width``) and ``act`` is the
    shared activation module (class ``shared_act``), so one module object is always called
    at two call sites at least.

    Attributes:
        dims: 1 (``Conv1d``, ``BatchNorm1d``, pools 1d) or 2 (``Conv2d``, ...).
        in_channels: channels of the input.
        width: channels of every block.
        size: spatial size of the input (``dims`` entries).
        classes: outputs of the ``Linear`` head; the model returns ``(BATCH, classes)``.
        shared_act: ``"relu"``, ``"gelu"`` or ``"silu"``: the class of the shared activation.
        stem_norm: a BatchNorm after the stem conv.
        head_pool: ``"module"`` (``nn.AdaptiveAvgPool2d``) or ``"function"``
            (``F.adaptive_avg_pool2d``) for the pool before the head.
        blocks: the :class:`Block` sequence.
        seed: seeds the weights and the example inputs (through ``torch.Generator``).
        channels_last: (``dims == 2`` only) the net's 4-D weights and its example input are
            in ``torch.channels_last`` memory format, as in a model converted with
            ``model.to(memory_format=torch.channels_last)`` for speed.
    """

    dims: int
    in_channels: int
    width: int
    size: tuple[int, ...]
    classes: int
    shared_act: str
    stem_norm: bool
    head_pool: str
    blocks: tuple[Block, ...]
    seed: int
    channels_last: bool = False

    def __post_init__(self) -> None:
        _check_choice("NetPlan.dims", self.dims, (1, 2))
        if self.channels_last and self.dims != 2:
            raise ValueError(f"NetPlan.channels_last: only for dims=2 (4-D tensors), got dims={self.dims}")
        if len(self.size) != self.dims:
            raise ValueError(f"NetPlan.size: {self.size!r} does not have dims={self.dims} entries")
        _check_choice("NetPlan.shared_act", self.shared_act, ACTIVATIONS)
        _check_choice("NetPlan.head_pool", self.head_pool, ("module", "function"))
        for i, block in enumerate(self.blocks):
            if block.kind != "pool" and self.width % self.groups_of(block):
                raise ValueError(f"NetPlan.blocks[{i}].groups: {block.groups} does not divide width={self.width}")

    def groups_of(self, block: Block) -> int:
        """Groups of the conv of ``block``: ``width`` for depthwise blocks, else ``block.groups``."""
        return self.width if block.kind == "depthwise" else block.groups

    def input_shape(self) -> tuple[int, ...]:
        """Shape of the example input: ``(BATCH, in_channels, *size)``."""
        return (BATCH, self.in_channels, *self.size)

    def describe(self) -> str:
        """One line: conv kind, sizes, seed, then the blocks in order."""
        size = "x".join(str(s) for s in self.size)
        stem = f"stem({'bn, ' if self.stem_norm else ''}shared {_ACTIVATION_MODULES[self.shared_act].__name__})"
        head = f"head({'nn' if self.head_pool == 'module' else 'F'}.adaptive_avg_pool, Linear->{self.classes})"
        chain = " -> ".join([stem, *(b.describe() for b in self.blocks), head])
        layout = " channels_last" if self.channels_last else ""
        return f"Conv{self.dims}d{layout} in={self.in_channels} width={self.width} size={size} seed={self.seed}: {chain}"


def _check_choice(where: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")


def _pool_kernel(size: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(2, s) for s in size)


class ExampleInputs(tuple):
    """The positional inputs of a drawn model (a plain tuple of tensors) with a short repr."""

    def __repr__(self) -> str:
        shapes = ", ".join(f"randn{tuple(t.shape)}" if isinstance(t, Tensor) else repr(t) for t in self)
        return f"ExampleInputs({shapes})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class DrawnNet(nn.Module):
    """A small network built from a :class:`NetPlan`; the forward interprets the plan.

    The loop over the plan unrolls when torch.fx traces the forward (it has no
    data-dependent control flow), giving a graph that mixes module calls (convs, norms,
    activation and pool modules, the shared activation at several call sites, the linear
    head) with function calls (``F.relu``/``F.gelu``/``F.silu``, ``+``, ``torch.cat``,
    ``F.max_pool2d``..., ``F.adaptive_avg_pool2d``, ``torch.flatten``).

    Weights are initialised from ``plan.seed`` with a ``torch.Generator`` (the global RNG is
    left as it was), so ``DrawnNet(plan)`` always builds the same network.

    Attributes:
        plan: the :class:`NetPlan`.
    """

    def __init__(self, plan: NetPlan):
        super().__init__()
        self.plan = plan
        d, w = plan.dims, plan.width
        conv, norm = _CONV[d], _NORM[d]
        with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
            self.stem = conv(plan.in_channels, w, 3, padding=1)
            self.stem_norm = norm(w) if plan.stem_norm else None
            self.act = _ACTIVATION_MODULES[plan.shared_act]()
            self.blocks = nn.ModuleList()
            self._pool_kernels: list[Any] = []  # per block: the pool kernel (an int for 1d)
            size = tuple(plan.size)
            for block in plan.blocks:
                parts = nn.ModuleDict()
                kernel = _pool_kernel(size)
                if block.kind == "pool":
                    if block.call == "module":
                        parts["pool"] = _POOL_MODULES[d, block.pool](kernel)
                    size = tuple(s // k for s, k in zip(size, kernel))
                else:
                    parts["conv"] = conv(w, w, 3, padding=1, groups=plan.groups_of(block))
                    if block.norm:
                        parts["norm"] = norm(w)
                    if block.call == "module":
                        parts["act"] = _ACTIVATION_MODULES[block.act]()
                    if block.kind == "cat":
                        parts["proj"] = conv(2 * w, w, 1)
                self._pool_kernels.append(kernel if d == 2 else kernel[0])
                self.blocks.append(parts)
            self.head_pool = _ADAPTIVE_MODULES[d](1) if plan.head_pool == "module" else None
            self.fc = nn.Linear(w, plan.classes)
        self.reset_parameters()
        if plan.channels_last:
            self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter from ``plan.seed`` (same seed, same weights)."""
        generator = torch.Generator().manual_seed(2 * self.plan.seed)
        for name, param in self.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.dim() > 1:  # conv / linear weight: variance 2 / fan_in
                fan_in = param[0].numel()
                param.copy_(noise * (2.0 / fan_in) ** 0.5)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:  # biases
                param.copy_(0.1 * noise)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()

    def example_inputs(self) -> ExampleInputs:
        """The example inputs of this net: ``(randn(BATCH, in_channels, *size),)`` from the
        seed (channels-last when the plan's net is)."""
        generator = torch.Generator().manual_seed(2 * self.plan.seed + 1)
        x = torch.randn(self.plan.input_shape(), generator=generator)
        if self.plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return ExampleInputs((x,))

    def _act(self, block: Block, parts: nn.ModuleDict, x: Tensor) -> Tensor:
        if block.call == "shared":
            return self.act(x)
        if block.call == "module":
            return parts["act"](x)
        return _ACTIVATION_FUNCTIONS[block.act](x)

    def _conv_unit(self, block: Block, parts: nn.ModuleDict, x: Tensor) -> Tensor:
        x = parts["conv"](x)
        if block.norm:
            x = parts["norm"](x)
        return self._act(block, parts, x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.stem_norm is not None:
            x = self.stem_norm(x)
        x = self.act(x)
        for block, parts, kernel in zip(self.plan.blocks, self.blocks, self._pool_kernels):
            if block.kind == "pool":
                if block.call == "module":
                    x = parts["pool"](x)
                else:
                    x = _POOL_FUNCTIONS[self.plan.dims, block.pool](x, kernel)
            elif block.kind in ("conv", "depthwise"):
                x = self._conv_unit(block, parts, x)
            elif block.kind == "residual":
                x = x + self._conv_unit(block, parts, x)
            elif block.kind == "cat":
                x = parts["proj"](torch.cat([x, self._conv_unit(block, parts, x)], dim=1))
            elif block.kind == "shared_conv":
                x = self._conv_unit(block, parts, self._conv_unit(block, parts, x))
            else:
                raise ValueError(f"unknown block kind {block.kind!r}; expected one of {BLOCK_KINDS}")
        x = self.act(x)
        if self.head_pool is not None:
            x = self.head_pool(x)
        else:
            x = _ADAPTIVE_FUNCTIONS[self.plan.dims](x, 1)
        return self.fc(torch.flatten(x, 1))

    def __repr__(self) -> str:
        return f"DrawnNet({self.plan.describe()})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


# ---------------------------------------------------------------------------------------
# Strategies: networks
# ---------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _blocks(draw: st.DrawFn, width: int, max_blocks: int) -> tuple[Block, ...]:
    kinds = draw(st.lists(st.sampled_from(BLOCK_KINDS), min_size=1, max_size=max_blocks))
    blocks = []
    for kind in kinds:
        if kind == "pool":
            blocks.append(
                Block(
                    kind="pool",
                    call=draw(st.sampled_from(("module", "function"))),
                    pool=draw(st.sampled_from(("avg", "max"))),
                )
            )
            continue
        groups = width if kind == "depthwise" else draw(st.sampled_from(_divisors(width)))
        blocks.append(
            Block(
                kind=kind,
                act=draw(st.sampled_from(ACTIVATIONS)),
                call=draw(st.sampled_from(("module", "function", "shared"))),
                norm=draw(st.booleans()),
                groups=groups,
            )
        )
    return tuple(blocks)


@st.composite
def _plans(draw: st.DrawFn, max_blocks: int) -> NetPlan:
    dims = draw(st.sampled_from((2, 1)))
    width = draw(st.integers(2, 8))
    return NetPlan(
        dims=dims,
        in_channels=draw(st.integers(1, 4)),
        width=width,
        size=tuple(draw(st.integers(4, 8)) for _ in range(dims)),
        classes=draw(st.integers(2, 5)),
        shared_act=draw(st.sampled_from(ACTIVATIONS)),
        stem_norm=draw(st.booleans()),
        head_pool=draw(st.sampled_from(("function", "module"))),
        blocks=draw(_blocks(width, max_blocks)) if max_blocks > 0 else (),
        seed=draw(st.integers(0, 2**32 - 1)),
        channels_last=dims == 2 and draw(st.booleans()),
    )


def _check_int_arg(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{name}={value!r}: expected an int >= {low}")


def plans(max_blocks: int = 4) -> st.SearchStrategy[NetPlan]:
    """Draw a :class:`NetPlan` with 1..``max_blocks`` blocks (none when ``max_blocks == 0``).

    Conv1d or Conv2d for the whole net, input channels 1..4, width 2..8, spatial size 4..8
    per dim, 2..5 classes, a seed in ``0..2**32-1``, and for Conv2d nets the contiguous or
    the channels-last memory format.
    """
    _check_int_arg("max_blocks", max_blocks, 0)
    return _plans(max_blocks)


def build_model(plan: NetPlan) -> tuple[DrawnNet, ExampleInputs]:
    """``(DrawnNet(plan), its example_inputs())``: what :func:`models` draws, from a plan.

    Hypothesis reports a drawn model as ``build_model(NetPlan(...))``, which rebuilds it.
    """
    net = DrawnNet(plan)
    return net, net.example_inputs()


def models(max_blocks: int = 4) -> st.SearchStrategy[tuple[nn.Module, tuple[Tensor, ...]]]:
    """Draw ``(net, inputs)``: a small :class:`DrawnNet` and matching example inputs.

    ``net(*inputs)`` has shape ``(BATCH, net.plan.classes)``; ``inputs`` is an
    :class:`ExampleInputs` (a tuple) holding one ``randn`` tensor of shape
    ``net.plan.input_shape()``. Both come from ``net.plan.seed``, so ``DrawnNet(net.plan)``
    and ``DrawnNet(net.plan).example_inputs()`` rebuild them exactly. The net is traceable
    by torch.fx and always has module and function call sites and a module object called
    at two call sites (the shared activation ``act``); see :class:`NetPlan` and
    :class:`Block` for what else it may contain.
    """
    return plans(max_blocks).map(build_model)


# ---------------------------------------------------------------------------------------
# Strategies: ops, specs, schedules
# ---------------------------------------------------------------------------------------

_SITE_KINDS = SITE_KINDS


@st.composite
def _quantize(draw: st.DrawFn, kind: str, max_step: int) -> Quantize:
    """A Quantize that a site of ``kind`` takes, as the tables of :mod:`fxqp.rules` allow."""
    site = QUANTIZE_SITES[kind]
    # uniform is drawn half of the time: it has the most options
    name = draw(st.sampled_from(("uniform",)) | st.sampled_from(tuple(m.name for m in site.methods())))
    method = QUANTIZE_METHODS[name]
    bits = draw(st.integers(*method.bits))
    if method.fixed_grid:  # symmetric may only be unset or true, and changes nothing
        symmetric = None
    else:
        symmetric = draw(st.sampled_from((None, True, False) if bits >= site.symmetric_min_bits else (None, False)))
    return Quantize(
        bits=bits,
        start=draw(st.integers(0, max_step)),
        symmetric=symmetric,
        per_channel=draw(st.sampled_from((None, True, False) if site.per_channel else (None, False))),
        learned=method.learned and bits >= LEARNED_MIN_BITS and draw(st.booleans()),
        method=name,
        scaled=draw(st.sampled_from((None, True, False))) if method.scaled else None,
    )


def _structures(kind: str, weights: Optional[Sequence[Site]]) -> tuple[list[str], list[int]]:
    """The structures a pruner of ``kind`` may take on every site of ``weights`` (all of
    them but ``"element"`` need the sites' shapes: none without ``weights``), by name with
    ``"N:M"`` for the patterns, and the ``M`` of the patterns that fit."""
    shapes = [] if weights is None else [(s.shape, s.channel_axis) for s in weights]
    names, ms = [], []
    for structure in PRUNE_SITES[kind].structures():
        if structure.name != "element" and weights is None:
            continue
        if structure.name == "N:M":
            ms = [m for m in range(2, N_OF_M_MAX + 1) if all(prune_structure(f"1:{m}").fits(*shape) for shape in shapes)]
            if ms:
                names.append(structure.name)
        elif all(structure.fits(*shape) for shape in shapes):
            names.append(structure.name)
    return names, ms


@st.composite
def _prune(draw: st.DrawFn, kind: str, max_step: int, weights: Optional[Sequence[Site]] = None) -> Prune:
    """A Prune that a site of ``kind`` takes (and, for weights, every site of ``weights``),
    as the tables of :mod:`fxqp.rules` allow."""
    names, ms = _structures(kind, weights)
    name = draw(st.sampled_from(("element",)) | st.sampled_from(names)) if len(names) > 1 else "element"
    if name == "N:M":
        m = draw(st.sampled_from(ms))
        name = f"{draw(st.integers(1, m - 1))}:{m}"
    structure = prune_structure(name)
    start = draw(st.integers(0, max_step))
    end = None
    if structure.ramp:
        end = draw(st.none() | st.integers(1, max(1, max_step)).map(lambda d: start + d))
    site = PRUNE_SITES[kind]
    granularity = draw(st.sampled_from(site.granularities))
    dynamic = site.dynamic and granularity == "element" and draw(st.booleans())
    if structure.pattern is not None:
        sparsity = structure.pattern.sparsity
    else:
        sparsity = draw(st.floats(0.0, 0.95, allow_nan=False, allow_infinity=False))
    return Prune(
        sparsity=sparsity,
        start=start,
        end=end,
        every=draw(st.integers(1, 3)),
        granularity=granularity,
        dynamic=dynamic,
        structure=name,
        criterion=draw(st.sampled_from(structure.criteria)),
        score_from=draw(st.sampled_from(structure.score_from)),
    )


@st.composite
def _ops(draw: st.DrawFn, kind: str, max_step: int, weights: Optional[Sequence[Site]]) -> list[Op]:
    drawn = draw(st.lists(_quantize(kind, max_step) | _prune(kind, max_step, weights), max_size=3))
    if any(isinstance(op, Quantize) for op in drawn):
        return drawn
    # a criterion that compares with the quantized weight needs a Quantize op at the site
    plain = [name for name, c in PRUNE_CRITERIA.items() if not c.needs_quantizer]
    return [
        dataclasses.replace(op, criterion=draw(st.sampled_from(plain))) if PRUNE_CRITERIA[op.criterion].needs_quantizer else op
        for op in drawn
    ]


def ops(kind: str, max_step: int = 20, *, weights: Optional[Sequence[Site]] = None) -> st.SearchStrategy[list[Op]]:
    """Draw a list of 0..3 :class:`~fxqp.Quantize` / :class:`~fxqp.Prune` ops, in any order,
    that fxqp accepts on a site of ``kind`` (``"weight"`` or ``"activation"``).

    Every combination is drawn from the tables of :mod:`fxqp.rules`, which the spec checks
    against: a method's bits and options, the options of each kind of site, each prune
    structure's criteria, ``score_from``, ramp and weight shapes.

    Quantize: any method the site kind takes (``uniform`` half of the time) with bits it
    takes, ``learned`` (uniform, lsq) with ``bits >= 2``, ``start`` 0..max_step;
    weights: ``symmetric`` and ``per_channel`` None/True/False; activations: ``per_channel``
    None/False and ``symmetric=True`` only with ``bits >= 2``.

    Prune: ``sparsity`` in [0, 0.95], ``start`` 0..max_step, ``end`` None or
    ``start + 1 .. start + max_step``, ``every`` 1..3; activations also draw
    ``granularity`` (``"element"``/``"channel"``) and ``dynamic`` (element only).

    Structured pruning needs the weight sites the ops go on (:class:`fxqp.sites.Site`, as
    :func:`fxqp.sites.discover_sites` finds them): given ``weights``, a weight pruner also
    draws ``structure`` among those every site takes (``"filter"``, ``"channel"``, ``"N:M"``
    with ``M`` dividing the input dimension; ``sparsity`` then ``(M − N)/M`` and no ramp),
    ``criterion`` and ``score_from`` (``"angle"`` only with a Quantize op in the list).
    """
    if kind not in _SITE_KINDS:
        raise InvalidArgument(f"kind={kind!r}: expected 'weight' or 'activation'")
    _check_int_arg("max_step", max_step, 0)
    if weights is not None and kind != WEIGHT:
        raise InvalidArgument(f"weights=...: only for kind='weight', got kind={kind!r}")
    return _ops(kind, max_step, None if weights is None else tuple(weights))


@dataclasses.dataclass(frozen=True)
class _Pools:
    """Selector values that match at least one site of the given kinds of a model, and those
    sites (empty without a model)."""

    modules: tuple[str, ...]
    functions: tuple[str, ...]
    names: tuple[str, ...]  # node names and module paths (targets of names / exclude)
    sites: tuple[Site, ...] = ()


def _pools_of(weight_sites: Sequence[Site], activation_sites: Sequence[Site]) -> dict[tuple[str, ...], _Pools]:
    """For each non-empty choice of site kinds a rule can give ops for, what it may select."""
    by_kind = {WEIGHT: tuple(weight_sites), ACTIVATION: tuple(activation_sites)}
    out = {}
    for kinds in ((WEIGHT,), (ACTIVATION,), (WEIGHT, ACTIVATION)):
        sites = [s for k in kinds for s in by_kind[k]]
        if not all(by_kind[k] for k in kinds):
            continue
        out[kinds] = _Pools(
            modules=tuple(sorted({s.target for s in sites if s.module_path is not None and s.function is None})),
            functions=tuple(sorted({s.function for s in sites if s.function is not None})),
            names=tuple(sorted({n for s in sites for n in s.names()})),
            sites=tuple(sites),
        )
    return out


def _pattern(name: str) -> st.SearchStrategy[str]:
    """A ``names`` / ``exclude`` entry that matches ``name``: itself, a glob, or a regex."""
    return st.sampled_from((name, name + "*", "re:" + re.escape(name)))


def _anchor_values(site: Site) -> dict[str, tuple[str, ...]]:
    """The selector values that match ``site``, per field."""
    return {
        "modules": (site.target,) if site.module_path is not None and site.function is None else (),
        "functions": (site.function,) if site.function is not None else (),
        "names": site.names(),
    }


@st.composite
def _rule(draw: st.DrawFn, pools: dict[tuple[str, ...], _Pools], max_step: int) -> Rule:
    """A rule that selects at least one site: with a model, every field it uses has an entry
    matching one site drawn first (the anchor), and its ``exclude`` entry spares that site."""
    kinds = draw(st.sampled_from(sorted(pools)))
    pool = pools[kinds]
    anchor = draw(st.sampled_from(pool.sites)) if pool.sites else None
    own = _anchor_values(anchor) if anchor is not None else {f: getattr(pool, f) for f in ("modules", "functions", "names")}
    fields = [f for f in ("modules", "functions", "names") if own[f]]
    chosen = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=len(fields), unique=True))
    selectors: dict[str, Any] = {}
    for field in chosen:
        first = draw(st.sampled_from(own[field]))
        others = draw(st.lists(st.sampled_from(getattr(pool, field)), max_size=2, unique=True))
        values = list(dict.fromkeys([first, *others]))
        selectors[field] = [draw(_pattern(v)) for v in values] if field == "names" else values
        if field == "names":  # the anchor's own pattern first: it matches the anchor
            selectors[field][0] = draw(_pattern(first))
    if pool.names and draw(st.booleans()):
        exclude = draw(st.sampled_from(pool.names).flatmap(_pattern))
        if anchor is None or not any(glob_match(exclude, n) for n in anchor.names()):
            selectors["exclude"] = [exclude]
    # weight ops: structured pruning where every weight site the rule selects takes it
    weights = None
    if pool.sites:
        probe = Rule(**selectors, weight=())
        weights = [s for s in pool.sites if s.kind == WEIGHT and rule_matches(probe, s)]
    return Rule(**selectors, **{k: draw(ops(k, max_step, weights=weights if k == WEIGHT else None)) for k in kinds})


def specs(model: Optional[nn.Module] = None, max_rules: int = 3, *, max_step: int = 20) -> st.SearchStrategy[Spec]:
    """Draw a valid :class:`~fxqp.Spec` of 0..``max_rules`` rules.

    Each rule gives weight ops, activation ops or both (lists from :func:`ops`, with
    ``start`` steps up to ``max_step``) and selects by 1..3 entries of one or more of
    ``modules``, ``functions`` and ``names``, sometimes with an ``exclude`` entry.

    With a ``model``, the model is traced once (``passes.trace``) and every selector entry
    is taken from its sites (:func:`fxqp.sites.discover_sites`) of the kinds the rule gives
    ops for: class names of the called / weight-owning modules (``Conv2d``,
    ``BatchNorm2d``, ``ReLU``...), canonical function names (``relu``, ``add``, ``cat``,
    ``flatten``...) and node names / module paths (as the name, a ``name*`` glob, or an
    escaped ``re:`` regex). So ``fxqp.transform(model, spec)`` never reports a selector
    that matches nothing. Without a model: :data:`COMMON_MODULES` and
    :data:`COMMON_FUNCTIONS`, no names.
    """
    _check_int_arg("max_rules", max_rules, 0)
    _check_int_arg("max_step", max_step, 0)
    if model is None:
        common = _Pools(modules=COMMON_MODULES, functions=COMMON_FUNCTIONS, names=())
        pools = {(WEIGHT,): common, (ACTIVATION,): common, (WEIGHT, ACTIVATION): common}
    else:
        if not isinstance(model, nn.Module):
            raise InvalidArgument(f"model={model!r}: expected an nn.Module or None")
        pools = _pools_of(*discover_sites(trace(model).graph_module))
    if not pools:  # a model without sites: only the empty spec selects nothing
        return st.just(Spec())
    return st.lists(_rule(pools, max_step), max_size=max_rules).map(Spec)


@st.composite
def _schedules(draw: st.DrawFn, max_steps: int) -> list[tuple]:
    count = draw(st.integers(1, min(6, max_steps)))
    train_at = draw(st.integers(0, count - 1))
    kinds = [("train" if i == train_at else draw(st.sampled_from(("train", "eval", "step")))) for i in range(count)]
    budget = max_steps
    actions: list[tuple] = []
    for i, kind in enumerate(kinds):
        if kind == "eval":
            actions.append(("eval",))
            continue
        later = sum(k != "eval" for k in kinds[i + 1 :])  # each later one needs at least 1 step
        n = draw(st.integers(1, budget - later))
        budget -= n
        actions.append((kind, n))
    return actions


def schedules(max_steps: int = 30) -> st.SearchStrategy[list[tuple]]:
    """Draw 1..6 actions that drive a transformed model through its schedule.

    * ``("train", n)``: ``n`` training steps -- train mode, forward, backward, optimizer
      step; with ``auto_step`` (the default) each forward advances the step counter by one;
    * ``("eval",)``: one eval-mode forward without gradient (the counter does not move);
    * ``("step", n)``: ``fxqp.step(model, n)``, a manual jump of the counter by ``n``.

    There is at least one ``train`` action; every ``n`` is >= 1 and all the ``n`` together
    are at most ``max_steps``. :func:`run_schedule` performs the actions.
    """
    _check_int_arg("max_steps", max_steps, 1)
    return _schedules(max_steps)


def run_schedule(
    model: nn.Module,
    inputs: Sequence[Any],
    actions: Sequence[tuple],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Optional[Tensor]:
    """Perform the ``actions`` of :func:`schedules` on a transformed ``model``.

    Training steps minimise ``mean(output²)`` with ``optimizer`` (default: plain SGD,
    learning rate 0.01, over ``model.parameters()``). The model is left in the mode of the
    last forward. Returns the output of the last forward (None if there was none).
    """
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = None
    for action in actions:
        if action[0] == "train":
            model.train()
            for _ in range(action[1]):
                optimizer.zero_grad()
                out = model(*inputs)
                out.float().square().mean().backward()
                optimizer.step()
        elif action[0] == "eval":
            model.eval()
            with torch.no_grad():
                out = model(*inputs)
        elif action[0] == "step":
            fxqp_step(model, action[1])
        else:
            raise ValueError(f"unknown schedule action {action!r}; expected ('train', n), ('eval',) or ('step', n)")
    return out
