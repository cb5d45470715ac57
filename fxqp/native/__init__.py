"""Fused CPU kernels for the eager weight chain, compiled on first use.

Eagerly, a pruned and quantized weight costs several passes of torch ops over the weight at
every training step (``w·m``, per-channel min and max, divide, round, multiply; ``g·m`` in
the backward pass). On a CPU those passes are memory traffic, and the kernels in ``kernels.c`` do the same arithmetic in one or two passes
forward and one backward (:mod:`fxqp.ops.fused` uses them; the results are the same, element for
element).

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc``)
and OpenMP, into ``$FXQP_CACHE_DIR`` (default ``~/.cache/fxqp``), under a name that hashes
the source, the compiler, its flags and the CPU. A build is written to a temporary file, loaded
from there and only then renamed into place, so a cache never holds a half-written library nor
one that did not load. A cached library that does not load (a damaged file, one that lacks a
kernel) is removed and built again, once. If that build fails too, or there is no compiler,
fxqp runs the torch ops instead, with the same results, after one RuntimeWarning per process
that names the library and the reason (as :func:`unavailable_reason` does); ``FXQP_NATIVE=0``
runs them without a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterator

__all__ = ["kernels", "available", "unavailable_reason", "disabled", "cache_dir", "FLAGS"]

FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared")
"""Compiler flags. ``-ffp-contract=off`` keeps every multiply and add separately rounded, as
torch's kernels do; ``-fno-math-errno`` lets ``nearbyintf`` become a vector instruction."""

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float
_SIGNATURES = {
    "fxqp_block_range": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _INT],
    "fxqp_round_to_grid": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _F, _F, _P, _INT],
    "fxqp_quantize_rows": [_P, _P, _I64, _I64, _INT, _F, _F, _P, _INT],
    "fxqp_mask_multiply": [_P, _P, _I64, _I64, _P, _INT],
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib" (ctypes.CDLL or None), "reason" (str)
_disabled_depth = 0


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FXQP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxqp``,
    else ``~/.cache/fxqp``."""
    if os.environ.get("FXQP_CACHE_DIR"):
        return Path(os.environ["FXQP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fxqp"


def _cpu_identity() -> str:
    """The machine and, on Linux, the CPU's feature flags (``-march=native`` code is only
    loaded on a CPU with the same features)."""
    identity = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return identity + line
    except OSError:
        pass
    return identity + platform.processor()


def _source() -> str:
    return resources.files(__package__).joinpath("kernels.c").read_text(encoding="utf-8")


def _library_path(compiler: str, source: str) -> Path:
    """Where the library that ``compiler`` builds from ``source`` is cached on this machine."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source, compiler, version, *FLAGS, _cpu_identity()]).encode()).hexdigest()[:20]
    return cache_dir() / f"kernels-{key}.so"


def _bind(path: Path) -> ctypes.CDLL:
    """Load the library at ``path`` and declare its kernels (OSError if it does not load,
    AttributeError if it lacks a kernel)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


def _build(compiler: str, source: str, target: Path) -> ctypes.CDLL:
    """Compile ``source`` to a temporary file, load it from there, then rename it to ``target``:
    the rename is atomic (a reader sees no library or the whole one), and loading the new file
    under its own name keeps dlopen from handing back a bad library loaded earlier as ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as build:
        src, out = Path(build) / "kernels.c", Path(build) / "kernels.so"
        src.write_text(source, encoding="utf-8")
        done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        try:
            lib = _bind(out)
        except (OSError, AttributeError) as err:
            raise RuntimeError(f"the library {compiler} built does not load: {err}") from err
        os.replace(out, target)
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("FXQP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by FXQP_NATIVE"
    if platform.system() != "Linux":
        return None, f"native kernels are built on Linux only (this is {platform.system()})"
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        return None, f"no C compiler found (looked for {compiler!r}; set $CC)"
    target = None
    try:
        import torch  # noqa: F401  (its OpenMP runtime is the one the kernels then share)

        source = _source()
        target = _library_path(compiler, source)
        if target.exists():
            try:
                return _bind(target), ""
            except Exception:  # a damaged file, a library that lacks a kernel, ...: build it again, once
                with contextlib.suppress(FileNotFoundError):  # another process may have removed it already
                    target.unlink()
        return _build(compiler, source, target), ""
    except Exception as err:  # never raise out of kernels(): the torch ops do the same work
        where = f" ({target})" if target else ""
        return None, f"building the native kernels failed{where}: {err}"


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or ``None`` when it is unavailable or disabled (the first
    call compiles it if the cache has no build for this machine yet; a failure warns once)."""
    if _disabled_depth:
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, reason = _load()
                _state.update(lib=lib, reason=reason)
                if lib is None and not reason.startswith("disabled"):
                    warnings.warn(
                        f"fxqp: {reason}; the eager weight ops run as torch ops (same results, slower)", RuntimeWarning, stacklevel=3
                    )
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the native kernels are in use."""
    return kernels() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False (empty when it is True)."""
    if _disabled_depth:
        return "disabled by fxqp.native.disabled()"
    kernels()
    return str(_state["reason"])


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the torch ops instead of the native kernels inside the block (for comparisons)."""
    global _disabled_depth
    _disabled_depth += 1
    try:
        yield
    finally:
        _disabled_depth -= 1
