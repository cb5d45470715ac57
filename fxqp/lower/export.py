"""``fxqp.export``: a lowered model as a ``torch.export`` program that needs plain torch only."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import fx

from fxqp.atomic import atomic_path
from fxqp.errors import LoweringError
from fxqp.lower.lower import is_lowered, weight_sites

__all__ = ["export"]


def export(
    model: fx.GraphModule,
    args: tuple[Any, ...],
    path: str | os.PathLike | None = None,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """Export a lowered model with ``torch.export`` and, with ``path``, save it.

    The program's graph decodes the packed buffers with ordinary aten ops at every call (the
    weights are exported in their packed form, whatever the model's decode mode), so
    ``torch.export.load(path).module()(x)`` runs in a process that never imports fxqp. The
    file is written atomically (a temporary file beside ``path``, then renamed).

    Args:
        model: a lowered model (:func:`fxqp.lower` or :func:`fxqp.load`); not modified.
        args: example positional inputs.
        path: where to ``torch.export.save`` the program (``.pt2``), or ``None``.
        kwargs: example keyword inputs, passed to ``torch.export.export``.
        dynamic_shapes: passed to ``torch.export.export``.

    Raises:
        LoweringError: ``model`` is not a lowered model.
    """
    if not is_lowered(model):
        raise LoweringError(f"fxqp.export expects a lowered model (from fxqp.lower or fxqp.load), got {type(model).__name__}")
    program_model = copy.deepcopy(model)
    for _, _, params in weight_sites(program_model):
        params[0].set_decode("on_the_fly")
    program_model.eval()
    program = torch.export.export(program_model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.export.save(program, tmp)
    return program
