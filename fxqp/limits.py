"""Limits on what fxqp reads from files: sizes, nesting, node counts and quoted values.

Specs and artifacts are files users download and share, so every reader treats its input as
hostile: it reads at most a stated number of bytes, refuses nesting deeper than a stated
depth (Python's parsers recurse, and a deep file would end in ``RecursionError``), counts
the values a document expands to (a YAML alias "bomb" expands a few hundred bytes to
billions of values), and quotes at most :data:`MAX_QUOTE` characters of a bad value in an
error message. The docs page "Security and robustness" lists the limits.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Mapping
from typing import Any, Union

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_VALUES",
    "MAX_QUOTE",
    "quote",
    "nesting_problem",
    "read_bounded",
]

#: Largest spec file :meth:`fxqp.Spec.from_yaml` / ``from_json`` read (bytes).
MAX_SPEC_BYTES = 1 << 20
#: Deepest nesting of lists and mappings in a spec.
MAX_SPEC_DEPTH = 32
#: Most values (scalars, lists and mappings, counted with YAML aliases expanded) in a spec.
MAX_SPEC_VALUES = 100_000
#: Most characters of a bad value quoted in an error message.
MAX_QUOTE = 100


class _Repr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr of a huge integer takes time quadratic in its digits (and fails past 4300)
        return repr(x) if x.bit_length() <= 256 else f"<an integer of {x.bit_length()} bits>"


_repr = _Repr()
_repr.maxlevel = 3
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = 8
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_QUOTE


def quote(value: Any, limit: int = MAX_QUOTE) -> str:
    """``repr(value)``, cut to at most ``limit`` characters (``...`` marks a cut), in time
    bounded by ``limit`` whatever the value's size (long strings, huge integers and shared
    containers included)."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def nesting_problem(value: Any, max_depth: int, max_values: int | None = None) -> str | None:
    """Why ``value`` (parsed JSON or YAML: mappings, lists and scalars) nests too deep or
    expands to too many values, in a few words; ``None`` when it is within the limits.

    The walk is iterative and stops at the first violation, so it takes time bounded by
    ``max_values`` (or by the value's size) even for a value whose shared parts expand it
    exponentially. A value's depth is the number of containers on the path to it (a scalar
    at the top is at depth 0)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if max_values is not None and seen > max_values:
            return f"more than {max_values} values (YAML aliases counted as expanded)"
        if isinstance(item, Mapping):
            children: Any = list(item.keys()) + list(item.values())
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth + 1 > max_depth:
            return f"lists or mappings nested deeper than {max_depth} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


def read_bounded(path: Union[str, os.PathLike], max_bytes: int) -> bytes | None:
    """The bytes of ``path`` when it holds at most ``max_bytes``, else ``None``; never reads
    more than ``max_bytes + 1`` bytes (so ``/dev/zero`` or a FIFO costs no more).

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(os.fspath(path), "rb") as f:
        data = f.read(max_bytes + 1)
    return data if len(data) <= max_bytes else None
