"""fxqp.export: a lowered model as a torch.export program that decodes its packed weights in
the graph and runs in a process that has only torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from fxqp_test_nets import ReusedReluNet
from lowering_helpers import RESNET_SPEC, images, train_steps
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.lower import PackedWeight

# --------------------------------------------------------------------------- helpers


def assert_same(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if not torch.equal(out, ref):
        diff = (out.double() - ref.double()).abs().max().item()
        assert diff <= 1e-6, f"exported output differs from the lowered model's: max abs diff {diff:g}"


def packed_sites(low):
    """{site: (PackedWeight, dense weight shape)} of the quantized (bit-packed) weight sites."""
    out = {}
    for module in low.modules():
        if isinstance(module, PackedWeight) and module.layout.scheme != "float":
            out[module.site] = module
    return out


def graph_targets(program):
    return {str(node.target) for node in program.graph.nodes if node.op == "call_function"}


def program_tensors(program):
    """Every tensor the program carries: parameters, buffers and lifted constants."""
    tensors = dict(program.state_dict)
    tensors.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    return tensors


# Runs in a fresh interpreter: fxqp and this repository's packages cannot even be imported.
PLAIN_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("fxqp", "passes"):
                raise ImportError("the deployment imports " + name)
            return None

    sys.meta_path.insert(0, Refuse())
    import torch

    for program, inputs, outputs in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
        ep = torch.export.load(program)
        x = torch.load(inputs, weights_only=True)
        y = ep.module()(x)
        torch.save(y, outputs)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("fxqp", "passes"))
    assert not loaded, loaded
    assert "fxqp" not in sys.modules
    print("ok")
    """
)


def run_with_plain_torch(tmp_path, programs):
    """Run each ``(name, path of a .pt2, input)`` in one subprocess with plain torch; return
    the outputs by name."""
    argv = []
    for name, program, x in programs:
        torch.save(x, tmp_path / f"{name}-x.pt")
        argv += [str(program), str(tmp_path / f"{name}-x.pt"), str(tmp_path / f"{name}-y.pt")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TORCH_SCRIPT, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-4000:]
    return {name: torch.load(tmp_path / f"{name}-y.pt", weights_only=True) for name, _, _ in programs}


SMALL_SPEC = Spec(
    rules=[
        Rule(names=["conv1"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
        Rule(names=["conv2"], weight=[Quantize(bits=3, symmetric=False), Prune(sparsity=0.3)]),
        Rule(names=["fc"], weight=[Prune(sparsity=0.5), Quantize(bits=1)]),
        Rule(names=["act"], activation=[Quantize(bits=8)]),
        Rule(functions=["add"], activation=[Quantize(bits=5, learned=True)]),
        Rule(functions=["relu"], activation=[Prune(sparsity=0.3)]),
        Rule(functions=["cat"], activation=[Prune(sparsity=0.5, granularity="channel")]),
        Rule(names=["fc"], activation=[Quantize(bits=4), Prune(sparsity=0.4, dynamic=True)]),
    ]
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small net and resnet18, lowered with decode="cache", exported, and run once in a
    plain-torch subprocess."""
    tmp = tmp_path_factory.mktemp("export")
    cases = {}
    torch.manual_seed(0)
    small = fxqp.lower(train_steps(fxqp.transform(ReusedReluNet(), SMALL_SPEC), images(3, (4, 3, 8, 8))))
    cases["small"] = (small, images(1, (4, 3, 8, 8), seed=1)[0])
    torch.manual_seed(0)
    resnet = fxqp.lower(
        train_steps(fxqp.transform(torchvision.models.resnet18(num_classes=10), RESNET_SPEC), images(2, (2, 3, 32, 32)), lr=0.01)
    )
    cases["resnet18"] = (resnet, images(1, (2, 3, 32, 32), seed=1)[0])
    results = {}
    for name, (low, x) in cases.items():
        directory = tmp / name
        directory.mkdir()
        program = fxqp.export(low, (x,), directory / "m.pt2")
        results[name] = {"low": low, "x": x, "program": program, "dir": directory}
    deployed = run_with_plain_torch(tmp, [(name, r["dir"] / "m.pt2", r["x"]) for name, r in results.items()])
    for name, y in deployed.items():
        results[name]["y"] = y
    return results


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_exported_program_runs_with_plain_torch(exported, name):
    case = exported[name]
    ref = case["low"](case["x"])
    assert_same(case["y"], ref)
    assert_same(case["program"].module()(case["x"]), ref)


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_exported_graph_decodes_packed_weights(exported, name):
    case = exported[name]
    targets = graph_targets(case["program"])
    shifts = {t for t in targets if "shift" in t}
    ands = {t for t in targets if "__and__" in t or "bitwise_and" in t}
    assert shifts and ands, sorted(targets)
    sites = packed_sites(case["low"])
    assert sites
    tensors = program_tensors(case["program"])
    for site, weight in sites.items():
        numel, shape = weight.layout.numel, weight.layout.shape
        full = {k: tuple(t.shape) for k, t in tensors.items() if tuple(t.shape) == shape or (t.is_floating_point() and t.numel() >= numel)}
        assert not full, f"{site}: the program carries a full-size tensor: {full}"
    # the packed codes travel as they are
    codes = [t for k, t in tensors.items() if k.endswith(".codes")]
    assert len(codes) == sum(1 for m in case["low"].modules() if isinstance(m, PackedWeight))
    assert all(t.dtype == torch.uint8 for t in codes)


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_export_with_a_dynamic_batch_dimension(exported, name):
    """Quantized activations (affine, symmetric, LSQ), static and top-k activation pruning:
    one program for every batch size, bit-identical to the lowered model."""
    case = exported[name]
    batch = torch.export.Dim("batch", min=1, max=64)
    program = fxqp.export(case["low"], (case["x"],), dynamic_shapes=({0: batch},))
    for n in (1, 7):
        x = torch.randn(n, *case["x"].shape[1:], generator=torch.Generator().manual_seed(n))
        assert_same(program.module()(x), case["low"](x))


def test_export_does_not_change_the_lowered_model(exported):
    low = exported["small"]["low"]
    for module in low.modules():
        if isinstance(module, PackedWeight):
            assert module.decode_mode == "cache" and module.cached is not None


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_export_write_leaves_no_temporary_file(exported, name):
    assert os.listdir(exported[name]["dir"]) == ["m.pt2"]


def test_export_without_a_path_returns_the_program(exported):
    case = exported["small"]
    program = fxqp.export(case["low"], (case["x"],))
    assert isinstance(program, torch.export.ExportedProgram)
    assert_same(program.module()(case["x"]), case["low"](case["x"]))


def test_failed_export_write_is_atomic(exported, tmp_path, monkeypatch):
    case = exported["small"]

    def refuse(src, dst):
        raise OSError("disk full (simulated)")

    existing = tmp_path / "m.pt2"
    existing.write_bytes(b"previous program")
    monkeypatch.setattr("fxqp.atomic.os.replace", refuse)
    with pytest.raises(OSError, match="simulated"):
        fxqp.export(case["low"], (case["x"],), existing)
    with pytest.raises(OSError, match="simulated"):
        fxqp.export(case["low"], (case["x"],), tmp_path / "new.pt2")
    assert existing.read_bytes() == b"previous program"
    assert os.listdir(tmp_path) == ["m.pt2"]


def test_export_of_a_model_that_is_not_lowered(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    gm = fxqp.transform(ReusedReluNet(), SMALL_SPEC)
    gm.eval()
    for model in (gm, ReusedReluNet(), torch.fx.symbolic_trace(ReusedReluNet())):
        with pytest.raises(fxqp.LoweringError, match="lowered"):
            fxqp.export(model, (x,), tmp_path / "m.pt2")
    with pytest.raises(fxqp.LoweringError):
        fxqp.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    assert os.listdir(tmp_path) == []
