"""fxqp.export_onnx: quantized weights as ONNX integer initializers feeding DequantizeLinear,
checked by onnx.checker, decoded bit for bit as fxqp decodes them, and run by ONNX Runtime
with a dynamic batch dimension."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from fxqp_test_nets import ReusedReluNet
from lowering_helpers import images, train_steps
from onnx.reference import ReferenceEvaluator

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp._extras import MissingExtraError
from fxqp.lower import PackedWeight

CONVS = ["Conv2d", "Linear"]
CASES = {
    # name: (model factory, weight ops, expected ONNX type of the codes)
    "w8-symmetric": ([Prune(sparsity=0.3), Quantize(bits=8)], "INT8"),
    "w4-symmetric": ([Prune(sparsity=0.5), Quantize(bits=4)], "INT4"),
    "w3-affine": ([Quantize(bits=3, symmetric=False), Prune(sparsity=0.3)], "UINT4"),
    "w8-affine": ([Quantize(bits=8, symmetric=False)], "UINT8"),
    "w2-dorefa": ([Quantize(bits=2, method="dorefa")], "INT4"),  # doubled codes of the half-integer zero point
    "binary": ([Prune(sparsity=0.2), Quantize(bits=1)], "INT4"),
    "w5-lsq": ([Quantize(bits=5, learned=True)], "INT8"),
}
TOLERANCE = 1e-5  # of the largest output: float sums in another order; the weights themselves are bit-identical


def assert_close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=TOLERANCE, atol=TOLERANCE * float(np.abs(ref).max()))


def _lowered(model, spec, shape):
    torch.manual_seed(0)
    gm = fxqp.transform(model, spec, example_inputs=(torch.randn(*shape),))
    return fxqp.lower(train_steps(gm, images(2, shape), lr=0.01))


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _decoded_weights(proto):
    """Every DequantizeLinear output, computed by ONNX's reference evaluator alone."""
    nodes = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    names = {i for n in nodes for i in n.input}
    inits = [i for i in proto.graph.initializer if i.name in names]
    outputs = [onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes]
    graph = onnx.helper.make_graph(nodes, "weights", [], outputs, inits)
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import))
    values = ReferenceEvaluator(model).run(None, {})
    return {n.output[0]: v for n, v in zip(nodes, values)}


@pytest.fixture(scope="module", params=list(CASES))
def resnet(request, tmp_path_factory):
    ops, element = CASES[request.param]
    spec = Spec(rules=[Rule(modules=CONVS, weight=ops)])
    low = _lowered(torchvision.models.resnet18(num_classes=10), spec, (2, 3, 32, 32))
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    report = fxqp.export_onnx(low, (torch.randn(2, 3, 32, 32),), path)
    return low, path, report, element


def test_onnx_runtime_matches_the_lowered_model_at_every_batch_size(resnet):
    low, path, report, _ = resnet
    for n in (1, 7):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        assert_close(_run(path, x), low(x).detach().numpy())


def test_weights_are_integer_initializers_decoded_bit_for_bit(resnet):
    low, path, report, element = resnet
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    packed = {m.site: m for m in low.modules() if isinstance(m, PackedWeight)}
    assert set(report.integer_weights) == set(packed) and not report.float_weights
    assert set(report.integer_weights.values()) == {element}
    types = {i.name: i.data_type for i in proto.graph.initializer}
    decoded = _decoded_weights(proto)
    for site, weight in packed.items():
        assert types[f"{site}.codes"] == getattr(onnx.TensorProto, element), site
        output = site.removesuffix(".weight") + ".parametrizations.weight.0.cached"
        assert np.array_equal(decoded[output], weight.decode().numpy()), site  # bit for bit
    # no float copy of a quantized weight is left in the file
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64 * 9]
    assert not floats, [i.name for i in floats]


def test_the_file_is_about_as_small_as_the_codes(resnet):
    low, path, report, element = resnet
    params = sum(m.layout.numel for m in low.modules() if isinstance(m, PackedWeight))
    bits = 4 if element.endswith("INT4") else 8
    assert report.bytes == path.stat().st_size
    assert report.bytes < params * bits / 8 * 1.05 + 200_000  # codes, plus scales, biases, norms and the graph


def test_activation_ops_are_reported_as_float(tmp_path):
    spec = Spec(
        rules=[
            Rule(modules=CONVS, weight=[Quantize(bits=4)]),
            Rule(names=["act"], activation=[Quantize(bits=8)]),
            Rule(functions=["relu"], activation=[Prune(sparsity=0.3)]),
            Rule(functions=["flatten"], activation=[Prune(sparsity=0.25, dynamic=True)]),
        ]
    )
    low = _lowered(ReusedReluNet(), spec, (2, 3, 8, 8))
    report = fxqp.export_onnx(low, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx")
    assert set(report.float_activations) >= {"act", "relu", "flatten"}
    assert "FrozenQuantize" in report.float_activations["act"] and "TopK" in report.float_activations["flatten"]
    assert "float activation ops act" in str(report)
    for n in (1, 7):
        x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n))
        assert_close(_run(tmp_path / "m.onnx", x), low(x).detach().numpy())


def test_a_model_that_is_not_lowered_is_refused(tmp_path):
    gm = fxqp.transform(ReusedReluNet(), Spec(rules=[Rule(modules=CONVS, weight=[Quantize(bits=4)])]))
    with pytest.raises(fxqp.LoweringError, match="expects a lowered model"):
        fxqp.export_onnx(gm, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_extra_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"^fxqp.export_onnx needs onnx: pip install 'fxqp\[onnx\]'$") as info:
        fxqp.export_onnx(None, (), tmp_path / "m.onnx")
    assert "\n" not in str(info.value)
