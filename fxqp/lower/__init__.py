"""Lowering: turn a trained, transformed model into its frozen, packed inference form.

* :mod:`fxqp.lower.packing` — bit packing of integer codes and the sparsity encodings;
* :mod:`fxqp.lower.packed` — :class:`PackedWeight`, a weight stored packed;
* :mod:`fxqp.lower.frozen` — frozen activation ops;
* :mod:`fxqp.lower.lower` — :func:`lower`;
* :mod:`fxqp.lower.artifact` — :func:`save` / :func:`load` (safetensors + JSON header);
* :mod:`fxqp.lower.export` — :func:`export` (torch.export);
* :mod:`fxqp.lower.onnx` — :func:`export_onnx` (ONNX with integer weights; the ``onnx`` extra).
"""

from fxqp.lower.artifact import load, read_header, save
from fxqp.lower.export import export
from fxqp.lower.lower import is_lowered, lower
from fxqp.lower.onnx import export_onnx
from fxqp.lower.packed import PackedWeight, WeightLayout

__all__ = ["lower", "save", "load", "read_header", "export", "export_onnx", "is_lowered", "PackedWeight", "WeightLayout"]
