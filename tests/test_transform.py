"""fxqp.transform end to end: sites, order, schedule, errors, dtype, training."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from fxqp_test_nets import NetWithUntraceableBlock, ReusedReluNet, UntraceableRoot
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.stages import ActivationStage


def stages(gm):
    return {m.site: m for m in gm.modules() if isinstance(m, ActivationStage)}


def weight_ops(module):
    return list(module.parametrizations["weight"])


# --------------------------------------------------------------------------- sites


def test_empty_spec_leaves_outputs_bit_identical():
    torch.manual_seed(0)
    model = ReusedReluNet()
    gm = fxqp.transform(model, Spec())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    gm.train()
    assert torch.equal(gm(x), model(x))


def test_reused_module_gets_one_stage_per_call_site():
    spec = Spec(rules=[Rule(modules=["ReLU"], activation=[Quantize(bits=4)])])
    gm = fxqp.transform(ReusedReluNet(), spec)
    found = stages(gm)
    assert set(found) == {"act", "act_1"}
    assert found["act"] is not found["act_1"]
    gm.train()
    gm(torch.randn(2, 3, 8, 8))
    # independent observers: the two call sites see different activations
    assert not torch.equal(found["act"].ops[0].hi, found["act_1"].ops[0].hi)
    # each stage node follows its own producer node
    by_name = {n.name: n for n in gm.graph.nodes}
    assert by_name["act_fxqp"].args == (by_name["act"],)
    assert by_name["act_1_fxqp"].args == (by_name["act_1"],)


def test_functional_call_sites_are_caught():
    spec = Spec(rules=[Rule(functions=["relu", "add", "cat"], activation=[Quantize(bits=8)])])
    gm = fxqp.transform(ReusedReluNet(), spec)
    assert {s.target for s in stages(gm).values()} == {"relu", "add", "cat"}
    # every user of a selected node now reads the stage output
    for node in gm.graph.nodes:
        if node.name in ("relu", "add", "cat"):
            assert [u.name for u in node.users] == [f"{node.name}_fxqp"]


def test_functional_operator_callables_select_like_names():
    import operator

    spec = Spec(rules=[Rule(functions=[F.relu, operator.add], activation=[Quantize(bits=8)])])
    gm = fxqp.transform(ReusedReluNet(), spec)
    assert set(stages(gm)) == {"relu", "add"}


def test_weight_sites_of_every_parametrized_module_kind():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.conv1d = nn.Conv1d(6, 4, 3)
            self.deconv = nn.ConvTranspose1d(4, 5, 3)
            self.norm = nn.LayerNorm(5)

        def forward(self, idx):
            x = self.emb(idx).transpose(1, 2)
            x = self.deconv(self.conv1d(x))
            return self.norm(x.transpose(1, 2))

    spec = Spec(rules=[Rule(names=["*"], weight=[Quantize(bits=3)])])
    gm = fxqp.transform(Mixed(), spec)
    axes = {path: weight_ops(gm.get_submodule(path))[0].channel_axis for path in ("emb", "conv1d", "deconv", "norm")}
    assert axes == {"emb": 0, "conv1d": 0, "deconv": 1, "norm": None}
    out = gm(torch.randint(0, 10, (2, 7)))
    assert out.shape == (2, 7, 5)


def test_transform_runs_no_weight_op_even_when_the_graph_reads_the_weight():
    class OwnConv(nn.Conv2d):
        """A Conv2d subclass outside torch.nn: traced through, so the graph reads its weight
        with a get_attr node (as torchvision's video convolutions do)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = OwnConv(3, 8, 3)

        def forward(self, x):
            return self.conv(x).relu()

    spec = Spec(rules=[Rule(names=["conv.weight"], weight=[Prune(sparsity=0.5, end=20, every=5), Quantize(bits=4)])])
    gm = fxqp.transform(Net(), spec)
    assert any(node.op == "get_attr" and node.target == "conv.weight" for node in gm.graph.nodes)
    pruner, quantizer = weight_ops(gm.conv)
    # Nothing was refreshed while transforming: the mask is still all ones and the first
    # refresh is still due at step 0.
    assert bool(pruner.mask.all()) and int(pruner.next_refresh) == 0
    gm(torch.randn(2, 3, 8, 8))  # the first training forward makes the step-0 refresh
    assert int(pruner.next_refresh) == 5


def test_modules_traced_through_are_selected_by_their_own_class_and_bases():
    class OwnUpsample(nn.ConvTranspose2d):
        """Defined outside torch.nn, so traced through: the GraphModule keeps only its weight."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = OwnUpsample(4, 6, 2)
            self.conv = nn.Conv2d(6, 3, 1)

        def forward(self, x):
            return self.conv(self.up(x))

    for selector in ("ConvTranspose2d", "OwnUpsample"):
        gm = fxqp.transform(Net(), Spec(rules=[Rule(modules=[selector], weight=[Quantize(bits=4)])]))
        assert [p for p, m in gm.named_modules() if hasattr(m, "parametrizations")] == ["up"]
        assert weight_ops(gm.up)[0].channel_axis == 1  # a transposed convolution's output axis
    rows = fxqp.explain(Net(), {"rules": []}).to_dicts()
    assert [row["target"] for row in rows if row["site"] == "up.weight"] == ["OwnUpsample"]


def test_last_matching_rule_wins_and_empty_list_removes_ops():
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Quantize(bits=8)]),
            Rule(names=["conv2"], weight=[Prune(sparsity=0.5), Quantize(bits=2)]),
            Rule(names=["fc"], weight=[]),
        ]
    )
    gm = fxqp.transform(ReusedReluNet(), spec)
    assert [op.config for op in weight_ops(gm.conv1)] == [Quantize(bits=8)]
    assert [op.config for op in weight_ops(gm.conv2)] == [Prune(sparsity=0.5), Quantize(bits=2)]
    assert not hasattr(gm.fc, "parametrizations")


def test_names_globs_regex_and_exclude():
    model = torchvision.models.resnet18(num_classes=10)
    spec = Spec(rules=[Rule(modules=["Conv2d"], names=["re:layer[12]\\..*"], exclude=["*downsample*"], weight=[Quantize(bits=4)])])
    gm = fxqp.transform(model, spec)
    quantized = sorted(p for p, m in gm.named_modules() if hasattr(m, "parametrizations"))
    assert quantized == [f"layer{i}.{j}.conv{k}" for i in (1, 2) for j in (0, 1) for k in (1, 2)]


def test_transform_leaves_the_model_untouched_unless_inplace():
    model = ReusedReluNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5)])])
    gm = fxqp.transform(model, spec)
    gm.train()
    gm(torch.randn(2, 3, 8, 8))
    assert not hasattr(model.conv1, "parametrizations")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    gm_inplace = fxqp.transform(model, spec, inplace=True)
    assert hasattr(model.conv1, "parametrizations")
    assert gm_inplace.conv1 is model.conv1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transform_keeps_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    spec = Spec(
        rules=[
            Rule(modules=["Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8)]),
        ]
    )
    gm = fxqp.transform(model, spec)
    gm.train()
    out = gm(torch.randn(3, 8, dtype=dtype))
    assert out.dtype == dtype
    assert gm.get_submodule("0").weight.dtype == dtype
    assert gm.get_submodule("0").parametrizations.weight.original.dtype == dtype
    out.float().sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transform_keeps_cuda_device():
    model = ReusedReluNet().cuda()
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8), Prune(sparsity=0.5)]),
        ]
    )
    gm = fxqp.transform(model, spec)
    gm.train()
    assert gm(torch.randn(2, 3, 8, 8, device="cuda")).device.type == "cuda"
    assert all(b.device.type == "cuda" for b in gm.buffers())


# --------------------------------------------------------------------------- order


def linear_with(weight):
    layer = nn.Linear(len(weight), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
    return nn.Sequential(layer)


def test_prune_then_quantize_vs_quantize_then_prune_hand_computed():
    w = [0.8, -0.4, 0.2, -0.1]
    # [Prune(0.5), Quantize(1)]: Q(w·m); w·m = [0.8, -0.4, 0, 0]; α = mean |w·m| over the
    # non-zeros = 0.6; the pruned zeros stay zero.
    pq = fxqp.transform(linear_with(w), Spec(rules=[Rule(names=["0"], weight=[Prune(sparsity=0.5), Quantize(bits=1)])]))
    # [Quantize(1), Prune(0.5)]: Q(w)·m'; Q(w) = ±0.375 (α = mean|w|), all |Q| tie, so the
    # latent |w| decides: 0.1 and 0.2 are pruned.
    qp = fxqp.transform(linear_with(w), Spec(rules=[Rule(names=["0"], weight=[Quantize(bits=1), Prune(sparsity=0.5)])]))
    for gm in (pq, qp):
        gm.train()
        gm(torch.zeros(1, 4))  # step 0: the masks are computed
        gm.eval()
    torch.testing.assert_close(pq.get_submodule("0").weight, torch.tensor([[0.6, -0.6, 0.0, 0.0]]))
    torch.testing.assert_close(qp.get_submodule("0").weight, torch.tensor([[0.375, -0.375, 0.0, 0.0]]))


def test_prune_then_quantize_three_bit_hand_computed():
    # zero the two smallest |w| (0.2, 0.45), then scale = 1/3: 0.5·3 = 1.5 rounds to 2.
    gm = fxqp.transform(
        linear_with([1.0, 0.5, 0.45, -0.2]), Spec(rules=[Rule(names=["0"], weight=[Prune(sparsity=0.5), Quantize(bits=3)])])
    )
    gm.train()
    gm(torch.zeros(1, 4))
    torch.testing.assert_close(gm.get_submodule("0").weight, torch.tensor([[1.0, 2 / 3, 0.0, 0.0]]))


def test_activation_order_hand_computed():
    # Quantize(2 bits) then dynamic Prune(0.5) on x = [0.1, 0.6, 0.9, 0.3] (affine, lo=0 after
    # widening, hi=0.9, scale 0.3): Q(x) = [0, 0.6, 0.9, 0.3]; prune 2 smallest |Q|: 0 and 0.3.
    class Id(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    x = torch.tensor([[0.1, 0.6, 0.9, 0.3]])
    qp = fxqp.transform(Id(), Spec(rules=[Rule(functions=["relu"], activation=[Quantize(bits=2), Prune(sparsity=0.5, dynamic=True)])]))
    qp.train()
    torch.testing.assert_close(qp(x), torch.tensor([[0.0, 0.6, 0.9, 0.0]]))
    # Prune first: zero 0.1 and 0.3, then quantize (observer saw the unpruned batch)
    pq = fxqp.transform(Id(), Spec(rules=[Rule(functions=["relu"], activation=[Prune(sparsity=0.5, dynamic=True), Quantize(bits=2)])]))
    pq.train()
    torch.testing.assert_close(pq(x), torch.tensor([[0.0, 0.6, 0.9, 0.0]]))


# --------------------------------------------------------------------------- schedule


def test_step_counter_advances_after_each_training_forward_only():
    spec = Spec(rules=[Rule(modules=["ReLU"], activation=[Quantize(bits=2, start=2)])])
    gm = fxqp.transform(ReusedReluNet(), spec)
    x = torch.randn(2, 3, 8, 8)
    gm.eval()
    gm(x)
    assert int(gm.fxqp_schedule.step) == 0
    gm.train()
    outputs = []
    for _ in range(3):
        outputs.append(gm(x))
    assert int(gm.fxqp_schedule.step) == 3
    reference = ReusedReluNet()
    reference.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.startswith("fxqp")})
    # steps 0 and 1: the quantizer (start=2) is the identity; step 2: it quantizes
    assert torch.equal(outputs[0], reference(x)) and torch.equal(outputs[1], reference(x))
    assert not torch.equal(outputs[2], reference(x))


def test_manual_step_control():
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, start=3)])])
    gm = fxqp.transform(ReusedReluNet(), spec, auto_step=False)
    gm.train()
    x = torch.randn(2, 3, 8, 8)
    gm(x)
    gm(x)
    assert int(gm.fxqp_schedule.step) == 0
    assert float((gm.conv1.weight == 0).float().mean()) == 0.0
    assert fxqp.step(gm, 3) == 3
    gm(x)
    assert float((gm.conv1.weight == 0).float().mean()) == 0.5
    with pytest.raises(fxqp.FxqpError, match="non-negative int"):
        fxqp.step(gm, -1)
    with pytest.raises(fxqp.FxqpError, match="no fxqp schedule"):
        fxqp.step(nn.Linear(2, 2))


RESUME_SPEC = Spec(
    rules=[
        Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, start=2, end=8, every=2), Quantize(bits=4, start=5)]),
        Rule(modules=["ReLU"], functions=["relu"], activation=[Quantize(bits=6, start=3), Prune(sparsity=0.3, start=4, end=9)]),
        Rule(functions=["add"], activation=[Quantize(bits=5, learned=True, start=1), Prune(sparsity=0.25, dynamic=True, start=6)]),
        Rule(functions=["cat"], activation=[Prune(sparsity=0.5, granularity="channel", start=3)]),
        Rule(names=["fc"], weight=[Quantize(bits=3, learned=True, start=4), Prune(sparsity=0.4, start=7)]),
    ]
)


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def train(gm, opt, data):
    gm.train()
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()


def test_resume_mid_schedule_is_bit_exact():
    torch.manual_seed(0)
    data = batches(12)
    model = ReusedReluNet()
    gm = fxqp.transform(model, RESUME_SPEC)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    train(gm, opt, data[:6])
    checkpoint = copy.deepcopy({"model": gm.state_dict(), "opt": opt.state_dict()})
    train(gm, opt, data[6:])

    torch.manual_seed(123)  # a fresh instance with other initial weights
    fresh = fxqp.transform(ReusedReluNet(), RESUME_SPEC)
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(checkpoint["opt"])
    train(fresh, fresh_opt, data[6:])

    expected, actual = gm.state_dict(), fresh.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert int(fresh.fxqp_schedule.step) == 12


# --------------------------------------------------------------------------- training


def assert_loss_decreases(gm, x, y, steps=5, lr=0.05):
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9)
    gm.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    return losses


def test_reused_relu_net_trains():
    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, start=0, end=3), Quantize(bits=4, start=1)]),
            Rule(modules=["ReLU"], functions=["relu", "add"], activation=[Quantize(bits=8, start=0), Prune(sparsity=0.3, start=2)]),
        ]
    )
    gm = fxqp.transform(ReusedReluNet(), spec)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    assert_loss_decreases(gm, x, y, steps=8)
    assert float((gm.conv2.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)


def test_resnet18_trains_with_the_issue_example_spec():
    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, start=0), Quantize(bits=4, start=1)]),
            Rule(modules=["ReLU"], functions=["relu", "add"], activation=[Quantize(bits=8, start=0), Prune(sparsity=0.3, start=2)]),
        ]
    )
    gm = fxqp.transform(torchvision.models.resnet18(num_classes=10), spec)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    assert_loss_decreases(gm, x, y, steps=5, lr=0.01)
    report = fxqp.summary(gm)
    rows = {r["site"]: r for r in report.to_dicts()}
    assert rows["layer1.0.conv1.weight"]["ops (in order)"] == "prune(0.5) → quantize(4b sym/ch)"
    assert rows["layer1.0.conv1.weight"]["actual"] == 0.5 and rows["layer1.0.conv1.weight"]["sparsity"] == 0.5
    assert rows["add_7"]["target"] == "add"
    assert "step 5" in report.title


# --------------------------------------------------------------------------- reports


def test_explain_shows_rules_and_unmatched_sites():
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Quantize(bits=4)]),
            Rule(names=["conv2"], weight=[Prune(sparsity=0.5)]),
            Rule(functions=["relu", "gelu"], activation=[Quantize(bits=8)]),
        ]
    )
    report = fxqp.explain(ReusedReluNet(), spec)
    rows = {r["site"]: r for r in report.to_dicts()}
    assert rows["conv1.weight"]["rule"] == "rules[0]"
    assert rows["conv2.weight"]["rule"] == "rules[1]"
    assert rows["fc.weight"]["rule"] is None
    assert rows["relu"]["rule"] == "rules[2]"
    assert rows["act_1"]["rule"] is None
    assert any("'gelu' matches no activation site" in n for n in report.notes)
    assert "matched by no rule" in str(report)


def test_summary_of_an_untransformed_model_is_an_error():
    with pytest.raises(fxqp.FxqpError, match="fxqp.transform"):
        fxqp.summary(nn.Linear(2, 2))


# --------------------------------------------------------------------------- errors


def test_a_typo_in_a_class_or_function_name_is_an_error_with_the_closest_names():
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=4)]), Rule(modules=["Conv2", "Lnear"], weight=[Quantize(bits=4)])])
    with pytest.raises(
        fxqp.SpecError,
        match=r"rules\[1\]\.modules: 'Conv2' is no known module class \(closest: Conv2d.*'Lnear' is no known module class \(closest: Linear",
    ):
        fxqp.transform(ReusedReluNet(), spec)
    spec = Spec(rules=[Rule(functions=["relu", "rleu"], activation=[Quantize(bits=4)])])  # a typo even beside a match
    with pytest.raises(fxqp.SpecError, match=r"rules\[0\]\.functions: 'rleu' is no known function, method or operator \(closest: relu"):
        fxqp.transform(ReusedReluNet(), spec)


def test_a_rule_that_selects_no_site_is_an_error_naming_its_fields():
    spec = Spec(rules=[Rule(names=["conv3"], weight=[Quantize(bits=4)])])
    with pytest.raises(
        fxqp.SpecError,
        match=r"rules\[0\] selects no weight site of this model: rules\[0\]\.names: 'conv3' matches no weight site \(closest: conv2, conv1",
    ):
        fxqp.transform(ReusedReluNet(), spec)
    spec = Spec(rules=[Rule(modules=["GELU"], functions=["gelu"], activation=[Quantize(bits=4)])])  # known, but not in this model
    with pytest.raises(
        fxqp.SpecError, match=r"rules\[0\] selects no activation site of this model: rules\[0\]\.modules: 'GELU' matches no"
    ):
        fxqp.transform(ReusedReluNet(), spec)


def test_a_reusable_rule_selects_by_modules_or_functions_and_notes_what_is_absent():
    """A spec written for many models: known entries absent from this one are notes."""
    spec = Spec(
        rules=[
            Rule(
                modules=["ReLU", "GELU", "SiLU"],
                functions=["relu", "gelu", "silu", "add"],
                exclude=["nothing_*"],
                activation=[Quantize(bits=8)],
            )
        ]
    )
    gm = fxqp.transform(ReusedReluNet(), spec)
    assert any(isinstance(m, ActivationStage) for m in gm.modules())
    notes = fxqp.explain(ReusedReluNet(), spec).notes
    assert any("'GELU' matches no activation site" in n for n in notes)
    assert any("'silu' matches no activation site" in n for n in notes)
    assert any("exclude: 'nothing_*' matches no activation site" in n for n in notes)
    assert not any(n.startswith("error") for n in notes)


class GELU(nn.Module):
    """An activation class of another library, named like torch's (as timm's)."""

    def forward(self, x):
        return nn.functional.gelu(x)


class OwnGELU(GELU):
    pass


def test_module_selectors_match_classes_of_that_name_from_any_library_and_subclasses():
    model = nn.Sequential(nn.Linear(4, 4), GELU(), nn.Linear(4, 4), OwnGELU())
    gm = fxqp.transform(model, Spec(rules=[Rule(modules=["GELU"], activation=[Quantize(bits=8)])]), leaf_modules=[GELU])
    stages = [m.site for m in gm.modules() if isinstance(m, ActivationStage)]
    assert stages == ["_1", "_3"]


def test_option_not_valid_for_site_kind_names_rule_and_field():
    spec = Spec(rules=[Rule(modules=["ReLU"], activation=[Prune(sparsity=0.5), Quantize(bits=8, per_channel=True)])])
    with pytest.raises(fxqp.SpecError, match=r"rules\[0\]\.activation\[1\] \(site 'act'\): per_channel"):
        fxqp.transform(ReusedReluNet(), spec)


def test_dict_spec_is_accepted_and_bad_type_rejected():
    gm = fxqp.transform(ReusedReluNet(), {"rules": [{"modules": ["Linear"], "weight": [{"op": "quantize", "bits": 4}]}]})
    assert hasattr(gm.fc, "parametrizations")
    with pytest.raises(fxqp.SpecError, match="expected fxqp.Spec"):
        fxqp.transform(ReusedReluNet(), [Rule(modules=["Linear"], weight=[])])


def test_untraceable_submodule_becomes_a_leaf_and_is_reported():
    torch.manual_seed(0)
    model = NetWithUntraceableBlock()
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=8)])])
    gm = fxqp.transform(model, spec)
    assert gm.fxqp_schedule.fallback_leaves == ("block",)
    # the leaf's own weight is still a site
    assert hasattr(gm.block.conv, "parametrizations")
    x = torch.randn(2, 3, 6, 6)
    gm.eval()
    assert gm(x).shape == (2, 3)
    assert "block" in "\n".join(fxqp.summary(gm).notes)
    assert "block" in "\n".join(fxqp.explain(model, spec).notes)


def test_untraceable_root_raises_trace_error_naming_module_and_reason():
    with pytest.raises(fxqp.TraceError) as info:
        fxqp.transform(UntraceableRoot(), Spec())
    err = info.value
    assert err.module_path == ""
    assert "root module's forward" in str(err)
    assert "symbolically traced variables cannot be used as inputs to control flow" in err.reason


def test_user_leaf_modules_and_trace_error_for_a_non_module():
    spec = Spec(rules=[Rule(modules=["DataDependentBlock"], activation=[Quantize(bits=8)])])
    gm = fxqp.transform(NetWithUntraceableBlock(), spec, leaf_modules=["block"])
    assert gm.fxqp_schedule.fallback_leaves == ()
    assert set(stages(gm)) == {"block"}
    with pytest.raises(fxqp.TraceError, match="expected an nn.Module"):
        fxqp.transform(lambda x: x, Spec())


def test_non_floating_output_raises_site_error():
    class Argmax(nn.Module):
        def forward(self, x):
            return torch.argmax(x, dim=1)

    gm = fxqp.transform(Argmax(), Spec(rules=[Rule(functions=["argmax"], activation=[Quantize(bits=8)])]))
    with pytest.raises(fxqp.SiteError, match="site 'argmax'.*floating-point"):
        gm(torch.randn(2, 3))


def test_nodes_without_users_are_not_activation_sites():
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            torch._assert(x.dim() == 2, "2-d input expected")
            return self.fc(torch.relu(x))

    gm = fxqp.transform(Checked(), Spec(rules=[Rule(names=["*"], activation=[Quantize(bits=8)])]))
    assert set(stages(gm)) == {"relu", "fc"}
    gm.train()
    assert gm(torch.randn(3, 4)).shape == (3, 2)


def test_tuple_outputs_are_not_sites_but_their_items_are():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 8, batch_first=True)

        def forward(self, x):
            y, _ = self.attn(x, x, x)
            z, _ = self.lstm(y)
            values, _ = torch.max(z, dim=-1)
            return values

    gm = fxqp.transform(Attention(), Spec(rules=[Rule(names=["*"], activation=[Quantize(bits=8)])]))
    assert {s.target for s in stages(gm).values()} == {"getitem"}
    assert len(stages(gm)) == 3  # the first item of each tuple; the unused second items are dead
    gm.train()
    assert gm(torch.randn(2, 5, 8)).shape == (2, 5)


def test_activation_pruner_after_quantizer_breaks_ties_by_the_unquantized_activation():
    class Relu(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    # 2-bit affine on [0, 0.9] (scale 0.3): 0.2, 0.25 and 0.35 all quantize to 0.3; prune two
    # of four: the zero-quantized 0.1 first, then among the three ties the smallest |x|, 0.2.
    x = torch.tensor([[0.35, 0.2, 0.9, 0.1, 0.25]])
    spec = Spec(rules=[Rule(functions=["relu"], activation=[Quantize(bits=2), Prune(sparsity=0.4, dynamic=True)])])
    gm = fxqp.transform(Relu(), spec)
    gm.train()
    gm(x)  # observes the range [0, 0.9], which the next forward quantizes on
    torch.testing.assert_close(gm(x), torch.tensor([[0.3, 0.0, 0.9, 0.0, 0.3]]))

    # static mask: same ties in the running average, broken by the running average of |x|
    static = fxqp.transform(Relu(), Spec(rules=[Rule(functions=["relu"], activation=[Quantize(bits=2), Prune(sparsity=0.4)])]))
    static.train()
    static(x)  # the range, and the averages the mask is computed from
    torch.testing.assert_close(static(x), torch.tensor([[0.3, 0.0, 0.9, 0.0, 0.3]]))
    pruner = static.fxqp_stages.relu.ops[1]
    torch.testing.assert_close(pruner.running_latent, x[0])


def test_code_reading_the_training_flag_is_switched_with_eval():
    """torchvision's StochasticDepth passes self.training to a function: traced once, the
    flag would be frozen at True and eval would keep dropping branches at random."""
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.drop = StochasticDepth(0.9, "row")

        def forward(self, x):
            return x + self.drop(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model = Block()
    gm = fxqp.transform(
        model, Spec(rules=[Rule(modules=["Linear"], weight=[Quantize(bits=8)]), Rule(functions=["relu"], activation=[Quantize(bits=8)])])
    )
    assert gm.fxqp_schedule.mode_leaves == () and gm.fxqp_schedule.mode_switches == ("drop.fxqp_mode_0",)
    assert "relu" in {m.site for m in gm.modules() if isinstance(m, ActivationStage)}  # traced, still a site
    x = torch.randn(64, 8)
    gm.eval()
    assert torch.equal(gm(x), gm(x))  # deterministic in eval mode
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # and still dropping rows in training
    assert "parts that differ between training and evaluation, switched at run time: 1, in drop" in "\n".join(fxqp.summary(gm).notes)


def test_example_inputs_leave_out_nodes_whose_value_is_not_a_float_tensor():
    from fxqp_test_nets import FlagReturningHelperNet

    spec = Spec(rules=[Rule(names=["*"], activation=[Quantize(bits=8)])])
    x = torch.randn(2, 3, 4)
    with pytest.raises(fxqp.SiteError, match="example_inputs"):
        fxqp.transform(FlagReturningHelperNet(), spec)(x)  # the flag's getitem is a site
    gm = fxqp.transform(FlagReturningHelperNet(), spec, example_inputs=(x,))
    sites = {m.site for m in gm.modules() if isinstance(m, ActivationStage)}
    assert "getitem_1" not in sites and {"getitem", "relu"} <= sites
    assert gm(x).shape == (2, 3, 4)


# --------------------------------------------------------------------------- fractions of the run


def test_fractions_of_the_run_resolve_against_total_steps():
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Prune(0.5, start="20%", end="60%", every="10%"), Quantize(4, start="80%")]),
            Rule(modules=["ReLU"], activation=[Quantize(8, start="50%")]),
        ]
    )
    with pytest.raises(fxqp.SpecError, match=r"^rules\[0\]\.weight\[0\]\.start: '20%' is a fraction of the run .*total_steps=N"):
        fxqp.transform(ReusedReluNet(), spec)
    gm = fxqp.transform(ReusedReluNet(), spec, total_steps=30)
    prune, quant = weight_ops(gm.conv1)
    assert (int(prune.start), int(prune.end), int(prune.every), int(quant.start)) == (6, 18, 3, 24)
    assert {int(op.start) for stage in stages(gm).values() for op in stage.ops} == {15}
    schedule = gm.fxqp_schedule
    assert schedule.total_steps == 30 and schedule.spec == spec.resolve(30)
    # the run's clock: quantization is the identity until step 24, active from it on
    gm.eval()
    latent = gm.conv1.parametrizations["weight"].original
    fxqp.step(gm, 23)
    assert torch.equal(gm.conv1.weight, latent)
    fxqp.step(gm, 1)
    assert not torch.equal(gm.conv1.weight, latent)


def test_keyword_example_inputs_decide_the_transformed_models_inputs():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 4)

        def forward(self, ids, mask=None, scale=None):
            x = self.emb(ids)
            if mask is not None:
                x = x * mask.unsqueeze(-1)
            return torch.relu(self.fc(x if scale is None else x * scale))

    ids, mask = torch.randint(0, 10, (2, 5)), torch.rand(2, 5)
    spec = Spec(rules=[Rule(functions=["relu"], activation=[Quantize(bits=8)])])
    gm = fxqp.transform(Masked(), spec, example_inputs={"mask": mask, "ids": ids})  # any key order
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["ids", "mask"]
    assert gm.fxqp_stages.relu.ops[0].config.bits == 8
    gm.eval()
    assert torch.equal(gm(ids=ids, mask=mask), gm(ids, mask))
    with pytest.raises(fxqp.TraceError, match="has no parameter 'musk'"):
        fxqp.transform(Masked(), spec, example_inputs={"ids": ids, "musk": mask})


def test_a_model_specialised_to_its_example_inputs_rejects_others_with_an_input_error():
    class RankDecision(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask):
            if mask.ndim == 2:  # a Python decision on the input's rank
                mask = mask[:, :, None]
            return torch.relu(self.fc(x)) * mask

    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5)
    spec = Spec(rules=[Rule(functions=["relu"], activation=[Quantize(bits=8)])])
    with pytest.raises(fxqp.TraceError):
        fxqp.transform(RankDecision(), spec)  # without examples the root cannot be traced
    gm = fxqp.transform(RankDecision(), spec, example_inputs=(x, mask)).eval()
    assert gm(torch.randn(3, 7, 4), torch.ones(3, 7)).shape == (3, 7, 4)  # other sizes are free
    with pytest.raises(fxqp.InputError, match=r"traced for inputs where .* gave bool=True"):
        gm(x, torch.ones(2, 5, 1))
