"""Tests for passes.nodes: canonical names and the non-tensor inference."""

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes import (
    called_module,
    canonical_target_name,
    node_module_path,
    non_tensor_nodes,
    produces_tensor,
    trace,
)


class ManySpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x, y):
        a = F.relu(x)
        b = torch.relu(y)
        c = a.relu()
        d = b + c
        d += a
        e = torch.cat([d, c], dim=1)
        f = e[:, :8] @ self.w
        g = torch.flatten(f, 1)
        h = g.view(g.size(0), -1)
        return self.fc(h)


def test_canonical_names_on_a_traced_model():
    gm = trace(ManySpellings()).graph_module
    names = [canonical_target_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert names == [
        "relu",
        "relu",
        "relu",
        "add",
        "add",
        "cat",
        "getitem",
        "matmul",
        "flatten",
        "size",
        "view",
    ]


def test_canonical_names_of_other_node_kinds_are_none():
    gm = trace(ManySpellings()).graph_module
    others = [n for n in gm.graph.nodes if n.op not in ("call_function", "call_method")]
    assert {n.op for n in others} == {"placeholder", "get_attr", "call_module", "output"}
    assert all(canonical_target_name(n) is None for n in others)


def test_canonical_names_of_in_place_forms():
    graph = fx.Graph()
    x = graph.placeholder("x")
    cases = {
        graph.call_function(operator.iadd, (x, x)): "add",
        graph.call_function(operator.isub, (x, x)): "sub",
        graph.call_function(operator.imul, (x, x)): "mul",
        graph.call_function(operator.itruediv, (x, x)): "truediv",
        graph.call_function(operator.imatmul, (x, x)): "matmul",
        graph.call_function(operator.__add__, (x, x)): "add",
        graph.call_function(torch.relu_, (x,)): "relu",
        graph.call_function(F.relu, (x,)): "relu",
        graph.call_function(torch.ops.aten.add.Tensor, (x, x)): "add",
        graph.call_method("add_", (x, x)): "add",
        graph.call_method("relu_", (x,)): "relu",
        graph.call_method("__iadd__", (x, x)): "add",
        graph.call_method("view", (x, -1)): "view",
    }
    for node, expected in cases.items():
        assert canonical_target_name(node) == expected, node.target


def pad_amount(h, w):
    """A shape helper; traced as one call node (wrapped below)."""
    return (-h) % 4, (-w) % 4


def scale_by(x, k):
    return x * k


torch.fx.wrap("pad_amount")
torch.fx.wrap("scale_by")


class WrappedHelpers(nn.Module):
    def forward(self, x):
        pads = pad_amount(x.shape[2], x.shape[3])
        y = scale_by(x, 2)
        return torch.nn.functional.pad(y, (0, pads[1], 0, pads[0]))


def test_wrapped_function_of_sizes_is_not_a_tensor_but_of_a_tensor_is():
    gm = trace(WrappedHelpers()).graph_module
    by_name = {n.name: n for n in gm.graph.nodes}
    non_tensor = non_tensor_nodes(gm.graph)
    assert not produces_tensor(by_name["pad_amount"], non_tensor)
    assert not produces_tensor(by_name["getitem_2"], non_tensor)  # pads[1]
    assert produces_tensor(by_name["scale_by"], non_tensor)
    assert produces_tensor(by_name["pad"], non_tensor)


class SizeArithmetic(nn.Module):
    def forward(self, x):
        n = x.size(0)
        m = n * 2
        k = m + 1
        shape = x.shape
        c = shape[1]
        dims = x.dim()
        dt = x.dtype
        total = math.prod([n, c])
        z = torch.zeros(n)  # built from sizes, but a tensor
        y = x.view(k - m, -1)
        first = y[0]  # indexing a tensor
        return y.to(dt) + z.sum() + first.sum() + dims + total


def test_non_tensor_nodes_marks_sizes_and_their_arithmetic():
    gm = trace(SizeArithmetic()).graph_module
    graph = gm.graph
    non_tensor = non_tensor_nodes(graph)
    names = {n.name for n in non_tensor}

    assert names == {
        "size",
        "mul",
        "add",
        "getattr_1",
        "getitem",
        "dim",
        "getattr_2",
        "prod",
        "sub",
        "output",
    }, graph
    by_name = {n.name: n for n in graph.nodes}
    for tensor_name in ("x", "zeros", "view", "getitem_1", "to", "sum_1"):
        assert produces_tensor(by_name[tensor_name], non_tensor)
    assert not produces_tensor(by_name["size"], non_tensor)
    # without the precomputed set, the graph is analysed on the spot
    assert not produces_tensor(by_name["mul"])
    assert produces_tensor(by_name["view"])


def test_non_tensor_nodes_on_hand_built_graph():
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("w")
    length = graph.call_function(len, (x,))
    numel = graph.call_method("numel", (x,))
    device = graph.call_function(getattr, (x, "device"))
    transposed = graph.call_function(getattr, (x, "T"))
    ratio = graph.call_function(operator.truediv, (numel, length))
    scaled = graph.call_function(operator.mul, (x, ratio))  # tensor * scalar
    out = graph.output((scaled, w, device, transposed))
    graph.lint()

    assert non_tensor_nodes(graph) == {length, numel, device, ratio, out}


def test_called_module_and_module_path():
    gm = trace(ManySpellings()).graph_module
    fc_node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert called_module(gm, fc_node) is gm.fc
    assert node_module_path(fc_node) == "fc"
    placeholder = next(iter(gm.graph.nodes))
    assert called_module(gm, placeholder) is None
    assert node_module_path(placeholder) is None


def test_assertions_and_isinstance_are_not_tensors():
    import torch
    import torch.fx as fx

    class Checked(torch.nn.Module):
        def forward(self, x):
            torch._assert(x.dim() == 2, "2-d input expected")
            return x * 2

    gm = fx.symbolic_trace(Checked())
    found = {n.name for n in non_tensor_nodes(gm.graph)}
    assert "_assert" in found
    assert "mul" not in found
