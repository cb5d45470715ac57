"""Helpers shared by the lowering tests."""

import torch

from fxqp import Prune, Quantize, Rule, Spec

# resnet18: 4-bit, 50%-pruned convs and linear; 8-bit, 30%-pruned ReLU and add outputs
RESNET_SPEC = Spec(
    rules=[
        Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
        Rule(modules=["ReLU"], functions=["add"], activation=[Quantize(bits=8), Prune(sparsity=0.3)]),
    ]
)


def train_steps(gm, inputs, lr=0.05):
    """A few training-mode steps (observers, masks, LSQ scales get state; the step advances),
    then eval mode."""
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=lr)
    gm.train()
    for x in inputs:
        opt.zero_grad()
        gm(x).float().pow(2).mean().backward()
        opt.step()
    gm.eval()
    return gm


def images(n, shape=(2, 3, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def assert_same(out, ref, what="output"):
    """Equal dtype, shape and values (bit for bit)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if not torch.equal(out, ref):
        diff = (out.double() - ref.double()).abs().max().item()
        raise AssertionError(f"{what} differs from the reference: max abs diff {diff:g}")
