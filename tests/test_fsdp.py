"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on transformed models, two CPU ranks (gloo).

One spawn of two ranks runs every scenario (module fixture ``runs``); the tests compare what
each rank saved with a single process trained on the concatenated batches:

* sharding the root and the modules the graph calls: the trained tensors
  (``parametrizations.weight.original``) become DTensors sharded along dim 0; each forward
  gathers them and the op chain runs on the whole weight, so the masks are identical on both
  ranks and equal to the single process's, and so are the weights after SGD steps;
* activation stages and their observers run (both ranks see the same batch here: each rank's
  observers see its own batch unless they are synchronised across ranks);
* coupled filter pruning scored by the next layer reads that layer's weight as it is now
  (a sharded one is gathered), not the tensor the transform saw;
* a full state dict loads into an unsharded transformed copy, which lowers; the sharded
  model itself is refused by ``fxqp.lower`` with a LoweringError that says so;
* a module that the graph does not call (one traced through: its code is inlined) is never
  gathered: sharding it leaves its weights sharded in the forward, which fails.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxqp
from fxqp import Prune, Quantize, Rule, Spec

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
STEPS = 5
LR = 0.1
TIMEOUT_S = 180  # a hung collective fails the test instead of the run


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.block(x))


def mlp(activations: bool) -> torch.fx.GraphModule:
    """The MLP transformed: fc1 pruned then quantized (the fused eager path), fc2 quantized
    then pruned (ties broken by the latent weight), both masks ramping over steps 1-4."""
    torch.manual_seed(0)
    rules = [
        Rule(names=["fc1"], weight=[Prune(sparsity=0.5, start=1, end=4, every=1), Quantize(bits=4)]),
        Rule(names=["fc2"], weight=[Quantize(bits=4), Prune(sparsity=0.5, start=1, end=4, every=1)]),
    ]
    if activations:
        rules.append(Rule(modules=["ReLU"], activation=[Quantize(bits=8)]))
    return fxqp.transform(Mlp(), Spec(rules=rules)).train()


def chain() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    spec = Spec(rules=[Rule(names=["a"], weight=[Prune(sparsity=0.25, structure="filter", score_from="next", start=1), Quantize(bits=4)])])
    return fxqp.transform(Chain(), spec, example_inputs=(torch.randn(2, 3, 5, 5),)).train()


def batches(shape_in, shape_out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, *shape_in, generator=g), torch.randn(4, *shape_out, generator=g)) for _ in range(STEPS)]


def train(gm: nn.Module, data, rank: int | None = None) -> None:
    """SGD on ``data``; with ``rank``, on that rank's half of each batch."""
    opt = torch.optim.SGD(gm.parameters(), lr=LR)
    for x, y in data:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        F.mse_loss(gm(x), y).backward()
        opt.step()
        opt.zero_grad()


def fade_inputs(weight: torch.Tensor) -> None:
    """Input channels 1 and 6 of ``b`` hardly read: scored by the next layer, filters 1 and 6
    of ``a`` go first (on a sharded weight: the rows of this rank)."""
    with torch.no_grad():
        weight[:, [1, 6]] *= 0.001


def buffers(gm: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in gm.named_buffers()}


# --------------------------------------------------------------------------- the two ranks


def _worker(rank: int, init: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    full = StateDictOptions(full_state_dict=True)
    saved = {}
    try:
        # the modules the graph calls, then the root
        gm = mlp(activations=False)
        fully_shard(gm.fc1)
        fully_shard(gm.fc2)
        fully_shard(gm)
        original = gm.fc1.parametrizations.weight.original
        saved["sharded"] = (isinstance(original, DTensor), tuple(original.to_local().shape), tuple(original.shape))
        train(gm, batches((8,), (4,)), rank)
        saved["mlp_buffers"] = buffers(gm)
        saved["mlp_state"] = get_model_state_dict(gm, options=full)
        try:
            fxqp.lower(gm)
            saved["lower_sharded"] = "no error"
        except fxqp.LoweringError as exc:
            saved["lower_sharded"] = str(exc)

        # the root only, with activation stages: both ranks see the whole batch
        gm = mlp(activations=True)
        fully_shard(gm)
        train(gm, batches((8,), (4,)))
        saved["act_buffers"] = buffers(gm)
        saved["act_state"] = get_model_state_dict(gm, options=full)

        # coupled filters scored by a layer sharded on its own
        gm = chain()
        fully_shard(gm.a)
        fully_shard(gm.b)
        fully_shard(gm)
        fade_inputs(gm.b.weight.to_local())
        train(gm, batches((3, 5, 5), (4, 5, 5)), rank)
        saved["chain_buffers"] = buffers(gm)
        saved["chain_state"] = get_model_state_dict(gm, options=full)

        # a module traced through is never called, so never gathered: the ops get the
        # sharded DTensor (fxqp's native kernels decline it: a tensor subclass goes to torch's
        # ops, which raise, instead of the kernels reading a shard as the whole weight)
        torch.manual_seed(0)
        gm = fxqp.transform(Blocks(), Spec(rules=[Rule(modules=["Linear"], weight=[Quantize(bits=4)])])).train()
        fully_shard(gm.block)
        fully_shard(gm)
        try:
            gm(torch.randn(2, 8))
            saved["inlined"] = "no error"
        except RuntimeError as exc:
            saved["inlined"] = str(exc)
    finally:
        torch.save(saved, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each rank saved. Spawned, not forked: the test process may hold threads (OpenMP,
    compile workers) that a forked child would inherit the locks of."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp")
    ranks = mp.start_processes(_worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in ranks.processes:
                process.terminate()
            pytest.fail(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s")
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_states_close(state: dict, reference: dict) -> None:
    assert set(state) == set(reference)
    for key, expected in reference.items():
        if expected.dtype.is_floating_point:
            torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(state[key], expected), key


# --------------------------------------------------------------------------- the tests


def test_trained_weights_are_sharded_dtensors(runs):
    for rank in runs:
        assert rank["sharded"] == (True, (8, 8), (16, 8))  # half of fc1's 16 rows on each rank


def test_training_matches_one_process_on_the_whole_batches(runs):
    reference = mlp(activations=False)
    train(reference, batches((8,), (4,)))
    for rank in runs:
        assert_states_close(rank["mlp_state"], reference.state_dict())
        # the masks come from the whole weight: the same on both ranks, the single process's
        assert_states_close(rank["mlp_buffers"], dict(reference.named_buffers()))
    assert float(1 - reference.fc1.parametrizations.weight[0].mask.float().mean()) == 0.5  # the ramp ran to its end


def test_activation_stages_train_under_fsdp(runs):
    reference = mlp(activations=True)
    train(reference, batches((8,), (4,)))
    stage = next(m for m in reference.modules() if isinstance(m, fxqp.stages.ActivationStage))
    assert stage.ops[0].hi > 0  # observed
    for rank in runs:
        assert_states_close(rank["act_state"], reference.state_dict())
        assert_states_close(rank["act_buffers"], dict(reference.named_buffers()))


def test_coupled_filters_read_the_current_weight_of_a_sharded_reader(runs):
    reference = chain()
    fade_inputs(reference.b.weight)
    train(reference, batches((3, 5, 5), (4, 5, 5)))
    keep = reference.fxqp_groups.a.keep
    assert torch.nonzero(~keep).flatten().tolist() == [1, 6]
    for rank in runs:
        assert torch.equal(rank["chain_buffers"]["fxqp_groups.a.keep"], keep)
        assert_states_close(rank["chain_state"], reference.state_dict())


def test_full_state_dict_loads_into_a_transformed_copy_that_lowers(runs):
    state = runs[0]["mlp_state"]
    copy = mlp(activations=False)
    copy.load_state_dict(state)
    low = fxqp.lower(copy)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = copy.eval()(x)
        torch.testing.assert_close(low(x), expected)
    sparsity = 1 - copy.fc1.parametrizations.weight[0].mask.float().mean()
    assert float(sparsity) == pytest.approx(0.5)


def test_a_sharded_model_is_not_lowered_itself(runs):
    for rank in runs:
        assert rank["lower_sharded"].startswith("the model is sharded by torch.distributed.fsdp.fully_shard (the root, fc1, fc2)")


def test_a_sharded_module_the_graph_does_not_call_stays_sharded(runs):
    for rank in runs:
        assert "got mixed torch.Tensor and DTensor" in rank["inlined"]
