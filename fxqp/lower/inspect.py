"""``fxqp inspect``: what an artifact holds, read from its checked header alone.

No model code is needed: the header lists every weight site's layout (shape, scheme, bits,
mask encoding with ``n`` and ``nnz``) and tensors, every activation stage's frozen ops, and
the other tensors, each with its dtype and shape, so sizes follow without decoding.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from fxqp.lower.artifact import STORED_DTYPES, file_sha256, read_header
from fxqp.tables import Report

__all__ = ["inspect_artifact"]


def _nbytes(descriptor: Any) -> int:
    """Bytes of a tensor described as ``[offset, dtype, shape]``."""
    _, dtype, shape = descriptor
    return math.prod(shape) * torch.empty((), dtype=STORED_DTYPES[dtype]).element_size()


def _stage_ops(ops: list[dict[str, Any]]) -> str:
    parts = []
    for op in ops:
        record = op["record"]
        kind = record.get("kind")
        if kind == "quantize":
            parts.append(f"quantize({record.get('bits')}b {record.get('scheme')})")
        elif kind == "mask":
            code = record.get("code", {})
            n, nnz = code.get("n", 0), code.get("nnz", 0)
            parts.append(f"mask({1 - nnz / n:.1%} zero)" if n else "mask")
        else:
            parts.append(str(kind))
    return " → ".join(parts) or "—"


def inspect_artifact(path: str | os.PathLike) -> Report:
    """Per-site table of a saved artifact: scheme, bits, shape, parameters, non-zeros,
    sparsity, mask encoding and bytes; then activation stages, other tensors and totals.

    Raises:
        ArtifactError: the file is missing, truncated, corrupted or not an fxqp artifact.
    """
    header = read_header(path)
    rows: list[list[Any]] = []
    weight_bytes = weight_params = 0
    for site, entry in sorted(header["weights"].items()):
        layout = entry["layout"]
        mask = layout["mask"]
        nbytes = sum(_nbytes(d) for d in entry["tensors"].values())
        n, nnz = int(mask["n"]), int(mask["nnz"])
        weight_bytes += nbytes
        weight_params += n
        bits = layout["bits"] if layout["scheme"] != "float" else f"{layout['bits']} (float)"
        rows.append(
            [
                site,
                "weight",
                layout["scheme"],
                bits,
                "×".join(map(str, layout["shape"])),
                n,
                nnz,
                f"{1 - nnz / n:.1%}" if n else "—",
                mask["kind"],
                nbytes,
            ]
        )
    stage_bytes = 0
    for _, stage in sorted(header["stages"].items()):
        nbytes = sum(_nbytes(d) for op in stage["ops"] for d in op["tensors"].values())
        stage_bytes += nbytes
        rows.append([stage["site"], "activation", _stage_ops(stage["ops"]), "", "", "", "", "", "", nbytes])
    other_bytes = sum(_nbytes(d) for d in header["state"].values())
    file_bytes = os.path.getsize(path)
    rows.append(["(other tensors)", "", "", "", "", "", "", "", "", other_bytes])
    rows.append(["(file)", "", "", "", "", "", "", "", "", file_bytes])
    ratio = (4 * weight_params) / max(weight_bytes, 1)
    title = (
        f"{os.fspath(path)}: fxqp artifact v{header['format_version']}, lowered at step {header['step']}: "
        f"{len(header['weights'])} weight sites, {len(header['stages'])} activation stages"
    )
    notes = [
        f"weights: {weight_params:,} parameters in {weight_bytes:,} bytes ({8 * weight_bytes / max(weight_params, 1):.3f} bits/param, {ratio:.1f}x smaller than float32)",
        f"file: {file_bytes:,} bytes (weights {weight_bytes:,}, activation stages {stage_bytes:,}, other tensors {other_bytes:,}, headers {file_bytes - weight_bytes - stage_bytes - other_bytes:,})",
    ]
    notes.append(f"SHA-256 of the file: {file_sha256(path)} (publish it; fxqp.load(..., sha256=...) loads only this file)")
    if header["fallback_leaves"]:
        notes.append(f"modules traced as leaves: {', '.join(header['fallback_leaves'])}")
    headers = ["site", "kind", "scheme / ops", "bits", "shape", "params", "nnz", "sparsity", "mask", "bytes"]
    return Report(title, headers, rows, notes)
