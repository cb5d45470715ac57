"""Parts of a graph that differ between training and evaluation, switched at run time.

Symbolic tracing runs ``forward`` once, so each read of ``self.training`` becomes the
constant it was while tracing: ``F.dropout(x, p, training=self.training)`` would drop in
evaluation too, and a batch norm written out in Python (timm's ``BatchNormAct2d``) would
keep updating its statistics. :func:`switch_modes` compares a trace made with every module
in training mode with one made in evaluation mode. Wherever the two graphs differ, the
training graph's nodes are replaced by one call of a :class:`ModeSwitch`, which holds both
versions of that region as small ``GraphModule`` objects and runs the one its ``training``
flag selects. Everything else stays in the graph, the activation calls next to such a
region included.

The two node lists are aligned in one forward walk (:func:`_align`): nodes pair when they
do the same thing (op, target, constants) to paired arguments; after a difference, the walk
picks up again where the longest common run of ops starts. A *region* is what lies
between two consecutive pairs on either side; regions that read each other's values are
merged. Each switch is registered inside the module whose ``forward`` made the region (the
deepest module common to its nodes), so ``model.submodule.eval()`` switches it as it would
switch the original module.
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.fx as fx
from torch import nn

__all__ = ["ModeSwitch", "ModeDiff", "Region", "compare_modes", "switch_modes", "unswitchable"]

SWITCH_PREFIX = "fxqp_mode_"
"""Switches are registered as ``<owner path>.fxqp_mode_<n>``."""

_WINDOW = 256
"""How far ahead (in nodes, on each side) the walk looks for the graphs to agree again."""


class ModeSwitch(nn.Module):
    """Computes a region of the traced graph as it was traced in training or in evaluation
    mode, by this module's ``training`` flag (which ``model.train()`` / ``.eval()`` set, as
    for any submodule).

    Both branches take the same inputs and return the same number of values: one value
    bare, several as a tuple. They hold no parameters or buffers: the tensors they read
    are inputs.

    Attributes:
        when_training: the region as traced in training mode.
        when_evaluating: the region as traced in evaluation mode.
        source: path of the module whose ``forward`` made the region (``""``: the root).
    """

    def __init__(self, when_training: fx.GraphModule, when_evaluating: fx.GraphModule, source: str):
        super().__init__()
        self.when_training = when_training
        self.when_evaluating = when_evaluating
        self.source = source

    def forward(self, *inputs: Any) -> Any:
        if self.training:
            return self.when_training(*inputs)
        return self.when_evaluating(*inputs)

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


@dataclass
class Region:
    """Nodes that differ between the two traces, between the same two paired nodes.

    Attributes:
        train: the region's nodes in the training graph, in graph order.
        eval: the region's nodes in the evaluation graph, in graph order.
        outputs: ``(training value, evaluation value)`` for each value read after the region;
            either may be a node from before the region that the other mode replaces (a
            drop-path is the identity in evaluation).
        owner: path of the deepest module whose ``forward`` made every node of the region.
    """

    train: list[fx.Node]
    eval: list[fx.Node]
    outputs: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    owner: str = ""
    next_pair: fx.Node | None = None
    """The first paired node of the training graph after the region (None: none follows)."""


def _leaves(value: Any) -> Iterator[Any]:
    """The nodes and constants inside a node's arguments, in order."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, slice):
        yield from _leaves((value.start, value.stop, value.step))
    else:
        yield value


def _signature(value: Any) -> Any:
    """The arguments' structure with every node replaced by one marker, constants by text."""
    if isinstance(value, fx.Node):
        return "%"
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _signature(value.start), _signature(value.stop), _signature(value.step))
    return (type(value).__name__, repr(value))


def _key(node: fx.Node) -> tuple:
    target = node.target if isinstance(node.target, str) else id(node.target)
    return (node.op, target, _signature(node.args), _signature(node.kwargs))


class _Walk:
    """The forward walk that pairs the nodes of the two graphs (see the module doc)."""

    def __init__(self, train: list[fx.Node], evals: list[fx.Node]):
        self.train, self.evals = train, evals
        self.keys_t = [_key(n) for n in train]
        self.keys_e = [_key(n) for n in evals]
        self.ops_t = [key[:2] for key in self.keys_t]
        self.ops_e = [key[:2] for key in self.keys_e]
        self.pairs: dict[fx.Node, fx.Node] = {}
        self.paired_e: set[fx.Node] = set()

    def compatible(self, i: int, j: int) -> bool:
        """Same op on arguments that are paired, or that a region in between may provide."""
        if self.keys_t[i] != self.keys_e[j]:
            return False
        t, e = self.train[i], self.evals[j]
        for a, b in zip(_leaves((t.args, t.kwargs)), _leaves((e.args, e.kwargs))):
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                if a in self.pairs and b in self.paired_e and self.pairs[a] is not b:
                    return False
        return True

    def resync(self, i: int, j: int) -> tuple[int, int] | None:
        """Where the graphs agree again after ``(i, j)``: the first compatible pair of the
        matching blocks that :class:`difflib.SequenceMatcher` finds between the next
        ``_WINDOW`` ops of each (op and target; it takes the longest common run first, so a
        short coincidence such as two ``x.shape`` reads does not pair the graphs early)."""
        ops_t, ops_e = self.ops_t[i : i + _WINDOW], self.ops_e[j : j + _WINDOW]
        matcher = difflib.SequenceMatcher(None, ops_t, ops_e, autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            for k in range(size):
                if (a + k, b + k) != (0, 0) and self.compatible(i + a + k, j + b + k):
                    return i + a + k, j + b + k
        return None

    def run(self) -> dict[fx.Node, fx.Node]:
        i = j = 0
        while i < len(self.train) and j < len(self.evals):
            if not self.compatible(i, j):
                found = self.resync(i, j)
                if found is None:
                    break  # the rest differs
                i, j = found
            self.pairs[self.train[i]] = self.evals[j]
            self.paired_e.add(self.evals[j])
            i, j = i + 1, j + 1
        return self.pairs


def _align(train: fx.Graph, evals: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Pairs of nodes (training → evaluation) that compute the same thing."""
    return _Walk(list(train.nodes), list(evals.nodes)).run()


@dataclass
class ModeDiff:
    """How a graph traced in training mode and one traced in evaluation mode differ.

    Attributes:
        pairs: training node → evaluation node, for the nodes that compute the same thing.
        regions: what differs, in graph order (empty: the graphs are the same).
    """

    pairs: dict[fx.Node, fx.Node]
    regions: list[Region]


def compare_modes(train: fx.Graph, evals: fx.Graph) -> ModeDiff:
    """Pair the nodes of the two graphs and find the regions where they differ. The regions'
    ``outputs`` are the values that paired nodes after them read."""
    pairs = _align(train, evals)
    t_nodes, e_nodes = list(train.nodes), list(evals.nodes)
    if len(pairs) == len(t_nodes) == len(e_nodes):
        return ModeDiff(pairs, [])
    anchors = [(t, pairs[t]) for t in t_nodes if t in pairs]  # increasing on both sides

    # gap k: the unpaired nodes between anchors k-1 and k; a region spans gaps lo..hi and the
    # anchors between them
    def gap_indices(nodes: list[fx.Node], paired) -> dict[fx.Node, int]:
        gaps, k = {}, 0
        for node in nodes:
            if paired(node):
                k += 1
            else:
                gaps[node] = k
        return gaps

    gap_t = gap_indices(t_nodes, lambda n: n in pairs)
    partners = {e: t for t, e in pairs.items()}
    gap_e = gap_indices(e_nodes, lambda n: n in partners)
    anchor_index_t = {t: k for k, (t, _) in enumerate(anchors)}
    anchor_index_e = {e: k for k, (_, e) in enumerate(anchors)}
    spans = sorted({(k, k) for k in (*gap_t.values(), *gap_e.values())})

    def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(spans):
            if out and lo <= out[-1][1]:
                out[-1] = (out[-1][0], max(hi, out[-1][1]))
            else:
                out.append((lo, hi))
        return out

    while True:
        index = {}

        def span_of(node: fx.Node, gaps: dict[fx.Node, int], anchor_index: dict[fx.Node, int]) -> int | None:
            k = gaps.get(node)
            if k is not None:
                return index[k]
            k = anchor_index.get(node)  # anchor k lies inside a span (lo, hi) when lo <= k < hi
            if k is not None:
                for s, (lo, hi) in enumerate(spans):
                    if lo <= k < hi:
                        return s
            return None

        for s, (lo, hi) in enumerate(spans):
            for k in range(lo, hi + 1):
                index[k] = s
        links = []
        for nodes, gaps, anchor_index in ((t_nodes, gap_t, anchor_index_t), (e_nodes, gap_e, anchor_index_e)):
            for node in nodes:
                own = span_of(node, gaps, anchor_index)
                for arg in node.all_input_nodes:
                    other = span_of(arg, gaps, anchor_index)
                    if other is not None and other != own:
                        links.append((own, other))
        for t, e in anchors:
            if span_of(t, gap_t, anchor_index_t) is not None:
                continue
            for a, b in zip(_leaves((t.args, t.kwargs)), _leaves((e.args, e.kwargs))):
                if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                    sa, sb = span_of(a, gap_t, anchor_index_t), span_of(b, gap_e, anchor_index_e)
                    if sa is not None and sb is not None and sa != sb:
                        links.append((sa, sb))
        if not links:
            break
        joined = list(spans)
        for x, y in links:
            if x is None or y is None:  # a paired node outside every span read a region: it is an output
                continue
            joined.append((min(spans[x][0], spans[y][0]), max(spans[x][1], spans[y][1])))
        new = merged(joined)
        if new == spans:
            break
        spans = new

    regions = []
    for lo, hi in spans:
        inside_t = [n for n in t_nodes if (gap_t.get(n) is not None and lo <= gap_t[n] <= hi) or lo <= anchor_index_t.get(n, -1) < hi]
        inside_e = [n for n in e_nodes if (gap_e.get(n) is not None and lo <= gap_e[n] <= hi) or lo <= anchor_index_e.get(n, -1) < hi]
        if not inside_t and not inside_e:
            continue
        region = Region(inside_t, inside_e, next_pair=anchors[hi][0] if hi < len(anchors) else None)
        region.owner = _owner([*inside_t, *inside_e])
        regions.append(region)
    _find_outputs(regions, anchors)
    return ModeDiff(pairs, regions)


def _find_outputs(regions: list[Region], anchors: list[tuple[fx.Node, fx.Node]]) -> None:
    members_t = {n: r for r in regions for n in r.train}
    members_e = {n: r for r in regions for n in r.eval}
    for t, e in anchors:
        if t in members_t:
            continue
        for a, b in zip(_leaves((t.args, t.kwargs)), _leaves((e.args, e.kwargs))):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            region = members_t.get(a) or members_e.get(b)
            if region is not None and (a, b) not in region.outputs:
                region.outputs.append((a, b))


def _owner(nodes: list[fx.Node]) -> str:
    """The deepest module whose ``forward`` was running for every node ("" = the root)."""
    common: list[str] | None = None
    for node in nodes:
        stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
        if node.op == "call_module" and stack and stack[-1] == node.target:
            stack = stack[:-1]  # a leaf's own entry: the call is made by its parent
        if common is None:
            common = stack
        else:
            n = 0
            while n < min(len(common), len(stack)) and common[n] == stack[n]:
                n += 1
            common = common[:n]
    return common[-1] if common else ""


def unswitchable(region: Region) -> str | None:
    """Why ``region`` cannot become a :class:`ModeSwitch` (None when it can)."""
    for node in (*region.train, *region.eval):
        if node.op in ("placeholder", "output"):
            return f"the two modes differ in the {'inputs' if node.op == 'placeholder' else 'returned values'}"
        if node.op == "call_module":
            return f"a module call ({node.target}) differs between the two modes"
    if region.next_pair is None:
        return "the two modes differ up to the end of the graph"
    return None


def _get(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _branch(nodes: list[fx.Node], inputs: dict[fx.Node, int], n_inputs: int, outputs: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    placeholders = [graph.placeholder(f"input_{k}") for k in range(n_inputs)]
    env: dict[fx.Node, fx.Node] = {node: placeholders[k] for node, k in inputs.items()}
    for node in nodes:
        if node not in env:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    values = [env[node] for node in outputs]
    graph.output(values[0] if len(values) == 1 else tuple(values))
    return fx.GraphModule(nn.Module(), graph, "ModeBranch")


def switch_modes(gm: fx.GraphModule, evals: fx.GraphModule, diff: ModeDiff) -> list[str]:
    """Replace each region of ``gm`` (traced in training mode) by a :class:`ModeSwitch`
    between its two versions; ``evals`` is the same model traced in evaluation mode and
    ``diff`` their :func:`compare_modes`. Every region must be switchable
    (:func:`unswitchable`). Returns the paths of the switches added. Does not recompile
    ``gm``.
    """
    graph = gm.graph
    partners = {e: t for t, e in diff.pairs.items()}  # evaluation node → training node
    order = {node: k for k, node in enumerate(graph.nodes)}
    counts: dict[str, int] = {}
    values: dict[tuple[fx.Node, fx.Node], fx.Node] = {}  # a region's output → the node giving it
    paths = []
    for region in diff.regions:
        inside_t, inside_e = set(region.train), set(region.eval)
        inputs: list[fx.Node] = []  # nodes of gm, passed to both branches
        index_t: dict[fx.Node, int] = {}
        index_e: dict[fx.Node, int] = {}

        def add_input(node: fx.Node) -> int:
            if node not in index_t:
                if node in order and order[node] >= order[region.next_pair]:
                    raise ValueError(f"a mode region reads {node.name}, which comes after it")
                index_t[node] = len(inputs)
                inputs.append(node)
            return index_t[node]

        with graph.inserting_before(region.next_pair):
            for node in region.train:
                for arg in node.all_input_nodes:
                    if arg not in inside_t:
                        add_input(arg)
                if node.op == "get_attr":  # read in gm, where .to() keeps tensors current
                    add_input(node)
            for node in region.eval:
                for arg in node.all_input_nodes:
                    if arg not in inside_e:
                        index_e[arg] = add_input(partners[arg])
                if node.op == "get_attr":
                    index_e[node] = add_input(graph.get_attr(_attribute_in(gm, evals, node.target)))
            for a, b in region.outputs:
                if a not in inside_t:
                    add_input(a)
                if b not in inside_e:
                    index_e[b] = add_input(partners[b])
            when_training = _branch(region.train, index_t, len(inputs), [a for a, _ in region.outputs])
            when_evaluating = _branch(region.eval, index_e, len(inputs), [b for _, b in region.outputs])
            n = counts.get(region.owner, 0)
            counts[region.owner] = n + 1
            path = f"{region.owner}.{SWITCH_PREFIX}{n}" if region.owner else f"{SWITCH_PREFIX}{n}"
            if not gm.add_submodule(path, ModeSwitch(when_training, when_evaluating, region.owner)):
                raise ValueError(f"cannot register a mode switch at {path!r}")
            switch = graph.call_module(path, tuple(inputs))
        with graph.inserting_after(switch):
            if len(region.outputs) == 1:
                values[region.outputs[0]] = switch
            for k, pair in enumerate(region.outputs if len(region.outputs) > 1 else ()):
                values[pair] = graph.call_function(operator.getitem, (switch, k))
        paths.append(path)
    # paired nodes after a region read the values of its switch
    members = {node for region in diff.regions for node in region.train}
    for t, e in diff.pairs.items():
        if t in members:
            continue
        flat_e = list(_leaves((e.args, e.kwargs)))
        if not any((a, b) in values for a, b in zip(_leaves((t.args, t.kwargs)), flat_e) if isinstance(a, fx.Node)):
            continue
        t.args, t.kwargs = _rebuild((t.args, t.kwargs), _substitute(iter(flat_e), values))
    for region in diff.regions:
        for node in reversed(region.train):
            if node.op != "get_attr" or not node.users:
                graph.erase_node(node)
    return paths


def _attribute_in(gm: fx.GraphModule, evals: fx.GraphModule, target: str) -> str:
    """Where ``gm`` holds what ``evals`` reads at ``target``: the same path for the model's
    parameters and buffers, a new attribute for a constant of the evaluation trace only."""
    value = _get(evals, target)
    try:
        if _get(gm, target) is value:
            return target
    except AttributeError:
        pass
    n = 0
    while hasattr(gm, f"_fxqp_eval_constant{n}"):
        n += 1
    setattr(gm, f"_fxqp_eval_constant{n}", value)  # as fx keeps the constants of a trace
    return f"_fxqp_eval_constant{n}"


def _substitute(evaluation_leaves: Iterator[Any], values: dict[tuple[fx.Node, fx.Node], fx.Node]):
    """For :func:`_rebuild`: a training-graph argument, beside its evaluation-graph
    counterpart, becomes the switch value that gives both, if there is one."""

    def substitute(leaf: Any) -> Any:
        counterpart = next(evaluation_leaves)
        if isinstance(leaf, fx.Node):
            return values.get((leaf, counterpart), leaf)
        return leaf

    return substitute


def _rebuild(value: Any, fn) -> Any:
    """``value`` with each leaf replaced by ``fn(leaf)``, leaves visited as :func:`_leaves` does."""
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _rebuild(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*_rebuild((value.start, value.stop, value.step), fn))
    return fn(value)
