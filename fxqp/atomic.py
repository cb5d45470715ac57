"""Atomic file writes: an interrupted write never leaves a half file under the final name."""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from typing import Iterator, Union

__all__ = ["write_atomically", "write_json", "atomic_path"]

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    name = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(name))
    stem, suffix = os.path.splitext(base)
    # keep the suffix: some writers (torch.export.save) look at it
    tmp = os.path.join(directory, f".{stem}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_atomically(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` (UTF-8 for text) to a new file beside ``path``, fsync, rename over ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        # os.open applies the umask, so the file gets the permissions of an ordinary write.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: PathLike, data: object) -> None:
    """Write ``data`` as indented JSON to ``path`` with :func:`write_atomically`, creating
    the parent directories first. Data that is not JSON-serializable raises before anything
    is written."""
    text = json.dumps(data, indent=2)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write_atomically(path, text)
