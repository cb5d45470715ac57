"""``fxqp.save`` / ``fxqp.load``: one safetensors file with a JSON header. No pickle.

File layout (format version 1): a `safetensors <https://github.com/huggingface/safetensors>`_
file whose ``__metadata__`` holds two strings:

* ``fxqp``: the header, JSON: ``format``, ``format_version``, the ``spec`` (dict form), the
  ``step`` the model was lowered at, ``fallback_leaves``, ``weights`` (per weight site: its
  :class:`~fxqp.lower.packed.WeightLayout` — shape, dtype, scheme, bits, channel axis and
  mask encoding), ``stages`` (per activation stage: its frozen ops' records), ``state`` (the
  names of the other tensors: biases, norm parameters and statistics) and ``crc32`` (a CRC-32
  of every tensor's bytes);
* ``fxqp_sha256``: the SHA-256 of the header text.

Tensors are named ``<site>.codes``, ``<site>.mask``, ``<site>.scale``, ``<site>.zero_point``
for weight sites, ``<stage path>.ops.<i>.<buffer>`` for activation stages, and by their
``state_dict`` name for the rest (BatchNorm's ``num_batches_tracked`` is not stored).

Loading re-traces a fresh instance of the architecture with the stored spec and fills it
from the file, checking everything on the way: a truncated or corrupted file, a wrong format
version, a missing or extra site and a shape that does not match the model raise
:class:`fxqp.ArtifactError` naming the site or field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from typing import Any, Iterable

import safetensors
import safetensors.torch
import torch
from torch import Tensor, fx, nn

from fxqp.atomic import write_atomically
from fxqp.errors import ArtifactError, FxqpError
from fxqp.lower.frozen import frozen_from_record
from fxqp.lower.lower import LOWERED_KEY, finish_lowered, install_packed_weight, is_lowered, weight_sites
from fxqp.lower.packed import PackedWeight, WeightLayout
from fxqp.spec import Spec
from fxqp.stages import ActivationStage
from fxqp.schedule import SCHEDULE_NAME
from fxqp.transform import STAGES_NAME, transform

__all__ = ["save", "load", "read_header", "FORMAT", "FORMAT_VERSION"]

FORMAT = "fxqp"
FORMAT_VERSION = 1
HEADER_KEY = "fxqp"
DIGEST_KEY = "fxqp_sha256"
_SKIPPED_STATE = ("num_batches_tracked",)


def _crc32(t: Tensor) -> int:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return zlib.crc32(data)


def _is_fxqp_state(key: str) -> bool:
    return ".parametrizations.weight." in key or key.startswith((f"{STAGES_NAME}.", f"{SCHEDULE_NAME}."))


def _stages(model: nn.Module) -> dict[str, ActivationStage]:
    return {path: m for path, m in model.named_modules() if isinstance(m, ActivationStage)}


def _float_state(low: nn.Module) -> dict[str, Tensor]:
    return {
        k: v for k, v in low.state_dict().items() if not _is_fxqp_state(k) and k.rsplit(".", 1)[-1] not in _SKIPPED_STATE
    }


def save(model: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write a lowered model to ``path`` as one safetensors file (atomically: a temporary
    file beside it, renamed when complete).

    Raises:
        ArtifactError: ``model`` is not a lowered model (see :func:`fxqp.lower`).
    """
    if not is_lowered(model):
        raise ArtifactError(f"fxqp.save expects a lowered model (from fxqp.lower or fxqp.load), got {type(model).__name__}")
    tensors: dict[str, Tensor] = {}
    weights = {}
    for _, _, params in weight_sites(model):
        packed = params[0]
        weights[packed.site] = packed.layout.to_dict()
        for name in PackedWeight.tensor_names(packed.layout):
            tensors[f"{packed.site}.{name}"] = getattr(packed, name)
    stages = {}
    for path_, stage in _stages(model).items():
        stages[path_] = {"site": stage.site, "ops": [op.record() for op in stage.ops]}
        for i, op in enumerate(stage.ops):
            for name, t in op.tensors().items():
                tensors[f"{path_}.ops.{i}.{name}"] = t
    state = _float_state(model)
    tensors.update(state)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    record = model.meta[LOWERED_KEY]
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": record["spec"],
        "step": record["step"],
        "fallback_leaves": record["fallback_leaves"],
        "weights": weights,
        "stages": stages,
        "state": sorted(state),
        "crc32": {k: _crc32(v) for k, v in sorted(tensors.items())},
    }
    text = json.dumps(header, separators=(",", ":"), sort_keys=True)
    metadata = {HEADER_KEY: text, DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    write_atomically(path, safetensors.torch.save(tensors, metadata=metadata))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The checked JSON header of an artifact (no tensor is read)."""
    header, _ = _read(path, tensors=False)
    return header


def _read(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ArtifactError(f"{name}: no such file")
    try:
        with safetensors.safe_open(name, framework="pt") as f:
            metadata = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as err:  # safetensors reports truncation and a malformed header this way
        raise ArtifactError(f"{name}: not a readable safetensors file ({type(err).__name__}: {err}); it may be truncated or corrupted") from None
    text = metadata.get(HEADER_KEY)
    if text is None:
        raise ArtifactError(f"{name}: no '{HEADER_KEY}' header in the safetensors metadata; not an fxqp artifact")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get(DIGEST_KEY):
        raise ArtifactError(f"{name}: field '{DIGEST_KEY}': the header does not match its SHA-256 digest; the file is corrupted")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{name}: header: invalid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{name}: field 'format': expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{name}: field 'format_version': {header.get('format_version')!r} is not supported; this fxqp reads version {FORMAT_VERSION}")
    for field, kind in (("weights", dict), ("stages", dict), ("state", list), ("crc32", dict), ("spec", dict)):
        if not isinstance(header.get(field), kind):
            raise ArtifactError(f"{name}: field {field!r}: expected a JSON {kind.__name__}")
    if tensors:
        _check_tensors(name, header, data)
    return header, data


def _check_tensors(name: str, header: dict[str, Any], data: dict[str, Tensor]) -> None:
    crcs = header["crc32"]
    missing = sorted(set(crcs) - set(data))
    extra = sorted(set(data) - set(crcs))
    if missing:
        raise ArtifactError(f"{name}: tensor {missing[0]!r} is listed in the header but missing from the file")
    if extra:
        raise ArtifactError(f"{name}: tensor {extra[0]!r} is in the file but not in the header")
    for key, expected in crcs.items():
        if _crc32(data[key]) != expected:
            raise ArtifactError(f"{name}: tensor {key!r}: CRC-32 mismatch; the file is corrupted")


def _site_tensors(name: str, site: str, layout: WeightLayout, data: dict[str, Tensor], model_shape: tuple[int, ...]) -> dict[str, Tensor]:
    if layout.shape != model_shape:
        raise ArtifactError(f"{name}: site {site!r}: field 'shape' is {list(layout.shape)} but the model's weight is {list(model_shape)}")
    nnz = layout.mask.nnz
    channels = layout.shape[layout.channel_axis] if layout.channel_axis is not None else None
    expected = {
        "codes": (nnz * layout.bits // 8,) if layout.scheme == "float" else (math.ceil(nnz * layout.bits / 8),),
        "mask": (layout.mask.nbytes,),
        "scale": (channels,) if channels is not None else (),
        "zero_point": (channels,) if channels is not None else (),
    }
    out = {}
    for tname in PackedWeight.tensor_names(layout):
        t = data.get(f"{site}.{tname}")
        if t is None:
            raise ArtifactError(f"{name}: site {site!r}: tensor {tname!r} is missing")
        if tuple(t.shape) != expected[tname]:
            raise ArtifactError(f"{name}: site {site!r}: tensor {tname!r} has shape {list(t.shape)}, expected {list(expected[tname])}")
        if tname in ("codes", "mask") and t.dtype != torch.uint8:
            raise ArtifactError(f"{name}: site {site!r}: tensor {tname!r} has dtype {t.dtype}, expected uint8")
        out[tname] = t
    return out


def _fill_weights(name: str, low: fx.GraphModule, header: dict[str, Any], data: dict[str, Tensor], decode: str) -> None:
    stored = header["weights"]
    sites = {}
    for path, module, ops in weight_sites(low):
        sites[f"{path}.weight"] = (module, tuple(module.parametrizations["weight"].original.shape))
    missing = sorted(set(sites) - set(stored))
    extra = sorted(set(stored) - set(sites))
    if missing:
        raise ArtifactError(f"{name}: site {missing[0]!r}: the model has this weight site but the file does not")
    if extra:
        raise ArtifactError(f"{name}: site {extra[0]!r}: the file has this weight site but the model does not")
    for site, (module, shape) in sites.items():
        try:
            layout = WeightLayout.from_dict(stored[site])
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{name}: site {site!r}: invalid layout ({type(err).__name__}: {err})") from None
        tensors = _site_tensors(name, site, layout, data, shape)
        install_packed_weight(module, PackedWeight(site, layout, tensors, decode=decode))


def _fill_stages(name: str, low: fx.GraphModule, header: dict[str, Any], data: dict[str, Tensor]) -> None:
    stored = header["stages"]
    stages = _stages(low)
    missing = sorted(set(stages) - set(stored))
    extra = sorted(set(stored) - set(stages))
    if missing:
        raise ArtifactError(f"{name}: stage {missing[0]!r}: the model has this activation site but the file does not")
    if extra:
        raise ArtifactError(f"{name}: stage {extra[0]!r}: the file has this activation site but the model does not")
    for path, stage in stages.items():
        ops = []
        records = stored[path].get("ops") if isinstance(stored[path], dict) else None
        if not isinstance(records, list):
            raise ArtifactError(f"{name}: stage {path!r}: field 'ops': expected a list")
        for i, record in enumerate(records):
            prefix = f"{path}.ops.{i}."
            tensors = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
            try:
                ops.append(frozen_from_record(record, tensors))
            except (KeyError, TypeError, ValueError) as err:
                raise ArtifactError(f"{name}: stage {path!r}: op {i}: invalid record or tensors ({type(err).__name__}: {err})") from None
        stage.ops = nn.ModuleList(ops)


def _fill_state(name: str, low: fx.GraphModule, header: dict[str, Any], data: dict[str, Tensor]) -> None:
    expected = _float_state(low)
    listed = set(header["state"])
    missing = sorted(set(expected) - listed)
    extra = sorted(listed - set(expected))
    if missing:
        raise ArtifactError(f"{name}: tensor {missing[0]!r}: the model has it but the file does not")
    if extra:
        raise ArtifactError(f"{name}: tensor {extra[0]!r}: the file has it but the model does not")
    for key, target in expected.items():
        if tuple(data[key].shape) != tuple(target.shape):
            raise ArtifactError(f"{name}: tensor {key!r} has shape {list(data[key].shape)} but the model's is {list(target.shape)}")
    low.load_state_dict({k: data[k] for k in expected}, strict=False)


def load(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
    decode: str = "cache",
) -> fx.GraphModule:
    """Rebuild a lowered model from ``path`` into a fresh instance of its architecture.

    ``model`` is an instance of the architecture that was saved (its weights do not matter;
    it is not modified). It is traced and transformed with the stored spec (pass the same
    ``leaf_modules`` / ``concrete_args`` as when it was transformed), then every weight site,
    activation stage and remaining tensor is filled from the file and checked. Nothing is
    unpickled.

    Raises:
        ArtifactError: the file is missing, truncated or corrupted, has another format
            version, or does not match the model (a missing or extra site, another shape).
    """
    name = os.fspath(path)
    header, data = _read(path)
    try:
        spec = Spec.from_dict(header["spec"])
    except FxqpError as err:
        raise ArtifactError(f"{name}: field 'spec': {err}") from None
    gm = transform(model, spec, leaf_modules=leaf_modules, concrete_args=concrete_args)
    gm.eval()
    _fill_weights(name, gm, header, data, decode)
    _fill_stages(name, gm, header, data)
    _fill_state(name, gm, header, data)
    return finish_lowered(gm, {"spec": header["spec"], "step": header["step"], "fallback_leaves": header["fallback_leaves"]})
