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
from typing import Any, Iterable

import safetensors.torch
import torch
from torch import Tensor, fx, nn

from fxqp.atomic import write_atomically
from fxqp.errors import ArtifactError, FxqpError, SpecError, TraceError
from fxqp.lower.frozen import frozen_from_record
from fxqp.lower.lower import (
    LOWERED_KEY,
    finish_lowered,
    freeze_plain_parametrizations,
    install_packed_weight,
    is_lowered,
    release_tied,
    weight_sites,
)
from fxqp.lower.packed import DECODE_MODES, PackedWeight, WeightLayout
from fxqp.lower.shrink import Removal, channel_slices, shrink_originals
from fxqp.schedule import SCHEDULE_NAME
from fxqp.spec import Spec
from fxqp.stages import ActivationStage
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

FORMAT = "fxqp"
FORMAT_VERSION = 1
HEADER_KEY = "fxqp"
BLOBS = ("weights", "stages", "state")
_DATA_PLACEHOLDER = "fxqp-data-digest-placeholder-".ljust(64, "-")
_HEADER_PLACEHOLDER = "fxqp-header-digest-placeholder-".ljust(64, "-")
_SKIPPED_STATE = ("num_batches_tracked",)
STORED_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.bool, torch.int32, torch.int64)
}


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

    def get(self, descriptor: Any, what: str) -> Tensor:
        ok = isinstance(descriptor, list) and len(descriptor) == 3
        if ok:
            offset, dtype, shape = descriptor
            ok = (
                isinstance(offset, int)
                and offset >= 0
                and dtype in STORED_DTYPES
                and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
            )
        if not ok:
            raise ArtifactError(f"{self.file}: {what}: malformed tensor descriptor {descriptor!r}; expected [offset, dtype, shape]")
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
    text = json.dumps(dict(header, data_sha256=_DATA_PLACEHOLDER), separators=(",", ":"), sort_keys=True)
    raw = safetensors.torch.save(blobs, metadata={HEADER_KEY: f"{_HEADER_PLACEHOLDER}\n{text}"})
    data_digest = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    raw = _replace_once(raw, _DATA_PLACEHOLDER, data_digest)
    header_digest = hashlib.sha256(text.replace(_DATA_PLACEHOLDER, data_digest).encode()).hexdigest()
    return _replace_once(raw, _HEADER_PLACEHOLDER, header_digest)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The checked JSON header of an artifact."""
    return read_artifact(path)[0]


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The checked header and the three blobs of an artifact (see the module doc)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ArtifactError(f"{name}: no such file")
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ArtifactError(f"{name}: cannot read the artifact: {err.strerror or err}") from None
    not_safetensors = _not_safetensors(raw)
    if not_safetensors:
        raise ArtifactError(f"{name} is not an fxqp artifact ({not_safetensors})")
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if header_end > len(raw):
        raise ArtifactError(
            f"{name}: the safetensors header claims {header_end - 8} bytes but the file has {len(raw) - 8}; it is truncated or corrupted"
        )
    try:
        outer = json.loads(raw[8:header_end])
    except ValueError as err:
        raise ArtifactError(f"{name}: the safetensors header is not readable JSON ({err}); the file is corrupted") from None
    try:
        digest, text = outer["__metadata__"][HEADER_KEY].split("\n", 1)
    except (KeyError, TypeError, AttributeError):
        raise ArtifactError(
            f"{name} is not an fxqp artifact (a safetensors file without fxqp's header in its metadata; or it is corrupted)"
        ) from None
    except ValueError:  # no newline between the digest and the header
        raise ArtifactError(f"{name}: field '{HEADER_KEY}': expected a digest line, then the header; the file is corrupted") from None
    if hashlib.sha256(text.encode()).hexdigest() != digest:
        raise ArtifactError(f"{name}: field '{HEADER_KEY}': the header does not match its SHA-256 digest; the file is corrupted")
    header = json.loads(text)
    if not isinstance(header, dict) or hashlib.sha256(raw[header_end:]).hexdigest() != header.get("data_sha256"):
        raise ArtifactError(
            f"{name}: field 'data_sha256': the tensor data does not match its SHA-256 digest; the file is truncated or corrupted"
        )
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{name}: field 'format': expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{name}: field 'format_version': {header.get('format_version')!r} is not supported; this fxqp reads version {FORMAT_VERSION}"
        )
    for field, kind in (("weights", dict), ("stages", dict), ("state", dict), ("spec", dict), ("step", int), ("fallback_leaves", list)):
        if not isinstance(header.get(field), kind):
            raise ArtifactError(f"{name}: field {field!r}: expected a JSON {'object' if kind is dict else kind.__name__}")
    non_float = header.setdefault("non_float_nodes", [])
    if not isinstance(non_float, list) or not all(isinstance(n, str) for n in non_float):
        raise ArtifactError(f"{name}: field 'non_float_nodes': expected a JSON list of node names")
    header["example_inputs"] = _check_example_signature(name, header.get("example_inputs"))
    parts = header.setdefault("parts", [""])
    if not isinstance(parts, list) or len(parts) > 100_000 or not all(isinstance(p, str) and len(p) <= 1024 for p in parts):
        raise ArtifactError(f"{name}: field 'parts': expected a JSON list of module paths (\"\" for a model traced whole)")
    try:
        blobs = safetensors.torch.load(raw)
    except Exception as err:  # safetensors' own framing checks
        raise ArtifactError(f"{name}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    for blob in BLOBS:
        t = blobs.get(blob)
        if t is None or t.dtype != torch.uint8 or t.dim() != 1:
            raise ArtifactError(f"{name}: tensor {blob!r}: expected a 1-D uint8 tensor")
    return header, blobs


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


def _not_safetensors(raw: bytes) -> str | None:
    """Why ``raw`` cannot be a safetensors file (its first 8 bytes are the size of a JSON
    header that follows), in a few words; ``None`` when it may be one."""
    if not raw:
        return "the file is empty; truncated?"
    size = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    if 2 <= size <= _MAX_SAFETENSORS_HEADER and raw[8:9] == b"{":
        return None  # shaped like safetensors (maybe truncated), whatever its size's bytes resemble: 0x280 starts as a pickle does
    for magic, what in _MAGIC:
        if raw.startswith(magic):
            return what
    if raw[:1] == b"\x80" and raw[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle, such as a torch.save file"
    if _looks_like_text(raw[:512], cut=len(raw) > 512):
        return "a text file"
    if len(raw) < 8:
        return f"{len(raw)} bytes, fewer than the 8 that start a safetensors file; truncated?"
    if int.from_bytes(raw[:8], "little") > _MAX_SAFETENSORS_HEADER or raw[8:9] not in (b"{", b""):
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


#: Tensor dtypes an example-input record may name (the model is traced, never run, with them).
_EXAMPLE_DTYPES = {
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
_MAX_DIMS = 16
_MAX_DIM = 2**31


def _check_example_signature(name: str, record: Any) -> dict[str, dict[str, Any]] | None:
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
            or len(shape) > _MAX_DIMS
            or not all(type(d) is int and 0 <= d < _MAX_DIM for d in shape)
        ):
            raise ArtifactError(f"{field}: input {key!r}: expected 'shape' (a list of at most {_MAX_DIMS} ints in [0, 2^31)) and 'dtype'")
        if dtype not in _EXAMPLE_DTYPES:
            raise ArtifactError(f"{field}: input {key!r}: dtype {dtype!r} is not one of {', '.join(_EXAMPLE_DTYPES)}")
    return record


def _example_values(record: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Example inputs rebuilt from their record: tensors on ``meta`` (no memory), values as they were."""
    return {
        key: entry["value"] if "value" in entry else torch.empty(entry["shape"], dtype=_EXAMPLE_DTYPES[entry["dtype"]], device="meta")
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


def _removed_paths(header: dict[str, Any]) -> set[str]:
    """Module paths whose weights the file's ``removed`` channels reshape."""
    paths: set[str] = set()
    for entry in header.get("removed") or []:
        if isinstance(entry, dict):
            for key in ("producers", "followers", "consumers"):
                for item in entry.get(key) or []:
                    paths.add(str(item[0] if isinstance(item, list) and item else item))
    return paths


def _check_architecture(name: str, header: dict[str, Any], model: nn.Module) -> None:
    """Before the model is traced: every weight site of the file against the weight at that
    path in ``model``, in the file's order. A file loaded into another architecture is
    reported as such, at the first site that is missing or has another shape, with both
    shapes; not as whatever the trace, the spec's selectors or the filling would trip on.
    Weights whose channels the file removed are compared by their number of dimensions."""
    reshaped = _removed_paths(header)
    here = type(model).__name__
    for site, entry in header["weights"].items():
        try:
            shape = [int(d) for d in entry["layout"]["shape"]]
        except (KeyError, TypeError, ValueError):
            continue  # malformed: reported with the site's layout when it is filled
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


def _expected_shapes(layout: WeightLayout) -> dict[str, tuple[int, ...]]:
    nnz = layout.mask.nnz
    channels = () if layout.channel_axis is None else (layout.shape[layout.channel_axis],)
    codes = nnz * layout.bits // 8 if layout.scheme == "float" else math.ceil(nnz * layout.bits / 8)
    return {"codes": (codes,), "mask": (layout.mask.nbytes,), "scale": channels, "zero_point": channels}


def _fill_weights(name: str, low: fx.GraphModule, header: dict[str, Any], reader: _BlobReader, decode: str) -> None:
    stored = header["weights"]
    sites = {f"{path}.weight": module for path, module, _ in weight_sites(low)}
    _check_names(name, "site", sites, stored, of_model=True)
    for site, module in sites.items():
        entry = stored[site]
        try:
            layout = WeightLayout.from_dict(entry["layout"])
            described = dict(entry["tensors"])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{name}: site {site!r}: field 'layout': invalid ({type(err).__name__}: {err})") from None
        shape = tuple(module.parametrizations["weight"].original.shape)
        if layout.shape != shape:
            raise ArtifactError(f"{name}: site {site!r}: field 'shape' is {list(layout.shape)} but the model's weight is {list(shape)}")
        _check_names(name, f"site {site!r}: tensor", PackedWeight.tensor_names(layout), described)
        expected = _expected_shapes(layout)
        tensors = {}
        for tname in PackedWeight.tensor_names(layout):
            t = reader.get(described[tname], f"site {site!r}: tensor {tname!r}")
            if tuple(t.shape) != expected[tname] or (tname in ("codes", "mask") and t.dtype != torch.uint8):
                raise ArtifactError(
                    f"{name}: site {site!r}: tensor {tname!r} is {t.dtype} {list(t.shape)}, expected {list(expected[tname])}"
                )
            tensors[tname] = t
        install_packed_weight(module, PackedWeight(site, layout, tensors, decode=decode))


def _fill_stages(name: str, low: fx.GraphModule, header: dict[str, Any], reader: _BlobReader) -> None:
    stored = header["stages"]
    stages = _stages(low)
    _check_names(name, "stage", stages, stored, of_model=True)
    for path, stage in stages.items():
        ops = []
        entries = stored[path].get("ops") if isinstance(stored[path], dict) else None
        if not isinstance(entries, list):
            raise ArtifactError(f"{name}: stage {path!r}: field 'ops': expected a list")
        for i, entry in enumerate(entries):
            where = f"stage {path!r}: op {i}"
            try:
                tensors = {t: reader.get(d, f"{where}: tensor {t!r}") for t, d in entry["tensors"].items()}
                ops.append(frozen_from_record(entry["record"], tensors))
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
                raise ArtifactError(f"{name}: {where}: invalid record or tensors ({type(err).__name__}: {err})") from None
        stage.ops = nn.ModuleList(ops)


def _fill_state(name: str, low: fx.GraphModule, header: dict[str, Any], reader: _BlobReader) -> None:
    stored = header["state"]
    expected = float_state(low)
    _check_names(name, "tensor", expected, stored, of_model=True)
    values = {}
    for key, target in expected.items():
        t = reader.get(stored[key], f"tensor {key!r}")
        if tuple(t.shape) != tuple(target.shape) or t.dtype != target.dtype:
            raise ArtifactError(
                f"{name}: tensor {key!r} is {t.dtype} {list(t.shape)} but the model's is {target.dtype} {list(target.shape)}"
            )
        values[key] = t
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
) -> nn.Module:
    """Rebuild a lowered model from ``path`` into a fresh instance of its architecture.

    ``model`` is an instance of the architecture that was saved (its weights do not matter;
    it is not modified). It is traced and transformed with the stored spec (pass the same
    ``leaf_modules`` / ``concrete_args`` as when it was transformed), then every weight site,
    activation stage and remaining tensor is filled from the file and checked. The tracing
    uses the shapes, dtypes and plain values of the example inputs the model was transformed
    with, which the file records; ``example_inputs`` is needed only where it could not (inputs
    other than tensors and plain values).

    Raises:
        ArtifactError: the file is missing, truncated or corrupted, has another format
            version, or does not match the model (a missing or extra site, another shape).
    """
    name = os.fspath(path)
    if decode not in DECODE_MODES:
        raise ArtifactError(f"fxqp.load: decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
    header, blobs = read_artifact(path)
    try:
        spec = Spec.from_dict(header["spec"])
    except FxqpError as err:
        raise ArtifactError(f"{name}: field 'spec': {err}") from None
    _check_architecture(name, header, model)
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
        removed = [Removal.from_dict(d) for d in header.get("removed", [])]
        shrink_originals(gm, channel_slices(gm, removed))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise ArtifactError(f"{name}: field 'removed': does not fit the model ({type(err).__name__}: {err})") from None
    _fill_weights(name, gm, header, _BlobReader(name, blobs["weights"]), decode)
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
