"""Everyday actions on a transformed model (issue 29, item 2): casting it, saving it whole
with torch.save or pickle, deep-copying it, linting a spec with ``fxqp explain``, loading an
artifact into another architecture, ``fxqp inspect`` of a file that is no artifact, and
``--model`` factories that cannot be imported."""

import copy
import json
import pickle
import textwrap

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from fxqp_test_nets import FlagReturningHelperNet, ListDetector
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.cli import main
from fxqp.lower.artifact import serialize
from fxqp.lower.inspect import inspect_artifact
from fxqp.models import DigitsNet, ModelError, build_model
from fxqp.ops import ActivationPruner, ActivationQuantizer, LsqQuantizer, WeightPruner
from fxqp.schedule import find_schedule


class ConvNet(nn.Module):
    """Convolutions, batch norm, a functional relu, a residual add and a linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        a = F.relu(self.bn(self.conv1(x)))
        b = F.relu(self.conv2(a)) + a
        return self.fc(b.mean((2, 3)))


def spec_with(dynamic: bool = False, structure: str = "element", learned: bool = False) -> Spec:
    """Weights and activations quantized (8 bits) and pruned (50%), every op active from
    step 0; masks refreshed at every step of a ramp to step 4."""
    weight = [Prune(sparsity=0.5, start=0, end=4, every=1, structure=structure), Quantize(bits=8, start=0, learned=learned)]
    if structure != "element":
        weight = [Prune(sparsity=0.5, start=0, structure=structure), Quantize(bits=8, start=0, learned=learned)]
    rules = [Rule(modules=["Conv2d", "Linear"], weight=weight)]
    if structure == "element":  # channels are removed only when no activation is pruned
        rules.append(
            Rule(
                functions=["relu", "add"],
                activation=[Quantize(bits=8, start=0, learned=learned), Prune(sparsity=0.5, start=0, end=4, every=1, dynamic=dynamic)],
            )
        )
    return Spec(rules=rules)


def batches(n, dtype=torch.float32, seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def train(gm, inputs):
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    gm.train()
    losses = []
    for x in inputs:
        opt.zero_grad()
        loss = gm(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def transformed(spec=None, **kwargs):
    torch.manual_seed(0)
    return fxqp.transform(ConvNet(), spec or spec_with(**kwargs), example_inputs=(torch.randn(2, 3, 8, 8),))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- casting


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_a_cast_model_trains_and_lowers(dtype, dynamic):
    gm = transformed(dynamic=dynamic).to(dtype)
    assert next(gm.parameters()).dtype == dtype
    x0 = batches(1, dtype, seed=7)[0]
    gm.train()
    gm(x0)  # step 0: the observers initialise
    observers = [m for m in gm.modules() if isinstance(m, ActivationQuantizer)]
    before = [(float(m.lo), float(m.hi)) for m in observers]
    losses = train(gm, batches(5, dtype))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert int(find_schedule(gm).step) == 6
    # the moving averages moved, in float32 whatever the model's dtype
    assert all(bool(m.observed) and m.lo.dtype == m.hi.dtype == torch.float32 for m in observers)
    assert [(float(m.lo), float(m.hi)) for m in observers] != before
    for m in gm.modules():
        if isinstance(m, WeightPruner):
            assert m.mask.dtype == torch.bool and m.actual_sparsity() == pytest.approx(0.5, abs=0.02)
        if isinstance(m, ActivationPruner) and not dynamic:
            assert m.running.dtype == torch.float32 and m.actual_sparsity() == pytest.approx(0.5, abs=0.02)
    conv = gm.conv1.weight
    assert conv.dtype == dtype and float((conv == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    gm.eval()
    x = batches(1, dtype, seed=1)[0]
    ref = gm(x)
    assert ref.dtype == dtype
    low = fxqp.lower(gm)
    out = low(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_cast_model_with_removed_filters_and_lsq_lowers(dtype):
    gm = transformed(structure="filter", learned=True).to(dtype)
    train(gm, batches(3, dtype))
    gm.eval()
    x = batches(1, dtype, seed=1)[0]
    ref = gm(x)
    low = fxqp.lower(gm)  # removes the pruned filters, counting MACs on the recorded example shapes
    assert low.conv1.weight.shape[0] == 4
    torch.testing.assert_close(low(x), ref, rtol=0, atol=1e-12)


def test_op_state_keeps_its_dtypes_through_casts():
    reference = {
        name: t.dtype for name, t in transformed(learned=True).state_dict().items() if "parametrizations" in name or "fxqp_" in name
    }
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        gm = cast(transformed(learned=True))
        state = gm.state_dict()
        kept = {name: state[name].dtype for name in reference if not name.endswith("original")}
        assert kept == {name: dtype for name, dtype in reference.items() if not name.endswith("original")}
    lsq = [m for m in transformed(learned=True).to(torch.bfloat16).modules() if isinstance(m, LsqQuantizer)]
    assert lsq and all(m.scale.dtype == torch.float32 and m.qp_signed.dtype == torch.float32 for m in lsq)


def test_a_model_cast_after_the_transform_computes_as_one_cast_before():
    torch.manual_seed(0)
    model = ConvNet()
    spec = spec_with()
    x = torch.randn(2, 3, 8, 8)
    before = fxqp.transform(copy.deepcopy(model).to(torch.bfloat16), spec, example_inputs=(x.to(torch.bfloat16),))
    after = fxqp.transform(model, spec, example_inputs=(x,)).to(torch.bfloat16)
    for gm in (before, after):
        train(gm, batches(3, torch.bfloat16))
    assert_same_state(before, after)


# --------------------------------------------------------------------------- whole-model saving


def test_torch_save_of_a_transformed_model_loads_back_equal_and_trains_on(tmp_path):
    gm = transformed()
    train(gm, batches(2))
    path = tmp_path / "model.pt"
    torch.save(gm, path)
    loaded = torch.load(path, weights_only=False)
    assert_same_state(gm, loaded)
    assert int(find_schedule(loaded).step) == 2
    # both train on identically: masks, observers, schedule and parameters all came back
    train(gm, batches(2, seed=3))
    train(loaded, batches(2, seed=3))
    assert_same_state(gm, loaded)
    x = batches(1, seed=9)[0]
    gm.eval(), loaded.eval()
    assert torch.equal(gm(x), loaded(x))
    assert serialize(fxqp.lower(gm)) == serialize(fxqp.lower(loaded))


def test_pickle_of_lowered_and_loaded_models_round_trips(tmp_path):
    gm = transformed(structure="filter")
    train(gm, batches(2))
    low = fxqp.lower(gm)
    fxqp.save(low, tmp_path / "m.fxqp")
    x = batches(1, seed=4)[0]
    for model in (low, fxqp.load(tmp_path / "m.fxqp", ConvNet())):
        again = pickle.loads(pickle.dumps(model))
        assert torch.equal(again(x), model(x))
        assert serialize(again) == serialize(low)


@pytest.mark.parametrize("net", ["guards_and_wrapped_functions", "traced_in_parts"])
def test_pickle_rebuilds_graphs_with_leaf_functions_and_parts(net):
    if net == "traced_in_parts":
        model, inputs = ListDetector(), ([torch.randn(3, 8, 8), torch.randn(3, 8, 8)],)
        spec = Spec(
            rules=[
                Rule(modules=["Conv2d"], weight=[Quantize(bits=4, start=0)]),
                Rule(modules=["ReLU"], activation=[Quantize(bits=8, start=0)]),
            ]
        )
    else:
        model, inputs = FlagReturningHelperNet(), (torch.randn(2, 3, 4),)
        spec = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(sparsity=0.5, start=0), Quantize(bits=4, start=0)])])
    gm = fxqp.transform(model, spec, example_inputs=inputs)
    gm.train()
    out = gm(*inputs)
    (out if torch.is_tensor(out) else sum(o.sum() for o in out)).sum().backward()
    again = pickle.loads(pickle.dumps(gm))
    assert_same_state(gm, again)
    gm.eval(), again.eval()
    expected, got = gm(*inputs), again(*inputs)
    if torch.is_tensor(expected):
        expected, got = [expected], [got]
    assert len(expected) == len(got) and all(torch.equal(a, b) for a, b in zip(expected, got))


def test_torch_save_leaves_no_truncated_file(tmp_path):
    gm = transformed()
    path = tmp_path / "model.pt"
    torch.save(gm, path)  # it raised inside torch (parametrized modules), after opening the file
    assert isinstance(torch.load(path, weights_only=False), nn.Module)


def test_deep_copy_is_equal_and_independent():
    gm = transformed()
    train(gm, batches(2))
    twin = copy.deepcopy(gm)
    assert_same_state(gm, twin)
    saved = {k: v.clone() for k, v in gm.state_dict().items()}
    train(twin, batches(3, seed=5))
    assert int(find_schedule(twin).step) == 5 and int(find_schedule(gm).step) == 2
    assert all(torch.equal(saved[k], v) for k, v in gm.state_dict().items())  # the original is untouched


def test_deep_copy_sees_its_own_step():
    """The host copy of the step (and of masks) is not carried into a copy, where the copy's
    own version counter could match it again after a few writes: the op must see the step."""
    spec = Spec(rules=[Rule(modules=["Linear"], weight=[Quantize(bits=2, start=5)])])
    gm = fxqp.transform(nn.Sequential(nn.Linear(8, 8)), spec, auto_step=False)
    x = torch.randn(3, 8)
    for _ in range(3):
        fxqp.step(gm)
        gm(x)  # reads (and caches) the step
    for steps in range(1, 5):  # steps taken by the copy before it reads the step again
        twin = copy.deepcopy(gm)
        for _ in range(steps):
            fxqp.step(twin)
        layer = twin.get_submodule("0")
        quantized = not torch.equal(layer.weight, layer.parametrizations.weight.original)
        assert quantized == (3 + steps >= 5), steps


# --------------------------------------------------------------------------- fxqp explain


def write_spec(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_explain_exits_2_when_the_spec_would_fail_at_transform(tmp_path, capsys):
    good = write_spec(
        tmp_path,
        """\
        rules:
          - modules: [Conv2d]
            weight: [{op: quantize, bits: 4}]
        """,
    )
    assert main(["explain", "--model", "digits-cnn", "--spec", good]) == 0
    capsys.readouterr()
    bad = write_spec(
        tmp_path,
        """\
        rules:
          - modules: [Conv2dd]
            weight: [{op: quantize, bits: 4}]
        """,
    )
    assert main(["explain", "--model", "digits-cnn", "--spec", bad]) == 2
    captured = capsys.readouterr()
    assert "error at transform: rules[0].modules: 'Conv2dd' is no known module class (closest: Conv2d)" in captured.out
    assert captured.err.count("\n") == 1 and "fxqp.transform would fail" in captured.err


def test_explain_reports_ops_a_site_cannot_take_as_transform_does(tmp_path, capsys):
    spec = Spec(rules=[Rule(modules=["ReLU"], activation=[Quantize(bits=4, per_channel=True)])])
    with pytest.raises(fxqp.SpecError) as raised:
        fxqp.transform(DigitsNet(), spec)
    report = fxqp.explain(DigitsNet(), spec)
    assert len(report.errors) == 1 and report.errors[0].startswith(str(raised.value))
    path = write_spec(
        tmp_path,
        """\
        rules:
          - modules: [Conv2d]
            weight: [{op: prune, sparsity: 0.5, structure: filter, criterion: angle, start: "10%"}]
        """,
    )
    assert main(["explain", "--model", "digits-cnn", "--spec", path]) == 2
    assert "criterion 'angle' compares the weight with its quantized version" in capsys.readouterr().out


def test_explain_hints_name_public_classes_only_and_no_empty_list():
    spec = Spec(
        rules=[
            Rule(modules=["ConvNd"], weight=[Quantize(bits=4)]),
            Rule(modules=["NormBase"], weight=[Quantize(bits=4)]),
            Rule(modules=["BatchNorm1d"], weight=[Quantize(bits=4)]),
            Rule(functions=["gelu"], activation=[Quantize(bits=4)]),
        ]
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    report = fxqp.explain(model, spec)
    assert report.errors == [
        "rules[0].modules: 'ConvNd' is no known module class (closest: Conv2d)",
        "rules[0] selects no weight site of this model",
        "rules[1].modules: 'NormBase' is no known module class (closest: BatchNorm2d)",
        "rules[1] selects no weight site of this model",
        "rules[2] selects no weight site of this model: rules[2].modules: 'BatchNorm1d' matches no weight site (closest: BatchNorm2d)",
        "rules[3] selects no activation site of this model: rules[3].functions: 'gelu' matches no activation site",  # no empty list
    ]
    with pytest.raises(fxqp.SpecError) as raised:
        fxqp.transform(model, spec)
    assert "_ConvNd" not in str(raised.value)


# --------------------------------------------------------------------------- loading into another model


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory):
    spec = Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Quantize(bits=4, start=0)]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8, start=0)]),
        ]
    )
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm = fxqp.transform(DigitsNet(), spec, example_inputs=(x,))
    gm(x)
    path = tmp_path_factory.mktemp("artifact") / "digits.fxqp"
    fxqp.save(fxqp.lower(gm), path)
    return path


@pytest.mark.parametrize(
    "model, message",
    [
        (
            DigitsNet(width=16),
            "site 'conv1.weight': field 'shape' is [32, 1, 3, 3] but the weight of Conv2d 'conv1' in this DigitsNet is [16, 1, 3, 3]",
        ),
        (
            DigitsNet(num_classes=5),
            "site 'fc.weight': field 'shape' is [10, 1024] but the weight of Linear 'fc' in this DigitsNet is [5, 1024]",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()),
            "site 'conv1.weight' (field 'shape' [32, 1, 3, 3]) is not in this Sequential: it has no module 'conv1'",
        ),
    ],
)
def test_loading_into_another_architecture_says_so(digits_artifact, model, message):
    with pytest.raises(fxqp.ArtifactError) as raised:
        fxqp.load(digits_artifact, model)
    assert f"{digits_artifact}: the artifact was made for another model: {message}" == str(raised.value)


def test_loading_into_a_model_whose_weights_fit_but_not_the_spec(digits_artifact):
    class NoReLU(DigitsNet):
        def forward(self, x):
            x = self.pool(self.conv2(self.conv1(x)))
            return self.fc(torch.flatten(self.conv3(x), 1))

    with pytest.raises(fxqp.ArtifactError, match="the artifact was made for another model: its spec does not fit this NoReLU"):
        fxqp.load(digits_artifact, NoReLU())


# --------------------------------------------------------------------------- fxqp inspect


def test_inspect_of_files_that_are_no_artifact(tmp_path, capsys):
    files = {
        "image.png": (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
        "notes.txt": ("an fxqp artifact? no\n" * 3, "a text file"),
        "empty.fxqp": (b"", "the file is empty"),
        "checkpoint.pt": (None, "a zip archive, such as a torch.save file"),
        "random.bin": (bytes(range(256)) * 4, "it does not start as a safetensors file does"),
    }
    for name, (content, why) in files.items():
        path = tmp_path / name
        if content is None:
            torch.save({"w": torch.zeros(3)}, path)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        with pytest.raises(fxqp.ArtifactError) as raised:
            inspect_artifact(path)
        assert str(raised.value).startswith(f"{path} is not an fxqp artifact ({why}"), str(raised.value)
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not an fxqp artifact" in err and "claims" not in err
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, plain)
    # a header of 0x280 bytes: the file starts with 80 02, as a pickle does, and is no pickle
    shaped = tmp_path / "shaped.safetensors"
    header = json.dumps({"__metadata__": {"pad": "x" * 500}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    header += b" " * (0x280 - len(header))
    shaped.write_bytes((0x280).to_bytes(8, "little") + header + b"\x00")
    with pytest.raises(fxqp.ArtifactError, match="is not an fxqp artifact \\(a safetensors file without fxqp's header"):
        inspect_artifact(shaped)
    with pytest.raises(fxqp.ArtifactError, match="is not an fxqp artifact \\(a safetensors file without fxqp's header"):
        inspect_artifact(plain)


# --------------------------------------------------------------------------- --model


def test_model_module_that_cannot_be_imported_says_how_to_fix_it():
    with pytest.raises(ModelError) as raised:
        build_model("my_models_nowhere:factory")
    message = str(raised.value)
    assert "cannot import module 'my_models_nowhere'" in message and "PYTHONPATH" in message
    assert "--model path/to/my_models_nowhere.py:factory" in message


def test_model_from_a_file(tmp_path):
    (tmp_path / "zoo.py").write_text(
        "import torch.nn as nn\n\n\nclass Net(nn.Module):\n    def __init__(self, num_classes=10):\n        super().__init__()\n"
        "        self.fc = nn.Linear(4, num_classes)\n\n    def forward(self, x):\n        return self.fc(x)\n\n\n"
        "def make(num_classes=10):\n    return Net(num_classes)\n"
    )
    (tmp_path / "broken.py").write_text("import zoo_helper_that_is_nowhere\n")
    model = build_model(f"{tmp_path / 'zoo.py'}:make", num_classes=3)
    assert model.fc.out_features == 3
    # a transformed model of a class from the file pickles (its module is registered)
    gm = fxqp.transform(model, Spec(rules=[Rule(modules=["Linear"], weight=[Quantize(bits=4)])]))
    assert isinstance(pickle.loads(pickle.dumps(gm)), nn.Module)
    with pytest.raises(ModelError, match="zoo.py has no callable 'build'; it defines Net, make"):
        build_model(f"{tmp_path / 'zoo.py'}:build")
    with pytest.raises(ModelError, match="no such file"):
        build_model(f"{tmp_path / 'nowhere.py'}:make")
    with pytest.raises(ModelError, match="running .*broken.py failed \\(ModuleNotFoundError"):
        build_model(f"{tmp_path / 'broken.py'}:make")


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half()])
def test_casting_leaves_op_state_unrounded(cast):
    """The ops' float state keeps its dtype and its values: it is not cast and cast back
    (LSQ's 16-bit grid bound 2^15 - 1 is no bfloat16 value; observed ranges would round)."""
    from fxqp.models import DigitsNet

    spec = Spec(
        rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=16, learned=True)]), Rule(modules=["ReLU"], activation=[Quantize(bits=8)])]
    )
    gm = fxqp.transform(DigitsNet(), spec)
    gm(torch.randn(4, 1, 8, 8) * 3.3)
    ops = [m for m in gm.modules() if isinstance(m, fxqp.ops.ScheduledOp)]
    before = {(id(op), k): b.clone() for op in ops for k, b in op.named_buffers(recurse=False) if b.is_floating_point()}
    assert any(bool((b.to(torch.bfloat16).float() != b).any()) for b in before.values())  # some would round
    cast(gm)
    after = {(id(op), k): b for op in ops for k, b in op.named_buffers(recurse=False) if b.is_floating_point()}
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
