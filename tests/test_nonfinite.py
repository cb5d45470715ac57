"""Non-finite and empty batches: activation statistics leave out a batch with a NaN or ±Inf
(one warning names the sites), an empty batch passes through training and evaluation
without changing any op's state, and lowering refuses a non-finite weight."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


SPEC = Spec(
    rules=[
        Rule(modules=["Linear"], weight=[Quantize(bits=4)]),
        Rule(functions=["relu"], activation=[Quantize(bits=8), Prune(0.5, start=0, end=40, every=1)]),
        Rule(functions=["tanh"], activation=[Quantize(bits=8, learned=True, start=3)]),
        Rule(names=["fc3"], activation=[Prune(0.3, dynamic=True)]),
    ]
)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 6, generator=g) for _ in range(n)]


def _ops_state(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Every op's state (not the weights), by name."""
    return {k: v.clone() for k, v in gm.state_dict().items() if "fxqp" in k or "parametrizations" in k and "original" not in k}


def _pair():
    torch.manual_seed(0)
    a = fxqp.transform(Net(), SPEC, example_inputs=(torch.zeros(2, 6),), auto_step=False)
    torch.manual_seed(0)
    b = fxqp.transform(Net(), SPEC, example_inputs=(torch.zeros(2, 6),), auto_step=False)
    return a.train(), b.train()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_batch_is_left_out_of_every_statistic(bad):
    clean, poisoned = _pair()
    batches = _batches(8)
    for step, x in enumerate(batches):
        if step == 3:  # one more batch, with one bad element, in the step LSQ records its batch
            bad_x = x.clone()
            bad_x[2, 3] = bad
            with pytest.warns(fxqp.NonFiniteWarning, match=r"statistics of 2 site\(s\): relu \(1\), tanh \(1\)"):
                poisoned(bad_x)
        clean(x)
        poisoned(x)
        fxqp.step(clean)
        fxqp.step(poisoned)
    expected, got = _ops_state(clean), _ops_state(poisoned)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert all(torch.isfinite(t).all() for t in got.values() if t.is_floating_point())
    poisoned.eval()
    assert torch.isfinite(poisoned(batches[0])).all()
    assert torch.isfinite(fxqp.lower(poisoned)(batches[0])).all()


def test_a_first_batch_that_is_not_finite_leaves_the_observer_unobserved():
    gm, _ = _pair()
    x = torch.full((5, 6), float("nan"))
    with pytest.warns(fxqp.NonFiniteWarning):
        gm(x)
    quantizer = gm.fxqp_stages.relu.ops[0]
    assert not bool(quantizer.observed) and quantizer.lo.item() == 0.0 == quantizer.hi.item()
    gm(_batches(1)[0])
    assert bool(quantizer.observed)


@pytest.mark.parametrize("auto_step", [False, True])
def test_an_empty_batch_changes_no_state_in_training_and_evaluation(auto_step):
    torch.manual_seed(0)
    gm = fxqp.transform(Net(), SPEC, example_inputs=(torch.zeros(2, 6),), auto_step=auto_step).train()
    for x in _batches(4):  # observers set, masks refreshed, LSQ primed and set
        gm(x)
        if not auto_step:
            fxqp.step(gm)
    assert int(gm.fxqp_schedule.step) == 4
    before = _ops_state(gm)
    empty = torch.zeros(0, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gm(empty).shape == (0, 3)
        gm.eval()
        assert gm(empty).shape == (0, 3)
    after = _ops_state(gm)
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lowering_a_non_finite_weight_names_the_site(bad):
    gm, _ = _pair()
    gm(_batches(1)[0])
    with torch.no_grad():
        gm.fc2.parametrizations.weight.original[1, 2] = bad
    with pytest.raises(fxqp.LoweringError, match=r"site 'fc2.weight': the trained weight has 1 non-finite value\(s\)"):
        fxqp.lower(gm)
