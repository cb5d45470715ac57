"""A tiny quantized network and task for the search tests, and a worker entry point.

``python tests/search/tiny.py STORAGE STUDY N_TRIALS [SECONDS_PER_TRIAL]`` runs a joint ratio
search on the shared study as one worker (one torch thread), each trial fine-tuned for one
step that sleeps ``SECONDS_PER_TRIAL``; heartbeat every second, stale after 3.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from fxqp import Quantize, Rule, Spec

BASE = Spec(rules=[Rule(modules=["Conv2d"], exclude=["conv1"], weight=[Quantize(bits=4)])])
X = torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))


class TinyNet(nn.Module):
    """conv1 (float) → bn → relu → conv2 → bn → relu → conv3 → bn → relu → fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def train_fn(model: nn.Module, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(X[step % 4 * 16 : step % 4 * 16 + 16]), Y[step % 4 * 16 : step % 4 * 16 + 16]).backward()
        optimizer.step()


def evaluate_fn(model: nn.Module) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(X)
    return {"loss": float(F.cross_entropy(logits, Y)), "metric": float((logits.argmax(1) == Y).float().mean() * 100)}


def main(storage: str, study: str, n_trials: int, seconds: float = 0.0) -> None:
    from fxqp.search import Heartbeat, layer_ratios

    torch.set_num_threads(1)

    def slow_train(model: nn.Module, steps: int) -> None:
        time.sleep(seconds)
        train_fn(model, steps)

    layer_ratios(
        make_model,
        BASE,
        slow_train,
        evaluate_fn,
        example_inputs=X[:2],
        n_trials=n_trials,
        pretrain_steps=4,
        trial_steps=1 if seconds else 0,
        storage=storage,
        study_name=study,
        heartbeat=Heartbeat(interval=1, grace=3),
        finalize=False,
        progress=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
