"""torch.compile: one graph per mode through the whole schedule, equal to eager."""

import copy

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from fxqp_test_nets import ReusedReluNet

import fxqp
from fxqp import Prune, Quantize, Rule, Spec

# every op switches on at its own step; masks refresh on ramps (every 2 steps)
SCHEDULE_SPEC = Spec(
    rules=[
        Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, start=1, end=7, every=2), Quantize(bits=4, start=3)]),
        Rule(names=["fc"], weight=[Quantize(bits=3, learned=True, start=2), Prune(sparsity=0.3, start=5)]),
        Rule(modules=["ReLU"], activation=[Quantize(bits=8, start=4), Prune(sparsity=0.3, start=6, end=10, every=2)]),
        Rule(functions=["add"], activation=[Prune(sparsity=0.25, dynamic=True, start=8), Quantize(bits=6, symmetric=True, start=9)]),
        Rule(functions=["cat"], activation=[Prune(sparsity=0.5, granularity="channel", start=7)]),
    ]
)
STEPS = 13
EVAL_AT = (6, 11)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def twin_models(spec, x, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    net = ReusedReluNet().to(memory_format=memory_format)
    return fxqp.transform(copy.deepcopy(net), spec, example_inputs=(x,)), fxqp.transform(copy.deepcopy(net), spec, example_inputs=(x,))


def test_compiled_equals_eager_through_the_schedule_with_one_graph_per_mode():
    data = batches(STEPS)
    eager, inner = twin_models(SCHEDULE_SPEC, data[0][0])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(inner, backend=counter, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(inner.parameters(), lr=0.05)
    for step, (x, y) in enumerate(data):
        if step in EVAL_AT:
            eager.eval()
            compiled.eval()
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), eager(x))
            eager.train()
            compiled.train()
        for opt in (opt_e, opt_c):
            opt.zero_grad()
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, msg=lambda m: f"step {step}: {m}")
        F.cross_entropy(out_e, y).backward()
        F.cross_entropy(out_c, y).backward()
        for (name, p_e), p_c in zip(eager.named_parameters(), inner.parameters()):
            torch.testing.assert_close(p_c.grad, p_e.grad, msg=lambda m: f"step {step}, grad of {name}: {m}")
        opt_e.step()
        opt_c.step()
    assert int(inner.fxqp_schedule.step) == int(eager.fxqp_schedule.step) == STEPS
    state_e, state_c = eager.state_dict(), inner.state_dict()
    for key in state_e:
        torch.testing.assert_close(state_c[key], state_e[key], msg=lambda m: f"{key}: {m}")
    # every op switched on, the masks refreshed on their ramps, train -> eval -> train twice:
    # still one graph for training and one for evaluation
    assert counter.frame_count <= 2, counter.frame_count


def test_transformed_and_lowered_models_have_no_graph_breaks():
    x = batches(1)[0][0]
    gm, _ = twin_models(SCHEDULE_SPEC, x)
    gm.train()
    for _ in range(3):
        gm(x)
    explanation = torch._dynamo.explain(gm)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    gm.eval()
    assert torch._dynamo.explain(gm)(x).graph_break_count == 0
    low = fxqp.lower(gm, decode="on_the_fly")
    assert torch._dynamo.explain(low)(x).graph_break_count == 0


@pytest.mark.parametrize("decode", ["cache", "on_the_fly"])
def test_lowered_model_compiles_for_inference(decode):
    data = batches(4)
    gm, _ = twin_models(SCHEDULE_SPEC, data[0][0])
    gm.train()
    for x, _ in data:
        gm(x)
    low = fxqp.lower(gm, decode=decode)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(low, backend=counter, fullgraph=True)
    with torch.no_grad():
        for x, _ in batches(3, seed=1):
            torch.testing.assert_close(compiled(x), low(x))
    assert counter.frame_count == 1


def test_static_activation_masks_need_a_shape_before_compiling():
    spec = Spec(rules=[Rule(modules=["ReLU"], activation=[Prune(sparsity=0.5)])])
    gm = fxqp.transform(ReusedReluNet(), spec)
    with pytest.raises(Exception, match="run the model once before compiling it, or pass example_inputs"):
        torch.compile(gm, backend="eager", fullgraph=True)(torch.randn(2, 3, 8, 8))


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_inductor_training_matches_eager(memory_format):
    """The default backend (Inductor, fused kernels) on a few steps of the schedule; also
    for a channels-last model and input, whose weights Inductor lays out channels-last."""
    data = [(x.contiguous(memory_format=memory_format), y) for x, y in batches(8)]
    eager, inner = twin_models(SCHEDULE_SPEC, data[0][0], memory_format)
    train_side_by_side(eager, torch.compile(inner, fullgraph=True), inner, data, rtol=1e-4, atol=1e-4)


def train_side_by_side(eager, compiled, inner, data, **tolerance):
    """A forward and backward of each model on every batch (gradients accumulate): equal
    outputs at every step, equal gradients at the end. ``inner``: the compiled model's
    module, whose parameters hold its gradients."""
    for step, (x, y) in enumerate(data):
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, **tolerance, msg=lambda m: f"step {step}: {m}")
        F.cross_entropy(out_e, y).backward()
        F.cross_entropy(out_c, y).backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), inner.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, **tolerance, msg=lambda m: f"grad of {name}: {m}")


def _graph_inputs(gm, x):
    """The names of the inputs of the graph Dynamo captures for ``gm(x)``."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(gm, backend=backend, fullgraph=True)(x)
    assert len(graphs) == 1
    return [node.name for node in graphs[0].graph.nodes if node.op == "placeholder"]


def test_compiled_graphs_read_and_write_masks_through_their_byte_aliases():
    """Compiled, in training and in evaluation mode, a pruner's mask is read and written as
    its uint8 alias ``mask_bytes``, never as the bool buffer (Inductor's CPU code for a bool
    buffer seen through a uint8 view converts element by element, and a write through the
    view copies the whole buffer); compiled evaluation gives eager's output."""
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5)]), Rule(modules=["ReLU"], activation=[Prune(sparsity=0.5)])])
    data = batches(3)
    gm, _ = twin_models(spec, data[0][0])
    for x, _ in data:
        gm(x)
    pruners = [m for m in gm.modules() if isinstance(m, (fxqp.ops.WeightPruner, fxqp.ops.ActivationPruner))]
    assert any(isinstance(m, fxqp.ops.WeightPruner) for m in pruners) and any(isinstance(m, fxqp.ops.ActivationPruner) for m in pruners)
    for mode in ("train", "eval"):
        getattr(gm, mode)()
        names = _graph_inputs(gm, data[0][0])
        assert len([n for n in names if n.endswith("_buffers_mask_bytes_")]) == len(pruners), (mode, names)
        assert not [n for n in names if n.endswith("_buffers_mask_")], (mode, names)
    compiled = torch.compile(gm, fullgraph=True)
    with torch.no_grad():
        for x, _ in batches(2, seed=1):
            torch.testing.assert_close(compiled(x), gm(x))


def test_a_model_moved_to_channels_last_after_the_transform_compiles_and_matches_eager():
    """``model.to(memory_format=torch.channels_last)`` after the transform: the weight masks
    stay contiguous (the compiled refresh reads and writes them flat), and compiled training
    through the schedule's refreshes equals eager."""
    data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches(8)]
    eager, inner = twin_models(SCHEDULE_SPEC, data[0][0])
    eager, inner = eager.to(memory_format=torch.channels_last), inner.to(memory_format=torch.channels_last)
    pruners = [m for m in inner.modules() if isinstance(m, fxqp.ops.WeightPruner)]
    assert any(p.mask.dim() == 4 for p in pruners)
    assert all(p.mask.is_contiguous() and p.mask_bytes.data_ptr() == p.mask.data_ptr() for p in pruners)
    train_side_by_side(eager, torch.compile(inner, backend="aot_eager", fullgraph=True), inner, data)


def test_eager_forwards_see_the_masks_a_compiled_graph_wrote():
    """The eager ops cache conversions of a mask by its version; masks refreshed by a
    compiled graph (through ``mask_bytes``) must count as written."""
    data = batches(8)
    gm, twin = twin_models(SCHEDULE_SPEC, data[0][0])
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    for i, (x, _) in enumerate(data):
        (gm if i < 2 else compiled)(x)  # eagerly first: the conversions are cached
        twin(x)
    gm.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(data[0][0]), twin(data[0][0]))


@pytest.mark.slow
def test_gradients_accumulated_across_a_refresh_match_eager():
    """Two training forwards, the second one at a refresh step, then one backward: the
    first forward's gradient is masked by the mask it used, as eagerly, although the
    compiled refresh writes the mask buffer in place (Inductor)."""
    data = batches(9)
    eager, inner = twin_models(SCHEDULE_SPEC, data[0][0])
    compiled = torch.compile(inner, fullgraph=True)
    for model in (eager, compiled):
        for x, y in data[:4]:  # steps 0-3; the weight masks refresh at 1, 3, 5 and 7
            F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            p.grad = None
        (x1, y1), (x2, y2) = data[4], data[5]  # steps 4 and 5 (a refresh)
        (F.cross_entropy(model(x1), y1) + F.cross_entropy(model(x2), y2)).backward()
    masks = [m.mask for m in inner.modules() if isinstance(m, fxqp.ops.WeightPruner)]
    assert masks and not all(bool(m.all()) for m in masks)
    for (name, p_e), p_c in zip(eager.named_parameters(), inner.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_an_exported_evaluation_program_needs_no_fxqp_op():
    """Under torch.export the masks are read as their uint8 aliases, so the exported program
    needs no fxqp op and loads without fxqp."""
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5)]), Rule(modules=["ReLU"], activation=[Prune(sparsity=0.5)])])
    x = batches(1)[0][0]
    gm, _ = twin_models(spec, x)
    gm(x)
    gm.eval()
    program = torch.export.export(gm, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if t.startswith("fxqp.")]
    pruners = [m for m in gm.modules() if isinstance(m, (fxqp.ops.WeightPruner, fxqp.ops.ActivationPruner))]
    assert len(pruners) == 4
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), gm(x))
