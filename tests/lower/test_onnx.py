"""fxqp.export_onnx: quantized weights as ONNX integer initializers feeding DequantizeLinear,
checked by onnx.checker, decoded bit for bit as fxqp decodes them; activation quantizers as
QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer kernels; batch
norms folded; run by ONNX Runtime with a dynamic batch dimension.

Tolerances. Weights alone (no activation quantizer): every output within 1e-5 of the largest.
With 8-bit activations the lowered model is a step function of its input, and these nets are
untrained (so small changes grow through the layers): a convolution output that the runtime
sums in another order and that lies within float rounding of a grid boundary takes the
neighbouring code. So, with the runtime's graph optimizations off (each op as exported): at
least 8 of 16 samples (batches of 1, 7 and 8) within 1e-4 (relative L2); with them on (the integer kernels requantize with their own rounding): the
expected kernels fused, and on a trained net the same class for at least 97% of the held-out
digits (the deep untrained nets magnify every requantization step, so they are checked only
for the fusion)."""

from __future__ import annotations

import collections
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from fxqp_test_nets import ConvBnConv, ReusedReluNet
from lowering_helpers import images, train_steps
from onnx.reference import ReferenceEvaluator
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec
from fxqp._extras import MissingExtraError
from fxqp.lower import PackedWeight
from fxqp.lower.frozen import FrozenQuantize
from fxqp.lower.onnx import onnxruntime_op_counts
from fxqp.stages import ActivationStage

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
    torch.manual_seed(0)  # the dropout masks of the training steps: a process's first transform draws more
    return fxqp.lower(train_steps(gm, images(2, shape), lr=0.01))


def _run(path, x, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
    report = fxqp.export_onnx(low, (torch.randn(2, 3, 32, 32),), path, fold_batch_norm=False)  # decoded bit for bit
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
    assert not any(node.metadata_props for node in proto.graph.node)  # no exporter provenance
    # no float copy of a quantized weight is left in the file
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 64 * 9]
    assert not floats, [i.name for i in floats]


def test_the_file_is_about_as_small_as_the_codes(resnet):
    low, path, report, element = resnet
    params = sum(m.layout.numel for m in low.modules() if isinstance(m, PackedWeight))
    bits = 4 if element.endswith("INT4") else 8
    assert report.bytes == path.stat().st_size
    assert report.bytes < params * bits / 8 * 1.05 + 200_000  # codes, plus scales, biases, norms and the graph


class FunctionalNet(nn.Module):
    """Functional sites (relu, add, max_pool2d, cat, adaptive_avg_pool2d, flatten), batch norms
    and a Linear: the sites of an activation-pruned model."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(torch.add(self.bn2(self.conv2(a)), a))
        pooled = torch.cat([F.adaptive_avg_pool2d(b, 1), F.adaptive_avg_pool2d(F.max_pool2d(b, 2), 1)], dim=1)
        return self.fc(torch.flatten(pooled, 1))


# 8-bit affine (UINT8) activations after every norm, activation, pool and sum: each
# convolution reads a DequantizeLinear and its (folded) output meets a QuantizeLinear
ACTIVATIONS = Rule(
    modules=["BatchNorm2d", "ReLU", "ReLU6", "MaxPool2d", "AdaptiveAvgPool2d"],
    functions=["relu", "add", "max_pool2d", "adaptive_avg_pool2d", "cat", "flatten"],
    activation=[Quantize(bits=8, symmetric=False)],
)
PRUNED_ACTIVATIONS = [
    Rule(names=["relu"], activation=[Prune(sparsity=0.3), Quantize(bits=8, symmetric=False)]),  # a static mask
    Rule(functions=["flatten"], activation=[Prune(sparsity=0.25, dynamic=True), Quantize(bits=8, symmetric=False)]),  # top-k
]
WA_CASES = {
    "w8a8": ([Quantize(bits=8)], "INT8"),
    "w4a8": ([Prune(sparsity=0.5), Quantize(bits=4)], "INT4"),
    "w2-dorefa-a8": ([Quantize(bits=2, method="dorefa")], "INT4"),
    "binary-a8": ([Quantize(bits=1)], "INT4"),
}
WA_MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "functional": FunctionalNet,
}
SHAPE = (2, 3, 32, 32)


def relative_errors(got, ref):
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    return ((got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).tolist()


@pytest.fixture(scope="module", params=[(m, c) for m in WA_MODELS for c in WA_CASES], ids=lambda p: f"{p[0]}-{p[1]}")
def quantized(request, tmp_path_factory):
    model_name, case = request.param
    ops, element = WA_CASES[case]
    rules = [Rule(modules=CONVS, weight=ops), ACTIVATIONS] + (PRUNED_ACTIVATIONS if model_name == "functional" else [])
    torch.manual_seed(0)  # the same weights whichever tests ran before
    low = _lowered(WA_MODELS[model_name](), Spec(rules=rules), SHAPE)
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    report = fxqp.export_onnx(low, (torch.randn(*SHAPE),), path)
    return model_name, case, low, path, report, element


def test_each_op_as_exported_computes_what_the_lowered_model_computes(quantized):
    model_name, case, low, path, report, element = quantized
    errors = []
    for n in (1, 7, 8):  # one dynamic-batch file at batch 1, 7 and 8
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        errors += relative_errors(_run(path, x, optimize=False), low(x).detach())
    assert sum(e <= 1e-4 for e in errors) >= 8, errors  # a wrong grid moves every sample


def test_the_runtime_fuses_the_8_bit_groups_into_integer_kernels(quantized):
    model_name, case, low, path, report, element = quantized
    ops = onnxruntime_op_counts(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in low.modules())
    if element == "INT8":  # every convolution but the first, whose input (the image) has no quantizer
        assert ops["com.microsoft.QLinearConv"] == convs - 1, ops
    else:  # the runtime has no 4-bit convolution: dequantized weights, float Conv
        assert ops["com.microsoft.QLinearConv"] == 0 and ops["Conv"] + ops["FusedConv"] + ops["com.microsoft.FusedConv"] >= convs - 1, ops
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got, ref = torch.from_numpy(_run(path, x)), low(x).detach()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    if model_name == "functional":  # shallow: the kernels' own rounding moves little
        assert np.median(relative_errors(got, ref)) <= 0.01 and torch.equal(got.argmax(1), ref.argmax(1))
    # the deep untrained nets magnify each requantization step: see the trained test below


def test_a_trained_w8a8_net_predicts_the_same_classes_with_integer_kernels(tmp_path):
    """DigitsVGG (batch norms, ReLUs, max-pools, a mean), trained with 8-bit weights and
    activations on scikit-learn's digits: ONNX Runtime with its integer kernels predicts the
    lowered model's class for at least 97% of the held-out digits."""
    from fxqp.data import load_data
    from fxqp.models import DigitsVGG

    data = load_data("digits")
    torch.manual_seed(0)
    spec = Spec(
        rules=[
            Rule(modules=CONVS, weight=[Quantize(bits=8)]),
            Rule(modules=["ReLU", "MaxPool2d"], functions=["mean"], activation=[Quantize(bits=8, symmetric=False)]),
        ]
    )
    gm = fxqp.transform(DigitsVGG(width=16), spec, example_inputs=(data.train_x[:2],))
    opt = torch.optim.Adam(gm.parameters(), lr=3e-3)
    gm.train()
    for epoch in range(4):
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(64):
            opt.zero_grad()
            F.cross_entropy(gm(data.train_x[batch]), data.train_y[batch]).backward()
            opt.step()
            fxqp.step(gm)
    low = fxqp.lower(gm.eval())
    report = fxqp.export_onnx(low, (data.train_x[:2],), tmp_path / "m.onnx")
    assert len(report.folded_batch_norms) == 6 and len(report.quantized_activations) == 9
    assert onnxruntime_op_counts(tmp_path / "m.onnx")["com.microsoft.QLinearConv"] == 5  # all but the first
    ref = low(data.test_x).argmax(1)
    got = torch.from_numpy(_run(tmp_path / "m.onnx", data.test_x)).argmax(1)
    accuracy = (ref == data.test_y).float().mean()
    assert accuracy >= 0.9  # trained
    assert (got == ref).float().mean() >= 0.97
    assert abs((got == data.test_y).float().mean() - accuracy) <= 0.02


def test_the_report_lists_weights_activations_and_folds(quantized):
    model_name, case, low, path, report, element = quantized
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    packed = {m.site for m in low.modules() if isinstance(m, PackedWeight)}
    assert set(report.integer_weights) == packed and set(report.integer_weights.values()) == {element}
    assert not report.float_weights
    stages = {m.site: m for m in low.modules() if isinstance(m, ActivationStage) and len(m.ops)}
    quantizers = {site for site, m in stages.items() if any(isinstance(op, FrozenQuantize) for op in m.ops)}
    assert set(report.quantized_activations) == quantizers
    assert all(v.startswith("UINT8") for v in report.quantized_activations.values())
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["QuantizeLinear"] == len(quantizers) and ops["BatchNormalization"] == 0
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in low.modules())
    assert len(report.folded_batch_norms) == norms
    if model_name == "functional":  # the pruned activations stay float, listed
        assert "FrozenMask" in report.float_activations["relu"] and "TopK" in report.float_activations["flatten"]
    else:
        assert not report.float_activations


def test_folded_codes_are_the_lowered_codes_with_scaled_scales(tmp_path):
    """A folded convolution keeps its codes (negated where γ < 0) and scales by |γ|/sqrt(σ²+ε)."""
    model = ConvBnConv()
    with torch.no_grad():
        model.bn.weight.copy_(torch.linspace(-1, 1, 8))  # negative factors too
        model.bn.running_var.uniform_(0.5, 2)
    for ops, element in ((Quantize(bits=4), "INT4"), (Quantize(bits=8, symmetric=False), "UINT8")):
        gm = fxqp.transform(model, Spec(rules=[Rule(modules=["Conv2d"], weight=[ops])]), example_inputs=(torch.randn(1, 3, 8, 8),))
        low = fxqp.lower(train_steps(gm, images(1, (2, 3, 8, 8)), lr=0.0))
        exact = fxqp.export_onnx(low, (torch.randn(2, 3, 8, 8),), tmp_path / "exact.onnx", fold_batch_norm=False)
        folded = fxqp.export_onnx(low, (torch.randn(2, 3, 8, 8),), tmp_path / "folded.onnx")
        assert folded.folded_batch_norms == {"conv1.weight": "bn"} and not exact.folded_batch_norms
        assert exact.integer_weights["conv1.weight"] == element
        bn = low.get_submodule("bn")  # its statistics moved in the training step
        factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        inits = [
            {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}
            for p in (tmp_path / "exact.onnx", tmp_path / "folded.onnx")
        ]
        codes, folded_codes = (torch.from_numpy(i["conv1.weight.codes"].astype(np.int64)) for i in inits)
        negative = factor < 0
        if element == "INT4":
            assert torch.equal(folded_codes[~negative], codes[~negative]) and torch.equal(folded_codes[negative], -codes[negative])
        else:
            assert torch.equal(folded_codes[~negative], codes[~negative]) and torch.equal(folded_codes[negative], 255 - codes[negative])
        scale = torch.from_numpy(inits[0]["conv1.weight.scale"].copy()).expand(8)
        torch.testing.assert_close(torch.from_numpy(inits[1]["conv1.weight.scale"].copy()), scale * factor.abs(), rtol=1e-6, atol=0)
        x = torch.randn(4, 3, 8, 8)
        for path in ("exact.onnx", "folded.onnx"):
            assert_close(_run(tmp_path / path, x), low(x).detach().numpy())


def test_activation_grids_narrower_than_8_bits_are_clipped_exactly(tmp_path):
    spec = Spec(
        rules=[
            Rule(modules=CONVS, weight=[Quantize(bits=8)]),
            Rule(names=["conv1"], activation=[Quantize(bits=4, symmetric=False)]),
            Rule(names=["conv2"], activation=[Quantize(bits=3, symmetric=True)]),
            Rule(functions=["flatten"], activation=[Quantize(bits=6, learned=True)]),
        ]
    )
    low = _lowered(ReusedReluNet(8), spec, (2, 3, 8, 8))
    report = fxqp.export_onnx(low, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx")
    assert "UINT8" in report.quantized_activations["conv1"] and "clipped to codes [0, 15]" in report.quantized_activations["conv1"]
    assert "INT8" in report.quantized_activations["conv2"] and "clipped to codes [-3, 3]" in report.quantized_activations["conv2"]
    assert "clipped to codes [0, 63]" in report.quantized_activations["flatten"]  # LSQ, unsigned (after a ReLU)
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)
    assert ops["Clip"] == 3 and ops["QuantizeLinear"] == 3
    x = 4 * torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # well outside the observed ranges
    for optimize in (False, True):
        errors = relative_errors(_run(tmp_path / "m.onnx", x, optimize), low(x).detach())
        assert sum(e <= 1e-4 for e in errors) >= 14, errors


def test_8_bit_symmetric_activations_are_noted(tmp_path):
    spec = Spec(
        rules=[Rule(modules=CONVS, weight=[Quantize(bits=8)]), Rule(names=["conv2"], activation=[Quantize(bits=8, symmetric=True)])]
    )
    low = _lowered(ReusedReluNet(8), spec, (2, 3, 8, 8))
    report = fxqp.export_onnx(low, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx")
    assert report.quantized_activations["conv2"].startswith("INT8") and "clipped" not in report.quantized_activations["conv2"]
    assert "-128" in report.notes["conv2"] and "note conv2" in str(report)


def test_linear_weights_as_matmul_nbits(tmp_path):
    for ops, bits in (
        ([Quantize(bits=4)], 4),
        ([Quantize(bits=3, symmetric=False)], 4),
        ([Quantize(bits=8)], 8),
        ([Quantize(bits=2, method="dorefa")], 4),
    ):
        spec = Spec(rules=[Rule(modules=CONVS, weight=ops), ACTIVATIONS])
        low = _lowered(FunctionalNet(), spec, SHAPE)
        path = tmp_path / "m.onnx"
        report = fxqp.export_onnx(low, (torch.randn(*SHAPE),), path, linear_kernel="matmul_nbits")
        assert report.integer_weights["fc.weight"] == f"MatMulNBits {bits}-bit"
        proto = onnx.load(str(path))
        assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 1
        assert not any(
            i.name.startswith("fc.") and i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 10 for i in proto.graph.initializer
        )
        ref = low(torch.randn(7, *SHAPE[1:], generator=torch.Generator().manual_seed(1))).detach()
        got = _run(path, torch.randn(7, *SHAPE[1:], generator=torch.Generator().manual_seed(1)), optimize=False)
        errors = relative_errors(got, ref)
        assert sum(e <= 1e-4 for e in errors) >= 6, (ops, errors)
        assert onnxruntime_op_counts(path)["com.microsoft.MatMulNBits"] == 1


class TokenMixer(nn.Module):
    """Linear layers on (batch, tokens, features): the exporter writes MatMul with a transposed
    weight, which its optimizer would fold into a new constant."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(F.relu(self.up(x))) + x


def test_weights_stay_integers_where_the_optimizer_would_fold_them(tmp_path):
    spec = Spec(
        rules=[
            Rule(modules=["Linear"], weight=[Quantize(bits=4)]),
            Rule(functions=["relu"], activation=[Quantize(bits=8, symmetric=False)]),
        ]
    )
    low = _lowered(TokenMixer(), spec, (2, 5, 8))
    report = fxqp.export_onnx(low, (torch.randn(2, 5, 8),), tmp_path / "m.onnx")
    assert report.integer_weights == {"up.weight": "INT4", "down.weight": "INT4"} and not report.float_weights
    for n in (1, 7):
        x = torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(n))
        errors = relative_errors(_run(tmp_path / "m.onnx", x, optimize=False), low(x).detach())
        assert max(errors) <= 1e-5, errors


def test_a_bad_linear_kernel_is_refused(tmp_path):
    low = _lowered(ReusedReluNet(), Spec(rules=[Rule(modules=CONVS, weight=[Quantize(bits=4)])]), (2, 3, 8, 8))
    with pytest.raises(fxqp.LoweringError, match="linear_kernel 'nbits' is not one of dequantize, matmul_nbits"):
        fxqp.export_onnx(low, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", linear_kernel="nbits")
    with pytest.raises(fxqp.LoweringError, match="min_weight_bits 2 is not 4 or 8"):
        fxqp.export_onnx(low, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", min_weight_bits=2)
    assert not (tmp_path / "m.onnx").exists()


def test_a_graph_onnx_rejects_is_a_lowering_error_and_bfloat16_stays_float(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=4)]), Rule(modules=["ReLU"], activation=[Quantize(bits=8)])])
    low = fxqp.lower(train_steps(fxqp.transform(model, spec, example_inputs=(x,)), images(2, (2, 3, 8, 8), dtype=torch.bfloat16)))
    with pytest.raises(fxqp.LoweringError, match=r"fails ONNX's checker at opset 21 \(.*bfloat16.*model.float\(\)"):
        fxqp.export_onnx(low, (x,), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    report = fxqp.export_onnx(low, (x,), tmp_path / "m.onnx", opset=22)  # Conv on bfloat16 since opset 22
    assert not report.integer_weights and not report.quantized_activations
    assert set(report.float_weights) == {"0.weight", "2.weight"} and "bfloat16 weight" in report.float_weights["0.weight"]
    assert "torch.bfloat16 input" in report.float_activations["_1"]


def test_min_weight_bits_8_stores_4_bit_codes_as_int8(tmp_path):
    spec = Spec(
        rules=[
            Rule(modules=CONVS, weight=[Quantize(bits=4)]),
            Rule(modules=CONVS, names=["fc"], weight=[Quantize(bits=3, symmetric=False)]),
            ACTIVATIONS,
        ]
    )
    low = _lowered(FunctionalNet(), spec, SHAPE)
    report = fxqp.export_onnx(low, (torch.randn(*SHAPE),), tmp_path / "m.onnx", min_weight_bits=8)
    assert report.integer_weights == {"conv1.weight": "INT8", "conv2.weight": "INT8", "fc.weight": "UINT8"}
    assert onnxruntime_op_counts(tmp_path / "m.onnx")["com.microsoft.QLinearConv"] == 1  # conv2 (conv1 reads the image)
    x = torch.randn(7, *SHAPE[1:], generator=torch.Generator().manual_seed(2))
    assert max(relative_errors(_run(tmp_path / "m.onnx", x, optimize=False), low(x).detach())) <= 1e-4


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


def test_the_export_forms_compute_in_torch_what_the_runtime_computes():
    """The eager forms of the export's custom ops (for anyone running the export copy): a
    MatMulNBits linear decodes its blob to the lowered weight; a Q/DQ pair is the frozen
    quantizer but where x/s and x·(1/s) round to different codes."""
    from fxqp.lower.frozen import FrozenQuantize
    from fxqp.lower.onnx import _activation_qdq, _integer_codes, _LinearNBits

    for ops in ([Quantize(bits=4)], [Quantize(bits=3, symmetric=False)], [Quantize(bits=8)], [Quantize(bits=2, method="dorefa")]):
        gm = fxqp.transform(nn.Sequential(nn.Linear(70, 9)), Spec(rules=[Rule(modules=["Linear"], weight=ops)]))
        low = fxqp.lower(train_steps(gm, images(1, (2, 70))))
        packed = low.get_submodule("0").parametrizations.weight[0]
        x = torch.randn(5, 70)
        torch.testing.assert_close(_LinearNBits(_integer_codes(packed), low.get_submodule("0").bias)(x), low(x), rtol=1e-5, atol=1e-5)
    frozen = FrozenQuantize("affine", 4, {"scale": torch.tensor(0.1), "zero_point": torch.tensor(3.0)})
    qdq, description, note = _activation_qdq(frozen)
    x = 3 * torch.randn(10_000)
    assert (qdq(x) != frozen(x)).float().mean() < 1e-3 and "clipped to codes [0, 15]" in description and note is None
