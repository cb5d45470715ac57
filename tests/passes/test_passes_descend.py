"""Tests for passes.descend: tracing the largest traceable submodules of a model whose root
cannot be traced, and running each in place of its module."""

import copy

import pytest
import torch
import torch.fx as fx
from fxqp_test_nets import Head, ListDetector, Scale
from torch import nn

from passes import PassError, UntraceableError, graph_of, insert_after, install_part, qualify, trace_parts


def images():
    torch.manual_seed(0)
    return [torch.randn(3, 8, 8), torch.randn(3, 6, 10)]


def test_a_traceable_root_is_one_part():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    parts = trace_parts(model)
    assert parts.whole and list(parts.parts) == [""] and parts.untraced == {}


def test_an_untraceable_root_is_traced_in_its_largest_traceable_submodules():
    parts = trace_parts(ListDetector())
    assert not parts.whole
    # the ModuleList is a container (no forward): its items are parts of their own
    assert list(parts.parts) == ["backbone", "head.conv", "post.0", "post.1"]
    assert set(parts.untraced) == {"", "head"}
    assert "iterated" in parts.untraced[""] and "iterated" in parts.untraced["head"]
    # head.out is a torch.nn leaf: nothing to trace, its weight needs no graph
    assert "head.out" not in parts.untraced


def test_an_installed_part_keeps_its_module_and_runs_its_graph():
    model = ListDetector().eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
    parts = trace_parts(model)
    for path, result in parts.parts.items():
        install_part(model.get_submodule(path), result.graph_module)
    keys = set(model.state_dict())
    assert isinstance(model.head, Head) and model.head.bias_scale == 2.0  # identity, methods, attributes
    assert graph_of(model.backbone) is parts.parts["backbone"].graph_module
    assert graph_of(model.head) is None  # not traced: its own forward runs
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), expected))

    # what a pass inserts into the graph runs, and is registered in the module itself
    gm = parts.parts["backbone"].graph_module
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    insert_after(gm, relu, "doubled", Scale(2.0))
    install_part(model.backbone, gm)
    assert isinstance(model.backbone.doubled, Scale)
    assert set(model.state_dict()) == keys  # no duplicate of the shared modules' state
    with torch.no_grad():
        changed = model(x)
    assert not torch.equal(changed[0], expected[0])

    # a deep copy runs its own modules
    twin = copy.deepcopy(model)
    twin.backbone.doubled.factor = 1.0
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(twin(x), expected))
        assert all(torch.equal(a, b) for a, b in zip(model(x), changed))
    assert graph_of(twin.backbone) is not graph_of(model.backbone)

    # training: the parent's own code calls the traced part and the module's methods
    twin.train()
    loss = twin(x)
    loss.backward()
    assert twin.backbone[0].weight.grad is not None


class Cached(nn.Module):
    """Caches a value from its input on ``self`` on the first call (a proxy while traced)."""

    def __init__(self):
        super().__init__()
        self.size = None
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if self.size is None:
            self.size = x.shape[-1]
        return self.lin(x) * self.size


def test_tracing_leaves_no_proxy_in_the_model():
    model = Cached()
    trace_parts(model)
    assert model.size is None


class DataDependentWithInner(nn.Module):
    """Branches on a value (a leaf of its parent's trace) around a traceable block."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


def test_a_leaf_of_a_trace_is_traced_on_its_own_or_descended_into():
    model = nn.Sequential(nn.Linear(4, 4), DataDependentWithInner(), nn.Linear(4, 2))
    parts = trace_parts(model)
    assert parts.whole and parts.parts[""].fallback_leaves == ("1",)
    assert list(parts.parts) == ["", "1.inner"]
    assert set(parts.untraced) == {"1"}
    assert parts.qualified("fallback_leaves") == ("1",)


def test_only_rebuilds_a_given_structure_and_refuses_what_cannot_be_traced():
    parts = trace_parts(ListDetector(), only=["backbone", "post.1"])
    assert list(parts.parts) == ["backbone", "post.1"]
    assert "head" in parts.untraced and "post.0" in parts.untraced
    with pytest.raises(UntraceableError):
        trace_parts(ListDetector(), only=["head"])
    with pytest.raises(PassError, match="'nothing'"):
        trace_parts(ListDetector(), only=["nothing"])


def test_nothing_traceable_raises_the_roots_error():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    with pytest.raises(UntraceableError) as info:
        trace_parts(Root())
    assert info.value.module_path == ""


def test_qualify():
    assert qualify("", "relu") == "relu" and qualify("head.conv", "relu") == "head.conv.relu"
    assert isinstance(trace_parts(ListDetector()).parts["backbone"].graph_module, fx.GraphModule)
