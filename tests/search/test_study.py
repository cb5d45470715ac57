"""Studies: storages, joining, reading back, and several worker processes on one study —
with a journal file and with a real PostgreSQL server — one of them killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

from fxqp.search import Heartbeat, SearchError, read_study, study_names
from fxqp.search.study import open_storage, open_study, trials_csv

TINY = os.path.join(os.path.dirname(__file__), "tiny.py")


def postgres_url() -> str:
    """The URL of the PostgreSQL server .ci/run starts; without one, skip on a user's
    machine and fail in CI."""
    url = os.environ.get("FXQP_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must provide FXQP_TEST_POSTGRES_URL (.ci/run starts a PostgreSQL server with .ci/postgres.sh)")
        pytest.skip("no PostgreSQL server: run the tests through .ci/run, or set FXQP_TEST_POSTGRES_URL")
    return url


def test_storage_forms(tmp_path):
    assert isinstance(open_storage(None), optuna.storages.InMemoryStorage)
    assert isinstance(open_storage(str(tmp_path / "s.log")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(f"journal:{tmp_path / 'journal'}"), optuna.storages.JournalStorage)
    rdb = open_storage(f"sqlite:///{tmp_path / 's.db'}", Heartbeat(interval=2))
    assert isinstance(rdb, optuna.storages.RDBStorage) and rdb.heartbeat_interval == 2 and rdb.grace_period == 8


@pytest.mark.parametrize(
    "storage, message",
    [
        (
            "ratios.db",
            r"storage 'ratios.db': expected an RDB URL \(sqlite:///file.db, postgresql://user@host/db\), journal:PATH or a file ending in .log",
        ),
        ("journal:/no/such/folder/s.log", r"folder /no/such/folder does not exist"),
        (
            "postgresql://me:secret@127.0.0.1:1/fxqp",
            r"storage postgresql://me:\*\*\*@127.0.0.1:1/fxqp: cannot be opened \(OperationalError",
        ),
        (3, r"storage: 3 is not accepted"),
    ],
)
def test_bad_storages(storage, message):
    with pytest.raises(SearchError, match=message) as info:
        open_storage(storage)
    assert "secret" not in str(info.value)


def test_joining_checks_the_search_and_reading_back(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(storage, "x", directions=["minimize"], sampler=None, meta={"search": "a", "alpha": 1.0})
    study.run(lambda trial: trial.suggest_float("r", 0, 1), 3, progress=False)
    assert open_study(storage, "x", directions=["minimize"], sampler=None, meta={"search": "a", "alpha": 1.0}).counts() == (3, 0)
    with pytest.raises(SearchError, match=r"study 'x' was made by another search: its 'alpha' is 1.0, this search's is 7.0"):
        open_study(storage, "x", directions=["minimize"], sampler=None, meta={"search": "a", "alpha": 7.0})
    with pytest.raises(SearchError, match=r"study 'x' has directions \['minimize'\], this search needs \['maximize', 'minimize'\]"):
        open_study(storage, "x", directions=["maximize", "minimize"], sampler=None, meta={"search": "a", "alpha": 1.0})
    record = read_study(storage, "x")
    assert record.meta == {"search": "a", "alpha": 1.0} and record.counts() == {"COMPLETE": 3}
    assert all(t.attrs["worker"].endswith(f":{os.getpid()}") and t.attrs["seconds"] >= 0 for t in record.trials)
    csv = trials_csv(record).splitlines()
    assert csv[0] == "study,number,state,value,param.r,seconds,worker" and len(csv) == 4 and csv[1].startswith("x,0,COMPLETE,")
    assert study_names(storage) == ["x"]
    with pytest.raises(SearchError, match=r"storage holds no study 'y'; it holds: x"):
        read_study(storage, "y")


def _wait_for_two_running(storage: str, study: str, timeout: float = 120.0):
    """The trials that run while both workers run one, once that happens."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            record = read_study(storage, study)
        except SearchError:
            record = None
        if record is not None:
            running = [t for t in record.trials if t.state == "RUNNING" and "worker" in t.attrs]
            if len({t.attrs["worker"] for t in running}) == 2:
                return running
        time.sleep(0.2)
    raise AssertionError("the two workers never ran trials at the same time")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_workers_share_a_study_and_a_killed_workers_trial_is_failed_and_run_again(kind, tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}" if kind == "journal" else postgres_url()
    study, n_trials = f"kill-{uuid.uuid4().hex[:8]}", 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen([sys.executable, TINY, storage, study, str(n_trials), "1.5"], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        running = _wait_for_two_running(storage, study)
        victim_trial = running[0]
        victim_pid = int(victim_trial.attrs["worker"].rsplit(":", 1)[1])
        os.kill(victim_pid, signal.SIGKILL)
        victim = next(w for w in workers if w.pid == victim_pid)
        survivor = next(w for w in workers if w.pid != victim_pid)
        _, err = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, err[-3000:]
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    record = read_study(storage, study)
    counts = record.counts()
    assert "RUNNING" not in counts and n_trials <= counts["COMPLETE"] <= n_trials + 1
    states = {t.number: t.state for t in record.trials}
    assert states[victim_trial.number] == "FAIL"  # failed by the survivor once its heartbeat was stale
    assert {t.attrs["worker"] for t in record.trials} == {r.attrs["worker"] for r in running}  # both workers ran trials
    numbers = [t.number for t in record.trials]
    assert sorted(numbers) == list(range(len(numbers)))
