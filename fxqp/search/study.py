"""Optuna studies for fxqp's searches: storages, the worker loop, and what each trial records.

A study is data, not a process: every trial records, as Optuna user attributes, the spec it
trained (dict form), what the evaluation returned, the saved artifact's bytes and, for the
ratio search, the per-layer ratios and the objective's terms. Any worker on any machine can
join a study, and :func:`read_study` (``fxqp search show``) reads it back without running
anything.

Storages (the ``storage`` argument):

* ``None`` — in memory, this process only;
* an RDB URL (``sqlite:///search.db``, ``postgresql://user:pw@host/db``, any URL SQLAlchemy
  takes) — Optuna's ``RDBStorage`` with its heartbeat: while a trial runs its worker records
  a heartbeat every ``heartbeat.interval`` seconds, and a running trial whose last heartbeat
  is older than ``heartbeat.grace`` seconds (its worker died) is failed by the next worker
  that looks;
* a journal file, ``journal:PATH`` or any path ending in ``.log`` — Optuna's
  ``JournalStorage`` over a ``JournalFileBackend`` (many processes on one machine or on a
  shared file system, no server). Optuna keeps no heartbeat there; fxqp records one as the
  trial's user attribute ``heartbeat`` (Unix time) and fails stale trials the same way;
* an ``optuna.storages.BaseStorage`` object, used as it is.

:meth:`SearchStudy.run` is every worker's loop: it runs trials until the study holds the asked
number of finished (complete or pruned) trials, counting every worker's, and waits for the
trials other workers still run (or fails them once stale) before it returns, so that no
trial is left ``RUNNING`` by a worker that died.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from fxqp._extras import require
from fxqp.errors import FxqpError

__all__ = [
    "SearchError",
    "Heartbeat",
    "require_optuna",
    "open_storage",
    "open_study",
    "SearchStudy",
    "TrialRecord",
    "StudyRecord",
    "read_study",
    "trials_csv",
    "study_names",
    "worker_id",
]

META_KEY = "fxqp"
"""Study user attribute holding what kind of fxqp search made the study, and its settings."""


class SearchError(FxqpError):
    """A search that cannot run as asked: an argument, a storage that cannot be opened, a
    study made by another search, a train function that did not train as many steps."""


def require_optuna():
    """Import Optuna, or say how to install it."""
    try:
        import optuna
    except ImportError:
        raise SearchError("fxqp.search needs Optuna: pip install 'fxqp[search]' (optuna, scipy; psycopg for PostgreSQL)") from None
    return optuna


@contextmanager
def quiet_optuna():
    """Optuna's log lines off while a search runs (errors still shown): its progress bar
    says what they would, and a failed trial's error propagates; the verbosity is restored
    after."""
    optuna = require_optuna()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(level, optuna.logging.ERROR))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


@dataclass(frozen=True)
class Heartbeat:
    """How dead workers are detected: a running trial records a heartbeat every ``interval``
    seconds; one whose last heartbeat is older than ``grace`` seconds (default ``4·interval``)
    is failed by the next worker that looks."""

    interval: int = 10
    grace: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise SearchError(f"heartbeat interval: {self.interval!r} is not accepted; expected a whole number of seconds >= 1")
        if self.grace is not None and (isinstance(self.grace, bool) or not isinstance(self.grace, int) or self.grace <= self.interval):
            raise SearchError(
                f"heartbeat grace: {self.grace!r} is not accepted; expected None or whole seconds > the interval ({self.interval})"
            )

    @property
    def grace_seconds(self) -> int:
        return self.grace if self.grace is not None else 4 * self.interval


def worker_id() -> str:
    """``host:pid`` of this process, recorded with each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------- storages


def _journal_path(storage: str) -> str | None:
    if storage.startswith("journal:"):
        return storage.removeprefix("journal:")
    if "://" not in storage and storage.endswith(".log"):
        return storage
    return None


def open_storage(storage: Any, heartbeat: Heartbeat = Heartbeat()) -> Any:
    """An Optuna storage for ``storage`` (see the module doc for the accepted forms).

    Raises:
        SearchError: a string that is neither a URL nor a journal file, or a storage that
            cannot be opened (with the reason).
    """
    optuna = require_optuna()
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, str) or not storage:
        raise SearchError(
            f"storage: {storage!r} is not accepted; expected None, an RDB URL (sqlite:///file.db, postgresql://...), journal:PATH or a file ending in .log"
        )
    path = _journal_path(storage)
    if path is not None:
        if not path:
            raise SearchError(f"storage {storage!r}: the journal file path is empty")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise SearchError(f"storage {storage!r}: folder {directory} does not exist")
        backend = optuna.storages.journal.JournalFileBackend(path)
        return optuna.storages.JournalStorage(backend)
    if "://" not in storage:
        raise SearchError(
            f"storage {storage!r}: expected an RDB URL (sqlite:///file.db, postgresql://user@host/db), journal:PATH or a file ending in .log"
        )
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat.interval, grace_period=heartbeat.grace_seconds
            )
    except ImportError as err:  # the database driver
        raise SearchError(
            f"storage {_safe_url(storage)}: the database driver is missing ({err}); for PostgreSQL: pip install 'psycopg[binary]'"
        ) from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors: a bad URL, a server that does not answer
        raise SearchError(
            f"storage {_safe_url(storage)}: cannot be opened ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def _safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def _optuna_heartbeat(storage: Any) -> bool:
    """Whether Optuna itself keeps heartbeats in ``storage`` (an RDB storage with an interval)."""
    optuna = require_optuna()
    return isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval is not None


@dataclass
class SearchStudy:
    """An Optuna study with the storage it lives in and how its dead workers are detected
    (made by :func:`open_study`)."""

    study: Any
    storage: Any
    heartbeat: Heartbeat

    @property
    def optuna_heartbeat(self) -> bool:
        """Optuna records the heartbeats (RDB storages); otherwise fxqp does (journal files)."""
        return _optuna_heartbeat(self.storage)

    @property
    def shared(self) -> bool:
        """Other processes may run trials of this study (any storage but memory)."""
        return not isinstance(self.storage, require_optuna().storages.InMemoryStorage)

    def counts(self) -> tuple[int, int]:
        """(finished: complete or pruned, running) trials of every worker."""
        TrialState = require_optuna().trial.TrialState
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        running = sum(t.state == TrialState.RUNNING for t in trials)
        return len(trials) - running, running

    def fail_stale_trials(self) -> list[int]:
        """Fail the running trials whose worker stopped beating; returns their numbers.

        RDB storages: Optuna's ``fail_stale_trials``. Other storages: trials whose user
        attribute ``heartbeat`` (or, before the first one, whose start) is older than the
        grace period, failed through ``study.tell``.
        """
        optuna = require_optuna()
        TrialState = optuna.trial.TrialState
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or not self.shared:
            return []
        if self.optuna_heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)
            still = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            return [t.number for t in running if t.number not in still]
        now, failed = time.time(), []
        for trial in running:
            last = trial.user_attrs.get("heartbeat")
            if last is None and trial.datetime_start is not None:
                last = trial.datetime_start.timestamp()
            if last is not None and now - float(last) > self.heartbeat.grace_seconds:
                try:
                    self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                except (ValueError, RuntimeError):  # finished by its worker meanwhile
                    continue
                failed.append(trial.number)
        return failed

    def run(
        self,
        objective: Callable[[Any], Any],
        n_trials: int,
        *,
        progress: bool = True,
        desc: str = "trials",
        best: Callable[[Any], str] | None = None,
        poll: float = 1.0,
    ) -> None:
        """Run ``objective`` on trials until the study holds ``n_trials`` finished (complete
        or pruned) trials, every worker's counted; then wait until no trial of it runs.

        A worker that finds the remaining trials all running elsewhere waits for them; a
        trial whose worker died is failed once its heartbeat is stale, and another is run in
        its place. Several workers may overshoot the count by at most one trial each. An
        exception in ``objective`` fails its trial and propagates (Optuna's ``catch=()``).

        Args:
            best: text for the progress bar (the best so far), from the study.
        """
        optuna = require_optuna()
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            raise SearchError(f"n_trials: {n_trials!r} is not accepted; expected an integer >= 1")
        own_heartbeat = self.shared and not self.optuna_heartbeat

        def run(trial: Any) -> Any:
            trial.set_user_attr("worker", worker_id())
            started = time.perf_counter()
            try:
                if own_heartbeat:
                    with _JournalHeartbeat(trial, self.heartbeat.interval):
                        value = objective(trial)
                else:
                    value = objective(trial)
            finally:
                # fxqp.transform moves what it builds to the collector's oldest generation,
                # which Python collects rarely: free each trial's models now, or a long
                # search holds every one of them
                gc.collect()
            trial.set_user_attr("seconds", time.perf_counter() - started)
            return value

        done, _ = self.counts()
        tqdm = require("tqdm", "fxqp.search", "search").tqdm
        bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=desc, unit="trial", disable=not progress, dynamic_ncols=True)
        with quiet_optuna(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                while True:
                    self.fail_stale_trials()
                    done, running = self.counts()
                    bar.n = min(done, n_trials)
                    if best is not None and done:
                        bar.set_postfix_str(best(self.study), refresh=False)
                    bar.refresh()
                    if done >= n_trials and not running:
                        return
                    if done + running >= n_trials:
                        time.sleep(poll)  # the last trials run elsewhere: wait for them, or for them to go stale
                        continue
                    self.study.optimize(run, n_trials=1, catch=(), gc_after_trial=False, show_progress_bar=False)
            finally:
                bar.close()


class _JournalHeartbeat:
    """Records ``heartbeat`` (Unix time) on a trial every ``interval`` seconds from a thread,
    where the storage has no heartbeat of its own."""

    def __init__(self, trial: Any, interval: int):
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="fxqp-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial was finished (failed by a worker that judged it stale)
                return

    def __enter__(self) -> "_JournalHeartbeat":
        self.trial.set_user_attr("heartbeat", time.time())
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def open_study(
    storage: Any,
    study_name: str | None,
    *,
    directions: Sequence[str],
    sampler: Any,
    pruner: Any = None,
    meta: Mapping[str, Any],
    heartbeat: Heartbeat = Heartbeat(),
) -> SearchStudy:
    """Create the study, or join it when it exists (another worker, or an interrupted run).

    ``meta`` (JSON data: the kind of search and the settings that must agree between
    workers) is stored as the study's user attribute ``fxqp``; joining a study whose record
    differs raises :class:`SearchError` naming the first differing setting.
    """
    optuna = require_optuna()
    opened = open_storage(storage, heartbeat)
    name = study_name or "fxqp-search"
    try:
        with quiet_optuna():
            study = optuna.create_study(
                storage=opened, study_name=name, directions=list(directions), sampler=sampler, pruner=pruner, load_if_exists=True
            )
    except ValueError as err:  # an existing study with other directions
        raise SearchError(f"study {name!r}: {err}") from None
    if [d.name.lower() for d in study.directions] != [d.lower() for d in directions]:
        raise SearchError(
            f"study {name!r} has directions {[d.name.lower() for d in study.directions]}, this search needs {list(directions)}; choose another study name"
        )
    existing = study.user_attrs.get(META_KEY)
    wanted = dict(meta)
    if existing is None:
        study.set_user_attr(META_KEY, wanted)
    elif existing != wanted:
        key = next((k for k in sorted(set(existing) | set(wanted)) if existing.get(k) != wanted.get(k)), "?")
        raise SearchError(
            f"study {name!r} was made by another search: its {key!r} is {existing.get(key)!r}, this search's is {wanted.get(key)!r}; "
            "run the same search to join it, or choose another study name"
        )
    return SearchStudy(study, opened, heartbeat)


# --------------------------------------------------------------------------- reading a study back


@dataclass(frozen=True)
class TrialRecord:
    """What one trial recorded (Optuna user attributes), readable without the model code.

    Attributes:
        number: the trial number in its study.
        state: ``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING`` or ``WAITING``.
        values: the objective values (``None`` unless complete).
        params: the sampled parameters.
        spec: the spec the trial trained (dict form), if it got that far.
        attrs: every other user attribute (``evaluation``, ``artifact_bytes``, ``ratios``,
            ``terms``, ``worker``, ``seconds``, ...).
    """

    number: int
    state: str
    values: tuple[float, ...] | None
    params: dict[str, Any]
    spec: dict[str, Any] | None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        """No constraint violated (the user attribute ``constraints``: values above 0 violate)."""
        return all(v <= 0 for v in self.attrs.get("constraints", {}).values())


@dataclass(frozen=True)
class StudyRecord:
    """A study read back: its name, directions, the ``fxqp`` record and every trial."""

    name: str
    directions: tuple[str, ...]
    meta: dict[str, Any]
    trials: tuple[TrialRecord, ...]
    user_attrs: dict[str, Any] = field(default_factory=dict)

    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "COMPLETE" and t.values is not None and all(math.isfinite(v) for v in t.values)]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for trial in self.trials:
            out[trial.state] = out.get(trial.state, 0) + 1
        return out


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def trials_csv(*records: StudyRecord) -> str:
    """Every trial of the studies as one CSV: study, number, state, the objective values, the
    parameters (``param.<name>``) and the recorded numbers (``evaluation.loss``,
    ``artifact_bytes``, ``terms.value``, ...); the specs are left out (they are in the
    studies)."""
    import csv
    import io

    rows = []
    for record in records:
        for trial in record.trials:
            row: dict[str, Any] = {"study": record.name, "number": trial.number, "state": trial.state}
            for i in range(len(record.directions)):
                row[f"value{i}" if len(record.directions) > 1 else "value"] = None if trial.values is None else trial.values[i]
            _flat("param", trial.params, row)
            for key, value in trial.attrs.items():
                if key not in ("heartbeat", "ratios"):
                    _flat(key, value, row)
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_study(storage: Any, study_name: str) -> StudyRecord:
    """Read a study of any storage back (see the module doc): nothing is run or written.

    Raises:
        SearchError: the storage cannot be opened, or holds no study of that name (with
            the names it holds).
    """
    optuna = require_optuna()
    opened = open_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = study_names(opened)
        raise SearchError(f"storage holds no study {study_name!r}; it holds: {', '.join(names) or 'none'}") from None
    trials = []
    for t in study.get_trials(deepcopy=False):
        attrs = dict(t.user_attrs)
        trials.append(
            TrialRecord(
                t.number, t.state.name, tuple(t.values) if t.values is not None else None, dict(t.params), attrs.pop("spec", None), attrs
            )
        )
    directions = tuple(d.name.lower() for d in study.directions)
    user_attrs = dict(study.user_attrs)
    return StudyRecord(study.study_name, directions, user_attrs.get(META_KEY, {}), tuple(trials), user_attrs)


def study_names(storage: Any) -> list[str]:
    """The names of the studies a storage holds."""
    optuna = require_optuna()
    return sorted(optuna.get_all_study_names(open_storage(storage)))
