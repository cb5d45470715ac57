"""Parametrize a parameter with a chain of modules.

``parametrize(model, "layer1.0.conv1.weight", [p1, p2])`` registers ``p1`` then
``p2`` with ``torch.nn.utils.parametrize``, so reading the weight gives
``p2(p1(w))`` while the optimizer keeps training the original tensor, now at
``layer1.0.conv1.parametrizations.weight.original`` (the same ``Parameter``
object as before).  The graph of a GraphModule does not change: the module
reads its weight through the parametrization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize as torch_parametrize

from passes.errors import PassError

__all__ = ["original_of", "parametrizations_of", "parametrize"]


def parametrize(
    gm_or_module: nn.Module,
    param_path: str,
    parametrizations: Sequence[nn.Module],
    *,
    check: bool = True,
) -> None:
    """Register ``parametrizations`` on the parameter at ``param_path``, in order.

    The first module of the list is applied first: the parameter reads as
    ``p_n(...p_2(p_1(w)))``.  With ``check`` (the default) registration uses
    ``unsafe=False``: torch runs each parametrization once to verify that it keeps the
    shape and dtype. Pass ``check=False`` for parametrizations known to keep both, to skip
    those forward calls (and their side effects): each entry is then registered with
    ``unsafe=True``.  If the parameter already has parametrizations, the new ones are
    applied after them.

    Args:
        gm_or_module: the root module (a GraphModule or any ``nn.Module``).
        param_path: dotted path of a parameter, e.g. ``"layer1.0.conv1.weight"``.
        parametrizations: the modules to register.

    Raises:
        PassError: the module or the parameter does not exist, the attribute is
            not an ``nn.Parameter`` (a buffer, a plain tensor), an entry is not
            an ``nn.Module``, or torch refuses a parametrization.  On error the
            parametrizations registered by this call are removed again.
    """
    module, name = _owner_and_name(gm_or_module, param_path)
    was_parametrized = torch_parametrize.is_parametrized(module, name)
    if was_parametrized:
        original = module.parametrizations[name].original
    else:
        original = module._parameters.get(name)
    if not isinstance(original, nn.Parameter):
        if hasattr(module, name):
            kind = type(getattr(module, name)).__name__
            problem = f"{name!r} is a {kind}, not an nn.Parameter"
        else:
            problem = f"{type(module).__name__} has no attribute {name!r}"
        raise PassError(f"cannot parametrize {param_path!r}: {problem}")
    for p in parametrizations:
        if not isinstance(p, nn.Module):
            raise PassError(f"cannot parametrize {param_path!r}: parametrizations must be nn.Module instances, got {type(p).__name__}")

    registered = 0
    try:
        for p in parametrizations:
            torch_parametrize.register_parametrization(module, name, p, unsafe=not check)
            registered += 1
    except Exception as exc:
        _unregister_last(module, name, registered, was_parametrized)
        raise PassError(f"cannot parametrize {param_path!r} with {type(p).__name__}: {type(exc).__name__}: {exc}") from exc


def parametrizations_of(module: nn.Module, name: str) -> list[nn.Module]:
    """The parametrizations of ``module.<name>``, first applied first.

    ``name`` may also be a dotted path below ``module`` (``"conv1.weight"``).
    Returns an empty list when the tensor is not parametrized.
    """
    owner, name = _owner_and_name(module, name)
    if not torch_parametrize.is_parametrized(owner, name):
        return []
    return list(owner.parametrizations[name])


def original_of(module: nn.Module, name: str) -> torch.Tensor:
    """The unparametrized tensor behind ``module.<name>``.

    This is the tensor the optimizer trains.  For a tensor without
    parametrizations it is the tensor itself.  ``name`` may also be a dotted
    path below ``module``.

    Raises:
        PassError: no such tensor, or the parametrization splits it into several
            original tensors.
    """
    owner, tensor_name = _owner_and_name(module, name)
    if torch_parametrize.is_parametrized(owner, tensor_name):
        chain = owner.parametrizations[tensor_name]
        if not chain.is_tensor:
            raise PassError(f"{name!r} is parametrized by several original tensors (original0, original1, ...), not one")
        return chain.original
    value = getattr(owner, tensor_name, None)
    if not isinstance(value, torch.Tensor):
        raise PassError(f"{name!r} is not a tensor of {type(owner).__name__}")
    return value


def _owner_and_name(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``"a.b.weight"`` -> (``root.a.b``, ``"weight"``), as a PassError if missing."""
    if not isinstance(root, nn.Module):
        raise PassError(f"expected an nn.Module, got {type(root).__name__}")
    if not isinstance(path, str) or not all(path.split(".")):
        raise PassError(f"invalid parameter path {path!r}")
    module_path, _, name = path.rpartition(".")
    try:
        owner = root.get_submodule(module_path)
    except AttributeError as exc:
        raise PassError(f"cannot find {path!r}: {module_path!r} is not a submodule of {type(root).__name__}") from exc
    return owner, name


def _unregister_last(module: nn.Module, name: str, count: int, was_parametrized: bool) -> None:
    """Undo the last ``count`` registrations on ``module.<name>``."""
    if count == 0:
        return
    if was_parametrized:
        del module.parametrizations[name][-count:]
    else:
        torch_parametrize.remove_parametrizations(module, name, leave_parametrized=False)
