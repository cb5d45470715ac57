"""Parametrize a parameter with a chain of modules.

``parametrize(model, "layer1.0.conv1.weight", [p1, p2])`` registers ``p1`` then
``p2`` with ``torch.nn.utils.parametrize``, so reading the weight gives
``p2(p1(w))`` while the optimizer keeps training the original tensor, now at
``layer1.0.conv1.parametrizations.weight.original`` (the same ``Parameter``
object as before).  The graph of a GraphModule does not change: the module
reads its weight through the parametrization.
"""

from __future__ import annotations

import functools
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
    those forward calls (and their side effects); on a module with no parametrization yet
    the whole list is then registered in one step, with the same result as torch's
    registration of one entry at a time (see :func:`_register_at_once`).  If the parameter
    already has parametrizations, the new ones are applied after them.

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

    if not check and not was_parametrized and _can_register_at_once(module, parametrizations):
        _register_at_once(module, name, original, parametrizations)
        return
    registered = 0
    try:
        for p in parametrizations:
            torch_parametrize.register_parametrization(module, name, p, unsafe=not check)
            registered += 1
    except Exception as exc:
        _unregister_last(module, name, registered, was_parametrized)
        raise PassError(f"cannot parametrize {param_path!r} with {type(p).__name__}: {type(exc).__name__}: {exc}") from exc


def _can_register_at_once(module: nn.Module, parametrizations: Sequence[nn.Module]) -> bool:
    """Whether :func:`_register_at_once` builds what torch's registration would: the module
    has no parametrization yet, no entry has a ``right_inverse`` (torch would call it), no
    global module or parameter registration hook is installed (torch would call them),
    and the installed torch builds the same objects (:func:`_register_at_once_matches_torch`)."""
    if torch_parametrize.is_parametrized(module) or not parametrizations:
        return False
    taken = (module.__dict__, module._parameters, module._buffers, module._modules, vars(type(module)))
    if any("parametrizations" in names for names in taken):  # torch would replace that attribute
        return False
    if any(hasattr(p, "right_inverse") for p in parametrizations):
        return False
    hooks = nn.modules.module
    if hooks._global_module_registration_hooks or hooks._global_parameter_registration_hooks:
        return False
    return _register_at_once_matches_torch()


def _register_at_once(module: nn.Module, name: str, original: nn.Parameter, parametrizations: Sequence[nn.Module]) -> None:
    """Parametrize ``module.<name>`` (a parameter of a module that has no parametrization
    yet) with the whole chain at once, building the objects that one
    ``register_parametrization(..., unsafe=True)`` call per entry builds.

    torch's registration runs the module machinery once per entry (a ``ParametrizationList``
    and a ``ModuleDict`` through ``__init__``/``__setattr__``, an append and a ``train()`` per
    entry, the checks): most of the cost of parametrizing a weight, repeated for the
    thousands of weights of a large model (what that costs a transform is measured in
    docs/developers.md).
    Here the list and the dict are filled directly; the class with the ``name`` property is
    still made by torch's own ``_inject_new_class`` and ``_inject_property``, so reading,
    caching, deep copies and ``remove_parametrizations`` behave as after torch's
    registration. The list's ``original`` is the same ``Parameter`` object (torch sets it to
    itself), so an optimizer built before keeps training it.
    """
    for p in parametrizations:
        p.train(module.training)
    chain = torch_parametrize.ParametrizationList.__new__(torch_parametrize.ParametrizationList)
    nn.Module.__init__(chain)
    chain._modules.update((str(i), p) for i, p in enumerate(parametrizations))
    chain._parameters["original"] = original
    chain.__dict__.update(unsafe=True, is_tensor=True, ntensors=1)
    del module._parameters[name]
    torch_parametrize._inject_new_class(module)
    holder = nn.ModuleDict.__new__(nn.ModuleDict)
    nn.Module.__init__(holder)
    holder._modules[name] = chain
    module._modules["parametrizations"] = holder
    torch_parametrize._inject_property(module, name)


@functools.cache
def _register_at_once_matches_torch() -> bool:
    """Whether :func:`_register_at_once` gives the same objects as torch's registration:
    checked once, on two small modules, so that a torch version that builds its
    parametrizations differently gets its own registration instead."""
    try:
        ours, theirs = nn.Linear(2, 2).eval(), nn.Linear(2, 2).eval()  # the entries take the module's mode
        _register_at_once(ours, "weight", ours.weight, [nn.Identity(), nn.Identity()])
        for p in (nn.Identity(), nn.Identity()):
            torch_parametrize.register_parametrization(theirs, "weight", p, unsafe=True)
    except Exception:
        return False

    def shape(module: nn.Module) -> tuple:
        chain = module.parametrizations.weight
        return (
            type(module).__bases__,
            sorted(vars(type(module))),
            sorted(vars(module)),
            sorted(vars(module.parametrizations)),
            {k: v for k, v in vars(module.parametrizations).items() if not isinstance(v, dict)},
            sorted(module.parametrizations._modules),
            type(chain),
            {k: v for k, v in vars(chain).items() if not isinstance(v, dict)},
            sorted(vars(chain)),
            [p.training for p in chain],
            {k: sorted(v) for k, v in vars(chain).items() if isinstance(v, dict)},
            sorted(module.state_dict()),
        )

    return (
        shape(ours) == shape(theirs)
        and ours.parametrizations.weight.original is not None
        and torch.equal(ours.weight, ours.parametrizations.weight.original)
    )


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
