"""Calling the user's ``train_fn`` and ``evaluate_fn`` from a search, checked."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fxqp.search.study import SearchError

__all__ = ["call_train", "evaluation_dict"]


def call_train(
    train_fn: Callable[..., Any], model: nn.Module, steps: int, what: str, report: Callable[[int, float], None] | None = None
) -> None:
    """``train_fn(model, steps)`` (with ``report=`` when it takes one), checked: the model's
    step counter must advance by ``steps``, or ops timed in fractions of the run would
    start at other steps than planned."""
    from fxqp.schedule import find_schedule

    if steps <= 0:
        return
    schedule = find_schedule(model)
    before = int(schedule.step)
    kwargs = {}
    if report is not None and "report" in _parameters(train_fn):
        kwargs["report"] = report
    train_fn(model, steps, **kwargs)
    advanced = int(schedule.step) - before
    if advanced != steps:
        raise SearchError(
            f"{what}: train_fn(model, {steps}) advanced the model's step counter by {advanced}; it must train exactly "
            f"{steps} steps (one training-mode forward each), or ops would start at other steps than planned"
        )


def _parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def evaluation_dict(result: Any, what: str = "evaluate_fn") -> dict[str, float]:
    """``evaluate_fn``'s result as ``{name: float}``; a plain number is ``{"value": x}``."""
    if isinstance(result, bool):
        raise SearchError(f"{what} returned {result!r}; expected a number or a mapping of names to numbers")
    if isinstance(result, (int, float)):
        return {"value": float(result)}
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        return {"value": float(result)}
    if not isinstance(result, Mapping):
        raise SearchError(f"{what} returned {type(result).__name__}; expected a number or a mapping of names to numbers")
    out = {}
    for key, value in result.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise SearchError(f"{what} returned {key!r}: {value!r}, not a number") from None
    return out
