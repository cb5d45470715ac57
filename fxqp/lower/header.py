"""The artifact header's schema: every field checked for type, range and consistency.

An artifact is a file from elsewhere. Its digests detect corruption, but anyone can
recompute them, so the header is checked field by field before anything is allocated or
decoded: :func:`check_header` here (what the header alone determines), then
:func:`fxqp.load` against the model (shapes, dtypes, names; see
:mod:`fxqp.lower.artifact`). Every failure is an :class:`fxqp.ArtifactError` that names the
file, the field (as a path such as ``weights['conv1.weight'].layout.bits``) and what would
be accepted; a bad value is quoted in at most :data:`fxqp.limits.MAX_QUOTE` characters.

The schema is written as plain checks over the parsed JSON, producing the frozen
dataclasses the rest of fxqp uses (:class:`~fxqp.lower.packed.WeightLayout`,
:class:`~fxqp.lower.packing.MaskCode`, :class:`~fxqp.lower.shrink.Removal`): the rules are
mostly relations between fields (a mask's length is the weight's size, a scale has one
entry per channel, a code width fits its scheme), which a declarative schema language
cannot state, and the core takes no dependency for it.

Limits (beyond the model's own shapes, which :func:`fxqp.load` applies):

* a shape has at most :data:`MAX_DIMS` dimensions, each below 2^31, and at most 2^40
  elements;
* code widths are 1..16 bits (a ``float`` layout: its dtype's width); ``qmin`` lies in
  ``[-2^(bits-1), 0]`` for ``symmetric``/``lsq`` and is 0 otherwise;
* lists of names hold at most :data:`MAX_ENTRIES` strings of at most :data:`MAX_NAME` characters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from fxqp.errors import ArtifactError
from fxqp.limits import quote
from fxqp.lower.packed import WeightLayout, dtype_from_name
from fxqp.lower.packing import MAX_PACK_BITS, MaskCode
from fxqp.lower.shrink import Removal

__all__ = [
    "check_header",
    "CheckedHeader",
    "check_descriptor",
    "check_example_signature",
    "expected_weight_tensors",
    "expected_stage_tensors",
    "FORMAT",
    "FORMAT_VERSION",
    "STORED_DTYPES",
    "EXAMPLE_DTYPES",
    "MAX_DIMS",
    "MAX_ENTRIES",
    "MAX_NAME",
]

#: The ``format`` and ``format_version`` fields this fxqp writes and reads.
FORMAT = "fxqp"
FORMAT_VERSION = 1
#: dtypes a stored tensor may have.
STORED_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.bool, torch.int32, torch.int64)
}
MAX_DIMS = 16
MAX_DIM = 2**31
MAX_NUMEL = 2**40
MAX_ENTRIES = 1_000_000
MAX_NAME = 1024
MAX_STEP = 2**62
MAX_STAGE_OPS = 16
_FLOAT_NAMES = ("float32", "float64", "float16", "bfloat16")
_HEX64 = re.compile(r"[0-9a-f]{64}")

_REQUIRED = ("format", "format_version", "spec", "step", "fallback_leaves", "weights", "stages", "state", "data_sha256")
_OPTIONAL = ("non_float_nodes", "example_inputs", "removed", "parts")


class _Checker:
    """Raises :class:`ArtifactError` for one file, naming the field."""

    def __init__(self, name: str):
        self.name = name

    def fail(self, field: str, problem: str) -> None:
        raise ArtifactError(f"{self.name}: field {field!r}: {problem}")

    def int_(self, field: str, value: Any, low: int, high: int) -> int:
        if type(value) is not int:  # bool is not an int here
            self.fail(field, f"{quote(value)} is not an integer; expected an integer in {low}..{high}")
        if not low <= value <= high:
            self.fail(field, f"{quote(value)} is outside {low}..{high}")
        return value

    def str_(self, field: str, value: Any, limit: int = MAX_NAME) -> str:
        if not isinstance(value, str) or len(value) > limit:
            self.fail(field, f"{quote(value)} is not accepted; expected a string of at most {limit} characters")
        return value

    def choice(self, field: str, value: Any, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(field, f"{quote(value)} is not one of {', '.join(choices)}")
        return value

    def dict_(self, field: str, value: Any, keys: tuple[str, ...] | None = None, optional: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) > MAX_ENTRIES:
            self.fail(field, f"expected a JSON object (at most {MAX_ENTRIES} entries), got {quote(value)}")
        if keys is not None:
            missing = [k for k in keys if k not in value]
            extra = sorted(str(k) for k in value if k not in keys and k not in optional)
            if missing:
                self.fail(f"{field}.{missing[0]}", "missing")
            if extra:
                self.fail(f"{field}.{extra[0]}", f"unknown field; accepted: {', '.join(keys + optional)}")
        return value

    def list_(self, field: str, value: Any, limit: int = MAX_ENTRIES) -> list[Any]:
        if not isinstance(value, list) or len(value) > limit:
            self.fail(field, f"expected a JSON list of at most {limit} entries, got {quote(value)}")
        return value

    def strings(self, field: str, value: Any) -> list[str]:
        return [self.str_(f"{field}[{i}]", s) for i, s in enumerate(self.list_(field, value))]

    def shape(self, field: str, value: Any, positive: bool = False) -> tuple[int, ...]:
        dims = self.list_(field, value, MAX_DIMS)
        shape = tuple(self.int_(f"{field}[{i}]", d, 1 if positive else 0, MAX_DIM - 1) for i, d in enumerate(dims))
        if math.prod(shape) > MAX_NUMEL:
            self.fail(field, f"{list(shape)} has more than 2^40 elements")
        return shape


def check_descriptor(name: str, field: str, value: Any) -> tuple[int, str, tuple[int, ...]]:
    """A tensor descriptor ``[byte offset, dtype, shape]`` with a dtype of :data:`STORED_DTYPES`."""
    ok = isinstance(value, list) and len(value) == 3
    if ok:
        offset, dtype, shape = value
        ok = type(offset) is int and 0 <= offset < 2**62 and isinstance(dtype, str) and dtype in STORED_DTYPES
    if not ok:
        _Checker(name).fail(
            field, f"{quote(value)} is not a tensor descriptor; expected [byte offset, dtype ({', '.join(STORED_DTYPES)}), shape]"
        )
    return offset, dtype, _Checker(name).shape(f"{field}[2]", shape)


def _tensors(
    c: _Checker, field: str, value: Any, expected: dict[str, tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]], source: str
) -> None:
    """The descriptors of an entry's ``tensors``: exactly the names ``expected`` gives, each
    with one of its dtypes and shapes (what the ``source``, a layout or a record, implies)."""
    tensors = c.dict_(field, value, tuple(expected))
    for tname, (dtypes, shapes) in expected.items():
        _, dtype, shape = check_descriptor(c.name, f"{field}.{tname}", tensors[tname])
        if dtype not in dtypes or shape not in shapes:
            c.fail(f"{field}.{tname}", f"is {dtype} {list(shape)}; the {source} implies {' or '.join(dtypes)} {list(shapes[0])}")


def _layout(c: _Checker, field: str, value: Any) -> WeightLayout:
    """A :class:`WeightLayout` from its dict, every field checked."""
    keys = ("shape", "dtype", "compute_dtype", "scheme", "bits", "qmin", "channel_axis", "mask")
    d = c.dict_(field, value, keys)
    shape = c.shape(f"{field}.shape", d["shape"])
    dtype = c.choice(f"{field}.dtype", d["dtype"], _FLOAT_NAMES)
    compute = c.choice(f"{field}.compute_dtype", d["compute_dtype"], _FLOAT_NAMES)
    scheme = c.choice(f"{field}.scheme", d["scheme"], ("symmetric", "affine", "lsq", "sign", "float"))
    if scheme == "float":
        width = dtype_from_name(dtype).itemsize * 8
        bits = c.int_(f"{field}.bits", d["bits"], width, width)
        if compute != dtype:
            c.fail(f"{field}.compute_dtype", f"{compute!r} differs from dtype {dtype!r}; a float layout stores the values themselves")
    elif scheme == "sign":
        bits = c.int_(f"{field}.bits", d["bits"], 1, 1)
    else:
        bits = c.int_(f"{field}.bits", d["bits"], 1, MAX_PACK_BITS)
    low = -(2 ** (bits - 1)) if scheme in ("symmetric", "lsq") else 0
    qmin = c.int_(f"{field}.qmin", d["qmin"], low, 0)
    axis = d["channel_axis"]
    if axis is not None:
        if scheme == "float":
            c.fail(f"{field}.channel_axis", f"{quote(axis)}: a float layout has no scale, so no channel axis; expected null")
        axis = c.int_(f"{field}.channel_axis", axis, 0, max(len(shape) - 1, 0))
        if not shape:
            c.fail(f"{field}.channel_axis", "a scalar weight has no channel axis; expected null")
    try:
        mask = MaskCode.from_dict(c.dict_(f"{field}.mask", d["mask"]))
    except ValueError as err:
        c.fail(f"{field}.mask", str(err))
    if mask.n != math.prod(shape):
        c.fail(f"{field}.mask.n", f"{mask.n} is not the {math.prod(shape)} elements of shape {list(shape)}")
    return WeightLayout(shape, dtype, compute, scheme, bits, qmin, axis, mask)


def expected_weight_tensors(layout: WeightLayout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The (dtype, shape) of each stored tensor of a weight site, from its layout."""
    nnz = layout.mask.nnz
    channels = () if layout.channel_axis is None else (layout.shape[layout.channel_axis],)
    codes = nnz * layout.bits // 8 if layout.scheme == "float" else math.ceil(nnz * layout.bits / 8)
    out = {"codes": ("uint8", (codes,)), "mask": ("uint8", (layout.mask.nbytes,))}
    if layout.scheme != "float":
        out["scale"] = (layout.compute_dtype, channels)
    if layout.scheme == "affine":
        out["zero_point"] = (layout.compute_dtype, channels)
    return out


def _weights(c: _Checker, value: Any) -> dict[str, WeightLayout]:
    layouts = {}
    for site, entry in c.dict_("weights", value).items():
        field = f"weights[{quote(site)}]"
        c.str_(field, site)
        entry = c.dict_(field, entry, ("layout", "tensors"))
        layout = _layout(c, f"{field}.layout", entry["layout"])
        expected = {name: ((dtype,), (shape,)) for name, (dtype, shape) in expected_weight_tensors(layout).items()}
        _tensors(c, f"{field}.tensors", entry["tensors"], expected, "layout")
        layouts[site] = layout
    return layouts


def expected_stage_tensors(record: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]]:
    """The accepted (dtypes, shapes) of each tensor of a checked frozen-op record."""
    scalar = ((), (1,))
    if record["kind"] == "quantize":
        names = {"affine": ("scale", "zero_point"), "symmetric": ("scale",), "lsq": ("scale", "qn", "qp")}[record["scheme"]]
        return {n: (_FLOAT_NAMES, scalar) for n in names}
    if record["kind"] == "mask":
        return {"payload": (("uint8",), ((record["code"]["nbytes"],),))}
    return {"target": (("float64",), scalar)}


def _record(c: _Checker, field: str, value: Any) -> dict[str, Any]:
    d = c.dict_(field, value)
    kind = c.choice(f"{field}.kind", d.get("kind"), ("quantize", "mask", "topk"))
    if kind == "quantize":
        c.dict_(field, d, ("kind", "scheme", "bits"))
        c.choice(f"{field}.scheme", d["scheme"], ("affine", "symmetric", "lsq"))
        c.int_(f"{field}.bits", d["bits"], 1, MAX_PACK_BITS)
    elif kind == "mask":
        c.dict_(field, d, ("kind", "shape", "code"))
        shape = c.shape(f"{field}.shape", d["shape"], positive=True)
        try:
            code = MaskCode.from_dict(c.dict_(f"{field}.code", d["code"]))
        except ValueError as err:
            c.fail(f"{field}.code", str(err))
        if code.n != math.prod(shape):
            c.fail(f"{field}.code.n", f"{code.n} is not the {math.prod(shape)} elements of shape {list(shape)}")
    else:
        c.dict_(field, d, ("kind", "tiebreak"))
        if not isinstance(d["tiebreak"], bool):
            c.fail(f"{field}.tiebreak", f"{quote(d['tiebreak'])} is not true or false")
    return d


def _stages(c: _Checker, value: Any) -> None:
    for path, entry in c.dict_("stages", value).items():
        field = f"stages[{quote(path)}]"
        c.str_(field, path)
        entry = c.dict_(field, entry, ("site", "ops"))
        c.str_(f"{field}.site", entry["site"])
        for i, op in enumerate(c.list_(f"{field}.ops", entry["ops"], MAX_STAGE_OPS)):
            where = f"{field}.ops[{i}]"
            op = c.dict_(where, op, ("record", "tensors"))
            record = _record(c, f"{where}.record", op["record"])
            _tensors(c, f"{where}.tensors", op["tensors"], expected_stage_tensors(record), "record")


def _removed(c: _Checker, value: Any) -> list[Removal]:
    removals = []
    for i, entry in enumerate(c.list_("removed", value)):
        field = f"removed[{i}]"
        d = c.dict_(field, entry, ("size", "kept", "producers", "followers", "consumers"))
        size = c.int_(f"{field}.size", d["size"], 2, MAX_DIM - 1)
        kept = [c.int_(f"{field}.kept[{j}]", k, 0, size - 1) for j, k in enumerate(c.list_(f"{field}.kept", d["kept"], size - 1))]
        if not kept or any(b <= a for a, b in zip(kept, kept[1:])):
            c.fail(f"{field}.kept", "expected a non-empty ascending list of distinct channel indices, fewer than 'size'")
        producers = tuple(c.strings(f"{field}.producers", d["producers"]))
        followers = []
        for j, f in enumerate(c.list_(f"{field}.followers", d["followers"])):
            if isinstance(f, str):  # a plain path (offset 0) in files written before concatenations were coupled
                f = [f, 0]
            f = c.list_(f"{field}.followers[{j}]", f, 2)
            if len(f) != 2:
                c.fail(f"{field}.followers[{j}]", "expected [module path, channel offset]")
            followers.append((c.str_(f"{field}.followers[{j}][0]", f[0]), c.int_(f"{field}.followers[{j}][1]", f[1], 0, MAX_DIM - 1)))
        consumers = []
        for j, f in enumerate(c.list_(f"{field}.consumers", d["consumers"])):
            f = c.list_(f"{field}.consumers[{j}]", f, 3)
            if len(f) == 2:
                f = [*f, 1]
            if len(f) != 3:
                c.fail(f"{field}.consumers[{j}]", "expected [module path, channel offset, features per channel]")
            consumers.append(
                (
                    c.str_(f"{field}.consumers[{j}][0]", f[0]),
                    c.int_(f"{field}.consumers[{j}][1]", f[1], 0, MAX_DIM - 1),
                    c.int_(f"{field}.consumers[{j}][2]", f[2], 1, MAX_DIM - 1),
                )
            )
        removals.append(Removal(size, tuple(kept), producers, tuple(followers), tuple(consumers)))
    return removals


#: Tensor dtypes an example-input record may name (the model is traced, never run, with them).
EXAMPLE_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def check_example_signature(name: str, record: Any) -> dict[str, dict[str, Any]] | None:
    """The ``example_inputs`` record, checked: parameter name → ``{"shape", "dtype"}`` (at most
    16 dimensions below 2^31, a whitelisted dtype) or ``{"value"}`` (a JSON scalar)."""
    if record is None:
        return None
    field = f"{name}: field 'example_inputs'"
    if not isinstance(record, dict) or len(record) > 256:
        raise ArtifactError(f"{field}: expected a JSON object of at most 256 inputs, or null")
    for key, entry in record.items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{field}: input {key!r}: expected an object with 'shape' and 'dtype', or 'value'")
        if set(entry) == {"value"}:
            if not isinstance(entry["value"], (bool, int, float, str, type(None))) or (
                isinstance(entry["value"], str) and len(entry["value"]) > 256
            ):
                raise ArtifactError(f"{field}: input {key!r}: 'value' must be a JSON scalar (strings up to 256 characters)")
            continue
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if (
            set(entry) != {"shape", "dtype"}
            or not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d < MAX_DIM for d in shape)
        ):
            raise ArtifactError(f"{field}: input {key!r}: expected 'shape' (a list of at most {MAX_DIMS} ints in [0, 2^31)) and 'dtype'")
        if not isinstance(dtype, str) or dtype not in EXAMPLE_DTYPES:
            raise ArtifactError(f"{field}: input {key!r}: dtype {quote(dtype)} is not one of {', '.join(EXAMPLE_DTYPES)}")
    return record


@dataclass(frozen=True)
class CheckedHeader:
    """A checked header (with the defaults of its optional fields filled in) and the
    dataclasses built from it on the way."""

    header: dict[str, Any]
    layouts: dict[str, WeightLayout]
    removals: list[Removal]


def check_header(name: str, header: Any) -> CheckedHeader:
    """``header`` (parsed JSON) with every field checked that the header alone determines.

    Raises:
        ArtifactError: a field is missing, unknown, of the wrong type, out of range or
            inconsistent with another; the message names it.
    """
    c = _Checker(name)
    if not isinstance(header, dict):
        c.fail("fxqp", f"expected a JSON object, got {quote(header)}")
    if header.get("format") != FORMAT:
        c.fail("format", f"{quote(header.get('format'))} is not 'fxqp'")
    if header.get("format_version") != FORMAT_VERSION or type(header.get("format_version")) is not int:
        c.fail("format_version", f"{quote(header.get('format_version'))} is not supported; this fxqp reads version {FORMAT_VERSION}")
    c.dict_("fxqp", header, _REQUIRED, _OPTIONAL)
    if not isinstance(header["data_sha256"], str) or not _HEX64.fullmatch(header["data_sha256"]):
        c.fail("data_sha256", "expected 64 lowercase hexadecimal digits")
    c.dict_("spec", header["spec"])
    c.int_("step", header["step"], 0, MAX_STEP)
    c.strings("fallback_leaves", header["fallback_leaves"])
    header.setdefault("non_float_nodes", [])
    c.strings("non_float_nodes", header["non_float_nodes"])
    header["example_inputs"] = check_example_signature(name, header.get("example_inputs"))
    parts = header.setdefault("parts", [""])
    c.strings("parts", parts)
    header.setdefault("removed", [])
    removals = _removed(c, header["removed"])
    layouts = _weights(c, header["weights"])
    _stages(c, header["stages"])
    for key, descriptor in c.dict_("state", header["state"]).items():
        c.str_(f"state[{quote(key)}]", key)
        check_descriptor(name, f"state[{quote(key)}]", descriptor)
    return CheckedHeader(header, layouts, removals)
