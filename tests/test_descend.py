"""A model whose root cannot be traced: transformed in parts (passes.descend), as one model
that trains, lowers, saves and loads; and tied weights (one site, one op chain)."""

import torch
from fxqp_test_nets import Head, ListDetector
from torch import nn

import fxqp
from fxqp import Quantize, Rule, Spec
from fxqp.lower.artifact import read_header
from fxqp.ops.chain import TiedWeight
from fxqp.stages import ActivationStage

SPEC = Spec(
    rules=[
        Rule(modules=["Conv2d", "Linear", "Embedding"], weight=[Quantize(bits=4)]),
        Rule(modules=["ReLU"], functions=["mul", "relu"], activation=[Quantize(bits=8, start=1)]),
    ]
)


def images():
    torch.manual_seed(0)
    return [torch.randn(3, 8, 8), torch.randn(3, 6, 10)]


def outputs_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_an_untraceable_root_is_transformed_in_parts_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = ListDetector()
    x = images()
    gm = fxqp.transform(model, SPEC, example_inputs=(x,))
    assert isinstance(gm, ListDetector) and isinstance(gm.head, Head)  # the user's model, traced in place
    schedule = gm.fxqp_schedule
    assert schedule.parts == ("backbone", "head.conv", "post.0", "post.1")
    assert set(schedule.untraced) == {"", "head"}
    stages = {path: m.site for path, m in gm.named_modules() if isinstance(m, ActivationStage)}
    assert stages == {  # in each part, under its module: <part>.fxqp_stages.<node>
        "backbone.fxqp_stages._1": "backbone._1",  # the Sequential's ReLU, node '_1'
        "head.conv.fxqp_stages._1": "head.conv._1",
        "post.0.fxqp_stages.mul": "post.0.mul",
        "post.1.fxqp_stages.mul": "post.1.mul",
    }
    # weights in untraced modules get their ops too (head.out is called by the head's own code)
    assert type(gm.head.out.parametrizations.weight[0]).__name__ == "WeightQuantizer"

    notes = "\n".join(fxqp.summary(gm).notes)
    assert "the root's forward cannot be traced" in notes and "head (" in notes
    explained = fxqp.explain(ListDetector(), SPEC)
    assert {row["site"] for row in explained.to_dicts() if row["kind"] == "activation" and row["rule"] is not None} == set(stages.values())

    gm.train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    for _ in range(2):  # the root's forward hook advances the step, as a graph's last node would
        gm(x).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert int(schedule.step) == 2
    gm.eval()
    with torch.no_grad():
        expected = gm(x)
        assert outputs_equal(gm(x), expected)
    assert int(schedule.step) == 2

    low = fxqp.lower(gm)
    with torch.no_grad():
        assert outputs_equal(low(x), expected)
    assert not hasattr(low, "fxqp_schedule") and low.meta["fxqp"]["parts"] == list(schedule.parts)
    fxqp.save(low, tmp_path / "model.fxqp")
    assert read_header(tmp_path / "model.fxqp")["parts"] == list(schedule.parts)
    loaded = fxqp.load(tmp_path / "model.fxqp", ListDetector())
    with torch.no_grad():
        assert outputs_equal(loaded(x), expected)


def test_activation_modules_in_untraced_code_are_reported():
    class Untraced(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = nn.GELU()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, xs):
            return [self.body(self.act(self.lin(x))) for x in xs]

    spec = Spec(rules=[Rule(modules=["ReLU", "GELU"], activation=[Quantize(bits=8)])])
    gm = fxqp.transform(Untraced(), spec)
    assert gm.fxqp_schedule.parts == ("body",)
    notes = "\n".join(fxqp.summary(gm).notes)
    assert "activation calls inside (root) are no sites: act (GELU)" in notes
    explain_notes = "\n".join(fxqp.explain(Untraced(), spec).notes)
    assert "act (GELU)" in explain_notes


class TiedLM(nn.Module):
    """A token embedding and an output layer that share one weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.embed(ids))))


def test_tied_weights_share_one_op_chain_and_one_artifact_entry(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    gm = fxqp.transform(TiedLM(), SPEC, example_inputs=(ids,))
    assert isinstance(gm.out.parametrizations.weight[0], TiedWeight)
    assert gm.out.parametrizations.weight.original is gm.embed.parametrizations.weight.original
    rows = [r["site"] for r in fxqp.summary(gm).to_dicts() if r["kind"] == "weight"]
    assert rows == ["embed.weight", "mix.weight"]
    assert "tied weights (one site, one op chain): out.weight reads embed.weight" in fxqp.summary(gm).notes
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm.out.weight, gm.embed.weight)  # the one quantized weight
        assert not torch.equal(gm.embed.weight, gm.embed.parametrizations.weight.original)
    gm.train()
    gm(ids).pow(2).mean().backward()
    assert gm.embed.parametrizations.weight.original.grad is not None  # both uses train the one tensor
    gm.eval()
    with torch.no_grad():
        expected = gm(ids)
    low = fxqp.lower(gm)
    with torch.no_grad():
        assert torch.equal(low(ids), expected)
    assert low.out.parametrizations.weight.original.numel() == 0  # no float copy kept
    fxqp.save(low, tmp_path / "tied.fxqp")
    assert sorted(read_header(tmp_path / "tied.fxqp")["weights"]) == ["embed.weight", "mix.weight"]
    loaded = fxqp.load(tmp_path / "tied.fxqp", TiedLM())
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)


class ReadsItsWeight(nn.Conv2d):
    """A convolution from outside torch.nn: traced through, its weight read by a get_attr."""

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)


def test_a_part_reads_its_weights_through_their_ops():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(ReadsItsWeight(3, 4, 3), nn.ReLU())

        def forward(self, xs):
            return [self.body(x) for x in xs]

    torch.manual_seed(0)
    spec = Spec(rules=[Rule(modules=["ReadsItsWeight"], weight=[Quantize(bits=2)])])
    gm = fxqp.transform(Root(), spec)
    assert gm.fxqp_schedule.parts == ("body",)
    x = torch.randn(1, 3, 5, 5)
    conv = gm.body[0]
    gm.eval()
    with torch.no_grad():
        quantized = torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
        float_weight = torch.relu(torch.nn.functional.conv2d(x, conv.parametrizations.weight.original, conv.bias, padding=1))
        out = gm([x])[0]
    assert torch.equal(out, quantized) and not torch.equal(out, float_weight)
