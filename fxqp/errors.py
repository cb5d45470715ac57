"""Errors raised by fxqp.

Every error a user can trigger with bad input is a subclass of :class:`FxqpError`. Messages
name the offending rule, module path, graph node or file field, and what would be accepted.
"""

from __future__ import annotations

from passes.errors import ChannelRuleError as PassChannelRuleError
from passes.errors import GuardError

__all__ = [
    "ScheduleWarning",
    "NonFiniteWarning",
    "FxqpError",
    "SpecError",
    "PatternError",
    "TraceError",
    "SiteError",
    "LoweringError",
    "ArtifactError",
    "InputError",
    "ChannelRuleError",
]


class FxqpError(Exception):
    """Base class of every error fxqp raises on bad input."""


class SpecError(FxqpError, ValueError):
    """A spec (or one of its rules or ops) is invalid.

    The message starts with the location of the problem, e.g. ``rules[1].weight[0].bits``,
    and says which values would be accepted.
    """


class PatternError(SpecError):
    """A ``re:`` name selector is refused: it does not compile, is too long, or backtracks
    catastrophically on a name (:func:`fxqp.limits.name_regex_fullmatch`)."""


class TraceError(FxqpError):
    """A model could not be symbolically traced, even with the automatic leaf fallback.

    Attributes:
        module_path: dotted path of the submodule whose tracing failed (``""`` for the root).
        reason: the underlying error message.
    """

    def __init__(self, message: str, module_path: str = "", reason: str = ""):
        super().__init__(message)
        self.module_path = module_path
        self.reason = reason


class SiteError(FxqpError):
    """A selected site cannot carry the ops the spec gives it (e.g. a non-floating output)."""


class LoweringError(FxqpError):
    """A transformed model cannot be lowered to its packed inference form."""


class ArtifactError(FxqpError):
    """A saved artifact is malformed, corrupted or does not match the model."""


class InputError(FxqpError, GuardError):
    """At run time: an input differs from the example inputs the model was transformed with
    in a way its graph is specialised to (a rank or dtype a Python decision read); the
    message names the decision. Transform with example inputs of that kind."""


class ChannelRuleError(FxqpError, PassChannelRuleError):
    """A channel rule (:func:`fxqp.register_channel_rule`) is malformed, is registered for
    something that is not an ``nn.Module`` class, or does not fit a module of its class (an
    attribute it names is missing, a weight axis does not exist); the message names the
    class and the field."""


class ScheduleWarning(UserWarning):
    """A schedule that does not do what its spec asks: an op that never ran in a training
    forward before the model was lowered."""


class NonFiniteWarning(UserWarning):
    """Training batches with NaN or ±Inf values were left out of the activation statistics
    (observers, LSQ's initial step sizes, static pruning's averages): named by site, with
    the number of batches; the state keeps what the finite batches gave it."""
