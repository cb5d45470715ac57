"""fxqp.lower end to end: the lowered model computes what the transformed model computes in
eval mode, for every weight scheme and activation form, in both decode modes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from fxqp_test_nets import MixedWeightsNet, ReusedReluNet
from hypothesis import given
from hypothesis import strategies as st
from lowering_helpers import RESNET_SPEC, assert_same, images, train_steps
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.lower import PackedWeight, is_lowered
from fxqp.lower.frozen import FrozenMask, FrozenQuantize, TopK
from fxqp.ops import ScheduledOp
from fxqp.schedule import Schedule
from fxqp.stages import ActivationStage

DECODES = ("cache", "on_the_fly")


# --------------------------------------------------------------------------- helpers


def trained(model, spec, inputs, lr=0.05):
    return train_steps(fxqp.transform(model, spec), inputs, lr)


def packed(low, path):
    """The PackedWeight of ``<path>.weight`` of a lowered model."""
    chain = list(low.get_submodule(path).parametrizations["weight"])
    assert len(chain) == 1 and isinstance(chain[0], PackedWeight)
    return chain[0]


RECORD_KEYS = ("kind", "scheme", "bits", "tiebreak")


def stage_records(low):
    """Per stage, what each frozen op is (its record's kind, scheme, bits, tiebreak)."""
    return {
        m.site: [{k: v for k, v in op.record().items() if k in RECORD_KEYS} for op in m.ops]
        for m in low.modules()
        if isinstance(m, ActivationStage)
    }


def assert_lowers_exactly(gm, x):
    """Lower ``gm`` in both decode modes; each lowered model gives gm's eval output."""
    ref = gm(x)
    lows = {}
    for decode in DECODES:
        low = fxqp.lower(gm, decode=decode)
        assert_same(low(x), ref)
        lows[decode] = low
    return lows


def assert_is_frozen(low):
    assert is_lowered(low)
    assert not hasattr(low, "fxqp_schedule")
    assert not any(isinstance(m, (Schedule, ScheduledOp)) for m in low.modules())
    assert all(node.target != "fxqp_schedule" for node in low.graph.nodes)
    assert not low.training and not any(m.training for m in low.modules())
    assert not any(p.requires_grad for p in low.parameters())


# --------------------------------------------------------------------------- resnet18


def test_resnet18_lowered_equals_transformed():
    torch.manual_seed(0)
    spec = RESNET_SPEC
    gm = trained(torchvision.models.resnet18(num_classes=10), spec, images(2, (2, 3, 32, 32)), lr=0.01)
    x = images(1, (2, 3, 32, 32), seed=1)[0]
    lows = assert_lowers_exactly(gm, x)
    low = lows["on_the_fly"]
    assert_is_frozen(low)
    weight_sites = [p for p, m in low.named_modules() if hasattr(m, "parametrizations")]
    assert len(weight_sites) == 21  # 20 convolutions (with downsample) and fc
    for path in weight_sites:
        layout = packed(low, path).layout
        assert (layout.scheme, layout.bits) == ("symmetric", 4), path
    assert torch.equal(lows["cache"](x), lows["on_the_fly"](x))


# --------------------------------------------------------------------------- ReusedReluNet, every scheme and form

ACTIVATION_RULES = [
    Rule(names=["act"], activation=[Quantize(bits=8)]),  # affine; also selects act_1 (same module) ...
    Rule(names=["act_1"], activation=[Quantize(bits=6, symmetric=True)]),  # ... which this rule overrides
    Rule(functions=["add"], activation=[Quantize(bits=5, learned=True)]),
    Rule(functions=["relu"], activation=[Prune(sparsity=0.3)]),
    Rule(functions=["adaptive_avg_pool2d"], activation=[Quantize(bits=3), Prune(sparsity=0.5)]),
    Rule(functions=["cat"], activation=[Prune(sparsity=0.5, granularity="channel")]),
    Rule(functions=["flatten"], activation=[Prune(sparsity=0.25, dynamic=True)]),
    Rule(names=["fc"], activation=[Quantize(bits=4), Prune(sparsity=0.5, dynamic=True)]),
]

EXPECTED_STAGES = {
    "act": [{"kind": "quantize", "scheme": "affine", "bits": 8}],
    "act_1": [{"kind": "quantize", "scheme": "symmetric", "bits": 6}],
    "add": [{"kind": "quantize", "scheme": "lsq", "bits": 5}],
    "relu": [{"kind": "mask"}],
    "adaptive_avg_pool2d": [{"kind": "quantize", "scheme": "affine", "bits": 3}, {"kind": "mask"}],
    "cat": [{"kind": "mask"}],
    "flatten": [{"kind": "topk", "tiebreak": False}],
    "fc": [{"kind": "quantize", "scheme": "affine", "bits": 4}, {"kind": "topk", "tiebreak": True}],
}

# weight ops per module, and the (scheme, bits, channel axis) each is stored with
WEIGHT_CASES = {
    "pq-sym4/qp-affine3/sign": (
        {
            "conv1": [Prune(sparsity=0.5), Quantize(bits=4)],
            "conv2": [Quantize(bits=3, symmetric=False), Prune(sparsity=0.3)],
            "fc": [Quantize(bits=1)],
        },
        {"conv1": ("symmetric", 4, 0), "conv2": ("affine", 3, 0), "fc": ("sign", 1, 0)},
    ),
    "lsq/per-tensor/prune-only": (
        {
            "conv1": [Quantize(bits=5, learned=True)],
            "conv2": [Quantize(bits=6, per_channel=False)],
            "fc": [Prune(sparsity=0.6)],
        },
        {"conv1": ("lsq", 5, 0), "conv2": ("symmetric", 6, None), "fc": ("float", 32, None)},
    ),
    "qp-sign/pq-lsq-tensor/pq-affine-tensor": (
        {
            "conv1": [Quantize(bits=1), Prune(sparsity=0.5)],
            "conv2": [Prune(sparsity=0.4), Quantize(bits=4, learned=True, per_channel=False)],
            "fc": [Prune(sparsity=0.5), Quantize(bits=2, symmetric=False, per_channel=False)],
        },
        {"conv1": ("sign", 1, 0), "conv2": ("lsq", 4, None), "fc": ("affine", 2, None)},
    ),
}


def reused_relu_spec(weights):
    return Spec(rules=[Rule(names=[path], weight=ops) for path, ops in weights.items()] + ACTIVATION_RULES)


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_reused_relu_net_every_weight_scheme_and_activation_form(case):
    weights, expected = WEIGHT_CASES[case]
    torch.manual_seed(0)
    gm = trained(ReusedReluNet(), reused_relu_spec(weights), images(3, (4, 3, 8, 8)))
    x = images(1, (4, 3, 8, 8), seed=1)[0]
    lows = assert_lowers_exactly(gm, x)
    for decode, low in lows.items():
        assert_is_frozen(low)
        for path, (scheme, bits, axis) in expected.items():
            weight = packed(low, path)
            assert weight.decode_mode == decode
            assert (weight.layout.scheme, weight.layout.bits, weight.layout.channel_axis) == (scheme, bits, axis), path
            assert torch.equal(low.get_submodule(path).weight, gm.get_submodule(path).weight), path
        assert stage_records(low) == EXPECTED_STAGES
        assert tuple(low.fxqp_stages.cat.ops[0].mask.shape) == (8, 1, 1)  # a channel mask
        assert tuple(low.fxqp_stages.relu.ops[0].mask.shape) == (4, 8, 8)  # an element mask
    # a batch of another size runs through the dynamic top-k stages as in the transformed model
    x3 = images(1, (3, 3, 8, 8), seed=2)[0]
    assert_same(lows["on_the_fly"](x3), gm(x3))


def test_mixed_module_kinds_lower_exactly():
    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(names=["emb"], weight=[Prune(sparsity=0.5), Quantize(bits=3)]),
            Rule(names=["conv1d"], weight=[Quantize(bits=4, symmetric=False), Prune(sparsity=0.3)]),
            Rule(names=["deconv"], weight=[Prune(sparsity=0.5), Quantize(bits=5)]),
            Rule(names=["norm"], weight=[Quantize(bits=6, learned=True)]),
            Rule(functions=["relu"], activation=[Quantize(bits=8), Prune(sparsity=0.2, dynamic=True)]),
        ]
    )
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 10, (2, 7), generator=g) for _ in range(3)]
    gm = trained(MixedWeightsNet(), spec, inputs)
    lows = assert_lowers_exactly(gm, torch.randint(0, 10, (3, 7), generator=g))
    layouts = {path: packed(lows["cache"], path).layout for path in ("emb", "conv1d", "deconv", "norm")}
    assert {p: (lay.scheme, lay.channel_axis) for p, lay in layouts.items()} == {
        "emb": ("symmetric", 0),
        "conv1d": ("affine", 0),
        "deconv": ("symmetric", 1),  # ConvTranspose: output channels on axis 1
        "norm": ("lsq", None),  # a 1-D weight has one scale
    }
    assert packed(lows["cache"], "deconv").scale.shape == (5,)


def test_bfloat16_model_lowers_exactly_and_keeps_its_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    spec = Spec(
        rules=[
            Rule(names=["0"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
            Rule(names=["2"], weight=[Prune(sparsity=0.5)]),  # float values, stored as bfloat16
            Rule(modules=["ReLU"], activation=[Quantize(bits=8), Prune(sparsity=0.25, dynamic=True)]),
        ]
    )
    gm = trained(model, spec, images(3, (3, 8), dtype=torch.bfloat16))
    x = images(1, (5, 8), seed=1, dtype=torch.bfloat16)[0]
    lows = assert_lowers_exactly(gm, x)
    for low in lows.values():
        assert low(x).dtype == torch.bfloat16
        for path, scheme in (("0", "symmetric"), ("2", "float")):
            layout = packed(low, path).layout
            assert (layout.scheme, layout.dtype) == (scheme, "bfloat16")
            assert low.get_submodule(path).weight.dtype == torch.bfloat16
            assert torch.equal(low.get_submodule(path).weight, gm.get_submodule(path).weight)
        assert packed(low, "2").layout.bits == 16
        assert low.get_submodule("0").bias.dtype == low.get_submodule("2").bias.dtype == torch.bfloat16


# --------------------------------------------------------------------------- random specs


NET_INPUT = (2, 3, 6, 6)
WEIGHT_MODULES = ["conv1", "conv2", "fc"]
ACTIVATION_NODES = ["act", "act_1", "add", "relu", "adaptive_avg_pool2d", "adaptive_max_pool2d", "cat", "flatten", "fc"]
STARTS = st.sampled_from([0, 1, 2, 1000])


@st.composite
def quantize_ops(draw, activation):
    bits = draw(st.integers(1, 16))
    symmetric_choices = [None, False] + ([True] if bits >= 2 else [])
    return Quantize(
        bits=bits,
        start=draw(STARTS),
        symmetric=draw(st.sampled_from(symmetric_choices)),
        per_channel=None if activation else draw(st.sampled_from([None, False])),
        learned=bits >= 2 and draw(st.booleans()),
    )


@st.composite
def prune_ops(draw, activation):
    start = draw(STARTS)
    end = draw(st.one_of(st.none(), st.integers(start + 1, start + 4)))
    dynamic = activation and draw(st.booleans())
    granularity = "channel" if activation and not dynamic and draw(st.booleans()) else "element"
    return Prune(
        sparsity=draw(st.floats(0.0, 0.95, allow_nan=False)),
        start=start,
        end=end,
        every=draw(st.integers(1, 2)),
        granularity=granularity,
        dynamic=dynamic,
    )


def op_chains(activation):
    op = st.one_of(quantize_ops(activation), prune_ops(activation))
    return st.lists(op, min_size=1, max_size=3)


@st.composite
def random_specs(draw):
    rules = []
    for path in draw(st.lists(st.sampled_from(WEIGHT_MODULES), unique=True, max_size=3)):
        rules.append(Rule(names=[path], weight=draw(op_chains(activation=False))))
    for node in draw(st.lists(st.sampled_from(ACTIVATION_NODES), unique=True, max_size=5)):
        rules.append(Rule(names=[node], activation=draw(op_chains(activation=True))))
    return Spec(rules=rules)


def test_stacked_quantizers_store_the_grid_of_the_last_one():
    # found by the random specs: the scale's axis must be that of the last active quantizer
    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(names=["fc"], weight=[Quantize(bits=1, per_channel=False), Quantize(bits=1)]),
            Rule(names=["conv1"], weight=[Quantize(bits=6), Quantize(bits=3, per_channel=False)]),
            Rule(
                names=["conv2"],
                weight=[
                    Quantize(bits=8, per_channel=False),
                    Prune(sparsity=0.5),
                    Quantize(bits=4, symmetric=False),
                    Quantize(bits=5, start=1000),
                ],
            ),
        ]
    )
    gm = trained(ReusedReluNet(), spec, images(2))
    lows = assert_lowers_exactly(gm, images(1, seed=1)[0])
    layouts = {p: packed(lows["cache"], p).layout for p in WEIGHT_MODULES}
    assert {p: (lay.scheme, lay.bits, lay.channel_axis) for p, lay in layouts.items()} == {
        "fc": ("sign", 1, 0),
        "conv1": ("symmetric", 3, None),
        "conv2": ("affine", 4, 0),
    }


RANDOM_SPEC_NET_SEED = 0


@given(spec=random_specs(), steps=st.integers(0, 3))
def test_random_specs_lower_exactly(spec, steps):
    torch.manual_seed(RANDOM_SPEC_NET_SEED)
    gm = trained(ReusedReluNet(), spec, images(steps, NET_INPUT))
    assert_lowers_exactly(gm, images(1, NET_INPUT, seed=1)[0])


# --------------------------------------------------------------------------- schedule at lowering time


def test_ops_that_have_not_started_are_dropped():
    torch.manual_seed(0)
    late = 1000
    spec = Spec(
        rules=[
            Rule(names=["conv1"], weight=[Quantize(bits=4, start=late)]),
            Rule(names=["conv2"], weight=[Prune(sparsity=0.5), Quantize(bits=4, start=late)]),
            Rule(names=["fc"], weight=[Prune(sparsity=0.5, start=late), Quantize(bits=2, learned=True, start=late)]),
            Rule(names=["act"], activation=[Quantize(bits=8, start=late)]),
            Rule(functions=["add"], activation=[Quantize(bits=4, learned=True, start=late), Prune(sparsity=0.5, start=late)]),
            Rule(functions=["relu"], activation=[Prune(sparsity=0.5, dynamic=True, start=late)]),
            Rule(functions=["cat"], activation=[Prune(sparsity=0.5, granularity="channel", start=late)]),
        ]
    )
    gm = trained(ReusedReluNet(), spec, images(3))
    x = images(1, seed=1)[0]
    lows = assert_lowers_exactly(gm, x)
    for low in lows.values():
        # no active quantizer: weights are kept as their float values
        assert {p: packed(low, p).layout.scheme for p in WEIGHT_MODULES} == {p: "float" for p in WEIGHT_MODULES}
        assert packed(low, "conv1").layout.mask.kind == "full"
        assert packed(low, "fc").layout.mask.kind == "full"
        assert packed(low, "conv2").layout.mask.nnz == 72  # the active pruner: half of 144
        assert torch.equal(low.conv1.weight, gm.conv1.parametrizations.weight.original)
        # no activation op had started: every stage is empty
        records = stage_records(low)
        assert set(records) == {"act", "act_1", "add", "relu", "cat"}
        assert all(ops == [] for ops in records.values()), records
        assert not any(isinstance(m, (FrozenQuantize, FrozenMask, TopK)) for m in low.modules())


def test_lower_does_not_modify_the_transformed_model():
    torch.manual_seed(0)
    spec = reused_relu_spec(WEIGHT_CASES["pq-sym4/qp-affine3/sign"][0])
    gm = trained(ReusedReluNet(), spec, images(3))
    x = images(1, seed=1)[0]
    before = copy.deepcopy(gm.state_dict())
    chains = {p: [type(op) for op in gm.get_submodule(p).parametrizations["weight"]] for p in WEIGHT_MODULES}
    ref = gm(x)

    low = fxqp.lower(gm)
    low_again = fxqp.lower(gm, decode="on_the_fly")  # lowering twice works
    assert_same(low_again(x), low(x))

    after = gm.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert {p: [type(op) for op in gm.get_submodule(p).parametrizations["weight"]] for p in WEIGHT_MODULES} == chains
    assert gm.conv1.parametrizations.weight.original.shape == (4, 3, 3, 3)
    assert int(gm.fxqp_schedule.step) == 3
    assert not gm.training  # lower does not switch the model's mode
    assert_same(gm(x), ref)

    # the transformed model still trains: its weights change and its step counter advances
    latent = gm.conv1.parametrizations.weight.original.detach().clone()
    train_steps(gm, images(1, seed=2))
    assert not torch.equal(gm.conv1.parametrizations.weight.original, latent)
    assert int(gm.fxqp_schedule.step) == 4
    assert "step 4" in fxqp.summary(gm).title
    # the lowered copies are independent of it
    assert_same(low(x), ref)
    assert_same(low_again(x), ref)
    # and it lowers again at its new state
    assert_lowers_exactly(gm, x)


def test_lowered_model_is_frozen():
    torch.manual_seed(0)
    spec = reused_relu_spec(WEIGHT_CASES["lsq/per-tensor/prune-only"][0])
    gm = trained(ReusedReluNet(), spec, images(2))
    gm.train()  # lowering gives an eval-mode model whatever the mode of its input
    low = fxqp.lower(gm)
    assert_is_frozen(low)
    assert low.meta["fxqp"]["step"] == 2
    assert low.meta["fxqp"]["spec"] == spec.to_dict()
    gm.eval()
    x = images(1, seed=1)[0]
    assert_same(low(x), gm(x))
    # eval forwards of the lowered model have no state to update
    state = copy.deepcopy(low.state_dict())
    low(x)
    assert all(torch.equal(low.state_dict()[k], v) for k, v in state.items())


# --------------------------------------------------------------------------- packed storage


def test_packed_site_has_exact_code_bytes_and_no_float_copy():
    torch.manual_seed(0)
    spec = Spec(rules=[Rule(names=["conv2"], weight=[Prune(sparsity=0.5), Quantize(bits=4)])])
    gm = trained(ReusedReluNet(), spec, images(2))
    numel = gm.conv2.weight.numel()
    assert numel == 144
    nnz = int((gm.conv2.weight != 0).sum())
    assert 0 < nnz <= 72  # half pruned; a kept weight may also quantize to 0
    for decode in DECODES:
        low = fxqp.lower(gm, decode=decode)
        weight = packed(low, "conv2")
        assert weight.layout.mask.nnz == nnz
        assert weight.codes.dtype == torch.uint8
        assert weight.codes.numel() == math.ceil(nnz * 4 / 8)
        assert weight.mask.numel() == weight.layout.mask.nbytes <= math.ceil(numel / 8)
        assert weight.scale.shape == (4,)
        # the float weight is not kept: the parametrization's original is an empty placeholder
        assert low.conv2.parametrizations.weight.original.numel() == 0
        stored = low.conv2.state_dict()
        assert not any(t.is_floating_point() and t.numel() >= numel for t in stored.values()), {k: t.shape for k, t in stored.items()}
        assert sum(t.numel() * t.element_size() for t in stored.values()) < numel  # < 1 byte per weight, bias included
        if decode == "on_the_fly":
            assert weight.cached is None
            assert not any(t.is_floating_point() and t.numel() >= numel for t in low.conv2.buffers())
        assert torch.equal(low.conv2.weight, gm.conv2.weight)


# --------------------------------------------------------------------------- errors


def test_lower_of_a_model_that_is_not_transformed_is_an_error():
    with pytest.raises(fxqp.FxqpError, match="fxqp.transform"):
        fxqp.lower(nn.Linear(2, 2))
    with pytest.raises(fxqp.FxqpError, match="fxqp.transform"):
        fxqp.lower(torch.fx.symbolic_trace(ReusedReluNet()))
    low = fxqp.lower(fxqp.transform(ReusedReluNet(), Spec()))
    with pytest.raises(fxqp.FxqpError):
        fxqp.lower(low)  # already lowered: no schedule left


def test_lower_with_an_unknown_decode_mode_is_a_lowering_error():
    gm = fxqp.transform(ReusedReluNet(), Spec(rules=[Rule(names=["fc"], weight=[Quantize(bits=4)])]))
    with pytest.raises(fxqp.LoweringError, match="decode"):
        fxqp.lower(gm, decode="eager")
