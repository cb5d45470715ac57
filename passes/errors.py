"""Errors raised by the passes.

Every pass raises a :class:`PassError` (or a subclass) when its input is not what
it accepts.  The errors carry their details as attributes so that a caller (for
example a domain package wrapping these passes) can re-raise them in its own
terms without parsing messages.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PassError", "UntraceableError", "GuardError", "ChannelRuleError"]


class PassError(Exception):
    """Base class of every error raised by the ``passes`` package."""


class UntraceableError(PassError):
    """A model could not be symbolically traced, even with automatic leaves.

    Attributes:
        module_path: dotted path of the innermost module whose ``forward`` was
            running when tracing failed; ``""`` for the root module.
        reason: the underlying exception, as ``"TypeName: message"``.
        leaves: module paths that the automatic fallback had made leaves
            before giving up, in the order they were added.
        module_type: class name of the failing module (``""`` when unknown).
        hint: a sentence on what could be done about it (may be ``""``).

    The positional arguments are kept in ``args`` so that the error survives
    pickling and copying with its attributes intact.
    """

    def __init__(
        self,
        module_path: str,
        reason: str,
        leaves: Iterable[str] = (),
        module_type: str = "",
        hint: str = "",
    ) -> None:
        leaves = tuple(leaves)
        super().__init__(module_path, reason, leaves, module_type, hint)
        self.module_path = module_path
        self.reason = reason
        self.leaves = leaves
        self.module_type = module_type
        self.hint = hint

    def __str__(self) -> str:
        if self.module_path:
            where = f"module {self.module_path!r}"
        else:
            where = "the root module"
        if self.module_type:
            where += f" ({self.module_type})"
        message = f"cannot trace {where}: {self.reason}; automatic leaves so far: {list(self.leaves)}"
        if self.hint:
            message += f". {self.hint}"
        return message


class GuardError(PassError, ValueError):
    """At run time: an input differs from the example inputs a graph was traced with in a
    way the graph is specialised to (a shape or dtype that a Python decision read)."""


class ChannelRuleError(PassError, ValueError):
    """A channel rule (:mod:`passes.layers`) is malformed, is registered for something that
    is not a module class, or does not fit a module it is applied to."""
