"""fxqp.testing.strategies: drawn models, ops, specs and schedules are what they promise."""

import dataclasses
from collections import Counter

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument, NoSuchExample
from torch import nn

import fxqp
from fxqp.ops import build_op
from fxqp.schedule import find_schedule
from fxqp.sites import Site, discover_sites, selector_problems
from fxqp.spec import Prune, Quantize, Rule, Spec
from fxqp.testing.strategies import (
    ACTIVATIONS,
    BATCH,
    BLOCK_KINDS,
    COMMON_FUNCTIONS,
    COMMON_MODULES,
    Block,
    DrawnNet,
    ExampleInputs,
    NetPlan,
    build_model,
    models,
    ops,
    plans,
    run_schedule,
    schedules,
    specs,
)
from passes import canonical_target_name, trace

# A handful of examples is enough where one example traces, transforms and trains a net.
SLOW = settings(max_examples=15)


def traced(net):
    return trace(net).graph_module


def expected_functions(plan: NetPlan) -> set[str]:
    """Canonical names of the function calls the forward of ``DrawnNet(plan)`` makes."""
    names = {"flatten"}
    if plan.head_pool == "function":
        names.add(f"adaptive_avg_pool{plan.dims}d")
    for block in plan.blocks:
        if block.kind == "pool":
            if block.call == "function":
                names.add(f"{block.pool}_pool{plan.dims}d")
            continue
        if block.call == "function":
            names.add(block.act)
        if block.kind == "residual":
            names.add("add")
        if block.kind == "cat":
            names.add("cat")
    return names


# --------------------------------------------------------------------------- models


@given(models())
def test_drawn_models_trace_and_train(model_and_inputs):
    net, inputs = model_and_inputs
    assert isinstance(net, DrawnNet) and isinstance(inputs, tuple)
    assert inputs[0].shape == net.plan.input_shape() and inputs[0].shape[0] == BATCH
    gm = traced(net)
    gm.train()
    out = gm(*inputs)
    assert out.shape == (BATCH, net.plan.classes)
    out.square().mean().backward()
    grads = [p.grad for p in gm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    net.train()
    torch.testing.assert_close(net(*inputs), out.detach())


@given(models())
def test_drawn_models_mix_module_and_function_calls(model_and_inputs):
    net, _ = model_and_inputs
    plan = net.plan
    nodes = list(traced(net).graph.nodes)
    calls = Counter(str(n.target) for n in nodes if n.op == "call_module")
    functions = {canonical_target_name(n) for n in nodes if n.op == "call_function"}
    assert calls and functions
    # one module object at two call sites at least: the shared activation
    assert calls["act"] == 2 + sum((2 if b.kind == "shared_conv" else 1) for b in plan.blocks if b.kind != "pool" and b.call == "shared")
    assert expected_functions(plan) <= functions
    conv = nn.Conv1d if plan.dims == 1 else nn.Conv2d
    assert isinstance(net.stem, conv) and isinstance(net.fc, nn.Linear)
    for i, block in enumerate(plan.blocks):
        if block.kind == "pool":
            assert calls[f"blocks.{i}.pool"] == (1 if block.call == "module" else 0)
            continue
        layer = net.blocks[i]["conv"]
        assert isinstance(layer, conv) and layer.groups == block.groups == plan.groups_of(block)
        assert plan.width % block.groups == 0
        if block.kind == "depthwise":
            assert layer.groups == plan.width
        assert calls[f"blocks.{i}.conv"] == (2 if block.kind == "shared_conv" else 1)
        if block.call == "module":
            assert isinstance(net.blocks[i]["act"], (nn.ReLU, nn.GELU, nn.SiLU))


# hypothesis' find, deterministic, without a database and without shrinking (not needed here)
FIND = settings(database=None, max_examples=2000, derandomize=True, phases=[Phase.generate])


FEATURES = {
    "Conv1d": lambda p: p.dims == 1,
    "Conv2d": lambda p: p.dims == 2,
    "grouped conv": lambda p: any(b.kind == "conv" and 1 < b.groups < p.width for b in p.blocks),
    "batch norm": lambda p: any(b.kind != "pool" and b.norm for b in p.blocks),
    "adaptive pool as module": lambda p: p.head_pool == "module",
    "adaptive pool as function": lambda p: p.head_pool == "function",
    "shared activation in a block": lambda p: any(b.kind != "pool" and b.call == "shared" for b in p.blocks),
    **{f"block {kind}": (lambda p, kind=kind: any(b.kind == kind for b in p.blocks)) for kind in BLOCK_KINDS},
    **{
        f"{call} {act}": (lambda p, act=act, call=call: any(b.kind != "pool" and b.act == act and b.call == call for b in p.blocks))
        for act in ACTIVATIONS
        for call in ("module", "function")
    },
    **{
        f"{pool} pool as {call}": (
            lambda p, pool=pool, call=call: any(b.kind == "pool" and b.pool == pool and b.call == call for b in p.blocks)
        )
        for pool in ("avg", "max")
        for call in ("module", "function")
    },
}


def test_every_promised_feature_can_be_drawn():
    for name, predicate in FEATURES.items():
        plan = find(plans(), predicate, settings=FIND)
        assert predicate(plan), name
        net = DrawnNet(plan)
        assert net(*net.example_inputs()).shape == (BATCH, plan.classes), name


@given(models())
def test_drawn_models_are_reproducible(model_and_inputs):
    net, inputs = model_and_inputs
    rng = torch.get_rng_state()
    again = DrawnNet(net.plan)
    assert torch.equal(torch.get_rng_state(), rng)  # building draws nothing from the global RNG
    again_inputs = again.example_inputs()
    assert torch.equal(again_inputs[0], inputs[0])
    assert net.state_dict().keys() == again.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    for mode in (False, True):
        net.train(mode)
        again.train(mode)
        assert torch.equal(net(*inputs), again(*again_inputs))


def test_reprs_are_short_and_readable():
    plan = NetPlan(
        dims=2,
        in_channels=3,
        width=4,
        size=(6, 5),
        classes=3,
        shared_act="relu",
        stem_norm=True,
        head_pool="function",
        blocks=(Block("conv", act="gelu", call="function", norm=True, groups=2), Block("pool", call="module", pool="max")),
        seed=7,
    )
    net = DrawnNet(plan)
    assert repr(net) == (
        "DrawnNet(Conv2d in=3 width=4 size=6x5 seed=7: stem(bn, shared ReLU) -> conv(groups=2, bn, F.gelu)"
        " -> pool(nn.max) -> head(F.adaptive_avg_pool, Linear->3))"
    )
    assert repr(net.example_inputs()) == "ExampleInputs(randn(2, 3, 6, 5))"
    assert isinstance(net.example_inputs(), ExampleInputs)


def test_channels_last_plans_build_channels_last_nets_and_inputs():
    plan = find(plans(max_blocks=2), lambda p: p.channels_last and p.in_channels > 1, settings=FIND)
    assert plan.dims == 2 and "Conv2d channels_last" in plan.describe()
    net, (x,) = build_model(plan)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # (a weight with one input channel or a 1x1 kernel is both contiguous and channels-last)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1 and m.weight[0, 0].numel() > 1]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous() for c in convs)
    contiguous = DrawnNet(dataclasses.replace(plan, channels_last=False))
    # the same weights and input values, another memory layout
    for key, value in contiguous.state_dict().items():
        assert torch.equal(value, net.state_dict()[key]), key
    assert torch.equal(contiguous.example_inputs()[0], x)
    torch.testing.assert_close(net(x), contiguous(x.contiguous()))


# --------------------------------------------------------------------------- ops


def _site(kind):
    if kind == "weight":
        return Site(kind="weight", name="conv.weight", target="Conv2d", module_path="conv", shape=(4, 3, 3, 3), channel_axis=0)
    return Site(kind="activation", name="relu", target="relu", function="relu")


@pytest.mark.parametrize("kind", ["weight", "activation"])
@given(data=st.data())
def test_ops_are_valid_for_their_kind(kind, data):
    max_step = data.draw(st.integers(0, 30), label="max_step")
    drawn = data.draw(ops(kind, max_step), label="ops")
    assert isinstance(drawn, list) and len(drawn) <= 3
    rule = Rule(names=["*"], **{kind: drawn})  # the spec accepts the list for this kind
    assert list(getattr(rule, kind)) == drawn
    weight = torch.randn(4, 3, 3, 3)
    for op in drawn:
        assert isinstance(op, (Quantize, Prune))
        assert 0 <= op.start <= max_step
        if isinstance(op, Quantize):
            assert 1 <= op.bits <= 16
            assert op.bits >= 2 or not op.learned
            if kind == "activation":
                assert op.per_channel in (None, False)
                assert op.bits >= 2 or op.symmetric is not True
        else:
            assert 0.0 <= op.sparsity <= 0.95
            assert op.end is None or op.start < op.end <= op.start + max(1, max_step)
            assert 1 <= op.every <= 3
            if kind == "weight":
                assert op.granularity == "element" and not op.dynamic
            elif op.granularity == "channel":
                assert not op.dynamic
        build_op(op, _site(kind), weight if kind == "weight" else None)  # the transform accepts it too


def test_ops_come_in_either_order():
    kinds = lambda drawn: [type(op).__name__ for op in drawn]  # noqa: E731
    assert kinds(find(ops("weight"), lambda d: kinds(d) == ["Prune", "Quantize"], settings=FIND)) == ["Prune", "Quantize"]
    assert kinds(find(ops("weight"), lambda d: kinds(d) == ["Quantize", "Prune"], settings=FIND)) == ["Quantize", "Prune"]
    dynamic = find(ops("activation"), lambda d: any(isinstance(op, Prune) and op.dynamic for op in d), settings=FIND)
    assert any(isinstance(op, Prune) and op.dynamic and op.granularity == "element" for op in dynamic)


# --------------------------------------------------------------------------- specs


@given(specs())
def test_specs_without_a_model_use_common_names_and_round_trip(spec):
    assert isinstance(spec, Spec) and len(spec) <= 3
    for rule in spec:
        assert set(rule.modules) <= set(COMMON_MODULES)
        assert set(rule.functions) <= set(COMMON_FUNCTIONS)
        assert rule.weight is not None or rule.activation is not None
    assert Spec.from_dict(spec.to_dict()) == spec


@SLOW
@given(st.data())
def test_specs_drawn_for_a_model_select_real_sites_and_transform(data):
    net, inputs = data.draw(models(), label="model")
    spec = data.draw(specs(net, max_step=6), label="spec")
    weight_sites, activation_sites = discover_sites(traced(net))
    assert selector_problems(spec, weight_sites, activation_sites) == ([], [])  # every entry matches
    class_names = {type(m).__name__ for m in net.modules()}
    for rule in spec:
        assert set(rule.modules) <= class_names
        assert set(rule.functions) <= {s.function for s in activation_sites}
    gm = fxqp.transform(net, spec)
    gm.train()
    out = gm(*inputs)
    assert out.shape == (BATCH, net.plan.classes)
    out.square().mean().backward()
    assert torch.isfinite(out).all()


def test_specs_of_a_model_without_sites_are_empty():
    class Nothing(nn.Module):
        def forward(self, x):
            return x

    assert find(specs(Nothing()), lambda s: True) == Spec()


# --------------------------------------------------------------------------- schedules


@given(st.integers(1, 40).flatmap(lambda m: st.tuples(st.just(m), schedules(m))))
def test_schedules_train_at_least_once_within_the_step_budget(max_and_actions):
    max_steps, actions = max_and_actions
    assert 1 <= len(actions) <= 6
    assert any(a[0] == "train" for a in actions)
    for action in actions:
        assert action == ("eval",) or (action[0] in ("train", "step") and len(action) == 2 and action[1] >= 1)
    assert sum(a[1] for a in actions if a[0] != "eval") <= max_steps


@SLOW
@given(st.data())
def test_run_schedule_drives_the_step_counter(data):
    net, inputs = data.draw(models(max_blocks=2), label="model")
    actions = data.draw(schedules(12), label="actions")
    gm = fxqp.transform(net, data.draw(specs(net, max_rules=2, max_step=8), label="spec"))
    out = run_schedule(gm, inputs, actions)
    assert int(find_schedule(gm).step) == sum(a[1] for a in actions if a[0] != "eval")
    assert out.shape == (BATCH, net.plan.classes) and torch.isfinite(out).all()
    assert gm.training == (next(a for a in reversed(actions) if a[0] != "step")[0] == "train")


# --------------------------------------------------------------------------- arguments


def test_hand_written_plans_are_checked():
    with pytest.raises(ValueError, match="Block.kind"):
        Block("attention")
    with pytest.raises(ValueError, match="Block.call"):
        Block("pool", call="shared")
    with pytest.raises(ValueError, match="does not divide width=6"):
        NetPlan(
            dims=1,
            in_channels=1,
            width=6,
            size=(4,),
            classes=2,
            shared_act="relu",
            stem_norm=False,
            head_pool="module",
            blocks=(Block("conv", groups=4),),
            seed=0,
        )
    with pytest.raises(ValueError, match="channels_last: only for dims=2"):
        NetPlan(
            dims=1,
            in_channels=1,
            width=6,
            size=(4,),
            classes=2,
            shared_act="relu",
            stem_norm=False,
            head_pool="module",
            blocks=(),
            seed=0,
            channels_last=True,
        )
    depthwise = NetPlan(
        dims=1,
        in_channels=1,
        width=6,
        size=(4,),
        classes=2,
        shared_act="relu",
        stem_norm=False,
        head_pool="module",
        blocks=(Block("depthwise"),),
        seed=0,
    )
    assert DrawnNet(depthwise).blocks[0]["conv"].groups == 6


@pytest.mark.parametrize(
    "make",
    [
        lambda: ops("bias"),
        lambda: ops("weight", max_step=-1),
        lambda: schedules(0),
        lambda: plans(-1),
        lambda: models(max_blocks=1.5),
        lambda: specs(max_rules=-1),
        lambda: specs(model="resnet"),
    ],
)
def test_bad_arguments_raise_invalid_argument(make):
    with pytest.raises(InvalidArgument):
        make()


# --------------------------------------------------------------------------- structured pruning


def _weight_prunes(spec):
    return [op for rule in spec for op in (rule.weight or ()) if isinstance(op, Prune)]


STRUCTURED = settings(database=None, max_examples=300, derandomize=True, phases=[Phase.generate], deadline=None)
model_specs = models(max_blocks=3).flatmap(lambda m: st.tuples(st.just(m), specs(m[0], max_step=6)))


@pytest.mark.parametrize(
    "feature, predicate",
    [
        ("filter", lambda p: p.structure == "filter"),
        ("channel", lambda p: p.structure == "channel"),
        ("N:M", lambda p: p.n_of_m is not None),
        ("angle", lambda p: p.criterion == "angle"),
        ("l2", lambda p: p.criterion == "l2"),
        ("score_from next", lambda p: p.score_from == "next"),
    ],
)
def test_specs_of_a_model_draw_structured_pruning(feature, predicate):
    (net, _), spec = find(model_specs, lambda ms: any(predicate(p) for p in _weight_prunes(ms[1])), settings=FIND)
    assert any(predicate(p) for p in _weight_prunes(spec)), feature


def test_many_drawn_specs_include_structured_pruning():
    drawn = []

    @STRUCTURED
    @given(model_specs)
    def collect(model_and_spec):
        drawn.append(model_and_spec[1])

    collect()
    pruned = [s for s in drawn if _weight_prunes(s)]
    structured = [s for s in pruned if any(p.structure != "element" for p in _weight_prunes(s))]
    # a structure other than "element" needs every weight site a rule selects to take it;
    # after the whole suite this test drew 6 structured of 43 weight pruners (the draws
    # differ with what ran before in the process)
    assert len(drawn) == 300 and len(structured) >= 5 and 10 * len(structured) >= len(pruned), (len(drawn), len(pruned), len(structured))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_drawn_structured_specs_are_valid_for_every_site_and_transform(data):
    from fxqp.rules import PRUNE_CRITERIA, prune_structure
    from fxqp.sites import plan_sites
    from fxqp.transform import op_problems

    net, inputs = data.draw(models(max_blocks=3), label="model")
    spec = data.draw(specs(net, max_step=6), label="spec")
    assert Spec.from_dict(spec.to_dict()) == spec  # the spec's own checks accept it
    plan = plan_sites(traced(net), spec)
    assert op_problems(net, plan) == []  # every op goes on every site it selects
    for assignment in plan.weights:
        quantized = any(isinstance(op, Quantize) for op in assignment.ops)
        for op in assignment.ops:
            if isinstance(op, Prune):
                structure = prune_structure(op.structure)
                assert structure.fits(assignment.site.shape, assignment.site.channel_axis)
                assert quantized or not PRUNE_CRITERIA[op.criterion].needs_quantizer
    for assignment in plan.activations:
        assert all(op.structure == "element" for op in assignment.ops if isinstance(op, Prune))
    gm = fxqp.transform(net, spec, example_inputs=inputs)  # with coupled filter groups
    gm.train()
    out = gm(*inputs)
    out.square().mean().backward()
    assert torch.isfinite(out).all()


@given(data=st.data())
def test_ops_for_given_weight_sites_fit_every_one_of_them(data):
    from fxqp.rules import prune_structure

    shapes = [(8, 4, 3, 3), (6, 4, 3), (5, 8)]
    sites = [
        Site(kind="weight", name=f"w{i}.weight", target="Conv2d", module_path=f"w{i}", shape=shape, channel_axis=0)
        for i, shape in enumerate(data.draw(st.lists(st.sampled_from(shapes), min_size=1, max_size=3), label="shapes"))
    ]
    drawn = data.draw(ops("weight", 6, weights=sites), label="ops")
    for op in drawn:
        if isinstance(op, Prune):
            if op.n_of_m is not None:
                assert all(s.shape[1] % op.n_of_m.m == 0 for s in sites)  # in dims 4 (and 8): M in 2, 4
                assert op.n_of_m.m in (2, 4) and op.end is None and op.sparsity == op.n_of_m.sparsity
            assert prune_structure(op.structure) is not None
            if op.criterion == "angle":
                assert any(isinstance(other, Quantize) for other in drawn)
        for site in sites:
            build_op(op, site, torch.randn(site.shape))


def test_ops_of_one_dimensional_weights_prune_elements_only():
    bias_like = Site(kind="weight", name="bn.weight", target="BatchNorm2d", module_path="bn", shape=(8,), channel_axis=None)
    assert find(ops("weight", weights=[bias_like]), lambda d: any(isinstance(op, Prune) for op in d), settings=FIND)
    with pytest.raises(NoSuchExample):
        find(
            ops("weight", weights=[bias_like]),
            lambda d: any(isinstance(op, Prune) and op.structure != "element" for op in d),
            settings=FIND,
        )


def test_weights_are_only_for_weight_ops():
    with pytest.raises(InvalidArgument):
        ops("activation", weights=[])
