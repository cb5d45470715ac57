"""Atomic file writes: an interrupted write never leaves a half file under the final name."""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from contextlib import contextmanager
from typing import Iterator, Union

__all__ = ["write_atomically", "write_json", "atomic_path", "remove_stale"]

PathLike = Union[str, os.PathLike]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or not a pid): left alone
    return True


def remove_stale(path: PathLike) -> list[str]:
    """Remove the temporary files of earlier writes to ``path`` that their process left
    behind (killed before it could clean up): those named for this host and a process that
    no longer runs. Files of live processes, of other hosts (a shared folder) and anything
    that does not parse are left alone. Returns the paths removed."""
    if os.name != "posix":
        return []
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    stem, suffix = os.path.splitext(base)
    pattern = re.compile(rf"\.{re.escape(stem)}\.{re.escape(_host())}-(\d+)-[0-9a-f]+\.tmp{re.escape(suffix)}")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for entry in names:
        match = pattern.fullmatch(entry)
        if match and not _alive(int(match.group(1))):
            try:
                os.remove(os.path.join(directory, entry))
                removed.append(os.path.join(directory, entry))
            except OSError:
                pass
    return removed


@contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. A write
    killed outright (``SIGKILL``, power loss) cannot clean up: its temporary file is named
    for the host and the process (``.<stem>.<host>-<pid>-<random>.tmp<suffix>``), and the
    next write to ``path`` removes it once that process is gone (:func:`remove_stale`).
    """
    name = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(name))
    stem, suffix = os.path.splitext(base)
    remove_stale(name)
    # keep the suffix: some writers (torch.export.save) look at it
    tmp = os.path.join(directory, f".{stem}.{_host()}-{os.getpid()}-{uuid.uuid4().hex}.tmp{suffix}")
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
