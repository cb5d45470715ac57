"""Buffers and plain attributes of an op, set in one step: the one place where fxqp writes
an ``nn.Module``'s state past ``register_buffer`` and ``nn.Module.__setattr__``.

The transform builds several ops per site: thousands for a large model. ``register_buffer``
checks each name against every attribute of the module (a failed ``__getattr__`` lookup,
the costliest part) and ``nn.Module.__setattr__`` searches the parameter, buffer and
submodule dicts for each plain value; for the ops' own fixed names neither check can fail.
What that saves a transform is measured in docs/developers.md. ``tests/test_op_state.py`` compares what this sets with what
torch's calls set, so that it fails when torch keeps a module's state otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

__all__ = ["set_state"]


def set_state(
    module: nn.Module, buffers: Mapping[str, Tensor] | None = None, *, persistent: bool = True, plain: Mapping[str, Any] | None = None
) -> None:
    """``module.register_buffer(name, tensor, persistent=persistent)`` for each of
    ``buffers`` (new names, or names of buffers to replace), and ``setattr(module, name,
    value)`` for each of ``plain`` (flags, numbers, configs: never a tensor or a module, and
    never the name of a parameter, buffer or submodule); without their per-name checks. With
    global buffer registration hooks installed, buffers go through ``register_buffer``."""
    if buffers:
        if nn.modules.module._global_buffer_registration_hooks:
            for name, tensor in buffers.items():
                module.register_buffer(name, tensor, persistent=persistent)
        else:
            module._buffers.update(buffers)
            if persistent:
                module._non_persistent_buffers_set.difference_update(buffers)
            else:
                module._non_persistent_buffers_set.update(buffers)
    if plain:
        module.__dict__.update(plain)
