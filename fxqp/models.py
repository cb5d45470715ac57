"""Small built-in networks for the demo and ``fxqp train``, and ``--model`` resolution.

``--model`` accepts a built-in name (:data:`BUILTIN_MODELS`), ``torchvision:<name>``
(built untrained with ``num_classes``) or ``module.path:factory`` (any importable callable
returning an ``nn.Module``; it receives ``num_classes=`` when the task is classification and
the callable accepts it).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from fxqp.errors import FxqpError

__all__ = ["DigitsNet", "DigitsVGG", "ESPCN", "BUILTIN_MODELS", "ModelError", "build_model", "default_model"]


class ModelError(FxqpError):
    """A ``--model`` argument that cannot be resolved or built."""


class DigitsNet(nn.Module):
    """A small CNN for 8×8 digits: two 3×3 conv+ReLU blocks, a 2×2 max-pool, a third
    conv+ReLU and a linear classifier on the flattened 4×4 maps (ReLU modules and
    functional relu)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


class DigitsVGG(nn.Module):
    """A VGG-style CNN for 8×8 digits: three blocks of two 3×3 conv + batch norm + ReLU
    (``width``, ``2·width``, ``4·width`` channels), 2×2 max-pools after the first two
    blocks, global average pooling and a linear classifier. Six convolutions, each its own
    channel group: a network with a filter-pruning ratio to choose per layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        widths = [width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        previous = in_channels
        for i, channels in enumerate(widths):
            layers += [nn.Conv2d(previous, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class ESPCN(nn.Module):
    """Efficient sub-pixel CNN (Shi et al., 2016) for ×``scale`` super-resolution:
    5×5 conv(64) → ReLU → 3×3 conv(32) → ReLU → 3×3 conv(scale²·C) → pixel shuffle.

    ReLU (instead of the paper's tanh) gives the activation sites the non-negative,
    prunable outputs the seed paper's experiment prunes."""

    def __init__(self, scale: int = 3, channels: int = 1, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.conv3 = nn.Conv2d(width // 2, channels * scale * scale, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.shuffle(self.conv3(x))


#: Built-in ``--model`` names.
BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"digits-cnn": DigitsNet, "digits-vgg": DigitsVGG, "espcn": ESPCN}


def default_model(kind: str) -> str:
    """The built-in model for a task kind (``classification`` or ``super_resolution``)."""
    return "espcn" if kind == "super_resolution" else "digits-cnn"


def _call(factory: Callable[..., nn.Module], what: str, **kwargs) -> nn.Module:
    try:
        params = inspect.signature(factory).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in kwargs.items() if accepts_any or k in params}
    except (TypeError, ValueError):
        pass  # builtins without a signature: call with everything
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's factory failed: say which
        raise ModelError(f"--model {what}: building the model failed ({type(err).__name__}: {err})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {what}: the factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def build_model(name: str, *, num_classes: int | None = None, in_channels: int = 3, scale: int | None = None) -> nn.Module:
    """Build ``--model name`` for a task (see the module doc for the accepted forms).

    ``num_classes`` is given for classification, ``scale`` for super-resolution; each is
    passed only to factories whose signature accepts it.
    """
    kwargs: dict[str, int] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if scale is not None:
        kwargs["scale"] = scale
    if name in BUILTIN_MODELS:
        return _call(BUILTIN_MODELS[name], name, in_channels=in_channels, channels=in_channels, **kwargs)
    if name.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError:
            raise ModelError(f"--model {name}: torchvision is not installed (pip install torchvision)") from None
        arch = name.removeprefix("torchvision:")
        if arch not in torchvision.models.list_models():
            raise ModelError(f"--model {name}: torchvision has no model {arch!r}; see torchvision.models.list_models()")
        return _call(lambda **kw: torchvision.models.get_model(arch, weights=None, **kw), name, **kwargs)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"--model {name!r}: expected one of {', '.join(BUILTIN_MODELS)}, torchvision:NAME or module.path:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"--model {name}: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"--model {name}: module {module_name!r} has no callable {attr!r}")
    return _call(factory, name, **kwargs)
