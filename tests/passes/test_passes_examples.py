"""passes.examples: Python decisions on shapes and dtypes, settled by example values and guarded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes import trace
from passes.errors import GuardError, UntraceableError
from passes.examples import check_traced


class ShapeDecisions(nn.Module):
    """Decides in Python from ndim, from a shape's length, from a dtype and from a size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        if mask.ndim == 2:  # a (batch, seq) mask becomes (batch, 1, seq)
            mask = mask[:, None, :]
        *lead, width = x.shape  # iteration over a shape
        y = self.fc(x).view(*lead, 2, width // 2)
        if y.dtype != torch.float32:  # a dtype read as a constant
            y = y.float()
        steps = [y[..., i, :] for i in range(y.size(-2))]  # a size as a Python int
        return torch.relu(torch.cat(steps, -1)) * mask.transpose(1, 2)


def guards(gm):
    return [n for n in gm.graph.nodes if n.target is check_traced]


def test_decisions_on_shapes_are_settled_by_examples_and_guarded():
    model = ShapeDecisions()
    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5)
    with pytest.raises(UntraceableError):
        trace(model, autoleaf=False)  # symbolically alone: the root branches on a proxy
    result = trace(model, example_inputs=(x, mask))
    gm = result.graph_module
    assert result.fallback_leaves == () and result.leaves == ()
    assert {n.args[1] for n in guards(gm)} == {"bool", "len", "value", "int"}
    assert torch.equal(gm(x, mask), model(x, mask))
    # other batch and sequence sizes are free: they are read symbolically
    x2, mask2 = torch.randn(3, 7, 4), torch.rand(3, 7)
    assert torch.equal(gm(x2, mask2), model(x2, mask2))
    # a decision the graph is specialised to: a 3-d mask took the other branch
    with pytest.raises(GuardError, match=r"traced for inputs where .* gave bool=True"):
        gm(x, torch.ones(2, 1, 5))
    with pytest.raises(GuardError, match="gave value=torch.float32"):
        gm.double()(x.double(), mask.double())  # the dtype branch was read as float32


def test_a_guard_passes_what_the_example_gave():
    check_traced(torch.zeros(2, 3), "len", 2, "x")
    check_traced(True, "bool", True, "flag")
    with pytest.raises(GuardError, match="where x gave int=4, and the graph is specialised to that; these inputs give 5"):
        check_traced(5, "int", 4, "x")


def test_a_module_made_inside_forward_is_traced_inline():
    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return nn.ReLU()(self.fc(x))  # as DistilBERT does

    result = trace(Inline())
    gm = result.graph_module
    assert result.leaves == ()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc"]
    assert any(n.op == "call_function" and n.target is torch.nn.functional.relu for n in gm.graph.nodes)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), torch.relu(gm.fc(x)))


def _helper_reads_data(x, n):
    """A plain function that fx cannot trace: it loops over a value's data."""
    return x * sum(int(v) for v in n.tolist())


class CallsHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, n):
        return torch.relu(_helper_reads_data(self.fc(x), n))


def test_a_failing_plain_function_becomes_the_leaf_not_its_module():
    model = CallsHelper()
    x, n = torch.randn(2, 4), torch.tensor([1, 2])
    result = trace(model)
    gm = result.graph_module
    assert result.fallback_leaves == ()  # the root stays traced
    assert result.leaf_functions == (f"{__name__}._helper_reads_data",)
    assert any(n_.target is _helper_reads_data for n_ in gm.graph.nodes)
    assert torch.equal(gm(x, n), model(x, n))
    assert torch.equal(gm(x, torch.tensor([3])), model(x, torch.tensor([3])))  # runs on the data at run time
