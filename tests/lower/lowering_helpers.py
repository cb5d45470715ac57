"""Helpers shared by the lowering tests."""

from pathlib import Path

import torch

from fxqp import Prune, Quantize, Rule, Spec
from fxqp.lower.artifact import encode_artifact, read_artifact

# resnet18: 4-bit, 50%-pruned convs and linear; 8-bit, 30%-pruned ReLU and add outputs
RESNET_SPEC = Spec(
    rules=[
        Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
        Rule(modules=["ReLU"], functions=["add"], activation=[Quantize(bits=8), Prune(sparsity=0.3)]),
    ]
)


#: Every weight scheme and activation form a lowered ReusedReluNet holds: 4-bit symmetric,
#: 3-bit affine and binary weights (two pruned), an 8-bit observer, LSQ, a static mask and
#: dynamic top-k.
EVERY_FORM_SPEC = Spec(
    rules=[
        Rule(names=["conv1"], weight=[Prune(sparsity=0.5), Quantize(bits=4)]),
        Rule(names=["conv2"], weight=[Quantize(bits=3, symmetric=False), Prune(sparsity=0.3)]),
        Rule(names=["fc"], weight=[Quantize(bits=1)]),
        Rule(names=["act"], activation=[Quantize(bits=8)]),
        Rule(functions=["add"], activation=[Quantize(bits=5, learned=True)]),
        Rule(functions=["relu"], activation=[Prune(sparsity=0.3)]),
        Rule(functions=["flatten"], activation=[Prune(sparsity=0.25, dynamic=True)]),
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


def rewrite_artifact(path, edit, to=None):
    """Rewrite an artifact through ``edit(header, blobs)`` and recompute its digests (of the
    header text and of the data), so that only fxqp's own consistency checks can notice;
    written to ``to`` (default: in place)."""
    header, blobs = read_artifact(path)
    del header["data_sha256"]
    edit(header, blobs)
    Path(to or path).write_bytes(encode_artifact(header, blobs))
