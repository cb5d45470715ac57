"""Tests for passes.insert."""

import pytest
import torch
from torch import nn

from passes import PassError, insert_after, insert_after_many, trace


class AddOne(nn.Module):
    def forward(self, x):
        return x + 1


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return y * 2 + y  # relu has two users


def node_named(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_insert_after_rewires_every_user():
    model = TwoUsers()
    gm = trace(model).graph_module
    relu = node_named(gm, "relu")
    old_users = set(relu.users)
    assert len(old_users) == 2

    new = insert_after(gm, relu, "stages.relu_out", AddOne(), node_name="relu_stage")

    assert new.op == "call_module" and new.target == "stages.relu_out"
    assert new.name == "relu_stage"
    assert new.args == (relu,)
    assert list(relu.users) == [new]
    assert set(new.users) == old_users
    assert all(new in user.args for user in old_users)
    assert relu.next is new
    assert isinstance(gm.stages.relu_out, AddOne)
    assert type(gm.stages) is nn.Module
    gm.graph.lint()
    assert "self.stages.relu_out(relu)" in gm.code

    x = torch.randn(3, 4)
    y = torch.relu(model.fc(x)) + 1
    assert torch.equal(gm(x), y * 2 + y)


def test_insert_after_the_node_feeding_the_output():
    model = TwoUsers()
    gm = trace(model).graph_module
    last = gm.graph.output_node().args[0]
    insert_after(gm, last, "final", AddOne())
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x) + 1)


def test_node_names_are_made_unique():
    gm = trace(TwoUsers()).graph_module
    relu = node_named(gm, "relu")
    a = insert_after(gm, relu, "a", AddOne(), node_name="fc")
    assert a.name != "fc"
    assert len({n.name for n in gm.graph.nodes}) == len(gm.graph.nodes)


def test_insert_after_a_placeholder_keeps_inputs_first():
    class Two(nn.Module):
        def forward(self, x, y):
            return x * y

    model = Two()
    gm = trace(model).graph_module
    x_node = next(iter(gm.graph.nodes))
    insert_after(gm, x_node, "on_x", AddOne())

    ops = [n.op for n in gm.graph.nodes]
    assert ops[:3] == ["placeholder", "placeholder", "call_module"]
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(gm(a, b), (a + 1) * b)


def test_two_insertions_after_one_node_chain():
    gm = trace(TwoUsers()).graph_module
    relu = node_named(gm, "relu")
    first, second = insert_after_many(gm, [(relu, "first", AddOne(), None), (relu, "second", AddOne(), None)])
    assert second.args == (relu,)
    assert first.args == (second,)
    assert all(first in user.args for user in first.users)


class Chain(nn.Module):
    def __init__(self, length):
        super().__init__()
        self.length = length

    def forward(self, x):
        for _ in range(self.length):
            x = x * 1.0 + 0.5
        return x


def test_many_insertions_on_a_long_chain():
    model = Chain(200)
    gm = trace(model).graph_module
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("add")]
    assert len(adds) == 200
    nodes_before = len(gm.graph.nodes)

    new = insert_after_many(
        gm,
        ((node, f"stages.s{i}", AddOne(), f"stage_{i}") for i, node in enumerate(adds)),
    )

    assert len(new) == 200
    assert len(gm.graph.nodes) == nodes_before + 200
    assert [n.name for n in new] == [f"stage_{i}" for i in range(200)]
    for node, stage in zip(adds, new):
        assert list(node.users) == [stage]
        assert node.next is stage
    assert len(list(gm.stages.children())) == 200
    gm.graph.lint()
    x = torch.randn(5)
    assert torch.allclose(gm(x), x + 200 * 1.5)


def test_empty_batch_changes_nothing():
    gm = trace(TwoUsers()).graph_module
    code = gm.code
    assert insert_after_many(gm, []) == []
    assert gm.code == code


# -- errors -------------------------------------------------------------------


def test_cannot_insert_after_the_output():
    gm = trace(TwoUsers()).graph_module
    with pytest.raises(PassError, match="output"):
        insert_after(gm, gm.graph.output_node(), "x", AddOne())


@pytest.mark.parametrize(
    "path, message",
    [
        ("fc", "already exists"),
        ("fc.weight", "already exists"),
        ("fc.weight.stage", "not a module"),
        ("graph", "already exists"),
        ("", "invalid"),
        ("a..b", "invalid"),
    ],
)
def test_taken_or_bad_module_paths(path, message):
    gm = trace(TwoUsers()).graph_module
    code = gm.code
    with pytest.raises(PassError, match=message):
        insert_after(gm, node_named(gm, "relu"), path, AddOne())
    assert gm.code == code


def test_registering_below_an_existing_module_is_allowed():
    gm = trace(TwoUsers()).graph_module
    insert_after(gm, node_named(gm, "relu"), "fc.stage", AddOne())
    assert isinstance(gm.fc.stage, AddOne)


@pytest.mark.parametrize("paths", [("s", "s"), ("s", "s.t"), ("s.t", "s")])
def test_clashing_paths_in_one_batch_change_nothing(paths):
    gm = trace(TwoUsers()).graph_module
    relu = node_named(gm, "relu")
    code = gm.code
    with pytest.raises(PassError):
        insert_after_many(gm, [(relu, p, AddOne(), None) for p in paths])
    assert gm.code == code
    assert not hasattr(gm, "s")


def test_node_of_another_graph_and_non_module_are_rejected():
    gm = trace(TwoUsers()).graph_module
    other = trace(TwoUsers()).graph_module
    with pytest.raises(PassError, match="not a node"):
        insert_after(gm, node_named(other, "relu"), "s", AddOne())
    with pytest.raises(PassError, match="nn.Module"):
        insert_after(gm, node_named(gm, "relu"), "s", lambda x: x)
    with pytest.raises(PassError, match="tuples"):
        insert_after_many(gm, [(node_named(gm, "relu"), "s", AddOne())])
