"""The built-in demo: a small CNN trained on random data through a prune-then-quantize
schedule. (The seed paper's experiment on real data replaces it in a later release.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fxqp.report import summary
from fxqp.spec import Prune, Quantize, Rule, Spec
from fxqp.transform import transform

__all__ = ["DemoNet", "demo_spec", "run_demo"]


class DemoNet(nn.Module):
    """Conv → ReLU → two residual blocks sharing one ReLU module → pooled Linear."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()  # called at two call sites: two independent activation sites
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.act(self.conv1(x))
        x = x + self.act(self.conv2(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def demo_spec(steps: int) -> Spec:
    """Prune weights (AGP ramp over the first half), then quantize weights and activations."""
    half = max(steps // 2, 2)
    return Spec(
        rules=[
            Rule(modules=["Conv2d", "Linear"], weight=[Prune(sparsity=0.5, start=steps // 10, end=half), Quantize(bits=4, start=half)]),
            Rule(modules=["ReLU"], functions=["relu", "add"], activation=[Quantize(bits=8, start=half), Prune(sparsity=0.3, start=half)]),
        ]
    )


def run_demo(steps: int = 120, seed: int = 0) -> float:
    """Train the demo network for ``steps`` steps, print the summary, return the last loss."""
    torch.manual_seed(seed)
    images = torch.randn(64, 3, 16, 16)
    labels = torch.randint(0, 10, (64,))
    spec = demo_spec(steps)
    print(spec.to_yaml())
    gm = transform(DemoNet(), spec)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    gm.train()
    loss = torch.tensor(float("nan"))
    for _ in (bar := tqdm(range(steps), desc="training", unit="step")):
        optimizer.zero_grad()
        loss = F.cross_entropy(gm(images), labels)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(summary(gm))
    print(f"final training loss: {loss.item():.4f}")
    return float(loss.item())
