"""Tests for passes.trace: leaf modules, the automatic fallback and its errors."""

import copy
import functools
import importlib
import pickle

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from passes import PassError, TraceResult, UntraceableError, trace


def call_module_targets(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


class DataDependent(nn.Module):
    """Branches on a tensor value: untraceable unless it is a leaf."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -x


class RangeOverSize(nn.Module):
    """Uses a traced size as a Python int: a TypeError while tracing."""

    def forward(self, x):
        for _ in range(x.size(0)):
            x = x + 1
        return x


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.dd = DataDependent()
        self.post = nn.Linear(4, 4)

    def forward(self, x):
        return self.post(torch.relu(self.dd(self.pre(x))))


class Middle(nn.Module):
    def __init__(self):
        super().__init__()
        self.good = nn.Linear(4, 4)
        self.bad = DataDependent()

    def forward(self, x):
        return self.bad(self.good(x) * 2)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.middle = Middle()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.middle(x) + 1)


class TwoBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = DataDependent()
        self.b = RangeOverSize()

    def forward(self, x):
        return self.b(self.a(x))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.dd = DataDependent()

    def forward(self, x):
        return self.dd(x) + self.dd(x * 3)


class RootBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.mean() > 0:
            return y
        return -y


class BadThenRootBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.dd = DataDependent()

    def forward(self, x):
        y = self.dd(x)
        if y.mean() > 0:
            return y
        return -y


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, flag: bool = False):
        y = self.lin(x)
        if flag:
            y = y * 2
        return y


class MakesConstant(nn.Module):
    def forward(self, x):
        return x + torch.tensor([1.0, 2.0, 3.0, 4.0])


def assert_same_outputs(model, gm, inputs):
    for x in inputs:
        assert torch.equal(gm(x), model(x))


def random_inputs(n=4, shape=(3, 4)):
    torch.manual_seed(0)
    # both signs, so that both branches of DataDependent are taken
    return [torch.randn(*shape) * (1 if i % 2 else -5) for i in range(n)]


# -- plain tracing ------------------------------------------------------------


def test_resnet18_traces_to_the_same_function():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = trace(model)

    assert isinstance(result, TraceResult)
    gm = result.graph_module
    assert isinstance(gm, fx.GraphModule)
    assert type(gm).__name__ == "ResNet"
    assert result.fallback_leaves == ()
    assert result.leaves == ()
    gm.graph.lint()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    # the torch.nn leaves are kept, the BasicBlocks are traced through
    targets = call_module_targets(gm)
    assert "layer1.0.conv1" in targets and "fc" in targets
    assert "layer1.0" not in targets


def test_without_code_generation_the_graph_module_gets_its_code_at_recompile():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gm = trace(model, generate_code=False).graph_module

    assert type(gm).__name__ == "ResNet"
    assert "recompile" not in vars(type(gm))  # the constructor's stand-in is gone again
    assert "forward" not in vars(type(gm))  # no code yet
    with pytest.raises(RuntimeError, match="Code has not been generated"):
        _ = gm.code
    assert call_module_targets(gm) == call_module_targets(trace(model).graph_module)
    assert gm.get_submodule("layer1.0.conv1") is model.layer1[0].conv1

    gm.recompile()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    # GraphModules built afterwards, and deep copies, generate their code as usual
    fresh = fx.symbolic_trace(model)
    assert "forward" in vars(type(fresh)) and "def forward" in fresh.code
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(gm)(x), model(x))


def test_a_graph_module_built_without_code_is_torchs_once_recompiled(monkeypatch):
    """passes.trace.graph_module(generate_code=False) against torch's own construction: the
    same attributes and, once recompiled, the same code; torch's constructor generates the
    code by calling recompile exactly once (the call the stand-in replaces)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    ours = trace(model, generate_code=False).graph_module
    theirs = fx.GraphModule(model, copy.deepcopy(ours.graph), type(model).__name__)
    assert type(ours).__bases__ == type(theirs).__bases__ == (fx.GraphModule,)
    ours.recompile()
    assert sorted(vars(ours)) == sorted(vars(theirs))
    assert ours.code == theirs.code
    assert sorted(vars(type(ours))) == sorted(vars(type(theirs)))

    calls = []
    real = fx.GraphModule.recompile

    def counting(self):
        calls.append(type(self))
        return real(self)

    monkeypatch.setattr(fx.GraphModule, "recompile", counting)
    fx.GraphModule(model, copy.deepcopy(theirs.graph), "ResNet")
    assert len(calls) == 1


def test_leaf_by_path():
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = trace(model, leaf_modules=["layer1.0", "layer3"])
    targets = call_module_targets(result.graph_module)

    assert "layer1.0" in targets and "layer3" in targets
    assert not any(t.startswith(("layer1.0.", "layer3.")) for t in targets)
    assert "layer1.1.conv1" in targets
    assert result.leaves == ("layer1.0", "layer3")
    assert result.fallback_leaves == ()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.graph_module(x), model(x))


def test_leaf_by_class():
    block = torchvision.models.resnet.BasicBlock
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = trace(model, leaf_modules=[block])
    gm = result.graph_module
    blocks = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), block)]

    assert [n.target for n in blocks] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert result.leaves == tuple(n.target for n in blocks)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_leaf_given_as_single_string_and_by_alias():
    model = Nested()
    model.alias = model.middle  # the same module under a second name
    result = trace(model, leaf_modules="alias")
    assert result.leaves == ("middle",)
    assert "middle" in call_module_targets(result.graph_module)


@pytest.mark.parametrize("bad", ["nope", "middle.nope", "", 3, torch.Tensor])
def test_bad_leaf_modules_raise(bad):
    with pytest.raises(PassError):
        trace(Nested(), leaf_modules=[bad])


def test_not_a_module_raises():
    with pytest.raises(PassError, match="nn.Module"):
        trace(lambda x: x)


# -- automatic fallback -------------------------------------------------------


def test_data_dependent_submodule_becomes_a_leaf():
    model = Flat()
    result = trace(model)

    assert result.fallback_leaves == ("dd",)
    assert result.leaves == ("dd",)
    gm = result.graph_module
    assert call_module_targets(gm) == ["pre", "dd", "post"]
    gm.graph.lint()
    assert_same_outputs(model, gm, random_inputs())


def test_only_the_innermost_failing_module_becomes_a_leaf():
    model = Nested()
    result = trace(model)

    assert result.fallback_leaves == ("middle.bad",)
    assert call_module_targets(result.graph_module) == ["middle.good", "middle.bad", "head"]
    assert_same_outputs(model, result.graph_module, random_inputs())


def test_several_failing_modules_are_added_in_order():
    model = TwoBad()
    result = trace(model)
    assert result.fallback_leaves == ("a", "b")
    assert_same_outputs(model, result.graph_module, random_inputs())


def test_fallback_after_user_leaves():
    model = Nested()
    result = trace(model, leaf_modules=["head"])
    assert result.fallback_leaves == ("middle.bad",)
    assert result.leaves == ("head", "middle.bad")


def test_module_called_twice_becomes_one_leaf_with_two_call_sites():
    model = CalledTwice()
    result = trace(model)
    assert result.fallback_leaves == ("dd",)
    assert call_module_targets(result.graph_module) == ["dd", "dd"]
    assert_same_outputs(model, result.graph_module, random_inputs())


def test_concrete_args_make_a_flag_branch_traceable():
    model = Flagged()
    x = torch.randn(3, 4)
    for flag in (True, False):
        result = trace(model, concrete_args={"flag": flag})
        assert result.fallback_leaves == ()
        # the flag stays an input, checked against the traced value
        assert torch.equal(result.graph_module(x, flag), model(x, flag))
        assert [n.op for n in result.graph_module.graph.nodes].count("call_module") == 1


def test_flag_branch_without_concrete_args_is_a_root_failure():
    with pytest.raises(UntraceableError) as info:
        trace(Flagged())
    assert info.value.module_path == ""


def test_tracing_does_not_leave_constants_on_the_model():
    model = MakesConstant()
    before = set(vars(model))
    gm = trace(model).graph_module
    assert set(vars(model)) == before
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))


# -- errors -------------------------------------------------------------------


def test_root_control_flow_is_untraceable():
    with pytest.raises(UntraceableError) as info:
        trace(RootBranches())
    err = info.value

    assert isinstance(err, PassError)
    assert err.module_path == ""
    assert err.module_type == "RootBranches"
    assert err.leaves == ()
    assert err.reason.startswith("TraceError: ")
    assert "control flow" in err.reason
    message = str(err)
    assert message.startswith("cannot trace the root module (RootBranches): TraceError: ")
    assert "automatic leaves so far: []" in message
    assert isinstance(err.__cause__, fx.proxy.TraceError)


def test_root_failure_reports_the_leaves_added_before():
    with pytest.raises(UntraceableError) as info:
        trace(BadThenRootBranches())
    assert info.value.module_path == ""
    assert info.value.leaves == ("dd",)
    assert "automatic leaves so far: ['dd']" in str(info.value)


def test_autoleaf_off_names_the_innermost_module():
    model = Nested()
    model.middle.bad = RangeOverSize()
    with pytest.raises(UntraceableError) as info:
        trace(model, autoleaf=False)
    err = info.value

    assert err.module_path == "middle.bad"
    assert err.module_type == "RangeOverSize"
    assert err.reason.startswith("TypeError: ")
    assert err.leaves == ()
    assert str(err).startswith("cannot trace module 'middle.bad' (RangeOverSize): TypeError: ")


def test_retries_are_limited():
    with pytest.raises(UntraceableError) as info:
        trace(TwoBad(), max_retries=1)
    assert info.value.module_path == "b"
    assert info.value.leaves == ("a",)
    assert "max_retries" in str(info.value)


def test_failing_again_as_a_leaf_gives_up():
    class Odd(nn.Module):
        def forward(self, x, thing):
            return x if x.sum() > 0 else -x

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Odd()

        def forward(self, x):
            return self.odd(x, object())  # an object cannot be a node argument

    with pytest.raises(UntraceableError) as info:
        trace(Root())
    assert info.value.module_path == "odd"
    assert info.value.leaves == ("odd",)
    assert "even as a leaf" in str(info.value)


def test_untraceable_error_survives_pickle_and_copy():
    err = UntraceableError("a.b", "TypeError: boom", ["a.b", "c"], "Block", "hint")
    for clone in (pickle.loads(pickle.dumps(err)), copy.copy(err)):
        assert clone.module_path == "a.b"
        assert clone.reason == "TypeError: boom"
        assert clone.leaves == ("a.b", "c")
        assert clone.module_type == "Block"
        assert str(clone) == str(err)
    assert str(err) == ("cannot trace module 'a.b' (Block): TypeError: boom; automatic leaves so far: ['a.b', 'c']. hint")


class _OptionalDropout(nn.Module):
    """Reads ``self.training`` only when ``p > 0`` (like torchvision's dense layers)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = torch.relu(self.fc(x))
        if self.p > 0:
            x = nn.functional.dropout(x, self.p, training=self.training)
        return x


class _TwoOptionalDropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = _OptionalDropout(0.0)
        self.dropping = nn.Sequential(_OptionalDropout(0.5))

    def forward(self, x):
        return self.dropping(self.plain(x))


def test_a_training_flag_on_an_untaken_branch_changes_nothing():
    model = _TwoOptionalDropouts()
    model.plain.eval()
    result = trace(model)
    # only the instance whose dropout runs differs by mode: its dropout is switched, its
    # Linear and ReLU stay in the graph; nothing is a leaf
    assert result.mode_leaves == () and result.leaves == ()
    assert result.mode_switches == ("dropping.0.fxqp_mode_0",)
    called = [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"]
    assert called == ["plain.fc", "dropping.0.fc", "dropping.0.fxqp_mode_0"]
    assert [m.training for m in model.modules()] == [True, False, False, True, True, True]
    gm = result.graph_module
    x = torch.randn(64, 4)
    gm.eval()
    assert torch.equal(gm(x), gm(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropping.0 still drops in training

    model = nn.Sequential(_OptionalDropout(0.0), _OptionalDropout(0.0))
    result = trace(model)
    assert result.mode_leaves == () and result.mode_switches == ()
    assert [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"] == ["0.fc", "1.fc"]


def test_densenet_layers_are_traced_through():
    model = torchvision.models.densenet121(num_classes=10)
    result = trace(model)
    assert result.mode_leaves == () and result.leaves == ()
    cats = [n for n in result.graph_module.graph.nodes if n.target is torch.cat]
    assert len(cats) > 58  # one per dense layer, and one per block
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(result.graph_module.eval()(x), model(x))


class _Gate(nn.Module):
    """Reads the flag, returns a tuple, holds a parameter that the root also reads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        y = self.fc(x) * self.scale
        return (y, y + 1) if self.training else (y, y - 1)


class _Passthrough(nn.Module):
    """Returns its input unchanged in training mode: its traced call creates no node."""

    def forward(self, x):
        return x if self.training else x * 0.5


class _Scale(nn.Module):
    def forward(self, x):
        return x * 2 if self.training else x * 3


class _Outer(nn.Module):
    """A flag-reading module with another one inside."""

    def __init__(self):
        super().__init__()
        self.inner = _Scale()

    def forward(self, x):
        x = self.inner(x)
        return x + 1 if self.training else x


class _DictOut(nn.Module):
    def forward(self, x):
        return {"y": x * 2 if self.training else x}


class _ModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()
        self.outer = _Outer()

    def forward(self, x):
        a, b = self.gate(x)
        c, d = self.gate(b)  # the module again, on an output of its first call
        f = self.outer(a + d)
        return f * self.gate.scale + c  # a parameter of a folded module, read after it


@pytest.fixture
def count_traces(monkeypatch):
    trace_module = importlib.import_module("passes.trace")  # `passes.trace` is also the function
    calls = []
    original = trace_module._FallbackTracer.trace

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trace_module._FallbackTracer, "trace", counted)
    return calls


def _same_in_every_mode(model, gm, *inputs):
    for mode in (True, False, True):
        model.train(mode)
        gm.train(mode)
        assert torch.equal(gm(*inputs), model(*inputs))


def test_flag_reading_code_is_switched_and_the_modules_stay_traced(count_traces):
    model = _ModeNet()
    result = trace(model)
    gm = result.graph_module
    gm.graph.lint()
    assert len(count_traces) == 2  # one trace per mode
    assert result.mode_leaves == () and result.fallback_leaves == ()
    # the module called twice gets a switch per call; the nested flag readers, whose
    # differences are next to each other, one switch inside the outer module
    assert result.mode_switches == ("gate.fxqp_mode_0", "gate.fxqp_mode_1", "outer.fxqp_mode_0")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [
        "gate.fc",
        "gate.fxqp_mode_0",
        "gate.fc",
        "gate.fxqp_mode_1",
        "outer.fxqp_mode_0",
    ]
    _same_in_every_mode(model, gm, torch.randn(3, 4))


@pytest.mark.parametrize("module, use", [(_DictOut, lambda out: out["y"]), (_Passthrough, lambda out: out)], ids=["dict", "passthrough"])
def test_a_mode_that_passes_a_value_through_is_switched(module, use, count_traces):
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module()

        def forward(self, x):
            return use(self.m(x)) + x  # the passthrough's input is used after it, too

    model = Root()
    result = trace(model)
    assert len(count_traces) == 2
    assert result.mode_leaves == () and result.mode_switches == ("m.fxqp_mode_0",)
    assert [n.target for n in result.graph_module.graph.nodes if n.op == "call_module"] == ["m.fxqp_mode_0"]
    _same_in_every_mode(model, result.graph_module, torch.randn(2, 3))


def test_a_switch_reads_the_constants_of_its_trace(count_traces):
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = _Gate()

        def forward(self):  # no inputs: a constant tensor starts the graph
            return self.gate(torch.ones(2, 4))[1]

    model = Root()
    result = trace(model)
    assert len(count_traces) == 2 and result.mode_leaves == () and result.mode_switches == ("gate.fxqp_mode_0",)
    result.graph_module.graph.lint()
    _same_in_every_mode(model, result.graph_module)


def _returns_tuple(fn):
    """A ``(self, *args, **kwargs)`` decorator, as Hugging Face's ``can_return_tuple``."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        as_tuple = kwargs.pop("as_tuple", False)
        out = fn(self, *args, **kwargs)
        return (out,) if as_tuple else out

    return wrapper


class _Decorated(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    @_returns_tuple
    def forward(self, ids, mask=None, scale=None, **kwargs):
        x = self.emb(ids)
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        if scale is not None:
            x = x * scale
        return torch.relu(self.fc(x))


def _placeholders(gm):
    return [(n.target, n.args) for n in gm.graph.nodes if n.op == "placeholder"]


def test_a_forward_behind_a_decorator_is_traced_with_its_own_parameters():
    model = _Decorated()
    ids, mask = torch.randint(0, 10, (2, 5)), torch.rand(2, 5)
    gm = trace(model).graph_module  # no examples: every named parameter, with its default
    assert _placeholders(gm) == [("ids", ()), ("mask", (None,)), ("scale", (None,))]
    gm = trace(model, example_inputs={"ids": ids, "mask": mask}).graph_module
    assert _placeholders(gm) == [("ids", ()), ("mask", ())]  # scale is traced as None
    assert torch.equal(gm(ids, mask), model(ids, mask))
    assert torch.equal(gm(ids=ids, mask=mask), model(ids, mask=mask))
    gm = trace(model, example_inputs=(ids,)).graph_module  # positional: the first parameters
    assert _placeholders(gm) == [("ids", ())]
    assert torch.equal(gm(ids), model(ids))


def test_example_inputs_that_do_not_fit_the_signature_are_errors():
    model = _Decorated()
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(PassError, match="has no parameter 'maks'; its parameters: ids, mask, scale"):
        trace(model, example_inputs={"ids": ids, "maks": ids})
    with pytest.raises(PassError, match="4 positional inputs, but _Decorated.forward takes 3"):
        trace(model, example_inputs=(ids, ids, ids, ids))
    with pytest.raises(PassError, match="parameter 'ids' has no default value and no example input"):
        trace(model, example_inputs={"mask": ids})


class Output(dict):
    """A model's output object (as Hugging Face's ``ModelOutput``): a dict subclass."""

    @property
    def logits(self):
        return self["logits"]


class ReturnsOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return Output(logits=self.fc(x), hidden=x)


def test_a_dict_subclass_output_keeps_its_class():
    gm = trace(ReturnsOutput()).graph_module
    out = gm(torch.randn(2, 4))
    assert type(out) is Output and out.logits.shape == (2, 3)
    from passes import non_tensor_nodes

    rebuilt = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is Output]
    assert len(rebuilt) == 1 and rebuilt[0] in non_tensor_nodes(gm.graph)  # no activation site


def test_an_ordered_dict_output_with_keys_that_are_no_identifiers_keeps_its_class():
    from collections import OrderedDict

    class Levels(nn.Module):
        def forward(self, x):
            return OrderedDict([("0", x), ("p6", x * 2)])

    out = trace(Levels()).graph_module(torch.ones(2))
    assert type(out) is OrderedDict and list(out) == ["0", "p6"] and torch.equal(out["p6"], torch.full((2,), 2.0))
