"""fxqp.atomic: write_json creates parent directories and writes nothing for data that is not
JSON; a write removes the temporary files killed writes to its path left; fxqp.save and
fxqp.load turn OS errors into ArtifactError."""

from __future__ import annotations

import json
import os

import pytest

from fxqp.atomic import write_json


def test_write_json_creates_the_directory_and_writes_the_data(tmp_path) -> None:
    path = tmp_path / "results" / "deeper" / "run.json"
    write_json(path, {"rows": [1, 2.5, None], "name": "x"})
    assert json.loads(path.read_text()) == {"rows": [1, 2.5, None], "name": "x"}
    write_json(path, {"rows": []})  # replaces the file
    assert json.loads(path.read_text()) == {"rows": []}


def test_write_json_of_data_that_is_not_json_leaves_the_old_file(tmp_path) -> None:
    path = tmp_path / "run.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_removes_what_killed_writes_to_the_same_path_left(tmp_path) -> None:
    from fxqp.atomic import _host, write_atomically

    path = tmp_path / "model.fxqp"
    killed = tmp_path / f".model.{_host()}-{_dead_pid()}-0a1b.tmp.fxqp"  # as a SIGKILL leaves it
    running = tmp_path / f".model.{_host()}-{os.getpid()}-2c3d.tmp.fxqp"  # a write in progress
    elsewhere = tmp_path / ".model.otherhost-1-4e5f.tmp.fxqp"  # another host's, in a shared folder
    other_file = tmp_path / f".other.{_host()}-{_dead_pid()}-6a7b.tmp.fxqp"  # another path's
    for p in (killed, running, elsewhere, other_file):
        p.write_bytes(b"partial")
    write_atomically(path, b"complete")
    assert path.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.fxqp", running.name, elsewhere.name, other_file.name])


def test_an_artifact_that_cannot_be_written_or_read_is_an_artifact_error(tmp_path) -> None:
    import pytest
    import torch

    import fxqp
    from fxqp import Quantize, Rule, Spec

    gm = fxqp.transform(torch.nn.Sequential(torch.nn.Linear(3, 3)), Spec(rules=[Rule(modules=["Linear"], weight=[Quantize(bits=4)])]))
    lowered = fxqp.lower(gm.eval())
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(fxqp.ArtifactError, match=r"a-file/model.fxqp: cannot write the artifact: Not a directory"):
        fxqp.save(lowered, blocker / "model.fxqp")
    folder = tmp_path / "folder.fxqp"
    folder.mkdir()
    with pytest.raises(fxqp.ArtifactError, match=r"folder.fxqp: no such file"):
        fxqp.load(folder, torch.nn.Sequential(torch.nn.Linear(3, 3)))
