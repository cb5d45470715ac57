"""Small networks shared by the tests: module calls mixed with functional call sites."""

import torch
import torch.nn.functional as F
from torch import nn


class ReusedReluNet(nn.Module):
    """One ReLU module called at two call sites, a functional relu, a residual add, a cat."""

    def __init__(self, channels: int = 4, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x):
        a = self.act(self.conv1(x))
        b = self.act(self.conv2(a))
        c = F.relu(a + b)
        pooled = torch.cat([F.adaptive_avg_pool2d(c, 1), F.adaptive_max_pool2d(b, 1)], dim=1)
        return self.fc(torch.flatten(pooled, 1))


class ConvBnConv(nn.Module):
    """A convolution, a batch norm and a second convolution: the smallest net whose lowering
    removes pruned filters (the producer, its norm, the consumer's input channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


class DataDependentBlock(nn.Module):
    """Not symbolically traceable: branches on a tensor value."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class NetWithUntraceableBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DataDependentBlock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.block(x)
        return self.fc(x.mean(dim=(2, 3)))


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.max() > 0:
            return self.fc(x)
        return self.fc(-x)


class MixedWeightsNet(nn.Module):
    """Weights of several module kinds: Embedding, Conv1d, ConvTranspose1d (channel axis 1),
    LayerNorm (1-D weight); input: int64 token ids of shape (N, L)."""

    def __init__(self, vocab: int = 10, dim: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv1d = nn.Conv1d(dim, 4, 3)
        self.deconv = nn.ConvTranspose1d(4, 5, 3)
        self.norm = nn.LayerNorm(5)

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)
        x = F.relu(self.deconv(self.conv1d(x)))
        return self.norm(x.transpose(1, 2))


def unsqueeze_flagged(x, dim):
    """Like torchvision's mvit helper: a tensor and a flag the caller reads later."""
    needs = x.dim() == 3
    return (x.unsqueeze(dim) if needs else x), needs


def squeeze_if(x, flag, dim):
    return x.squeeze(dim) if flag else x


torch.fx.wrap("unsqueeze_flagged")
torch.fx.wrap("squeeze_if")


class FlagReturningHelperNet(nn.Module):
    """A wrapped helper returns ``(tensor, bool)``; ``getitem`` of the flag is a call node
    whose value static inference cannot tell from a tensor."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y, added = unsqueeze_flagged(x, 1)
        y = torch.relu(self.fc(y))
        return squeeze_if(y, added, 1)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Head(nn.Module):
    """Iterates a list of feature maps (untraceable as a whole); its ``conv`` block is
    traceable, and its parent's code calls ``compute_loss``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.out = nn.Conv2d(4, 2, 1)
        self.bias_scale = 2.0

    def forward(self, features):
        return [self.out(self.conv(f)) for f in features]

    def compute_loss(self, outputs):
        return sum(o.pow(2).mean() for o in outputs) * self.bias_scale


class ListDetector(nn.Module):
    """A root that iterates its list of images, as torchvision's detectors do."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = Head()
        self.post = nn.ModuleList([Scale(0.5), Scale(3.0)])

    def forward(self, images):
        features = [self.backbone(image.unsqueeze(0)) for image in images]
        outputs = self.head(features)
        if self.training:
            return self.head.compute_loss(outputs)
        return [self.post[1](self.post[0](o)) for o in outputs]
