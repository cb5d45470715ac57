"""Data-parallel training: every rank holds the compression state one process computes on
the global batch (fxqp.ops.statistics), with two collectives per training forward.

The two-rank runs (tests/fxqp_distributed.py) train a CNN with weight and activation
pruning ramps, min/max observers and LSQ under DDP over gloo, against one process trained
on the concatenated batches with the same data order."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")

import fxqp_distributed as runs  # noqa: E402


def _read(out, name):
    with open(os.path.join(out, f"{name}.json"), encoding="utf-8") as f:
        return load_file(os.path.join(out, f"{name}.safetensors")), json.load(f)


def _exact(name: str, t: torch.Tensor) -> bool:
    """Masks, counters and flags must be equal; floats to tolerance."""
    return not t.is_floating_point()


# Collectives per training forward: the observers' maxima always; sums while a static
# activation mask is live (relu1's until its refresh at step 8, relu2's until 6) or LSQ's
# step size is recorded (step 4; set at step 5).
_EAGER = [2] * 9 + [1]
# Two micro-batches per optimizer step: at step 8 the first refreshes relu1's mask for the
# last time, so the second records no sums.
_ACCUMULATED = [4] * 8 + [3, 2]


@pytest.mark.parametrize(
    "case, collectives",
    [
        (runs.Case(sync_buffers=True), _EAGER),
        (runs.Case(sync_buffers=False, accumulate=2), _ACCUMULATED),
        (runs.Case(sync_buffers=True, compile=True), _EAGER),
    ],
    ids=["ddp", "no-buffer-sync+no_sync-accumulation", "compiled-ddp"],
)
def test_two_ranks_hold_the_state_of_one_process_on_the_global_batch(tmp_path, case, collectives):
    out = str(tmp_path)
    runs.run_ranks(case, out)
    runs.train_single(case, out)
    (rank0, run0), (rank1, run1), (single, run_single) = (_read(out, n) for n in ("rank0", "rank1", "single"))
    # all ranks bit-identical after every step (weights, masks, observers, averages, step)
    assert run0["digests"] == run1["digests"]
    assert run0["digests"] != run_single["digests"]  # float sums differ in order: the digests are not vacuous
    assert run0["collectives"] == run1["collectives"] == collectives
    assert run0["ops"] == ["RedOpType.MAX", "RedOpType.SUM"]
    # item 6: the artifacts written on either rank are byte-identical
    with open(os.path.join(out, "rank0.fxqp"), "rb") as a, open(os.path.join(out, "rank1.fxqp"), "rb") as b:
        assert a.read() == b.read()
    assert sorted(rank0) == sorted(single)
    checked = {"mask": 0, "observer": 0, "average": 0}
    for name, reference in single.items():
        got = rank0[name]
        if _exact(name, reference):
            assert torch.equal(got, reference), name
        else:
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        leaf = name.rsplit(".", 1)[-1]
        checked["mask"] += leaf == "mask" and not bool(reference.all())
        checked["observer"] += leaf in ("lo", "hi", "initial_scale")
        checked["average"] += leaf in ("running", "running_latent")
    # the comparison covers pruned weight and activation masks, observers and averages
    assert checked["mask"] >= 5 and checked["observer"] >= 5 and checked["average"] >= 3, checked
    assert int(single["fxqp_schedule.step"]) == runs.STEPS


# --------------------------------------------------------------------- in one process


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank in this process (the collectives run, trivially)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((str(op), tensor.numel()))
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    monkeypatch.setattr(dist, "all_reduce", counting)
    return calls


class _Wide(nn.Module):
    """Ten activation sites."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(10))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _wide(**kwargs):
    spec = Spec(rules=[Rule(functions=["relu"], activation=[Quantize(bits=8), Prune(0.5, start=1, end=5)])])
    torch.manual_seed(0)
    return fxqp.transform(_Wide(), spec, example_inputs=(torch.zeros(2, 6),), **kwargs)


def test_two_collectives_per_training_forward_for_the_whole_model(world_of_one, counted):
    gm = _wide()
    x = torch.randn(4, 6)
    gm(x)
    # 10 sites, each a quantizer and a static pruner after it: one MAX of the quantizers' 2
    # values each, one SUM of the pruners' 6 per-feature sums of |x|, 6 of the unquantized
    # |x| (their tie-break) and a count each
    assert counted == [("RedOpType.MAX", 20), ("RedOpType.SUM", 130)]
    counted.clear()
    gm.eval()
    gm(x)
    assert counted == []  # evaluation records nothing: no collective (evaluating on one rank is safe)


def test_process_group_false_keeps_statistics_local(world_of_one, counted):
    gm = _wide(process_group=False)
    gm(torch.randn(4, 6))
    assert counted == []
    fxqp.set_process_group(gm, None)
    gm(torch.randn(4, 6))
    assert len(counted) == 2


def test_weight_ops_need_no_collective(world_of_one, counted):
    spec = Spec(rules=[Rule(modules=["Linear"], weight=[Prune(0.5, start=0, end=3), Quantize(bits=4)])])
    gm = fxqp.transform(_Wide(), spec)
    for _ in range(4):
        gm(torch.randn(4, 6))
    assert counted == []


def test_an_explicit_group_is_used_and_survives_a_deep_copy(world_of_one, counted):
    import copy

    group = dist.new_group([0])
    gm = _wide(process_group=group)
    twin = copy.deepcopy(gm)
    assert fxqp.schedule.find_schedule(twin).process_group is group
    twin(torch.randn(4, 6))
    assert len(counted) == 2


def test_process_group_is_checked():
    with pytest.raises(fxqp.FxqpError, match="process_group must be a torch.distributed ProcessGroup, None .* or False"):
        _wide(process_group="world")


def test_without_torch_distributed_nothing_is_reduced(counted):
    assert not dist.is_initialized()
    _wide()(torch.randn(4, 6))
    assert counted == []


def test_a_pickled_model_commits_the_statistics_of_its_own_ops():
    import pickle

    gm = _wide()
    gm(torch.randn(4, 6))
    again = pickle.loads(pickle.dumps(gm))
    schedule = fxqp.schedule.find_schedule(again)
    ops = {id(m) for m in again.modules()}
    assert len(schedule.observers) == 20 and all(id(op) in ops for op in schedule.observers)
    x = torch.randn(4, 6) * 3
    again(x)
    quantizer = again.fxqp_stages.relu.ops[0]
    assert quantizer.hi.item() == pytest.approx(
        0.9 * gm.fxqp_stages.relu.ops[0].hi.item() + 0.1 * torch.relu(again.get_submodule("layers.0")(x)).max().item(), rel=1e-5
    )
