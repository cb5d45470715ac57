"""Tests of fxqp.spec: construction, normalization, round trips and error messages."""

from __future__ import annotations

import json
import operator
import os
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fxqp.errors import SpecError
from fxqp.spec import (
    OP_KINDS,
    Op,
    Prune,
    Quantize,
    Rule,
    Spec,
    canonical_function_name,
)

EXAMPLE_YAML = """\
rules:
  - modules: [Conv2d, Linear]
    weight:
      - {op: prune, sparsity: 0.5, start: 100, end: 400}
      - {op: quantize, bits: 4, start: 500}
  - modules: [ReLU]
    functions: [relu, add]
    activation:
      - {op: quantize, bits: 8, start: 200}
"""

EXAMPLE_DICT = {
    "rules": [
        {
            "modules": ["Conv2d", "Linear"],
            "weight": [
                {"op": "prune", "sparsity": 0.5, "start": 100, "end": 400},
                {"op": "quantize", "bits": 4, "start": 500},
            ],
        },
        {
            "modules": ["ReLU"],
            "functions": ["relu", "add"],
            "activation": [{"op": "quantize", "bits": 8, "start": 200}],
        },
    ]
}

EXAMPLE_SPEC = Spec(
    [
        Rule(
            modules=["Conv2d", "Linear"],
            weight=[Prune(0.5, start=100, end=400), Quantize(4, start=500)],
        ),
        Rule(
            modules=["ReLU"],
            functions=[F.relu, operator.add],
            activation=[Quantize(bits=8, start=200)],
        ),
    ]
)


def one_rule(**rule: object) -> dict:
    """A spec dict holding one rule."""
    return {"rules": [rule]}


# ---------------------------------------------------------------------------------------
# The example of the docs, in every form
# ---------------------------------------------------------------------------------------


def test_example_from_dict_equals_python():
    assert Spec.from_dict(EXAMPLE_DICT) == EXAMPLE_SPEC


def test_example_from_yaml_equals_python(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(EXAMPLE_YAML)
    assert Spec.from_yaml(path) == EXAMPLE_SPEC
    assert Spec.from_yaml(str(path)) == EXAMPLE_SPEC


def test_example_from_json_equals_python(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(EXAMPLE_DICT))
    assert Spec.from_json(path) == EXAMPLE_SPEC


def test_example_to_dict_is_the_minimal_dict():
    assert EXAMPLE_SPEC.to_dict() == EXAMPLE_DICT


def test_example_fields():
    first, second = EXAMPLE_SPEC.rules
    assert first.modules == ("Conv2d", "Linear")
    assert first.activation is None
    assert first.weight == (Prune(sparsity=0.5, start=100, end=400), Quantize(bits=4, start=500))
    assert second.functions == ("relu", "add")
    assert second.weight is None
    assert len(EXAMPLE_SPEC) == 2
    assert list(EXAMPLE_SPEC) == [first, second]


def test_to_yaml_text_loads_back():
    text = EXAMPLE_SPEC.to_yaml()
    assert yaml.safe_load(text) == EXAMPLE_DICT
    assert Spec.from_dict(yaml.safe_load(text)) == EXAMPLE_SPEC


def test_to_json_text_loads_back():
    text = EXAMPLE_SPEC.to_json()
    assert json.loads(text) == EXAMPLE_DICT


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "out.yaml"
    text = EXAMPLE_SPEC.to_yaml(path)
    assert path.read_text() == text
    assert Spec.from_yaml(path) == EXAMPLE_SPEC


def test_json_file_round_trip(tmp_path):
    path = tmp_path / "out.json"
    text = EXAMPLE_SPEC.to_json(str(path))
    assert path.read_text() == text
    assert Spec.from_json(path) == EXAMPLE_SPEC


def test_to_yaml_writes_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("old content that must be replaced whole\n")
    EXAMPLE_SPEC.to_yaml(path)
    assert os.listdir(tmp_path) == ["spec.yaml"]
    assert Spec.from_yaml(path) == EXAMPLE_SPEC
    EXAMPLE_SPEC.to_json(tmp_path / "spec.json")
    assert sorted(os.listdir(tmp_path)) == ["spec.json", "spec.yaml"]


def test_write_to_missing_directory_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        EXAMPLE_SPEC.to_yaml(tmp_path / "missing" / "spec.yaml")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Empty specs and convenience
# ---------------------------------------------------------------------------------------


def test_empty_specs():
    assert Spec.from_dict({}) == Spec.empty()
    assert Spec.from_dict({"rules": []}) == Spec.empty()
    assert Spec.from_dict({"rules": None}) == Spec.empty()  # YAML "rules:" with nothing
    assert Spec() == Spec.empty()
    assert len(Spec.empty()) == 0
    assert Spec.empty().to_dict() == {"rules": []}


def test_empty_yaml_spec_round_trip(tmp_path):
    path = tmp_path / "empty.yaml"
    Spec.empty().to_yaml(path)
    assert Spec.from_yaml(path) == Spec.empty()


def test_op_kinds():
    assert OP_KINDS == {"quantize": Quantize, "prune": Prune}
    assert Quantize.kind == "quantize"
    assert Prune.kind == "prune"
    assert isinstance(Quantize(4), Op.__args__)
    assert set(Op.__args__) == {Quantize, Prune}


# ---------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------


def test_lists_become_tuples_and_rules_are_hashable():
    a = Rule(modules=["Conv2d"], names=["layer1.*"], weight=[Quantize(4)])
    b = Rule(modules=("Conv2d",), names=("layer1.*",), weight=(Quantize(4),))
    assert a == b
    assert hash(a) == hash(b)
    assert isinstance(a.modules, tuple) and isinstance(a.weight, tuple)
    assert len({a, b}) == 1
    assert hash(Spec([a])) == hash(Spec((b,)))


def test_single_entries_count_as_lists_of_one():
    rule = Rule(modules="Conv2d", functions=F.relu, names="a.*", activation=[])
    assert rule.modules == ("Conv2d",)
    assert rule.functions == ("relu",)
    assert rule.names == ("a.*",)


def test_module_class_is_stored_as_qualified_name():
    rule = Rule(modules=[torch.nn.Conv2d, "Linear"], weight=[Quantize(8)])
    assert rule.modules == ("torch.nn.modules.conv.Conv2d", "Linear")
    assert Rule.from_dict(rule.to_dict()) == rule


def test_user_module_class_is_stored_as_qualified_name():
    class Block(torch.nn.Module):
        pass

    rule = Rule(modules=[Block], weight=[])
    assert rule.modules == (f"{__name__}.test_user_module_class_is_stored_as_qualified_name.<locals>.Block",)
    assert Rule.from_dict(rule.to_dict()) == rule


def test_callables_are_stored_by_canonical_name():
    rule = Rule(functions=[F.relu, operator.iadd, torch.Tensor.add_], activation=[Quantize(8)])
    assert rule.functions == ("relu", "add", "add")


@pytest.mark.parametrize(
    "fn, name",
    [
        (F.relu, "relu"),
        (torch.relu, "relu"),
        (torch.relu_, "relu"),
        (torch.Tensor.relu_, "relu"),
        (torch.cat, "cat"),
        (torch.matmul, "matmul"),
        (operator.add, "add"),
        (operator.iadd, "add"),
        (operator.__iadd__, "add"),
        (operator.isub, "sub"),
        (operator.imul, "mul"),
        (operator.itruediv, "truediv"),
        (operator.imatmul, "matmul"),
        (operator.matmul, "matmul"),
        (torch.Tensor.add, "add"),
        (torch.Tensor.add_, "add"),
        (torch.Tensor.__add__, "add"),
        (torch.Tensor.__iadd__, "add"),
        ("relu_", "relu"),
        ("add_", "add"),
        ("iadd", "add"),
        ("__imatmul__", "matmul"),
        ("cat", "cat"),
    ],
)
def test_canonical_function_name(fn, name):
    assert canonical_function_name(fn) == name


@pytest.mark.parametrize("bad", ["", "_", "torch.cat", "not a name", lambda x: x, 3])
def test_canonical_function_name_rejects_bad_names(bad):
    with pytest.raises(SpecError, match=r"canonical_function_name: .*expected"):
        canonical_function_name(bad)


def test_sparsity_is_stored_as_float():
    op = Prune(sparsity=0)
    assert isinstance(op.sparsity, float)
    assert op == Prune(0.0)
    assert Spec.from_dict(one_rule(names="*", activation=[{"op": "prune", "sparsity": 0}])) == (
        Spec([Rule(names="*", activation=[Prune(0.0)])])
    )


def test_none_and_empty_op_lists_are_distinct_and_survive_round_trip(tmp_path):
    clears = Rule(modules=["Linear"], weight=[], activation=None)
    says_nothing = Rule(modules=["Linear"], weight=None, activation=[])
    assert clears != says_nothing
    assert clears.weight == () and clears.activation is None
    spec = Spec([clears, says_nothing])
    assert spec.to_dict() == {"rules": [{"modules": ["Linear"], "weight": []}, {"modules": ["Linear"], "activation": []}]}
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_dict(json.loads(spec.to_json())) == spec
    path = tmp_path / "s.yaml"
    spec.to_yaml(path)
    loaded = Spec.from_yaml(path)
    assert loaded == spec
    assert loaded.rules[0].weight == () and loaded.rules[0].activation is None
    assert loaded.rules[1].weight is None and loaded.rules[1].activation == ()


def test_null_op_list_in_dict_means_none():
    spec = Spec.from_dict(one_rule(modules="Linear", weight=None, activation=[]))
    assert spec.rules[0].weight is None


def test_op_to_dict_leaves_out_defaults():
    assert Quantize(4).to_dict() == {"op": "quantize", "bits": 4}
    assert Quantize(4, symmetric=False, learned=True).to_dict() == {
        "op": "quantize",
        "bits": 4,
        "symmetric": False,
        "learned": True,
    }
    assert Prune(0.25, every=10, end=50).to_dict() == {
        "op": "prune",
        "sparsity": 0.25,
        "end": 50,
        "every": 10,
    }


def test_op_from_dict():
    assert Quantize.from_dict({"op": "quantize", "bits": 3, "per_channel": False}) == Quantize(3, per_channel=False)
    assert Prune.from_dict({"sparsity": 0.5, "granularity": "channel"}) == Prune(0.5, granularity="channel")


def test_repeated_ops_are_allowed():
    rule = Rule(names="*", weight=[Quantize(8), Quantize(4), Prune(0.1), Prune(0.2)])
    assert len(rule.weight) == 4


# ---------------------------------------------------------------------------------------
# Round trips: fixed cases and a hypothesis property
# ---------------------------------------------------------------------------------------

MINIMAL_DICTS = [
    {},
    {"rules": []},
    EXAMPLE_DICT,
    one_rule(names=["re:^layer[0-9]+\\.conv$"], exclude=["*.downsample.*"], weight=[]),
    one_rule(
        modules=["torch.nn.modules.linear.Linear"],
        activation=[
            {"op": "prune", "sparsity": 0.3, "granularity": "channel", "every": 5},
            {"op": "prune", "sparsity": 0.1, "dynamic": True},
            {"op": "quantize", "bits": 1, "symmetric": True, "per_channel": False},
            {"op": "quantize", "bits": 16, "learned": True},
        ],
    ),
]


@pytest.mark.parametrize("d", MINIMAL_DICTS)
def test_minimal_dict_round_trip(d):
    expected = d if d else {"rules": []}
    assert Spec.from_dict(d).to_dict() == expected


@pytest.mark.parametrize("d", MINIMAL_DICTS)
def test_minimal_dict_round_trip_through_files(d, tmp_path):
    expected = d if d else {"rules": []}
    spec = Spec.from_dict(d)
    spec.to_yaml(tmp_path / "s.yaml")
    spec.to_json(tmp_path / "s.json")
    assert Spec.from_yaml(tmp_path / "s.yaml").to_dict() == expected
    assert Spec.from_json(tmp_path / "s.json").to_dict() == expected


steps = st.integers(min_value=0, max_value=10**6)


@st.composite
def quantize_ops(draw):
    bits = draw(st.integers(min_value=1, max_value=16))
    return Quantize(
        bits=bits,
        start=draw(steps),
        symmetric=draw(st.none() | st.booleans()),
        per_channel=draw(st.none() | st.booleans()),
        learned=draw(st.booleans()) if bits >= 2 else False,
    )


@st.composite
def prune_ops(draw, site="activation"):
    start = draw(steps)
    granularity = "element" if site == "weight" else draw(st.sampled_from(["element", "channel"]))
    dynamic = draw(st.booleans()) if site == "activation" and granularity == "element" else False
    return Prune(
        sparsity=draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True)),
        start=start,
        end=draw(st.none() | st.integers(min_value=start + 1, max_value=start + 10**6)),
        every=draw(st.integers(min_value=1, max_value=1000)),
        granularity=granularity,
        dynamic=dynamic,
    )


def op_lists(site):
    return st.none() | st.lists(quantize_ops() | prune_ops(site), max_size=4)


module_entries = st.sampled_from(["Conv2d", "Linear", "ReLU", "BatchNorm2d", torch.nn.Conv2d, torch.nn.Linear])
function_entries = st.sampled_from(["relu", "add", "cat", "matmul", F.relu, operator.add, operator.iadd, torch.Tensor.mul_])
patterns = st.sampled_from(["*", "layer1.*", "fc", "re:^layer[0-9]+$", "re:conv\\d", "*.0.*"])


@st.composite
def rules(draw):
    modules = draw(st.lists(module_entries, max_size=3))
    functions = draw(st.lists(function_entries, max_size=3))
    names = draw(st.lists(patterns, min_size=0 if modules or functions else 1, max_size=3))
    weight = draw(op_lists("weight"))
    activation = draw(op_lists("activation"))
    if weight is None and activation is None:  # a rule must say something
        activation = []
    return Rule(
        modules=modules,
        names=names,
        functions=functions,
        exclude=draw(st.lists(patterns, max_size=2)),
        weight=weight,
        activation=activation,
    )


specs = st.lists(rules(), max_size=5).map(Spec)


@given(specs)
def test_dict_round_trip_property(spec):
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@given(specs)
def test_text_round_trip_property(spec):
    assert Spec.from_dict(yaml.safe_load(spec.to_yaml())) == spec
    assert Spec.from_dict(json.loads(spec.to_json())) == spec


@given(specs)
def test_to_dict_is_a_fixed_point(spec):
    d = spec.to_dict()
    assert Spec.from_dict(d).to_dict() == d


# ---------------------------------------------------------------------------------------
# Errors of directly built ops and rules: location is the class name
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, message",
    [
        (0, r"Quantize\.bits: 0 is outside the accepted range 1\.\.16"),
        (17, r"Quantize\.bits: 17 is outside the accepted range 1\.\.16 \(an integer\)"),
        (4.0, r"Quantize\.bits: 4\.0 is not an integer; expected an integer in 1\.\.16"),
        (True, r"Quantize\.bits: True is a bool.*expected an integer in 1\.\.16"),
        ("8", r"Quantize\.bits: '8' is not an integer"),
    ],
)
def test_bad_bits(bits, message):
    with pytest.raises(SpecError, match=message):
        Quantize(bits=bits)


def test_learned_needs_two_bits():
    with pytest.raises(SpecError, match=r"Quantize\.learned: True needs bits >= 2"):
        Quantize(bits=1, learned=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 4, "start": -1}, r"Quantize\.start: -1 .*expected an integer >= 0"),
        ({"bits": 4, "symmetric": "yes"}, r"Quantize\.symmetric: 'yes' is not a bool; expected None"),
        ({"bits": 4, "per_channel": 1}, r"Quantize\.per_channel: 1 is not a bool"),
        ({"bits": 4, "learned": None}, r"Quantize\.learned: None is not a bool; expected True or"),
    ],
)
def test_bad_quantize_fields(kwargs, message):
    with pytest.raises(SpecError, match=message):
        Quantize(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": -0.1}, r"Prune\.sparsity: -0\.1 is outside the accepted range \[0, 1\)"),
        ({"sparsity": 1.0}, r"Prune\.sparsity: 1\.0 is outside the accepted range \[0, 1\)"),
        ({"sparsity": float("nan")}, r"Prune\.sparsity: nan is outside the accepted range"),
        ({"sparsity": True}, r"Prune\.sparsity: True is not a real number; expected .*\[0, 1\)"),
        ({"sparsity": "0.5"}, r"Prune\.sparsity: '0\.5' is not a real number"),
        ({"sparsity": 0.5, "start": -1}, r"Prune\.start: -1 .*expected an integer >= 0"),
        (
            {"sparsity": 0.5, "start": 10, "end": 10},
            r"Prune\.end: 10 is not after start=10 "
            r"\(misordered steps\).*> start",
        ),
        ({"sparsity": 0.5, "start": 10, "end": 3}, r"Prune\.end: 3 .*misordered steps"),
        ({"sparsity": 0.5, "end": 2.5}, r"Prune\.end: 2\.5 is not an integer"),
        ({"sparsity": 0.5, "every": 0}, r"Prune\.every: 0 .*expected an integer >= 1"),
        ({"sparsity": 0.5, "granularity": "row"}, r"Prune\.granularity: 'row' is not accepted; expected one of 'element', 'channel'"),
        ({"sparsity": 0.5, "dynamic": "no"}, r"Prune\.dynamic: 'no' is not a bool"),
        ({"sparsity": 0.5, "granularity": "channel", "dynamic": True}, r"Prune\.dynamic: True is not accepted with granularity='channel'"),
    ],
)
def test_bad_prune_fields(kwargs, message):
    with pytest.raises(SpecError, match=message):
        Prune(**kwargs)


def test_rule_without_selector():
    with pytest.raises(SpecError, match=r"^Rule: give at least one selector among modules, names, functions"):
        Rule(exclude=["*"], weight=[Quantize(4)])


def test_rule_without_ops():
    with pytest.raises(SpecError, match=r"^Rule: give weight or activation ops"):
        Rule(modules=["Conv2d"])


def test_rule_weight_prune_options_are_activation_only():
    with pytest.raises(SpecError, match=r"^Rule\.weight\[1\]\.dynamic: True is an activation-only"):
        Rule(modules=["Conv2d"], weight=[Quantize(4), Prune(0.5, dynamic=True)])
    with pytest.raises(
        SpecError,
        match=r"^Rule\.weight\[0\]\.granularity: 'channel' is an activation-only.*"
        r"'element'",
    ):
        Rule(modules=["Conv2d"], weight=[Prune(0.5, granularity="channel")])
    # The same ops are fine on activations.
    Rule(modules=["ReLU"], activation=[Prune(0.5, dynamic=True), Prune(0.5, granularity="channel")])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"modules": [3]}, r"^Rule\.modules\[0\]: 3 is not accepted; expected a module class name"),
        ({"modules": ["Conv 2d"]}, r"^Rule\.modules\[0\]: 'Conv 2d' is not accepted"),
        ({"modules": [""]}, r"^Rule\.modules\[0\]: '' is not accepted"),
        ({"modules": ["Linear", int]}, r"^Rule\.modules\[1\]: int is not a subclass of torch\.nn\.Module"),
        ({"modules": {"Linear"}}, r"^Rule\.modules: expected a list of module classes, got set"),
        ({"functions": [torch.nn.ReLU]}, r"^Rule\.functions\[0\]: ReLU is a module class, not a function; put module classes in"),
        ({"functions": [lambda x: x]}, r"^Rule\.functions\[0\]: '<lambda>' is not a function name"),
        ({"functions": ["torch.cat"]}, r"^Rule\.functions\[0\]: 'torch\.cat' is not a function"),
        ({"names": ["re:[a-"]}, r"^Rule\.names\[0\]: 're:\[a-' is not a valid regular expression"),
        ({"names": ["re:"]}, r"^Rule\.names\[0\]: 're:' has an empty regular expression"),
        ({"names": [""]}, r"^Rule\.names\[0\]: '' is not accepted; expected a non-empty glob"),
        ({"names": ["a"], "exclude": ["re:("]}, r"^Rule\.exclude\[0\]: 're:\(' is not a valid regular expression"),
        ({"names": ["a"], "exclude": [None]}, r"^Rule\.exclude\[0\]: None is not accepted"),
    ],
)
def test_bad_selectors(kwargs, message):
    with pytest.raises(SpecError, match=message):
        Rule(**{"weight": [], **kwargs})


@pytest.mark.parametrize(
    "weight, message",
    [
        (Quantize(4), r"^Rule\.weight: expected None or a list of ops .*got Quantize"),
        ([Quantize(4), "prune"], r"^Rule\.weight\[1\]: expected a Quantize or Prune op, got str"),
        ([{"op": "quantize", "bits": 4}], r"^Rule\.weight\[0\]: expected a Quantize or Prune op"),
    ],
)
def test_bad_op_lists(weight, message):
    with pytest.raises(SpecError, match=message):
        Rule(modules=["Linear"], weight=weight)


def test_non_rule_in_spec():
    rule = Rule(modules=["Linear"], weight=[])
    with pytest.raises(SpecError, match=r"^rules\[3\]: expected a Rule, got int"):
        Spec([rule, rule, rule, 3])
    with pytest.raises(SpecError, match=r"^rules\[0\]: expected a Rule, got dict"):
        Spec([{"modules": ["Linear"], "weight": []}])
    with pytest.raises(SpecError, match=r"^Spec\.rules: expected a list or tuple of Rule, got Rul"):
        Spec(rule)


# ---------------------------------------------------------------------------------------
# Errors of the dict form: full locations
# ---------------------------------------------------------------------------------------

WEIGHT_RULE = {"modules": ["Conv2d"], "weight": [{"op": "quantize", "bits": 8}]}


def with_second_rule(**rule: object) -> dict:
    """A spec dict whose rules[1] is ``rule`` (rules[0] is valid)."""
    return {"rules": [WEIGHT_RULE, rule]}


@pytest.mark.parametrize(
    "d, message",
    [
        (
            with_second_rule(modules="ReLU", activation=[{"op": "prune", "sparsity": 1.0}]),
            r"^rules\[1\]\.activation\[0\]\.sparsity: 1\.0 is outside the accepted range \[0, 1\)",
        ),
        (
            with_second_rule(modules="ReLU", activation=[{"op": "prune", "sparsity": -0.1}]),
            r"^rules\[1\]\.activation\[0\]\.sparsity: -0\.1 is outside",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": 4}, {"op": "quantize", "bits": 17}]),
            r"^rules\[1\]\.weight\[1\]\.bits: 17 is outside the accepted range 1\.\.16 "
            r"\(an integer\)$",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": 0}]),
            r"^rules\[1\]\.weight\[0\]\.bits: 0 is outside the accepted range 1\.\.16",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": 4.0}]),
            r"^rules\[1\]\.weight\[0\]\.bits: 4\.0 is not an integer; "
            r"expected an integer in 1\.\.16",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": True}]),
            r"^rules\[1\]\.weight\[0\]\.bits: True is a bool",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": 1, "learned": True}]),
            r"^rules\[1\]\.weight\[0\]\.learned: True needs bits >= 2",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": 4, "start": -1}]),
            r"^rules\[1\]\.weight\[0\]\.start: -1 .*expected an integer >= 0",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "prune", "sparsity": 0.5, "start": 100, "end": 100}]),
            r"^rules\[1\]\.weight\[0\]\.end: 100 is not after start=100 \(misordered steps\)",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "prune", "sparsity": 0.5, "every": 0}]),
            r"^rules\[1\]\.weight\[0\]\.every: 0 .*expected an integer >= 1",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "prune", "sparsity": 0.5, "dynamic": True}]),
            r"^rules\[1\]\.weight\[0\]\.dynamic: True is an activation-only option; "
            r"weights accept False",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "prune", "sparsity": 0.5, "granularity": "channel"}]),
            r"^rules\[1\]\.weight\[0\]\.granularity: 'channel' is an activation-only option",
        ),
        (
            with_second_rule(
                modules="X",
                activation=[{"op": "prune", "sparsity": 0.5, "granularity": "channel", "dynamic": True}],
            ),
            r"^rules\[1\]\.activation\[0\]\.dynamic: True is not accepted with "
            r"granularity='channel'",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize", "bits": 4, "bit": 3}]),
            r"^rules\[1\]\.weight\[0\]: unknown field 'bit' for op 'quantize' \(did you mean "
            r"'bits'\?\); accepted fields: op, bits, start, symmetric, per_channel, learned, method, scaled$",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "prune", "sparsity": 0.5, "stop": 3}]),
            r"^rules\[1\]\.weight\[0\]: unknown field 'stop' for op 'prune'.*accepted fields: "
            r"op, sparsity, start, end, every, granularity, dynamic, structure, criterion, score_from$",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantise", "bits": 4}]),
            r"^rules\[1\]\.weight\[0\]\.op: 'quantise' is not an op kind; accepted kinds: "
            r"prune, quantize$",
        ),
        (
            with_second_rule(modules="X", weight=[{"bits": 4}]),
            r"^rules\[1\]\.weight\[0\]: missing key 'op'; accepted kinds: prune, quantize$",
        ),
        (
            with_second_rule(modules="X", weight=[{"op": "quantize"}]),
            r"^rules\[1\]\.weight\[0\]\.bits: missing; it is required for op 'quantize'",
        ),
        (
            with_second_rule(modules="X", activation=[{"op": "prune", "start": 3}]),
            r"^rules\[1\]\.activation\[0\]\.sparsity: missing; it is required for op 'prune'",
        ),
        (
            with_second_rule(modules="X", weight=["quantize"]),
            r"^rules\[1\]\.weight\[0\]: expected a mapping with key 'op' \(one of prune, "
            r"quantize\), got str",
        ),
        (
            with_second_rule(modules="X", weight={"op": "quantize", "bits": 4}),
            r"^rules\[1\]\.weight: expected a list of op mappings.*got dict",
        ),
        (
            with_second_rule(module="X", weight=[]),
            r"^rules\[1\]: unknown key 'module' \(did you mean 'modules'\?\); accepted keys: "
            r"modules, names, functions, exclude, weight, activation$",
        ),
        (
            with_second_rule(exclude=["*"], weight=[]),
            r"^rules\[1\]: give at least one selector among modules, names, functions$",
        ),
        (
            with_second_rule(modules=["X"]),
            r"^rules\[1\]: give weight or activation ops",
        ),
        (
            with_second_rule(modules=["X"], weight=None, activation=None),
            r"^rules\[1\]: give weight or activation ops",
        ),
        (
            with_second_rule(names=["ok", "re:(unclosed"], weight=[]),
            r"^rules\[1\]\.names\[1\]: 're:\(unclosed' is not a valid regular expression: "
            r"missing \)",
        ),
        (
            with_second_rule(modules=["X", 3], weight=[]),
            r"^rules\[1\]\.modules\[1\]: expected a string, got int$",
        ),
        (
            with_second_rule(modules={"a": 1}, weight=[]),
            r"^rules\[1\]\.modules: expected a string or a list of strings, got dict$",
        ),
        (
            with_second_rule(functions=["relu", "torch.relu"], activation=[]),
            r"^rules\[1\]\.functions\[1\]: 'torch\.relu' is not a function name",
        ),
        (
            {"rules": [WEIGHT_RULE, ["modules", "X"]]},
            r"^rules\[1\]: expected a mapping, got list$",
        ),
        (
            {"rules": [WEIGHT_RULE], "version": 1},
            r"^spec: unknown key 'version'; accepted keys: rules$",
        ),
        (
            {"rule": []},
            r"^spec: unknown key 'rule' \(did you mean 'rules'\?\); accepted keys: rules$",
        ),
        ({"rules": {"modules": "X"}}, r"^rules: expected a list of rule mappings, got dict$"),
        ([WEIGHT_RULE], r"^spec: expected a mapping with key 'rules', got list$"),
    ],
)
def test_from_dict_errors_carry_the_full_path(d, message):
    with pytest.raises(SpecError, match=message):
        Spec.from_dict(d)


def test_rule_from_dict_default_location():
    with pytest.raises(SpecError, match=r"^Rule\.weight\[0\]\.bits: 17 is outside"):
        Rule.from_dict({"modules": "X", "weight": [{"op": "quantize", "bits": 17}]})
    with pytest.raises(SpecError, match=r"^rules\[7\]\.weight\[0\]\.bits: 17 is outside"):
        Rule.from_dict({"modules": "X", "weight": [{"op": "quantize", "bits": 17}]}, "rules[7]")


def test_op_from_dict_errors():
    with pytest.raises(SpecError, match=r"^Quantize\.bits: missing; it is required"):
        Quantize.from_dict({"op": "quantize"})
    with pytest.raises(SpecError, match=r"^Prune\.op: 'quantize' does not match; expected 'prune'"):
        Prune.from_dict({"op": "quantize", "sparsity": 0.5})
    with pytest.raises(SpecError, match=r"^x\.sparsity: 1\.5 is outside"):
        Prune.from_dict({"sparsity": 1.5}, where="x")


def test_selector_string_in_dict_form_is_a_list_of_one():
    spec = Spec.from_dict(one_rule(modules="Conv2d", names="a.*", functions="relu", exclude="a.b", weight=[]))
    assert spec.rules[0] == Rule(modules=["Conv2d"], names=["a.*"], functions=["relu"], exclude=["a.b"], weight=[])


# ---------------------------------------------------------------------------------------
# File errors
# ---------------------------------------------------------------------------------------


def at(path) -> str:
    """``path`` as a regular expression matching itself."""
    return re.escape(str(path))


def test_yaml_file_missing(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=rf"^{at(path)}: no such file$"):
        Spec.from_yaml(path)


def test_json_file_missing(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(SpecError, match=rf"^{at(path)}: no such file$"):
        Spec.from_json(path)


def test_yaml_file_is_a_directory(tmp_path):
    with pytest.raises(SpecError, match=rf"^{at(tmp_path)}: cannot be read"):
        Spec.from_yaml(tmp_path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - modules: [Conv2d\n    weight: []\n")
    with pytest.raises(SpecError, match=rf"^{at(path)}: YAML syntax error at line \d+, column \d+"):
        Spec.from_yaml(path)
    path.write_text("rules:\n  - modules: Conv2d\n   weight: x: y\n")
    with pytest.raises(SpecError, match=rf"^{at(path)}: YAML syntax error at line 3, column \d+: "):
        Spec.from_yaml(path)


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"rules": [\n  {"modules": ["Conv2d"],}\n]}\n')
    with pytest.raises(SpecError, match=rf"^{at(path)}: JSON syntax error at line 2, column \d+: "):
        Spec.from_json(path)


def test_empty_yaml_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError, match=rf"^{at(path)}: the file is empty; expected a mapping"):
        Spec.from_yaml(path)


def test_file_content_errors_name_file_and_path(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "rules:\n"
        "  - modules: [Conv2d]\n"
        "    weight: [{op: quantize, bits: 8}]\n"
        "  - modules: [ReLU]\n"
        "    activation: [{op: prune, sparsity: 1.5}]\n"
    )
    with pytest.raises(SpecError, match=rf"^{at(path)}: rules\[1\]\.activation\[0\]\.sparsity: 1\.5 is "):
        Spec.from_yaml(path)
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps({"rules": [{"modules": ["X"], "weight": [{"op": "q"}]}]}))
    with pytest.raises(SpecError, match=rf"^{at(json_path)}: rules\[0\]\.weight\[0\]\.op: 'q'"):
        Spec.from_json(json_path)


def test_yaml_scientific_notation_without_dot_is_a_string(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; the error says so instead of guessing.
    path = tmp_path / "spec.yaml"
    path.write_text("rules:\n  - names: '*'\n    activation: [{op: prune, sparsity: 1e-3}]\n")
    with pytest.raises(SpecError, match=r"sparsity: '1e-3' is not a real number"):
        Spec.from_yaml(path)


# ---------------------------------------------------------------------------------------
# Fractions of the run
# ---------------------------------------------------------------------------------------


def test_fractions_are_kept_as_written_and_round_trip(tmp_path):
    op = Prune(0.5, start="40%", end=" 64.5 %", every="6%")
    assert (op.start, op.end, op.every) == ("40%", "64.5%", "6%")
    assert op.to_dict() == {"op": "prune", "sparsity": 0.5, "start": "40%", "end": "64.5%", "every": "6%"}
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[op, Quantize(4, start="92%")])])
    path = tmp_path / "spec.yaml"
    spec.to_yaml(path)
    assert "start: 40%" in path.read_text()
    assert Spec.from_yaml(path) == spec and Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_dict(json.loads(spec.to_json())) == spec


def test_resolve_turns_fractions_into_steps():
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Prune(0.5, start="40%", end="64%", every="6%"), Quantize(4, start="92%")]),
            Rule(modules=["ReLU"], activation=[Quantize(8, start=7), Prune(0.2, start="50%", every="0.1%")]),
        ]
    )
    resolved = spec.resolve(1000)
    assert resolved.rules[0].weight == (Prune(0.5, start=400, end=640, every=60), Quantize(4, start=920))
    assert resolved.rules[1].activation == (Quantize(8, start=7), Prune(0.2, start=500, every=1))
    assert resolved.rules[0].modules == ("Conv2d",)
    assert spec.resolve(3).rules[1].activation[1].start == 2  # 1.5 steps: halves round up
    assert resolved.resolve(None) is resolved  # nothing left to resolve
    plain = Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(4, start=10)])])
    assert plain.resolve(None) is plain and plain.resolve(50) is plain


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"start": "40"},
            r"Prune\.start: '40' is not accepted; expected an integer >= 0 and < 2\*\*62 or a fraction of the run such as '40%'",
        ),
        ({"start": "140%"}, r"Prune\.start: '140%' is outside the accepted range 0% to 100% of the run"),
        ({"start": "-5%"}, r"Prune\.start: '-5%' is not accepted"),
        ({"every": "0%"}, r"Prune\.every: '0%' is outside the accepted range 0% \(exclusive\) to 100%"),
        (
            {"start": "50%", "end": "50%"},
            r"Prune\.end: '50%' is not after start='50%' \(misordered steps\); expected None or a fraction > start",
        ),
        ({"start": 1.5}, r"Prune\.start: 1\.5 is not an integer; expected an integer >= 0 and < 2\*\*62 or a fraction"),
    ],
)
def test_bad_fractions(kwargs, message):
    with pytest.raises(SpecError, match=message):
        Prune(0.5, **kwargs)


def test_resolve_errors_name_the_field():
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d"], weight=[Quantize(4, start=5)]),
            Rule(modules=["ReLU"], activation=[Prune(0.3, start=10, end="20%")]),
        ]
    )
    with pytest.raises(
        SpecError,
        match=r"^rules\[1\]\.activation\[0\]\.end: '20%' is a fraction of the run and no run length was given; pass total_steps=N",
    ):
        spec.resolve(None)
    with pytest.raises(
        SpecError, match=r"^rules\[1\]\.activation\[0\]\.end: '20%' of a run of 40 steps is step 8, not after start 10 = step 10"
    ):
        spec.resolve(40)
    with pytest.raises(SpecError, match=r"^total_steps: 0 is too small"):
        spec.resolve(0)
    assert spec.resolve(100).rules[1].activation[0].end == 20
