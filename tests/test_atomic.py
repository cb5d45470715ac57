"""fxqp.atomic.write_json: parent directories are created, and nothing is written for data
that is not JSON."""

from __future__ import annotations

import json

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
