"""Limits on what fxqp reads from files: sizes, nesting, node counts and quoted values.

Specs and artifacts are files users download and share, so every reader treats its input as
hostile: it reads at most a stated number of bytes, refuses nesting deeper than a stated
depth (Python's parsers recurse, and a deep file would end in ``RecursionError``), counts
the values a document expands to (a YAML alias "bomb" expands a few hundred bytes to
billions of values), and quotes at most :data:`MAX_QUOTE` characters of a bad value in an
error message. The docs page "Security and robustness" lists the limits.

Spec and search-space files are read by :func:`load_yaml_document` and
:func:`load_json_document`, and every ``re:`` name selector is compiled and matched by
:func:`name_regex` and :func:`name_regex_fullmatch`: bounded in length, in the repeats it
expands to, and in the time one match may take. Their errors are
:class:`~fxqp.errors.SpecError` naming the file or field, the rule broken and what is
accepted.
"""

from __future__ import annotations

import functools
import json
import os
import re
import reprlib
import sys
from collections.abc import Mapping
from typing import Any, Union

import regex
import yaml

from fxqp.errors import PatternError, SpecError

__all__ = [
    "MAX_SPEC_BYTES",
    "MAX_SPEC_DEPTH",
    "MAX_SPEC_VALUES",
    "MAX_QUOTE",
    "MAX_STEP",
    "MAX_PATTERN_CHARS",
    "MAX_PATTERN_REPEATS",
    "PATTERN_TIMEOUT_S",
    "quote",
    "nesting_problem",
    "read_bounded",
    "read_document",
    "load_yaml_document",
    "load_json_document",
    "name_regex",
    "name_regex_fullmatch",
]

#: Largest spec file :meth:`fxqp.Spec.from_yaml` / ``from_json`` read (bytes).
MAX_SPEC_BYTES = 1 << 20
#: Deepest nesting of lists and mappings in a spec.
MAX_SPEC_DEPTH = 32
#: Most values (scalars, lists and mappings, counted with YAML aliases expanded) in a spec.
MAX_SPEC_VALUES = 100_000
#: Most characters of a bad value quoted in an error message.
MAX_QUOTE = 100
#: Largest step count of a spec (``start``, ``end``, ``every``) and largest ``total_steps``:
#: ``2**62 - 1``, so that step arithmetic stays within a 64-bit signed integer.
MAX_STEP = (1 << 62) - 1
#: Longest regular expression of a ``re:`` name selector (characters after ``re:``).
MAX_PATTERN_CHARS = 256
#: Largest product of the counts of the counted repeats (``{m}``, ``{m,n}``) of a ``re:``
#: selector: the regular expression engine unrolls counted repeats when it compiles them.
MAX_PATTERN_REPEATS = 10_000
#: Longest time (seconds) one match of a ``re:`` selector against one name may take (a
#: match that times out is tried once more before it counts as catastrophic backtracking).
PATTERN_TIMEOUT_S = 0.05


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


def _cut(text: str, limit: int = MAX_QUOTE) -> str:
    """``text`` cut to at most ``limit`` characters (``...`` marks a cut)."""
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


# ---------------------------------------------------------------------------------------
# Spec and search-space documents
# ---------------------------------------------------------------------------------------


def read_document(path: Union[str, os.PathLike], what: str, max_bytes: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of the ``what`` file (``"spec"``, ``"search space"``) at ``path``,
    reading at most ``max_bytes + 1`` bytes.

    Raises:
        SpecError: the file is missing or unreadable, holds more than ``max_bytes`` bytes, or
            is not UTF-8 text; the message names the file.
    """
    name = os.fspath(path)
    try:
        data = read_bounded(name, max_bytes)
    except FileNotFoundError as e:
        raise SpecError(f"{name}: no such file") from e
    except OSError as e:
        raise SpecError(f"{name}: cannot be read: {e.strerror or e}") from e
    if data is None:
        raise SpecError(f"{name}: larger than {max_bytes} bytes, the most a {what} file may hold; expected a smaller file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason}); expected a {what} file in UTF-8") from e


class _Refused(Exception):
    """A document :func:`load_yaml_document` or :func:`load_json_document` refuses: the
    message says what and where (without the file name)."""


def _at(mark: Any) -> str:
    return f"at line {mark.line + 1}, column {mark.column + 1}"


def _int_too_long(text: str) -> str:
    return (
        f"the integer {quote(text)} has {len(text)} characters, more than Python converts "
        f"({sys.get_int_max_str_digits() if hasattr(sys, 'get_int_max_str_digits') else 4300} digits); "
        "expected an integer within the field's range"
    )


def _key_of(node: yaml.Node, loader: "_StrictLoader") -> Any:
    """A hashable identity of a mapping key node: its constructed value for a scalar key,
    the node itself otherwise."""
    if isinstance(node, yaml.ScalarNode):
        key = loader.construct_object(node)
        try:
            hash(key)
        except TypeError:
            return node
        return key
    return node


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only), refusing what a shared file may abuse: lists
    and mappings nested deeper than :data:`MAX_SPEC_DEPTH` (refused while composing, before
    the recursive composer goes deeper), a key given twice in one mapping, and integers
    longer than Python converts. Merge keys (``<<``) keep their meaning; a merged mapping
    holds each key once, so chains of merges cannot multiply entries."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            return super().compose_node(parent, index)
        if self._depth >= MAX_SPEC_DEPTH:
            raise _Refused(
                f"lists or mappings nested deeper than {MAX_SPEC_DEPTH} levels {_at(event.start_mark)}; expected at most {MAX_SPEC_DEPTH}"
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = _key_of(key_node, self)
            if key in first:
                raise _Refused(
                    f"duplicate key {quote(key)} {_at(key_node.start_mark)} (first at line {first[key].start_mark.line + 1}); "
                    "expected each key once in a mapping"
                )
            first[key] = key_node
        return node

    def flatten_mapping(self, node: Any) -> None:
        super().flatten_mapping(node)
        # one entry per key: the position of its first occurrence, the value of its last
        # (the one the constructor would keep)
        entries: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            entries[_key_of(key_node, self)] = (key_node, value_node)
        if len(entries) < len(node.value):
            node.value = list(entries.values())

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as e:
            raise _Refused(f"{_int_too_long(node.value)} {_at(node.start_mark)}") from e


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _yaml_position(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return "" if mark is None else f" {_at(mark)}"


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem and context:
        return f"{problem} ({context})"
    return str(problem or context or e)


def _checked_document(name: str, data: Any, what: str) -> Any:
    problem = nesting_problem(data, MAX_SPEC_DEPTH, MAX_SPEC_VALUES)
    if problem is not None:
        raise SpecError(f"{name}: {problem}; a {what} holds at most {MAX_SPEC_VALUES} values nested at most {MAX_SPEC_DEPTH} levels")
    return data


def load_yaml_document(path: Union[str, os.PathLike], what: str = "spec") -> Any:
    """The plain data (mappings, lists, scalars) of the YAML ``what`` file at ``path``.

    Safe loading only (no Python objects), of at most :data:`MAX_SPEC_BYTES` bytes of UTF-8;
    lists and mappings nest at most :data:`MAX_SPEC_DEPTH` levels and expand (YAML aliases
    counted as expanded) to at most :data:`MAX_SPEC_VALUES` values; a mapping gives each key
    once. An empty file gives ``None``.

    Raises:
        SpecError: a file :func:`read_document` refuses, a syntax error, or a limit above
            broken; the message names the file (and the line where there is one).
    """
    name = os.fspath(path)
    text = read_document(path, what)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only
    except _Refused as e:
        raise SpecError(f"{name}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{name}: YAML syntax error{_yaml_position(e)}: {_yaml_problem(e)}") from None
    except RecursionError:
        raise SpecError(
            f"{name}: nested too deeply to read (YAML merge keys or lists); a {what} nests at most {MAX_SPEC_DEPTH} levels"
        ) from None
    except (ValueError, OverflowError) as e:
        raise SpecError(f"{name}: a value cannot be read: {_cut(str(e))}") from None
    return _checked_document(name, data, what)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {quote(key)} in an object; expected each key once in an object")
        out[key] = value
    return out


def _json_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _Refused(_int_too_long(text)) from None


def load_json_document(path: Union[str, os.PathLike], what: str = "spec") -> Any:
    """The data of the JSON ``what`` file at ``path``, within the limits of
    :func:`load_yaml_document` (an object gives each key once).

    Raises:
        SpecError: a file :func:`read_document` refuses, a syntax error, or a limit broken;
            the message names the file (and the line of a syntax error).
    """
    name = os.fspath(path)
    text = read_document(path, what)
    try:
        data = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int)
    except _Refused as e:
        raise SpecError(f"{name}: {e}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{name}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise SpecError(f"{name}: lists or objects nested too deeply to read; a {what} nests at most {MAX_SPEC_DEPTH} levels") from None
    except (ValueError, OverflowError) as e:
        raise SpecError(f"{name}: a value cannot be read: {_cut(str(e))}") from None
    return _checked_document(name, data, what)


# ---------------------------------------------------------------------------------------
# re: name selectors
# ---------------------------------------------------------------------------------------

# A counted repeat, {m}, {m,}, {,n} or {m,n}, wherever it appears (inside a class or after
# an escape too: counting more than the engine unrolls only errs on the safe side).
_COUNTED = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def _repeat_product(pattern: str) -> int:
    """The product of the counts of every counted repeat of ``pattern`` (at least 1 each):
    a bound on how many copies of any part the engine unrolls, however the repeats nest."""
    product = 1
    for match in _COUNTED.finditer(pattern):
        low, high = match.group(1), match.group(2)
        if not low and (high is None or not high):
            continue  # not a repeat: a literal "{}" or "{,}"
        product *= max(1, int(low or 0), int(high or 0))
        if product > MAX_PATTERN_REPEATS:
            break
    return product


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> "regex.Pattern[str] | str":
    """``pattern`` compiled (``regex``'s version 0: the syntax and meaning of :mod:`re`), or
    why it is refused, in words."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"the regular expression has {len(pattern)} characters; expected at most {MAX_PATTERN_CHARS}"
    product = _repeat_product(pattern)
    if product > MAX_PATTERN_REPEATS:
        return (
            f"its counted repeats ({{m}}, {{m,n}}) multiply to more than {MAX_PATTERN_REPEATS} copies; "
            f"expected counts whose product is at most {MAX_PATTERN_REPEATS}"
        )
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except regex.error as e:
        return f"not a valid regular expression: {_cut(str(e))}"
    except RecursionError:
        return "not a valid regular expression: its groups nest too deeply"
    except (ValueError, OverflowError, TypeError, MemoryError, IndexError) as e:
        return f"not a valid regular expression: {_cut(str(e) or type(e).__name__)}"


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def name_regex(pattern: str, where: str = "") -> "regex.Pattern[str]":
    """The compiled regular expression of the name selector ``"re:" + pattern`` (cached).

    The syntax and meaning are those of Python's :mod:`re` (``regex``, version 0). At most
    :data:`MAX_PATTERN_CHARS` characters, and counted repeats whose counts multiply to at
    most :data:`MAX_PATTERN_REPEATS`.

    Raises:
        SpecError: the pattern is refused; the message starts with ``where`` (the field) and
            quotes the selector.
    """
    compiled = _compiled(pattern)
    if isinstance(compiled, str):
        problem = compiled if compiled.startswith("not ") else f"refused: {compiled}"
        raise PatternError(f"{_prefix(where)}{quote('re:' + pattern)} is {problem}")
    return compiled


def name_regex_fullmatch(pattern: str, text: str, where: str = "") -> bool:
    """Whether the name selector ``"re:" + pattern`` matches all of ``text``: the one place
    fxqp matches a user's regular expression (answers are cached by pattern and name).

    A match may take at most :data:`PATTERN_TIMEOUT_S` seconds (tried twice, so that a
    machine busy elsewhere does not count against the pattern); a pattern whose match takes
    longer backtracks catastrophically (nested or adjacent unbounded repeats such as
    ``(.*)*`` or ``(.*)(.*)(.*)\\3``) and is refused.

    Raises:
        SpecError: the pattern is refused (:func:`name_regex`) or its match times out; the
            message starts with ``where`` (when given) and quotes the selector and the name.
    """
    try:
        return _fullmatch(pattern, text)
    except SpecError as e:
        if not where:
            raise
        raise type(e)(f"{where}: {e}") from None


@functools.lru_cache(maxsize=1 << 16)
def _fullmatch(pattern: str, text: str) -> bool:
    compiled = name_regex(pattern)
    for _ in range(2):
        try:
            return compiled.fullmatch(text, timeout=PATTERN_TIMEOUT_S) is not None
        except TimeoutError:
            continue
    raise PatternError(
        f"{quote('re:' + pattern)} backtracks catastrophically: matching it against the name {quote(text)} "
        f"took more than {PATTERN_TIMEOUT_S:g} s; expected a regular expression without nested or adjacent unbounded "
        "repeats such as (.*)* or (.*)(.*)(.*), e.g. 're:layer[0-9]+\\..*'"
    )
