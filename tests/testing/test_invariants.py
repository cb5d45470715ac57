"""fxqp.testing.check: every invariant holds on real cases and catches the fault it guards."""

from importlib import import_module

import pytest
import torch
from fxqp_test_nets import ReusedReluNet
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqp
import fxqp.testing as ft
from fxqp import Prune, Quantize, Rule, Spec
from fxqp.lower.frozen import FrozenQuantize

# one-shot default ops on the weights (both orders) and every activation form
SPEC = Spec(
    rules=[
        Rule(names=["conv1"], weight=[Prune(sparsity=0.5, start=1), Quantize(bits=4, start=2)]),
        Rule(names=["conv2"], weight=[Quantize(bits=3, start=1), Prune(sparsity=0.4, start=2)]),
        Rule(names=["fc"], weight=[Prune(sparsity=0.3, start=3, end=6, every=2), Quantize(bits=1, start=4)]),
        Rule(modules=["ReLU"], activation=[Quantize(bits=8, start=2), Prune(sparsity=0.3, start=3)]),
        Rule(functions=["add"], activation=[Prune(sparsity=0.25, dynamic=True, start=1), Quantize(bits=6, symmetric=True, start=4)]),
        Rule(functions=["cat"], activation=[Prune(sparsity=0.5, granularity="channel", start=2)]),
    ]
)
FAST = [name for name in ft.INVARIANTS if name != "compiled_equals_eager"]


@pytest.fixture
def case():
    torch.manual_seed(0)
    return ReusedReluNet(), torch.randn(4, 3, 8, 8)


def test_every_invariant_holds_on_a_net_with_every_op_form(case):
    model, x = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft.check(model, SPEC, x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # untouched


def test_invariants_hold_on_a_spec_in_fractions_of_the_run(case):
    model, x = case
    spec = Spec(
        rules=[
            Rule(names=["conv1"], weight=[Prune(sparsity=0.5, start="10%", end="60%", every="20%"), Quantize(bits=4, start="40%")]),
            Rule(modules=["ReLU"], activation=[Quantize(bits=8, start="20%"), Prune(sparsity=0.3, start="50%")]),
        ]
    )
    ft.check(model, spec, x, invariants=FAST, total_steps=10)
    with pytest.raises(fxqp.SpecError, match="total_steps=N"):
        ft.check(model, spec, x, invariants=["ops_in_spec_order"])


def test_the_order_reference_covers_both_orders(case):
    model, x = case
    # the invariant checked conv1 (P->Q) and conv2 (Q->P): breaking the tie-break rule of
    # Q->P must be caught at conv2 only
    original = fxqp.ops.prune.magnitude_keep_mask

    def ignore_tiebreak(score, k, tiebreak=None, batch_dims=0):
        return original(score, k, None, batch_dims)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fxqp.ops.prune, "magnitude_keep_mask", ignore_tiebreak)
        with pytest.raises(ft.InvariantError) as info:
            ft.check(model, SPEC, x, invariants=["prune_quantize_orders_match_reference"])
    assert [f.site for f in info.value.failures] == ["conv2.weight"]


# a fault for each invariant: (invariant, object, attribute, replacement, site or None)
def _no_quantization(self, x, *args, **kwargs):
    return x


def _one_fewer(target, n):
    return torch.round(target * n).to(torch.int64) - 1


FAULTS = {
    "ops_in_spec_order": (import_module("fxqp.transform"), "_build_ops", None),
    "identity_before_start": (fxqp.ops.clock, "active", lambda op: True),
    "quantized_values_on_grid": (fxqp.ops.quantize.WeightQuantizer, "quantize", _no_quantization),
    "pruned_sites_have_target_zeros": (fxqp.ops.prune, "prune_count", _one_fewer),
    "lowered_equals_eval": (FrozenQuantize, "forward", lambda self, x: x),
    "save_load_round_trips": (import_module("fxqp.lower.artifact"), "_fill_state", lambda *a, **k: None),
    "resume_is_bit_exact": (fxqp.schedule.Schedule, "_load_from_state_dict", lambda self, *a, **k: None),
}


@pytest.mark.parametrize("invariant", sorted(FAULTS))
def test_each_invariant_reports_its_fault(case, invariant):
    model, x = case
    owner, attribute, replacement = FAULTS[invariant]
    if invariant == "ops_in_spec_order":
        original = owner._build_ops

        def replacement(*args, **kwargs):
            return list(reversed(original(*args, **kwargs)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, attribute, replacement)
        with pytest.raises(ft.InvariantError) as info:
            ft.check(model, SPEC, x, invariants=[invariant])
    failures = info.value.failures
    assert failures and {f.invariant for f in failures} == {invariant}
    assert invariant in str(info.value)


def test_empty_spec_invariant_catches_a_model_that_changes(case):
    _, x = case

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x)

    with pytest.raises(ft.InvariantError, match="empty_spec_is_identity"):
        ft.check(Noisy(), Spec(), x, invariants=["empty_spec_is_identity"])


def test_unknown_invariant_is_an_error(case):
    model, x = case
    with pytest.raises(fxqp.FxqpError, match="unknown invariant"):
        ft.check(model, SPEC, x, invariants=["nope"])


def test_compile_backend_must_be_a_torch_compile_backend(case):
    model, x = case
    with pytest.raises(fxqp.FxqpError, match="compile_backend='inductr' is not a torch.compile backend; accepted: .*inductor"):
        ft.check(model, SPEC, x, invariants=["compiled_equals_eager"], compile_backend="inductr")


class TorchReluNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("backend", ["relu_compile_error_TESTING_ONLY", "relu_runtime_error_TESTING_ONLY"])
def test_a_compiler_error_is_reported_as_the_compiled_invariant_failing_at_its_step(backend):
    # backends of torch's own test set: they fail to compile, or make the compiled graph
    # fail, wherever the graph calls torch.relu
    torch.manual_seed(0)
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=4)])])
    with pytest.raises(ft.InvariantError, match=r"compiled_equals_eager at step 0: the compiled model raised \w+: .*Relu"):
        ft.check(TorchReluNet(), spec, torch.randn(2, 3, 6, 6), invariants=["compiled_equals_eager"], compile_backend=backend)


@pytest.mark.slow
def test_compiled_equals_eager_with_inductor_on_a_channels_last_model(case):
    """Inductor's own kernels and layouts (channels-last weights in a channels-last model,
    which once broke the compiled weight-mask refresh) through a schedule with ramps."""
    model, x = case
    model = model.to(memory_format=torch.channels_last)
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, start=1, end=4, every=1), Quantize(bits=4, start=2)])])
    ft.check(model, spec, x.contiguous(memory_format=torch.channels_last), invariants=["compiled_equals_eager"], compile_backend="inductor")


def test_failure_report_names_invariant_site_and_step():
    failure = ft.Failure("pruned_sites_have_target_zeros", "mask zeroes 3 of 8, expected 4", "conv1.weight", 5)
    assert str(failure) == "pruned_sites_have_target_zeros at site 'conv1.weight' at step 5: mask zeroes 3 of 8, expected 4"
    assert "1 fxqp invariant(s) failed" in str(ft.InvariantError([failure]))


@settings(max_examples=10, deadline=None)
@given(model_and_inputs=ft.models(max_blocks=3), data=st.data())
def test_invariants_hold_on_random_models_and_specs(model_and_inputs, data):
    model, inputs = model_and_inputs
    spec = data.draw(ft.specs(model, max_step=6), label="spec")
    ft.check(model, spec, inputs, invariants=FAST)


@settings(max_examples=3, deadline=None)
@given(model_and_inputs=ft.models(max_blocks=2), data=st.data())
def test_compiled_equals_eager_on_random_models_and_specs(model_and_inputs, data):
    model, inputs = model_and_inputs
    spec = data.draw(ft.specs(model, max_step=4), label="spec")
    ft.check(model, spec, inputs, invariants=["compiled_equals_eager"])
