"""fxqp.load finds the sites of the transform that made the file, also where an example run
decided them (integer tensors are no activation sites)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxqp
from fxqp import Quantize, Rule, Spec
from fxqp.lower.artifact import read_header
from fxqp.stages import ActivationStage

SPEC = Spec(rules=[Rule(names=["*"], activation=[Quantize(bits=8)])])


class PositionIds(nn.Module):
    """Position ids from two integer adds, as RoBERTa computes them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        ids = torch.arange(x.shape[1], device=x.device) + 1
        ids = ids + 1
        return self.fc(x + self.emb(ids))


def stages(gm) -> list[str]:
    return sorted(m.site for m in gm.modules() if isinstance(m, ActivationStage))


def test_load_leaves_out_the_integer_nodes_the_example_run_found(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    gm = fxqp.transform(PositionIds(), SPEC, example_inputs=(x,))
    without_example = fxqp.transform(PositionIds(), SPEC)
    assert set(stages(without_example)) - set(stages(gm)) == {"arange", "add", "add_1"}  # the integer ids
    assert set(gm.fxqp_schedule.non_float_nodes) >= {"add", "add_1"}
    gm.train()
    gm(x)
    low = fxqp.lower(gm.eval())
    path = tmp_path / "m.fxqp"
    fxqp.save(low, path)
    assert set(read_header(path)["non_float_nodes"]) >= {"add", "add_1"}
    loaded = fxqp.load(path, PositionIds())
    assert stages(loaded) == stages(gm)
    assert torch.equal(loaded(x), low(x))
    fxqp.save(loaded, tmp_path / "again.fxqp")  # what load read is kept for the next save
    assert read_header(tmp_path / "again.fxqp")["non_float_nodes"] == read_header(path)["non_float_nodes"]


@pytest.mark.parametrize("value", ["add", [1], {"a": 1}])
def test_a_bad_non_float_nodes_field_is_an_artifact_error(tmp_path, value):
    from fxqp.lower.artifact import encode_artifact, read_artifact

    gm = fxqp.transform(PositionIds(), SPEC, example_inputs=(torch.randn(2, 5, 4),))
    path = tmp_path / "m.fxqp"
    fxqp.save(fxqp.lower(gm.eval()), path)
    header, blobs = read_artifact(path)
    header = {k: v for k, v in header.items() if k != "data_sha256"}
    header["non_float_nodes"] = value
    (tmp_path / "bad.fxqp").write_bytes(encode_artifact(header, blobs))
    with pytest.raises(
        fxqp.ArtifactError, match=r"field 'non_float_nodes(\[0\])?'.*(expected a JSON list|not accepted; expected a string)"
    ):
        fxqp.load(tmp_path / "bad.fxqp", PositionIds())
    assert json.dumps(value)  # (a JSON value: the check is the loader's, not the encoder's)
