"""``fxqp.save`` / ``fxqp.load``: one safetensors file with a JSON header. No pickle.

File layout (format version 1): a `safetensors <https://github.com/huggingface/safetensors>`_
file with three uint8 tensors — ``weights`` (every weight site's codes, mask, scales and
zero points), ``stages`` (the frozen activation ops' tensors) and ``state`` (the other
tensors: biases, norm parameters and statistics; BatchNorm's ``num_batches_tracked`` is not
stored) — and three metadata strings:

* one metadata string, ``fxqp``: the SHA-256 of the header text, a newline, and the
  header, JSON: ``format``, ``format_version``, the ``spec`` (dict form), the ``step`` the
  model was lowered at, ``fallback_leaves``, ``removed`` (the pruned channels removed from
  the layers, :class:`fxqp.lower.shrink.Removal`), ``parts`` (``[""]`` for a model traced as
  one graph, else the paths of its traced parts, :mod:`passes.descend`); ``weights``: per weight site its ``layout``
  (:class:`~fxqp.lower.packed.WeightLayout`: shape, dtype, scheme, bits, channel axis, mask
  encoding) and ``tensors``; ``stages``: per activation stage its frozen ops' ``record`` and
  ``tensors``; ``state``: the other tensors; ``data_sha256``: the SHA-256 of the file's data
  section. A tensor is described as ``[byte offset in its blob, dtype, shape]``.

One metadata key (safetensors orders several keys arbitrarily) makes the file a function of
the model: saving the same model twice gives the same bytes.
Three blobs instead of one tensor per buffer keep the file's own headers small, so the file
stays close to the information bound (``benchmarks/packed_size.py`` compares them).

Loading re-traces a fresh instance of the architecture with the stored spec and fills it
from the file, checking everything on the way: a truncated or corrupted file, a wrong format
version, a missing or extra site and a shape that does not match the model raise
:class:`fxqp.ArtifactError` naming the site or field. The file is parsed by safetensors and
``json``; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

import safetensors.torch
import torch
from torch import Tensor, fx, nn

from fxqp.atomic import write_atomically
from fxqp.errors import ArtifactError, FxqpError, PatternError, SpecError, TraceError
from fxqp.limits import MAX_SPEC_DEPTH, nesting_problem, quote
from fxqp.lower.frozen import FrozenMask, TopK, frozen_from_record
from fxqp.lower.header import (
    EXAMPLE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    STORED_DTYPES,
    CheckedHeader,
    check_header,
    expected_weight_tensors,
)
from fxqp.lower.lower import (
    LOWERED_KEY,
    finish_lowered,
    freeze_plain_parametrizations,
    install_packed_weight,
    is_lowered,
    release_tied,
    weight_sites,
)
from fxqp.lower.packed import DECODE_MODES, PackedWeight, dtype_from_name, dtype_name
from fxqp.lower.packing import decode_mask
from fxqp.lower.shrink import channel_slices, shrink_originals
from fxqp.ops.base import compute_dtype
from fxqp.ops.numerics import MIN_SCALE
from fxqp.schedule import SCHEDULE_NAME
from fxqp.spec import Spec
from fxqp.stages import ActivationStage, stage_inputs
from fxqp.transform import STAGES_NAME, transform_as_recorded

__all__ = [
    "save",
    "serialize",
    "encode_artifact",
    "load",
    "read_header",
    "read_artifact",
    "float_state",
    "FORMAT",
    "FORMAT_VERSION",
    "STORED_DTYPES",
]

HEADER_KEY = "fxqp"
BLOBS = ("weights", "stages", "state")
DATA_PLACEHOLDER = "fxqp-data-digest-placeholder-".ljust(64, "-")
_HEADER_PLACEHOLDER = "fxqp-header-digest-placeholder-".ljust(64, "-")
_SKIPPED_STATE = ("num_batches_tracked",)


def _is_fxqp_state(key: str) -> bool:
    return ".parametrizations.weight." in key or key.startswith((f"{STAGES_NAME}.", f"{SCHEDULE_NAME}.")) or f".{STAGES_NAME}." in key


def _stages(model: nn.Module) -> dict[str, ActivationStage]:
    return {path: m for path, m in model.named_modules() if isinstance(m, ActivationStage)}


def float_state(low: nn.Module) -> dict[str, Tensor]:
    """The tensors of a lowered model that are stored as they are (biases, norms, ...)."""
    return {k: v for k, v in low.state_dict().items() if not _is_fxqp_state(k) and k.rsplit(".", 1)[-1] not in _SKIPPED_STATE}


class _BlobWriter:
    """Concatenates tensors' bytes; each ``add`` returns the tensor's descriptor."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.size = 0

    def add(self, t: Tensor) -> list[Any]:
        t = t.detach().contiguous().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in STORED_DTYPES:
            raise ArtifactError(f"cannot store a {dtype} tensor; storable: {', '.join(STORED_DTYPES)}")
        raw = t.reshape(-1).view(torch.uint8)
        descriptor = [self.size, dtype, list(t.shape)]
        self.parts.append(raw)
        self.size += raw.numel()
        return descriptor

    def tensor(self) -> Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=torch.uint8)


class _BlobReader:
    """Reads tensors back by descriptor, checking the descriptor against the blob."""

    def __init__(self, file: str, blob: Tensor) -> None:
        self.file = file
        self.blob = blob

    def get(self, descriptor: list[Any], what: str) -> Tensor:
        """The tensor of a checked descriptor (:func:`fxqp.lower.header.check_descriptor`)."""
        offset, dtype, shape = descriptor
        nbytes = math.prod(shape) * STORED_DTYPES[dtype].itemsize
        if offset + nbytes > self.blob.numel():
            raise ArtifactError(f"{self.file}: {what}: bytes {offset}..{offset + nbytes} lie outside the data")
        return self.blob[offset : offset + nbytes].clone().view(STORED_DTYPES[dtype]).reshape(shape)


def save(model: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write a lowered model to ``path`` as one safetensors file (atomically: a temporary
    file beside it, renamed when complete).

    Raises:
        ArtifactError: ``model`` is not a lowered model (see :func:`fxqp.lower`), or the
            file cannot be written (the message names the path and the system's reason).
    """
    data = serialize(model)
    try:
        write_atomically(path, data)
    except OSError as err:
        raise ArtifactError(f"{os.fspath(path)}: cannot write the artifact: {err.strerror or err}") from None


def serialize(model: fx.GraphModule) -> bytes:
    """The bytes :func:`save` writes."""
    if not is_lowered(model):
        raise ArtifactError(f"fxqp.save expects a lowered model (from fxqp.lower or fxqp.load), got {type(model).__name__}")
    blobs = {name: _BlobWriter() for name in BLOBS}
    weights = {}
    for _, _, params in weight_sites(model):
        packed = params[0]
        tensors = {name: blobs["weights"].add(getattr(packed, name)) for name in PackedWeight.tensor_names(packed.layout)}
        weights[packed.site] = {"layout": packed.layout.to_dict(), "tensors": tensors}
    stages = {}
    for path, stage in _stages(model).items():
        ops = [{"record": op.record(), "tensors": {n: blobs["stages"].add(t) for n, t in op.tensors().items()}} for op in stage.ops]
        stages[path] = {"site": stage.site, "ops": ops}
    state = {key: blobs["state"].add(t) for key, t in float_state(model).items()}
    record = model.meta[LOWERED_KEY]
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": record["spec"],
        "step": record["step"],
        "fallback_leaves": record["fallback_leaves"],
        "non_float_nodes": record.get("non_float_nodes", []),
        "example_inputs": record.get("example_inputs"),
        "removed": record.get("removed", []),
        "parts": record.get("parts", [""]),
        "weights": weights,
        "stages": stages,
        "state": state,
    }
    return encode_artifact(header, {name: blob.tensor() for name, blob in blobs.items()})


def _replace_once(raw: bytes, placeholder: str, value: str) -> bytes:
    if raw.count(placeholder.encode()) != 1:
        raise ArtifactError(f"internal: placeholder {placeholder!r} is not unique in the file header")
    return raw.replace(placeholder.encode(), value.encode())


def encode_artifact(header: dict[str, Any], blobs: dict[str, Tensor]) -> bytes:
    """The file bytes for a header (without ``data_sha256``) and the three blobs: the
    header's and the data's digests are filled in here (the data section does not depend on
    the header, so both are computed on the serialized bytes, in place of placeholders)."""
    return encode_header_text(json.dumps(dict(header, data_sha256=DATA_PLACEHOLDER), separators=(",", ":"), sort_keys=True), blobs)


def encode_header_text(text: str, blobs: dict[str, Tensor]) -> bytes:
    """:func:`encode_artifact` for a header given as JSON text, whose ``data_sha256`` is
    :data:`DATA_PLACEHOLDER` (for tests that craft headers ``json`` cannot write)."""
    raw = safetensors.torch.save(blobs, metadata={HEADER_KEY: f"{_HEADER_PLACEHOLDER}\n{text}"})
    data_digest = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    raw = _replace_once(raw, DATA_PLACEHOLDER, data_digest)
    header_digest = hashlib.sha256(text.replace(DATA_PLACEHOLDER, data_digest).encode()).hexdigest()
    return _replace_once(raw, _HEADER_PLACEHOLDER, header_digest)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The checked JSON header of an artifact (its data is checked against its digest too,
    read in chunks: memory stays small whatever the file's size)."""
    checked, framing = _open_artifact(path)
    _read_data(framing, checked.header, keep=False)
    return checked.header


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The checked header and the three blobs of an artifact (see the module doc)."""
    checked, framing = _open_artifact(path)
    return checked.header, _read_data(framing, checked.header)


#: Largest safetensors header (the JSON text before the data, fxqp's header inside) read.
MAX_HEADER_BYTES = 64 << 20
#: Deepest nesting of lists and objects in fxqp's header (the spec within it included).
MAX_HEADER_DEPTH = MAX_SPEC_DEPTH + 8
_CHUNK = 1 << 20
#: Most elements of one sample's activation mask in a file.
MAX_ACTIVATION_MASK = 1 << 28
#: Largest recorded example input (elements, all inputs together) :func:`load` runs the
#: model on (zeros) to check the activation masks' shapes; larger ones go unchecked until
#: the first forward.
MAX_EXAMPLE_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class _Framing:
    """Where an artifact's data lies: its first byte, its size, and each blob's byte range in it."""

    name: str
    data_start: int
    data_size: int
    blobs: dict[str, tuple[int, int]]


def _parse_json(name: str, field: str, text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ArtifactError(f"{name}: field {field!r}: {what} nests too deep to parse; the file is corrupted or crafted") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ArtifactError(
            f"{name}: field {field!r}: {what} is not readable JSON ({quote(str(err), 200)}); the file is corrupted"
        ) from None


def _framing(name: str, outer: Any, data_start: int, data_size: int) -> _Framing:
    """The blobs' byte ranges from the safetensors header, checked against the file."""
    if not isinstance(outer, dict) or set(outer) != {"__metadata__", *BLOBS}:
        found = sorted(outer) if isinstance(outer, dict) else type(outer).__name__
        raise ArtifactError(
            f"{name}: the safetensors header holds {quote(found)}; an fxqp artifact holds '__metadata__' and the tensors {', '.join(BLOBS)}"
        )
    ranges = {}
    for blob in BLOBS:
        entry = outer[blob]
        ok = isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"} and entry["dtype"] == "U8"
        if ok:
            shape, offsets = entry["shape"], entry["data_offsets"]
            ok = (
                isinstance(shape, list)
                and len(shape) == 1
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(type(v) is int for v in (*shape, *offsets))
                and 0 <= offsets[0] <= offsets[1]
                and offsets[1] - offsets[0] == shape[0]
            )
        if not ok:
            raise ArtifactError(f"{name}: tensor {blob!r}: {quote(entry)} is not a 1-D uint8 tensor with its data offsets")
        ranges[blob] = (offsets[0], offsets[1])
    position = 0
    for begin, end in sorted(ranges.values()):
        if begin != position:
            raise ArtifactError(f"{name}: the tensors' data offsets leave a gap or overlap at byte {position}; the file is corrupted")
        position = end
    if position != data_size:
        problem = "is truncated" if position > data_size else f"has {data_size - position} bytes after its data"
        raise ArtifactError(f"{name}: the tensors' data is {position} bytes but the file {problem}; it is corrupted")
    return _Framing(name, data_start, data_size, ranges)


def _open_artifact(path: str | os.PathLike) -> tuple[CheckedHeader, _Framing]:
    """Read and check the headers (safetensors' and fxqp's) of an artifact, not its data:
    at most :data:`MAX_HEADER_BYTES` are read, and the data's size must be the file's rest."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ArtifactError(f"{name}: no such file")
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8 + 512)
            not_safetensors = _not_safetensors(head, size)
            if not_safetensors:
                raise ArtifactError(f"{name} is not an fxqp artifact ({not_safetensors})")
            length = int.from_bytes(head[:8], "little")
            if 8 + length > size:
                raise ArtifactError(
                    f"{name}: the safetensors header claims {length} bytes but the file has {size - 8}; it is truncated or corrupted"
                )
            if length > MAX_HEADER_BYTES:
                raise ArtifactError(f"{name}: the safetensors header is {length} bytes; fxqp reads headers of at most {MAX_HEADER_BYTES}")
            f.seek(8)
            raw = f.read(length)
    except OSError as err:
        raise ArtifactError(f"{name}: cannot read the artifact: {err.strerror or err}") from None
    outer = _parse_json(name, "__metadata__", raw, "the safetensors header")
    metadata = outer.get("__metadata__") if isinstance(outer, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get(HEADER_KEY), str):
        raise ArtifactError(
            f"{name} is not an fxqp artifact (a safetensors file without fxqp's header in its metadata; or it is corrupted)"
        )
    framing = _framing(name, outer, 8 + length, size - 8 - length)
    try:
        digest, text = metadata[HEADER_KEY].split("\n", 1)
    except ValueError:  # no newline between the digest and the header
        raise ArtifactError(f"{name}: field '{HEADER_KEY}': expected a digest line, then the header; the file is corrupted") from None
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, written as an escape in the JSON text
        raise ArtifactError(f"{name}: field '{HEADER_KEY}': the header is not valid Unicode text; the file is corrupted") from None
    if hashlib.sha256(encoded).hexdigest() != digest:
        raise ArtifactError(f"{name}: field '{HEADER_KEY}': the header does not match its SHA-256 digest; the file is corrupted")
    header = _parse_json(name, HEADER_KEY, text, "the header")
    problem = nesting_problem(header, MAX_HEADER_DEPTH)
    if problem:
        raise ArtifactError(f"{name}: field '{HEADER_KEY}': the header has {problem}")
    return check_header(name, header), framing


def _read_data(framing: _Framing, header: dict[str, Any], keep: bool = True) -> dict[str, Tensor]:
    """The blobs, after checking the data against ``data_sha256``; with ``keep=False`` only
    the check, reading the data in chunks."""
    name = framing.name
    digest = hashlib.sha256()
    data = bytearray(framing.data_size) if keep else None
    view = memoryview(data) if keep else None
    try:
        with open(name, "rb") as f:
            f.seek(framing.data_start)
            done = 0
            while done < framing.data_size:
                want = min(_CHUNK, framing.data_size - done)
                if keep:
                    got = f.readinto(view[done : done + want])
                    digest.update(view[done : done + got])
                else:
                    chunk = f.read(want)
                    got = len(chunk)
                    digest.update(chunk)
                if not got:
                    break
                done += got
    except OSError as err:
        raise ArtifactError(f"{name}: cannot read the artifact: {err.strerror or err}") from None
    if done != framing.data_size or digest.hexdigest() != header["data_sha256"]:
        raise ArtifactError(
            f"{name}: field 'data_sha256': the tensor data does not match its SHA-256 digest; the file is truncated or corrupted"
        )
    if not keep:
        return {}
    whole = torch.frombuffer(data, dtype=torch.uint8) if framing.data_size else torch.zeros(0, dtype=torch.uint8)
    return {blob: whole[begin:end] for blob, (begin, end) in framing.blobs.items()}


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a whole file, read in chunks (what :func:`load`'s ``sha256`` compares)."""
    digest = hashlib.sha256()
    try:
        with open(os.fspath(path), "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise ArtifactError(f"{os.fspath(path)}: cannot read the artifact: {err.strerror or err}") from None
    return digest.hexdigest()


#: Leading bytes of common files that are not artifacts, and what they are.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive, such as a torch.save file"),
    (b"\x1f\x8b", "a gzip file"),
    (b"%PDF", "a PDF document"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x7fELF", "an executable"),
)
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors refuses larger headers


def _not_safetensors(head: bytes, size: int) -> str | None:
    """Why a file of ``size`` bytes starting with ``head`` cannot be a safetensors file (its
    first 8 bytes are the size of a JSON header that follows), in a few words; ``None``
    when it may be one."""
    if not size:
        return "the file is empty; truncated?"
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if 2 <= length <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
        return None  # shaped like safetensors (maybe truncated), whatever its size's bytes resemble: 0x280 starts as a pickle does
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle, such as a torch.save file"
    if _looks_like_text(head[:512], cut=size > 512):
        return "a text file"
    if size < 8:
        return f"{size} bytes, fewer than the 8 that start a safetensors file; truncated?"
    if length > _MAX_SAFETENSORS_HEADER or head[8:9] not in (b"{", b""):
        return "it does not start as a safetensors file does; or it is corrupted"
    return None


def _looks_like_text(head: bytes, cut: bool) -> bool:
    """Whether ``head`` (the start of a file; ``cut``: not its end) is printable UTF-8."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if not (cut and err.start >= len(head) - 3):  # only a character cut at the end is not binary
            return False
        text = head[: err.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


def _example_values(record: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Example inputs rebuilt from their record: tensors on ``meta`` (no memory), values as they were."""
    return {
        key: entry["value"] if "value" in entry else torch.empty(entry["shape"], dtype=EXAMPLE_DTYPES[entry["dtype"]], device="meta")
        for key, entry in record.items()
    }


_OTHER_MODEL = "the artifact was made for another model"


def _check_names(name: str, what: str, in_model: Iterable[str], in_file: Iterable[str], of_model: bool = False) -> None:
    """The same names in the model and the file; ``of_model``: the names are the model's
    sites, stages or tensors, which differ when the file was made for another model."""
    in_model, in_file = set(in_model), set(in_file)
    missing, extra = sorted(in_model - in_file), sorted(in_file - in_model)
    other = f"{_OTHER_MODEL}: " if of_model else ""
    if missing:
        raise ArtifactError(f"{name}: {other}{what} {missing[0]!r}: the model has it but the file does not")
    if extra:
        raise ArtifactError(f"{name}: {other}{what} {extra[0]!r}: the file has it but the model does not")


def _check_architecture(name: str, checked: CheckedHeader, model: nn.Module) -> None:
    """Before the model is traced: every weight site of the file against the weight at that
    path in ``model``, in the file's order. A file loaded into another architecture is
    reported as such, at the first site that is missing or has another shape, with both
    shapes; not as whatever the trace, the spec's selectors or the filling would trip on.
    Weights whose channels the file removed are compared by their number of dimensions.
    A weight of another dtype than the model's is refused too."""
    reshaped = {p for r in checked.removals for p in (*r.producers, *(f[0] for f in r.followers), *(c[0] for c in r.consumers))}
    here = type(model).__name__
    for site, layout in checked.layouts.items():
        shape = list(layout.shape)
        path, _, attr = site.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ArtifactError(
                f"{name}: {_OTHER_MODEL}: site {site!r} (field 'shape' {shape}) is not in this {here}: it has no module {path!r}"
            ) from None
        weight = getattr(module, attr, None)
        if not isinstance(weight, Tensor):
            raise ArtifactError(
                f"{name}: {_OTHER_MODEL}: site {site!r} (field 'shape' {shape}) is not in this {here}: its {type(module).__name__} {path!r} has no tensor {attr!r}"
            )
        same = weight.dim() == len(shape) if path in reshaped else list(weight.shape) == shape
        if not same:
            raise ArtifactError(
                f"{name}: {_OTHER_MODEL}: site {site!r}: field 'shape' is {shape} but the weight of "
                f"{type(module).__name__} {path!r} in this {here} is {list(weight.shape)}"
            )
        if dtype_name(weight.dtype) != layout.dtype:
            raise ArtifactError(
                f"{name}: site {site!r}: field 'dtype' is {layout.dtype} but the weight of {type(module).__name__} {path!r} is "
                f"{dtype_name(weight.dtype)}; cast the model to {layout.dtype} (model.to(torch.{layout.dtype})) before loading"
            )
        expected = dtype_name(compute_dtype(weight))
        if layout.compute_dtype != expected and layout.scheme != "float":
            raise ArtifactError(
                f"{name}: site {site!r}: field 'compute_dtype' is {layout.compute_dtype}; a {layout.dtype} weight computes in {expected}"
            )


def recorded_elements(record: dict[str, dict[str, Any]]) -> int:
    """Elements of the recorded example inputs, all tensors together."""
    return sum(math.prod(e["shape"]) for e in record.values() if "shape" in e)


def recorded_zeros(record: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The recorded example inputs as values: zeros of each tensor's shape and dtype, plain
    values as recorded."""
    return {k: e["value"] if "value" in e else torch.zeros(e["shape"], dtype=EXAMPLE_DTYPES[e["dtype"]]) for k, e in record.items()}


def _stage_inputs(model: nn.Module, record: dict[str, dict[str, Any]] | None) -> dict[str, tuple[int, ...]]:
    """Per activation stage path, the shape of the value it reads in one eval forward of
    ``model`` (still without the file's data) on zeros of the recorded example inputs' shapes:
    what :func:`fxqp.transform` ran once too. Empty when the file records no example inputs,
    they hold more than :data:`MAX_EXAMPLE_ELEMENTS` elements or a plain value other than a
    flag (``True``, ``False``, ``None``), or the forward fails."""
    if (
        record is None
        or recorded_elements(record) > MAX_EXAMPLE_ELEMENTS
        or any(e.get("value") not in (None, True, False) for e in record.values() if "value" in e)
    ):
        return {}  # sizes, counts or text from the file are not handed to the model's forward
    try:
        seen = stage_inputs(model, **recorded_zeros(record))
    except Exception:  # the model does not run on zeros: its masks are checked at their first forward
        return {}
    return {path: tuple(shape) for path, (shape, _) in seen.items()}


def _check_against_model(name: str, low: fx.GraphModule, checked: CheckedHeader, blob_sizes: dict[str, int]) -> None:
    """Before any data is read: the file's sites, stages and tensors are the model's, with
    the model's shapes and dtypes; and the data holds no byte that no field describes, so
    what is read is bounded by the model."""
    header = checked.header
    sites = {f"{path}.weight": module for path, module, _ in weight_sites(low)}
    _check_names(name, "site", sites, header["weights"], of_model=True)
    described = dict.fromkeys(BLOBS, 0)
    for site, module in sites.items():
        layout = checked.layouts[site]
        shape = tuple(module.parametrizations["weight"].original.shape)
        if layout.shape != shape:
            raise ArtifactError(f"{name}: site {site!r}: field 'shape' is {list(layout.shape)} but the model's weight is {list(shape)}")
        for dtype, tshape in expected_weight_tensors(layout).values():
            described["weights"] += math.prod(tshape) * STORED_DTYPES[dtype].itemsize
    stages = _stages(low)
    _check_names(name, "stage", stages, header["stages"], of_model=True)
    masks = any(op["record"]["kind"] == "mask" for path in stages for op in header["stages"][path]["ops"])
    inputs = _stage_inputs(low, header["example_inputs"]) if masks else {}
    for path in stages:
        for i, op in enumerate(header["stages"][path]["ops"]):
            record = op["record"]
            if record["kind"] == "mask" and record["code"]["n"] > MAX_ACTIVATION_MASK:
                raise ArtifactError(
                    f"{name}: stage {path!r}: op {i}: field 'code.n': {record['code']['n']} is larger than the "
                    f"{MAX_ACTIVATION_MASK} elements fxqp accepts for one sample's activation mask"
                )
            if record["kind"] == "mask" and path in inputs:
                sample = inputs[path][1:]
                if len(record["shape"]) > len(sample) or any(m not in (1, a) for m, a in zip(reversed(record["shape"]), reversed(sample))):
                    raise ArtifactError(
                        f"{name}: stage {path!r}: op {i}: field 'shape' {record['shape']} does not fit the activation, "
                        f"whose samples are {list(sample)}; expected that shape, or 1 where a channel mask repeats"
                    )
            for descriptor in op["tensors"].values():
                described["stages"] += math.prod(descriptor[2]) * STORED_DTYPES[descriptor[1]].itemsize
    expected = float_state(low)
    _check_names(name, "tensor", expected, header["state"], of_model=True)
    for key, target in expected.items():
        _, dtype, shape = header["state"][key]
        if tuple(shape) != tuple(target.shape) or STORED_DTYPES[dtype] != target.dtype:
            raise ArtifactError(
                f"{name}: tensor {key!r} is {dtype} {list(shape)} but the model's is {dtype_name(target.dtype)} {list(target.shape)}"
            )
        described["state"] += math.prod(shape) * target.element_size()
    for blob, size in blob_sizes.items():
        if size > described[blob]:
            raise ArtifactError(
                f"{name}: tensor {blob!r} holds {size} bytes but the header describes {described[blob]}; the file was made for another model or crafted"
            )


def _finite(name: str, where: str, t: Tensor, low: float | None = None) -> None:
    if not bool(torch.isfinite(t).all()) or (low is not None and bool((t < low).any())):
        accepted = f"finite values >= {low:g}" if low is not None else "finite values"
        raise ArtifactError(f"{name}: {where}: holds values that are not {accepted}")


def _fill_weights(name: str, low: fx.GraphModule, checked: CheckedHeader, reader: _BlobReader, decode: str) -> None:
    stored = checked.header["weights"]
    for path, module, _ in weight_sites(low):
        site = f"{path}.weight"
        layout = checked.layouts[site]
        tensors = {
            tname: reader.get(stored[site]["tensors"][tname], f"site {site!r}: tensor {tname!r}")
            for tname in expected_weight_tensors(layout)
        }
        keep = decode_mask(layout.mask, tensors["mask"])
        if int(keep.sum()) != layout.mask.nnz:
            raise ArtifactError(
                f"{name}: site {site!r}: tensor 'mask' does not decode to the {layout.mask.nnz} kept elements of field 'nnz'"
            )
        if layout.scheme == "float":
            _finite(name, f"site {site!r}: tensor 'codes'", tensors["codes"].view(dtype_from_name(layout.dtype)))
        for tname in ("scale", "zero_point"):
            if tname in tensors:
                _finite(name, f"site {site!r}: tensor {tname!r}", tensors[tname], 0.0 if tname == "scale" else None)
        install_packed_weight(module, PackedWeight(site, layout, tensors, decode=decode))


def _check_frozen(name: str, where: str, op: nn.Module) -> None:
    """The values of a frozen op: a grid of positive finite steps, a mask of as many kept
    elements as its code says, a sparsity in [0, 1]."""
    if isinstance(op, FrozenMask):
        if int(op.mask.sum()) != op.code.nnz:
            raise ArtifactError(f"{name}: {where}: tensor 'payload' does not decode to the {op.code.nnz} kept elements of field 'nnz'")
    elif isinstance(op, TopK):
        if not bool(torch.isfinite(op.target).all()) or not 0.0 <= float(op.target) <= 1.0:
            raise ArtifactError(f"{name}: {where}: tensor 'target' is not a sparsity in [0, 1]")
    else:
        _finite(name, f"{where}: tensor 'scale'", op.scale, MIN_SCALE)
        if op.scheme == "affine":
            _finite(name, f"{where}: tensor 'zero_point'", op.zero_point)
        if op.scheme == "lsq":
            qn, qp = float(op.qn), float(op.qp)
            if not (
                math.isfinite(qn) and math.isfinite(qp) and qn == int(qn) and qp == int(qp) and -(2**op.bits) <= qn <= 0 < qp <= 2**op.bits
            ):
                raise ArtifactError(f"{name}: {where}: tensors 'qn', 'qp' are not integer bounds around 0 of a {op.bits}-bit grid")


def _fill_stages(name: str, low: fx.GraphModule, header: dict[str, Any], reader: _BlobReader) -> None:
    for path, stage in _stages(low).items():
        ops = []
        for i, entry in enumerate(header["stages"][path]["ops"]):
            where = f"stage {path!r}: op {i}"
            tensors = {t: reader.get(d, f"{where}: tensor {t!r}") for t, d in entry["tensors"].items()}
            op = frozen_from_record(entry["record"], tensors)
            _check_frozen(name, where, op)
            ops.append(op)
        stage.ops = nn.ModuleList(ops)


def _fill_state(name: str, low: fx.GraphModule, header: dict[str, Any], reader: _BlobReader) -> None:
    values = {key: reader.get(header["state"][key], f"tensor {key!r}") for key in float_state(low)}
    low.load_state_dict(values, strict=False)


def _traced_as(parts: list[str]) -> str:
    return "the whole model traced as one graph" if parts == [""] else f"the traced parts {parts}"


def load(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    decode: str = "cache",
    example_inputs: tuple[Any, ...] | dict[str, Any] | None = None,
    sha256: str | None = None,
) -> nn.Module:
    """Rebuild a lowered model from ``path`` into a fresh instance of its architecture.

    ``model`` is an instance of the architecture that was saved (its weights do not matter;
    it is not modified). It is traced and transformed with the stored spec (pass the same
    ``leaf_modules`` / ``concrete_args`` as when it was transformed), then every weight site,
    activation stage and remaining tensor is filled from the file and checked. The tracing
    uses the shapes, dtypes and plain values of the example inputs the model was transformed
    with, which the file records; ``example_inputs`` is needed only where it could not (inputs
    other than tensors and plain values).

    The file is treated as hostile: its headers are read with bounded size and checked
    field by field (:mod:`fxqp.lower.header`), then against the model, before its data is
    read; the data is read only when its size is what the model's tensors need. The digests
    inside the file detect corruption, not tampering: anyone can recompute them. Pass
    ``sha256``, the SHA-256 of the whole file as its publisher gives it (``fxqp inspect``
    prints it), to load only that file.

    Raises:
        ArtifactError: the file is missing, truncated or corrupted, has another format
            version, a field of the wrong type or range, another SHA-256 than ``sha256``,
            or does not match the model (a missing or extra site, another shape or dtype).
    """
    name = os.fspath(path)
    if decode not in DECODE_MODES:
        raise ArtifactError(f"fxqp.load: decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
    if sha256 is not None:
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise ArtifactError(f"fxqp.load: sha256: {quote(sha256)} is not a SHA-256 (64 hexadecimal digits)")
        actual = file_sha256(path)
        if actual != sha256.lower():
            raise ArtifactError(
                f"{name}: the file's SHA-256 is {actual}, not the expected {sha256.lower()}; it is not the file you meant to load"
            )
    checked, framing = _open_artifact(path)
    header = checked.header
    try:
        spec = Spec.from_dict(header["spec"])
    except FxqpError as err:
        raise ArtifactError(f"{name}: field 'spec': {err}") from None
    _check_architecture(name, checked, model)
    if example_inputs is None and header["example_inputs"] is not None:
        example_inputs = _example_values(header["example_inputs"])
    try:
        gm = transform_as_recorded(
            model,
            spec,
            header["non_float_nodes"],
            leaf_modules=leaf_modules,
            concrete_args=concrete_args,
            example_inputs=example_inputs,
            parts=header["parts"],
        )
    except PatternError as err:  # a selector of the file's spec is refused: not a question of the model
        raise ArtifactError(f"{name}: field 'spec': {err}") from None
    except SpecError as err:  # the weights fit, the spec's selectors do not (activation sites)
        raise ArtifactError(f"{name}: {_OTHER_MODEL}: its spec does not fit this {type(model).__name__} ({err})") from None
    except TraceError as err:
        raise ArtifactError(
            f"{name}: field 'parts': the file was made from {_traced_as(header['parts'])}, which this model cannot rebuild ({err}); "
            "pass the model's architecture and the leaf_modules, concrete_args and example_inputs it was transformed with"
        ) from None
    gm.eval()
    freeze_plain_parametrizations(gm)  # as lower() did: the file holds their values
    try:
        shrink_originals(gm, channel_slices(gm, checked.removals))
    except (ValueError, AttributeError, IndexError, RuntimeError, FxqpError) as err:
        raise ArtifactError(f"{name}: field 'removed': does not fit the model ({type(err).__name__}: {str(err)[:300]})") from None
    _check_against_model(name, gm, checked, {blob: end - begin for blob, (begin, end) in framing.blobs.items()})
    blobs = _read_data(framing, header)
    _fill_weights(name, gm, checked, _BlobReader(name, blobs["weights"]), decode)
    release_tied(gm)
    _fill_stages(name, gm, header, _BlobReader(name, blobs["stages"]))
    _fill_state(name, gm, header, _BlobReader(name, blobs["state"]))
    return finish_lowered(
        gm,
        {
            "spec": header["spec"],
            "step": header["step"],
            "fallback_leaves": header["fallback_leaves"],
            "non_float_nodes": header["non_float_nodes"],
            "example_inputs": header["example_inputs"],
            "removed": header.get("removed", []),
            "parts": header["parts"],
        },
    )
