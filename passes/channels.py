"""Channel coupling: which output channels of a traced CNN must be pruned together.

A *space* is a set of channels that share one index: the output channels of a convolution
or linear layer, or of the model's input. Every tensor in the graph has a *layout* along
dim 1 (its channel dim): a list of segments ``(space, length)``; a convolution's output is
one segment of a new space, a concatenation along dim 1 joins its inputs' layouts, and
shape-preserving ops (batch norm, activations, pooling, depthwise convolution) pass their
input's layout on. What a layer does with channels is its :class:`~passes.layers.ChannelRule`
(``Conv``, ``Linear`` and ``BatchNorm`` are built in; :func:`passes.layers.register_channel_rule`
adds a layer type of one's own); a module without a rule is understood only when it is an
activation, a pooling or another per-channel op listed here. Ops that combine tensors element by element (``+``, ``*``) *couple*
their operands' spaces: channel ``c`` of one is channel ``c`` of the other. Coupled spaces
form a :class:`ChannelGroup` (connected components, found with networkx).

Filter ``c`` of a group can be removed exactly when the group's *producers* (the layers
that create its spaces) lose filter ``c`` (weight and bias), its *followers* (batch norms,
depthwise convolutions) lose channel ``c``, and its *consumers* (layers reading it)
lose input channel ``c`` at each place it appears in their input layout.

A grouped convolution (``groups = g``, not depthwise) consumes its input space and
produces a new one like any layer, but it ties each space to ``g`` equal runs of channels:
every run must lose the same number of channels, or the layer would no longer split into
``g`` equal groups. A group records this as :attr:`ChannelGroup.blocks` (the least common
multiple over its grouped convolutions).

Anything the analysis does not understand *blocks* the spaces it touches, so their groups
are never pruned: the model's inputs and outputs, reshapes and permutations (a channel
shuffle), grouped convolutions over concatenated inputs, layers applied to non-channel
dims, and any other op. A flatten keeps the channels' layout for the linear layer that
reads it (each channel is a block of features). Blocking is always safe.

>>> groups = channel_groups(gm, (torch.randn(1, 3, 32, 32),))   # doctest: +SKIP
>>> [g for g in groups if g.prunable]                            # doctest: +SKIP
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from passes.layers import ChannelRule, rule_for
from passes.nodes import called_module, canonical_target_name, propagate_shapes

__all__ = ["ChannelGroup", "Member", "Flat", "channel_groups"]

Layout = list[tuple[int, int]]  # segments (space id, length) along dim 1

# Shape-preserving per-channel ops that map 0 to 0, and those that do not (their pruned
# channels are constant but not zero: only a product with a zero channel may read them).
_NONZERO_AT_ZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_NONZERO_AT_ZERO_FUNCTIONS = frozenset({"sigmoid", "hardsigmoid", "exp"})
_PASS_THROUGH_MODULES = _NONZERO_AT_ZERO_MODULES + (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.ZeroPad2d,
    nn.Upsample,
)
_PASS_THROUGH_FUNCTIONS = (
    frozenset(
        {
            "relu",
            "relu_",
            "relu6",
            "silu",
            "gelu",
            "hardswish",
            "tanh",
            "leaky_relu",
            "elu",
            "mish",
            "dropout",
            "dropout2d",
            "contiguous",
            "clone",
            "detach",
            "max_pool1d",
            "max_pool2d",
            "max_pool3d",
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
            "adaptive_max_pool2d",
            "interpolate",
            "pad",
            "neg",
            "abs",
        }
    )
    | _NONZERO_AT_ZERO_FUNCTIONS
)
# Per-sample (not per-channel) zero-preserving modules known by class name only.
_PASS_THROUGH_NAMES = frozenset({"StochasticDepth"})
_ELEMENTWISE = frozenset({"add", "iadd", "sub", "isub", "mul", "imul", "truediv", "itruediv", "div", "maximum", "minimum", "where"})
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin"})


@dataclass(frozen=True)
class Member:
    """A layer attached to a group: ``module`` path, the weight ``axis`` of the group's
    channels (its rule's output axis for a producer, input axis for a consumer), and (consumers, followers) the ``offset`` of the group's channels in the
    layer's input (a concatenation puts several groups side by side)."""

    module: str
    axis: int
    offset: int = 0
    repeat: int = 1  # consumers after a flatten: input features per channel (channel-major)


@dataclass(frozen=True)
class Flat:
    """The layout of a flattened ``(N, C, *spatial)`` tensor: channel ``c`` is features
    ``c·positions .. c·positions + positions − 1``."""

    layout: Layout
    positions: int


@dataclass
class ChannelGroup:
    """Channels pruned together: ``size`` channels shared by every member.

    Attributes:
        size: number of channels.
        producers: layers whose output channels (weight axis 0, and bias) are the group.
        followers: per-channel layers the group passes through (batch norm, depthwise conv).
        consumers: layers that read the group as input channels.
        blocked: why the group cannot be pruned (``None``: prunable).
        blocks: the channels form this many equal runs (``size / blocks`` each) that must
            each lose the same number of channels: the groups of the grouped convolutions
            that produce or read them (1: no constraint).
    """

    size: int
    producers: list[Member] = field(default_factory=list)
    followers: list[Member] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)
    blocked: str | None = None
    blocks: int = 1

    @property
    def prunable(self) -> bool:
        return self.blocked is None and bool(self.producers)


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = nx.Graph()
        self.lengths: dict[int, int] = {}
        self.blocked: dict[int, str] = {}
        self.producers: dict[int, list[Member]] = {}
        self.followers: dict[int, list[Member]] = {}
        self.consumers: dict[int, list[Member]] = {}
        self.layouts: dict[fx.Node, Any] = {}
        self.module_out: dict[str, Layout] = {}
        self.module_in: dict[str, Layout] = {}
        self.dirty: set[fx.Node] = set()  # pruned channels of these values are not zero
        self.blocks: dict[int, int] = {}  # space -> groups of the grouped convs on it

    # spaces -------------------------------------------------------------------------
    def new_space(self, length: int, blocked: str | None = None) -> Layout:
        space = len(self.lengths)
        self.lengths[space] = length
        self.graph.add_node(space)
        if blocked:
            self.blocked[space] = blocked
        return [(space, length)]

    def block(self, layout: Any, reason: str) -> None:
        for space, _ in _segments(layout):
            self.blocked.setdefault(space, reason)

    def couple(self, a: Layout, b: Layout, reason: str) -> bool:
        """Join two layouts channel by channel; block both when their segments differ."""
        if [n for _, n in a] != [n for _, n in b]:
            self.block(a, reason)
            self.block(b, reason)
            return False
        for (sa, _), (sb, _) in zip(a, b):
            self.graph.add_edge(sa, sb)
        return True

    # node rules ---------------------------------------------------------------------
    def layout_of(self, arg: Any) -> Layout | None:
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_inputs(self, node: fx.Node) -> list[Layout]:
        return [self.layouts[n] for n in node.all_input_nodes if isinstance(self.layouts.get(n), (list, Flat))]

    def unknown(self, node: fx.Node, reason: str) -> Any:
        for layout in self.tensor_inputs(node):
            self.block(layout, reason)
        return self.fresh(node, reason)

    def fresh(self, node: fx.Node, blocked: str | None = None) -> Any:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, TensorMetadata):
            return self.new_space(_channels(meta), blocked)
        if isinstance(meta, (tuple, list)):  # a tuple of tensors: one blocked space each
            return tuple(
                self.new_space(_channels(m), blocked or f"output of {node.name}") if isinstance(m, TensorMetadata) else None for m in meta
            )
        return None

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.layouts[node] = self.fresh(node, f"model input {node.name!r}")
            elif node.op == "get_attr":
                self.layouts[node] = self.fresh(node, f"constant {node.target!r}")
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    if isinstance(self.layouts.get(arg), (list, tuple, Flat)):
                        self.block(self.layouts[arg], "model output")
            else:
                self.layouts[node] = self.call_module(node) if node.op == "call_module" else self.call_function(node)
                self.track_zeros(node)

    def track_zeros(self, node: fx.Node) -> None:
        """Mark values whose pruned channels would not be zero, and block the spaces such a
        value reaches a reader that is not a product with a zero channel."""
        inputs = [n for n in node.all_input_nodes if isinstance(self.layouts.get(n), (list, Flat))]
        dirty_in = [n for n in inputs if n in self.dirty]
        module = called_module(self.gm, node) if node.op == "call_module" else None
        name = None if module is not None else canonical_target_name(node)
        if isinstance(module, _NONZERO_AT_ZERO_MODULES) or name in _NONZERO_AT_ZERO_FUNCTIONS:
            self.dirty.add(node)
            return
        if not dirty_in:
            return
        if name in ("mul", "imul") and len(dirty_in) < len(inputs):
            return  # a product with a clean (zero) channel is zero
        if _passes_through(module) or name in _PASS_THROUGH_FUNCTIONS:
            self.dirty.add(node)
            return
        for n in dirty_in:
            self.block(self.layouts[n], f"{node.name}: reads channels that are not zero when pruned")

    def call_module(self, node: fx.Node) -> Any:
        module = called_module(self.gm, node)
        path = str(node.target)
        src = self.layout_of(node.args[0]) if node.args else None
        rule = rule_for(module)
        if rule is not None:
            return self.ruled_layer(node, path, module, rule, src)
        if isinstance(src, Flat) and _passes_through(module):
            return src
        if _passes_through(module) and isinstance(src, list):
            return list(src)
        if isinstance(module, nn.Flatten) and isinstance(src, list):
            return self.flatten(node, src, module.start_dim)
        return self.unknown(node, f"{path}: {type(module).__name__} is not understood by the channel analysis")

    def ruled_layer(self, node: fx.Node, path: str, module: nn.Module, rule: ChannelRule, src: Any) -> Any:
        """A layer with a :class:`~passes.layers.ChannelRule`: a follower of its input's
        channels, or a consumer of them and the producer of a new space; a grouped one ties
        both spaces to ``groups`` equal runs of channels."""
        in_count, out_count, groups = rule.in_count(module), rule.out_count(module), rule.group_count(module)
        if isinstance(src, Flat):
            if rule.input_rank != 2 or groups != 1 or sum(n for _, n in src.layout) * src.positions != in_count:
                return self.unknown(node, f"{path}: {type(module).__name__} on a flattened feature map")
            return self.layer(path, src.layout, out_count, rule, repeat=src.positions)
        if not isinstance(src, list):
            return self.unknown(node, f"{path}: input without a channel layout")
        meta = node.args[0].meta.get("tensor_meta")
        if rule.input_rank is not None and (meta is None or len(meta.shape) != rule.input_rank):
            what = "linear layer" if rule.input_rank == 2 else type(module).__name__
            shape = "(N, C)" if rule.input_rank == 2 else f"of rank {rule.input_rank}"
            return self.unknown(node, f"{path}: {what} on a tensor that is not {shape}")
        if sum(n for _, n in src) != in_count:
            return self.unknown(node, f"{path}: reads {sum(n for _, n in src)} channels on dim 1, its rule says {in_count}")
        if rule.keeps_channels(module):
            self.follow(path, src)
            return list(src)
        if groups == 1:
            return self.layer(path, src, out_count, rule)
        if len(src) != 1:
            return self.unknown(node, f"{path}: grouped convolution (groups={groups}) over concatenated channels")
        out = self.layer(path, src, out_count, rule)
        for space, _ in src + out:
            self.blocks[space] = math.lcm(self.blocks.get(space, 1), groups)
        return out

    def follow(self, path: str, src: Layout) -> None:
        """A per-channel layer over ``src``: a follower of each segment, at its offset."""
        offset = 0
        for space, length in src:
            self.followers.setdefault(space, []).append(Member(path, 0, offset))
            offset += length

    def layer(self, path: str, src: Layout, out_channels: int, rule: ChannelRule, repeat: int = 1) -> Layout:
        """A layer that consumes ``src`` and produces a new space (a convolution, a linear
        layer); a layer called more than once couples its inputs and its outputs across the
        calls."""
        if path in self.module_out:
            self.couple(self.module_in[path], src, f"{path}: called twice on differently laid out inputs")
            return list(self.module_out[path])
        offset = 0
        for space, length in src:
            self.consumers.setdefault(space, []).append(Member(path, rule.in_axis, offset, repeat))
            offset += length
        out = self.new_space(out_channels)
        self.producers.setdefault(out[0][0], []).append(Member(path, rule.out_axis))
        self.module_in[path], self.module_out[path] = list(src), out
        return out

    def flatten(self, node: fx.Node, src: Layout, start_dim: int) -> Any:
        meta = node.args[0].meta.get("tensor_meta")
        if start_dim != 1 or meta is None:
            return self.unknown(node, f"{node.name}: flatten that does not keep the batch dim")
        positions = 1
        for d in meta.shape[2:]:
            positions *= int(d)
        return list(src) if positions == 1 else Flat(list(src), positions)

    def call_function(self, node: fx.Node) -> Any:
        name = canonical_target_name(node)
        tensors = [a for a in node.args if isinstance(self.layout_of(a), list)]
        if node.target is operator.getitem:
            return self.getitem(node)
        if node.meta.get("tensor_meta") is None:
            return None  # sizes, flags: no channels
        if name in _PASS_THROUGH_FUNCTIONS and node.args and isinstance(self.layout_of(node.args[0]), Flat):
            return self.layouts[node.args[0]]
        if name in _PASS_THROUGH_FUNCTIONS and tensors and tensors[0] is node.args[0]:
            return list(self.layouts[tensors[0]])
        if name in _ELEMENTWISE:
            return self.elementwise(node, tensors)
        if name == "cat":
            return self.cat(node)
        if name == "flatten" and tensors:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, self.layouts[tensors[0]], start)
        if name in _REDUCTIONS and tensors and self.keeps_channels(node):
            return list(self.layouts[tensors[0]])
        if name in ("chunk", "split", "tensor_split") and tensors and self.split_dim(node) == 1:
            return ("split", self.layouts[tensors[0]])
        return self.unknown(node, f"{node.name}: {name or node.target} is not understood by the channel analysis")

    def elementwise(self, node: fx.Node, tensors: list[fx.Node]) -> Any:
        out_meta = node.meta["tensor_meta"]
        full = [
            t
            for t in tensors
            if _channels(t.meta["tensor_meta"]) == _channels(out_meta) and len(t.meta["tensor_meta"].shape) == len(out_meta.shape)
        ]
        if not full:
            return self.unknown(node, f"{node.name}: element-wise op without a full-channel operand")
        for other in tensors:
            if other not in full and _channels(other.meta["tensor_meta"]) != 1:
                return self.unknown(node, f"{node.name}: operands with different channel counts")
        for other in full[1:]:
            self.couple(self.layouts[full[0]], self.layouts[other], f"{node.name}: operands laid out differently")
        return list(self.layouts[full[0]])

    def cat(self, node: fx.Node) -> Any:
        items = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = len(node.meta["tensor_meta"].shape)
        layouts = [self.layout_of(t) for t in items]
        if any(not isinstance(lay, list) for lay in layouts):
            return self.unknown(node, f"{node.name}: concatenation of tensors without a channel layout")
        if dim % ndim == 1:
            return [seg for lay in layouts for seg in lay]
        for other in layouts[1:]:
            self.couple(layouts[0], other, f"{node.name}: concatenated tensors laid out differently")
        return list(layouts[0])

    def keeps_channels(self, node: fx.Node) -> bool:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        ndim = len(node.args[0].meta["tensor_meta"].shape)
        return all(d % ndim >= 2 for d in dims) and node.meta["tensor_meta"].shape[1] == node.args[0].meta["tensor_meta"].shape[1]

    def split_dim(self, node: fx.Node) -> int:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        return dim % len(node.args[0].meta["tensor_meta"].shape)

    def getitem(self, node: fx.Node) -> Any:
        source, index = node.args[0], node.args[1]
        held = self.layouts.get(source)
        if isinstance(held, tuple) and len(held) == 2 and held[0] == "split" and isinstance(index, int):
            metas = source.meta["tensor_meta"]
            start = sum(_channels(m) for m in metas[:index])
            return _slice(held[1], start, _channels(metas[index]), self)
        if isinstance(held, tuple) and isinstance(index, int) and index < len(held):
            return held[index]
        if isinstance(held, (list, Flat)):
            return self.unknown(node, f"{node.name}: indexing a tensor")
        return self.fresh(node, f"{node.name}: item of an opaque value")

    # result -------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        out = []
        for component in sorted(nx.connected_components(self.graph), key=min):
            spaces = sorted(component)
            group = ChannelGroup(size=self.lengths[spaces[0]])
            for space in spaces:
                group.producers += self.producers.get(space, [])
                group.followers += self.followers.get(space, [])
                group.consumers += self.consumers.get(space, [])
                if group.blocked is None and space in self.blocked:
                    group.blocked = self.blocked[space]
                group.blocks = math.lcm(group.blocks, self.blocks.get(space, 1))  # each divides size
            out.append(group)
        return out


def _passes_through(module: nn.Module | None) -> bool:
    """A module that keeps its input's channel layout (shape-preserving, per channel)."""
    return isinstance(module, _PASS_THROUGH_MODULES) or type(module).__name__ in _PASS_THROUGH_NAMES


def _channels(meta: Any) -> int:
    shape = getattr(meta, "shape", ())
    return int(shape[1]) if len(shape) >= 2 else 1


def _segments(layout: Any) -> list[tuple[int, int]]:
    if isinstance(layout, list):
        return layout
    if isinstance(layout, Flat):
        return layout.layout
    if isinstance(layout, tuple):
        if len(layout) == 2 and layout[0] == "split":
            return layout[1]
        return [seg for item in layout if isinstance(item, list) for seg in item]
    return []


def _slice(layout: Layout, start: int, length: int, analysis: _Analysis) -> Layout:
    """The segments of channels ``[start, start + length)``; a segment cut in two is blocked
    (its channels would no longer share one index)."""
    out, offset = [], 0
    for space, n in layout:
        lo, hi = max(start, offset), min(start + length, offset + n)
        if lo < hi:
            if lo > offset or hi < offset + n:
                analysis.block([(space, n)], "channels split inside one layer's output")
                return analysis.new_space(length, "channels split inside one layer's output")
            out.append((space, n))
        offset += n
    return out


def channel_groups(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> list[ChannelGroup]:
    """The channel groups of a traced model (see the module doc).

    Runs ``gm`` once on ``example_inputs`` (eval mode, no grad) to learn every tensor's shape
    (:func:`passes.nodes.propagate_shapes`); with ``None``, the shapes that an earlier
    propagation recorded are used.
    """
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    analysis = _Analysis(gm)
    analysis.run()
    return analysis.groups()
