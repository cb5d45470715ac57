"""Small built-in networks for the demo and ``fxqp train``, and ``--model`` resolution.

``--model`` accepts a built-in name (:data:`BUILTIN_MODELS`), ``torchvision:<name>``
(built untrained with ``num_classes``), ``torchvision:<name>:<weights>`` (with weights from
the local torch cache, never downloaded; a new classifier when the data's classes differ),
``path/to/file.py:factory`` (a callable defined in that file) or ``module.path:factory``
(any importable callable). A factory returns an ``nn.Module``; it receives ``num_classes=``
when the task is classification and the callable accepts it.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any, Callable

import torch
from torch import nn

from fxqp.errors import FxqpError

__all__ = ["DigitsNet", "DigitsVGG", "ESPCN", "BUILTIN_MODELS", "ModelError", "build_model", "build_for_data", "default_model"]


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


def cached_weights_path(weights: object) -> str:
    """Where torch's hub cache keeps the file of a torchvision ``weights`` entry
    (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    import os

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _torchvision_pretrained(name: str, arch: str, weights_name: str, num_classes: int | None) -> nn.Module:
    """torchvision model ``arch`` with its ``weights_name`` weights (``DEFAULT`` or an entry
    of its weights enum, e.g. ``IMAGENET1K_V1``) read from the local torch cache — never
    downloaded. With another ``num_classes`` than the weights', the last linear layer that
    produces the weights' classes is replaced by a new one (initialised as torch does)."""
    import os

    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum[weights_name] if weights_name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ModelError(
            f"--model {name}: {arch} has no weights {weights_name!r}; expected DEFAULT or one of {', '.join(w.name for w in enum)}"
        ) from None
    path = cached_weights_path(weights)
    if not os.path.isfile(path):
        raise ModelError(
            f"--model {name}: weights {weights} are not in the local torch cache ({path}); fxqp downloads nothing: put the file there (from {weights.url}) or set TORCH_HOME"
        )
    model = torchvision.models.get_model(arch, weights=None)
    try:
        # torchvision reads the cached file (with torch's weights-only loader); it is there, so nothing is downloaded
        model.load_state_dict(weights.get_state_dict(progress=False))
    except (RuntimeError, OSError, ValueError) as err:
        raise ModelError(f"--model {name}: cannot load {path} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    classes = len(weights.meta.get("categories") or ())
    if num_classes is not None and classes and num_classes != classes:
        head = [path for path, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == classes]
        if not head:
            raise ModelError(
                f"--model {name}: the weights give {classes} classes, the data {num_classes}, and no linear layer with {classes} outputs was found to replace"
            )
        old = model.get_submodule(head[-1])
        model.set_submodule(head[-1], nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        warnings.warn(
            f"--model {name}: {head[-1]} ({classes} outputs) is replaced by a new, untrained layer with {num_classes} outputs for the data's classes",
            stacklevel=2,
        )
    return model


def build_for_data(name: str | None, data: Any) -> nn.Module:
    """Build ``--model name`` for a data set: ``data`` has ``kind``, ``classes``,
    ``in_channels`` and ``scale`` (:class:`fxqp.data.TaskData`, ``fxqp train``'s data). The
    classes are passed for classification, the upscaling factor for super-resolution;
    ``name=None`` builds the built-in model of the data's kind."""
    name = name or default_model(data.kind)
    if data.kind == "classification":
        return build_model(name, num_classes=len(data.classes), in_channels=data.in_channels)
    return build_model(name, in_channels=data.in_channels, scale=data.scale)


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
        arch, _, weights = name.removeprefix("torchvision:").partition(":")
        if arch not in torchvision.models.list_models():
            raise ModelError(f"--model {name}: torchvision has no model {arch!r}; see torchvision.models.list_models()")
        if weights:
            return _torchvision_pretrained(name, arch, weights, num_classes)
        return _call(lambda **kw: torchvision.models.get_model(arch, weights=None, **kw), name, **kwargs)
    source, sep, attr = name.rpartition(":")  # rpartition: a Windows path has a colon of its own
    if not sep or not source or not attr:
        raise ModelError(
            f"--model {name!r}: expected one of {', '.join(BUILTIN_MODELS)}, torchvision:NAME, path/to/file.py:factory or module.path:factory"
        )
    module = _load_file(name, source) if source.endswith(".py") else _import(name, source)
    factory = getattr(module, attr, None)
    if not callable(factory):
        where = source if source.endswith(".py") else f"module {source!r}"
        defined = sorted(
            k
            for k, v in vars(module).items()
            if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        known = f"; it defines {', '.join(defined[:8])}{', ...' if len(defined) > 8 else ''}" if defined else ""
        raise ModelError(f"--model {name}: {where} has no callable {attr!r}{known}")
    return _call(factory, name, **kwargs)


def _import(name: str, module_name: str) -> object:
    """``--model module.path:factory``: the module, or a :class:`ModelError` saying how to make
    it importable."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(f"{err.name}.")):
            raise ModelError(
                f"--model {name}: importing module {module_name!r} failed: it imports {err.name!r}, which is not installed ({err})"
            ) from None
        raise ModelError(
            f"--model {name}: cannot import module {module_name!r} ({err}); put the folder that holds it on PYTHONPATH "
            f"(PYTHONPATH=path/to/folder fxqp ...), or pass its file: --model path/to/{module_name.split('.')[-1]}.py:{name.rpartition(':')[2]}"
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module failed to run: say which
        raise ModelError(f"--model {name}: importing module {module_name!r} failed ({type(err).__name__}: {err})") from None


def _load_file(name: str, path: str) -> object:
    """``--model path/to/file.py:factory``: the file run as a module of its own, named after
    the file's absolute path (``fxqp_model_<stem>_<digest>``: the same file gets the same name, two files
    never share one), registered in ``sys.modules`` so that its classes can be pickled."""
    import hashlib
    import importlib.util
    import os
    import re
    import sys

    if not os.path.isfile(path):
        raise ModelError(
            f"--model {name}: no such file {path!r}"
            + ("" if os.path.exists(path) else " (a path relative to the working directory, or absolute)")
        )
    full = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    module_name = f"fxqp_model_{stem}_{hashlib.sha256(full.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, full)
    if spec is None or spec.loader is None:
        raise ModelError(f"--model {name}: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failed to run: say which
        del sys.modules[module_name]
        hint = ""
        if isinstance(err, ModuleNotFoundError) and err.name:
            folder, top = os.path.dirname(full), err.name.split(".")[0]
            beside = os.path.isfile(os.path.join(folder, f"{top}.py")) or os.path.isdir(os.path.join(folder, top))
            hint = (
                f"; {top!r} is next to it: put its folder on PYTHONPATH (PYTHONPATH={folder})"
                if beside
                else f"; {err.name!r} is not installed"
            )
        raise ModelError(f"--model {name}: running {path} failed ({type(err).__name__}: {err}){hint}") from None
    return module
