"""Weight layouts (output-channel axis per class) and parametrizations of the model's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxqp
from fxqp import Quantize, Rule, Spec
from fxqp.layouts import WEIGHT_LAYOUTS, channel_axis_of
from fxqp.sites import discover_sites
from passes import trace

SPEC = Spec(rules=[Rule(names=["*"], weight=[Quantize(bits=4)])])


class TransposedLinear(nn.Module):
    """Weight stored (in, out), as Hugging Face's Conv1D."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ self.weight


def weight_site(model, path):
    weights, _ = discover_sites(trace(model).graph_module)
    return next(s for s in weights if s.module_path == path)


def test_hugging_face_conv1d_is_quantized_per_output_column():
    torch.manual_seed(0)  # four weights per column: a draw could put three of them on one level
    model = nn.Sequential(Conv1D(6, 4))  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 6))  # columns of very different magnitude
    assert weight_site(model, "0").channel_axis == 1
    gm = fxqp.transform(model, SPEC)
    gm.train()
    x = torch.randn(3, 4)
    gm(x)
    gm.eval()
    weight = gm.get_submodule("0").weight.detach()
    # one scale per output column: every column keeps its own levels, small ones are not zeroed
    assert all(len(torch.unique(weight[:, j])) > 2 for j in range(6))
    low = fxqp.lower(gm)
    assert torch.equal(low(x), gm(x))
    assert low.get_submodule("0").parametrizations["weight"][0].layout.channel_axis == 1


def test_a_registered_class_or_name_gets_its_axis_and_subclasses_inherit_it(monkeypatch):
    monkeypatch.setattr("fxqp.layouts.WEIGHT_LAYOUTS", dict(WEIGHT_LAYOUTS))
    assert channel_axis_of(TransposedLinear, (4, 6)) == 0
    fxqp.register_weight_layout(TransposedLinear, channel_axis=1)
    assert channel_axis_of(TransposedLinear, (4, 6)) == 1

    class Sub(TransposedLinear):
        pass

    assert channel_axis_of(Sub(2, 3), (2, 3)) == 1
    fxqp.register_weight_layout(f"{__name__}.Other", channel_axis=2)

    class Other(nn.Module):
        pass

    Other.__qualname__ = "Other"
    assert channel_axis_of(Other, (2, 3, 4)) == 2
    assert channel_axis_of(Other, (5,)) is None  # a 1-D weight has no channel axis
    with pytest.raises(fxqp.SpecError, match="channel axis 2 does not exist in a weight of shape \\(2, 3\\)"):
        channel_axis_of(Other, (2, 3))
    assert channel_axis_of(nn.ConvTranspose2d(2, 3, 1), (2, 3, 1, 1)) == 1


@pytest.mark.parametrize(
    "cls, axis, message",
    [
        (int, 0, "not an nn.Module subclass"),
        ("Conv1D", 1, "qualified class name"),
        (TransposedLinear, -1, "non-negative int"),
        (TransposedLinear, True, "non-negative int"),
    ],
)
def test_bad_layouts_are_errors(cls, axis, message):
    with pytest.raises(fxqp.SpecError, match=message):
        fxqp.register_weight_layout(cls, channel_axis=axis)


def test_weight_norm_is_lowered_as_its_float_value_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1))
    nn.utils.parametrizations.weight_norm(model[2], name="weight", dim=2)  # as Wav2Vec2's positional conv
    gm = fxqp.transform(
        model, Spec(rules=[Rule(modules=["Conv1d"], weight=[Quantize(bits=4)]), Rule(modules=["ReLU"], activation=[Quantize(bits=8)])])
    )
    assert [s.name for s in discover_sites(trace(model).graph_module)[0]] == ["0.weight"]  # the parametrized weight is no site
    x = torch.randn(2, 2, 8)
    gm.train()
    gm(x)
    gm.eval()
    low = fxqp.lower(gm)
    assert not hasattr(low.get_submodule("2"), "parametrizations")
    assert torch.equal(low(x), gm(x))
    fxqp.save(low, tmp_path / "m.fxqp")
    fresh = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3, padding=1))
    nn.utils.parametrizations.weight_norm(fresh[2], name="weight", dim=2)
    loaded = fxqp.load(tmp_path / "m.fxqp", fresh)
    assert torch.equal(loaded(x), gm(x))
