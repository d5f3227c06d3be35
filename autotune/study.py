"""The Optuna study: propose a config, check it, measure its load curve, record, score.

One trial = one engine configuration. The runner measures it at a ladder of loads; the trial
keeps the highest-throughput load that meets the SLO (its *operating point*). The objective is
output tokens/s per GPU there; each SLO term and "fits in memory" go in as Optuna constraints
(<= 0 met), and a ``feasible`` user attribute says the same for optuna-dashboard.
"""

from __future__ import annotations

import os
import platform
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from autotune.config import EngineConfig, stable_hash
from autotune.db import (
    RETRY_S,
    Retry,
    Store,
    StoredMeasurement,
    check_sqlite_file,
    engine_kwargs,
    first_line,
    install_sqlite_write_lock,
    once,
    parse_url,
    read_only_url,
    redact,
    sqlite_path,
    transient,
    utcnow,
    writable,
)
from autotune.errors import (
    DISTRIBUTION,
    DatabaseUnavailable,
    Interrupted,
    ScenarioMismatch,
    TrialFailure,
    UserError,
)
from autotune.measurement import REUSABLE, Status
from autotune.model import PerfModel, gate
from autotune.runners import Runner
from autotune.scenario import Scenario
from autotune.space import Layout, SearchSpace
from autotune.specs import Workload
from autotune.strategy import make_sampler, plan_study, quiet_optuna, sim_prior, startup_configs
from autotune.sweep import Gate, Outcome, evaluate, failed_outcome, outcome_of

#: Heartbeat of a running trial, and how long without one before it counts as dead (seconds).
HEARTBEAT_S, GRACE_S = 30, 120
#: Tries at opening a new database that other workers are creating at the same moment.
CREATE_ATTEMPTS = 8
#: Seconds a read command (best, report, ...) retries a failing database before it gives up.
READ_RETRY_S = 10.0
#: System attribute of a trial failed because its worker died (not by the worker itself).
REAPED = "autotune:reaped"


def versions() -> dict[str, str]:
    """Software versions stored with every study and measurement."""
    out = {"python": platform.python_version()}
    for dist in (DISTRIBUTION, "optuna", "sqlalchemy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
            out[dist] = "unknown"
    return out


# ---- storage ------------------------------------------------------------------------------
class RetryingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage with every call that reads or writes the study retried through
    ``retry`` when the database fails transiently (see ``autotune.db.transient``).

    Heartbeats are left alone: the heartbeat thread has its own policy (a missed beat is
    covered by the grace period) and must never block on a retry.
    """

    retry: Retry | None = None  # set by open_storage once the storage is open


def _retried_call(name: str):
    base = getattr(optuna.storages.RDBStorage, name)

    def call(self: RetryingRDBStorage, *args, **kwargs):
        if self.retry is None:
            return base(self, *args, **kwargs)
        return self.retry(base, self, *args, **kwargs)

    call.__name__, call.__doc__ = name, base.__doc__
    return call


for _name in (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
    "set_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials",
    "get_n_trials", "get_best_trial", "_get_stale_trial_ids",
    # What Optuna's cache in front of the storage calls instead of the public methods.
    "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
):
    setattr(RetryingRDBStorage, _name, _retried_call(_name))


@dataclass
class Storage:
    """Optuna's storage and autotune's Store over one database connection pool."""

    url: str  # as given; print ``redact(url)``
    optuna: optuna.storages.RDBStorage
    store: Store
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S

    @property
    def safe_url(self) -> str:
        return redact(self.url)


def open_storage(url: str, *, create: bool = True, write: bool | None = None,
                 heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S,
                 retry_s: float | None = None) -> Storage:
    """Open (and with ``create``, initialise) the database; UserError with one line if not.
    Without ``write`` (default: ``create``) it is opened read-only: nothing a read command does
    can change it.

    Once open, transient database failures are retried for ``retry_s`` seconds (default
    ``RETRY_S`` for a search, ``READ_RETRY_S`` for a read command) before DatabaseUnavailable.
    """
    quiet_optuna()
    write = create if write is None else write or create
    retry = Retry(retry_s if retry_s is not None else RETRY_S if write else READ_RETRY_S)
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if path is not None:
        check_sqlite_file(path, must_exist=not create, write=write)
        if not write:
            # Read commands cannot change the study; a finished one on a read-only archive
            # can still be read.
            parsed = read_only_url(path, archive=not writable(path))
    elif parsed.drivername.startswith("sqlite"):
        # Every connection to ``sqlite://`` is a new, empty database: the heartbeat thread and
        # the workers would each see their own, and everything is gone at exit.
        raise UserError(f"--storage {redact(parsed)!r} is an in-memory SQLite database, which "
                        "keeps nothing and cannot be shared: use sqlite:///FILE")
    try:
        if not create:
            # Read commands: refuse a database without autotune's tables (an empty file, an
            # empty PostgreSQL database) before Optuna reads its own, which it cannot.
            check = create_engine(parsed, **engine_kwargs(parsed, read_only=True))
            try:
                found = Store(check, once()).has_schema()
            finally:
                check.dispose()
            if not found:
                raise UserError(f"no autotune studies in {redact(parsed)} "
                                "(run `autotune search` first)")
        for attempt in range(CREATE_ATTEMPTS):
            try:
                storage = RetryingRDBStorage(
                    parsed.render_as_string(hide_password=False),
                    engine_kwargs=engine_kwargs(parsed, read_only=not write),
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace_s, skip_table_creation=not create,
                )
                install_sqlite_write_lock(storage.engine)
                # One policy for both: once it gives up, every later call tries only once.
                storage.retry = retry
                store = Store(storage.engine, retry)
                storage.heartbeat_stale_trial_callback = _on_stale_trial(store, grace_s)
                if create:
                    store.with_retry(once()).ensure_schema()
                break
            except (DBAPIError, optuna.exceptions.StorageInternalError, DatabaseUnavailable) as exc:
                # Workers started together on a new database all create its tables; all but
                # one lose that race (a duplicate table, type or version row). Once the winner
                # is done the tables are there: try again after a short, random wait. So for a
                # connection dropped while opening; a server that cannot be reached at all is
                # the user's to fix (exit 2 at once).
                again = (create and _lost_creation_race(exc)) or (
                    transient(exc) and not _unreachable(exc))
                if attempt == CREATE_ATTEMPTS - 1 or not again:
                    raise
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
    except ImportError as exc:  # the URL names a driver that is not installed
        raise UserError(f"cannot use database {redact(parsed)}: its driver is not installed "
                        f"({exc}); autotune supports sqlite:/// and postgresql:// "
                        "(pip install psycopg)") from None
    except (DBAPIError, SQLAlchemyError, optuna.exceptions.StorageInternalError,
            DatabaseUnavailable) as exc:
        # A database that still fails as it is opened is the user's to fix: one line, exit 2.
        cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else exc
        raise UserError(f"cannot use database {redact(parsed)}: {first_line(cause)}") from None
    except (RuntimeError, ValueError) as exc:  # optuna: incompatible or unreadable schema
        raise UserError(f"cannot use database {redact(parsed)}: {first_line(exc)}") from None
    return Storage(url=url, optuna=storage, store=store, heartbeat_s=heartbeat_s, grace_s=grace_s)


def _lost_creation_race(exc: BaseException) -> bool:
    """Whether a database error says another worker created the same tables at the same time."""
    return any(sign in _error_text(exc) for sign in (
        "already exists", "unique constraint", "duplicate key", "database is locked"))


def _error_text(exc: BaseException) -> str:
    """A database error's messages, its driver's and its cause's, in lower case."""
    return " ".join(str(e) for e in (exc, getattr(exc, "orig", None), exc.__cause__)
                    if e).lower()


def _unreachable(exc: BaseException) -> bool:
    """Whether a database error says no connection could be made at all (a wrong host or
    port, a server that is down), rather than that one was lost."""
    return any(sign in _error_text(exc) for sign in (
        "connection refused", "could not translate host name", "name or service not known",
        "no route to host", "timeout expired", "unable to open database file"))


def _record_lost(store: Store, study: optuna.Study, trial: FrozenTrial, why: str) -> None:
    """A ``lost`` row for a trial whose worker died after it proposed a config (once)."""
    # A worker killed between recording its measurement and noting it in the trial has
    # recorded all there is: no second row for the same trial.
    if "config" in trial.user_attrs and "measurement_id" not in trial.user_attrs and \
            not store.has_measurement(study.study_name, trial.number):
        scenario = study.user_attrs.get("scenario", {})
        store.add_measurement(StoredMeasurement(
            study_name=study.study_name, trial_number=trial.number,
            runner=scenario.get("runner", "?"), key=trial.user_attrs.get("key", ""),
            config=EngineConfig.from_dict(trial.user_attrs["config"]),
            workload=Workload.from_dict(scenario["workload"]),
            status=Status.LOST, failure_class="worker_lost", message=why,
            started_at=trial.datetime_start, finished_at=utcnow()))


def _on_stale_trial(store: Store, grace_s: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """What happens to a trial whose worker stopped sending heartbeats (Optuna has failed it):
    its slot and key claim are freed, a ``lost`` row records it, and it is re-queued once."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        store.release_trial(study.study_name, trial._trial_id)
        _record_lost(store, study, trial,
                     f"no heartbeat from its worker for over {grace_s} s; re-queued")
        if trial.params:  # a trial that proposed nothing yet leaves nothing to re-run
            retry(study, trial)

    return on_stale


class Heartbeat:
    """Records a trial's heartbeat (Optuna's, and the slot's ``claimed_at`` through ``touch``)
    every ``interval_s`` seconds from a daemon thread.

    The first beat is synchronous, inside ``__enter__``: once it returns, the trial can only
    end, be finished by its worker, or go stale and be reclaimed; never stay RUNNING unseen.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float,
                 touch: Callable[[], None] | None = None):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self.touch = touch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="autotune-heartbeat")

    #: Seconds between the first beat's tries when the database fails it (a lock held, a
    #: dropped connection): the trial starts only once its first beat is recorded.
    FIRST_BEAT_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)

    def beat(self) -> bool:
        """Record one beat; False when the database failed it (the next beat will do: the grace
        period covers a few missed ones). Optuna wraps some database errors in its own
        StorageInternalError: both count, so the thread never dies of one."""
        try:
            self.storage.record_heartbeat(self.trial_id)
            if self.touch is not None:
                self.touch()
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError, DatabaseUnavailable):
            return False
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        for pause in self.FIRST_BEAT_BACKOFF_S:
            if self.beat():
                break
            time.sleep(pause)
        else:
            # The database is gone for good: fail loudly here, before anything was measured.
            self.storage.record_heartbeat(self.trial_id)
            if self.touch is not None:
                self.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StopRequest:
    """A stop asked for by Ctrl-C or SIGTERM, delivered only where it leaves things consistent.

    The signal handler calls ``request()``. It stops the runner's run in progress at once; inside
    an interruptible stretch (a measurement, a wait) it raises KeyboardInterrupt right there, and
    the trial is recorded as interrupted. Anywhere else (asking Optuna for a trial, recording a
    result) the stop waits for the next ``check()``, so no trial is ever left half-recorded.
    """

    def __init__(self) -> None:
        self.requested = False
        self._depth = 0

    def request(self, runner: Runner | None = None) -> None:
        if self.requested:
            return  # the terminal and the parent process may both deliver the same Ctrl-C
        self.requested = True
        if runner is not None:
            runner.interrupt()
        if self._depth:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self.check()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


# ---- the study ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialReport:
    """One finished trial, for progress displays."""

    number: int
    config: EngineConfig
    status: Status
    feasible: bool
    objective: float
    reused: bool


def memory_gate(scenario: Scenario) -> Gate:
    """The gate in front of a real engine: the model rules out only configs whose weights alone
    cannot fit (recorded as ``predicted``); the engine decides near the edge."""
    def check(config: EngineConfig) -> None:
        gate(PerfModel(scenario.model, scenario.gpu, config, scenario.calibration))

    return check


class Tuner:
    """Runs one named study of one scenario against one runner and records every trial."""

    def __init__(self, scenario: Scenario, space: SearchSpace, runner: Runner, storage: Storage,
                 study_name: str | None = None, *, seed: int | None = None,
                 sampler: optuna.samplers.BaseSampler | None = None, prior: str | None = None):
        self.scenario, self.space, self.runner, self.storage = scenario, space, runner, storage
        self.study_name = study_name or scenario.default_study_name()
        # UserError when none is valid; a real engine is offered every layout its weights fit.
        self.layouts: list[Layout] = space.layouts(scenario, weights_only=not runner.predicts)
        self.sampler = sampler or make_sampler(space, self.layouts, seed)
        self.prior = prior  # "sim" or None (checked by SearchJob before anything is opened)
        self.store: Store = storage.store
        # The heartbeat thread's own view of the store: one try per beat, never a retry that
        # would hold the thread (the grace period covers a few missed beats).
        self._beat_store: Store = storage.store.with_retry(once())
        # The model's own runner needs no gate (it is the model); a real engine gets only the
        # "cannot run at all" one.
        self.gate: Gate | None = None if runner.predicts else memory_gate(scenario)
        self._retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        self._versions = versions()
        self._host = socket.gethostname()
        self.stop = StopRequest()

    # -- set-up
    def open(self, progress: Callable[[int], None] | None = None) -> optuna.Study:
        """Create or join the study (refused when it exists with another scenario or space).

        ``progress(n)`` is called as the model's prior scores its n-th configuration (only when
        this worker creates the study with ``prior="sim"``)."""
        created = self.store.register_study(self.study_name, self.scenario.identity(),
                                            self.space_dict(), self._versions)
        if not created:
            self._check_space(self.store.study(self.study_name).space or {})
        try:
            study = optuna.create_study(study_name=self.study_name, storage=self.storage.optuna,
                                        sampler=self.sampler, direction="maximize",
                                        load_if_exists=True)
        except SQLAlchemyError as exc:
            raise UserError(f"cannot open study {self.study_name!r} in "
                            f"{self.storage.safe_url}: {exc}") from None
        study.set_user_attr("scenario", self.scenario.identity())
        self.study = study
        if created:
            # Only the worker that created the study plans its first trials (see strategy.py).
            plan_study(study, self.first_configs(progress),
                       adaptive=self.prior != "sim" and bool(self.scenario.slo.bounds))
        return study

    def first_configs(self, progress: Callable[[int], None] | None = None
                      ) -> list[EngineConfig]:
        """The study's first trials: the model's prior, or one per layout."""
        if self.prior == "sim":
            # The runner's own engine constants (trtllm, vllm); the sim runner: TensorRT-LLM's.
            return sim_prior(self.scenario, self.space, self.layouts, progress=progress,
                             engine=self.runner.name)
        return startup_configs(self.space, self.layouts, self.scenario.precision,
                               latency_bound=bool(self.scenario.slo.bounds))

    def space_dict(self) -> dict:
        return {"source": self.space.source, "layouts": [lay.label for lay in self.layouts],
                "size": self.space.size(self.layouts), "choices": self.space.choices()}

    def _check_space(self, stored: dict) -> None:
        """Refuse to join a study with another search space (its trials' parameters would not
        fit the space), naming each setting that differs; nothing is written."""
        if "choices" not in stored:
            return  # a study from before spaces were recorded: nothing to compare with
        wanted = self.space.choices()
        diffs = [f"{k}: study has {stored['choices'].get(k)}, this run has {wanted.get(k)}"
                 for k in sorted(set(wanted) | set(stored["choices"]))
                 if stored["choices"].get(k) != wanted.get(k)]
        if diffs:
            raise ScenarioMismatch(
                f"study {self.study_name!r} exists with another search space "
                f"({'; '.join(diffs)}); use the study's space (--space {stored.get('source')}) "
                "or another --study name")

    def key(self, config: EngineConfig) -> str:
        """Identity of a measurement: runner settings, config, workload and load ladder."""
        return stable_hash(self.runner.settings(), config.to_dict(),
                           self.scenario.workload.to_dict(),
                           {"ladder": list(self.space.concurrency)})

    # -- running
    def finished(self) -> int:
        """Trials that count towards ``--trials`` (interrupted and lost ones are re-run)."""
        return self.store.slot_counts(self.study_name)[0]

    def optimize(self, n_trials: int, *, timeout: float | None = None,
                 on_trial: Callable[[TrialReport], None] | None = None) -> None:
        """Run trials until the study holds ``n_trials`` finished ones — its total, shared with
        every other worker on the same study, never exceeded.

        Each trial first claims a slot (``autotune_slots``), then asks Optuna for a trial, binds
        it to the slot and keeps its heartbeat while it runs (the first beat before anything
        else). A dead worker's trial goes stale after the grace period, whether or not it ever
        beat; whichever worker notices fails it, frees its slot and re-queues it once. When no
        slot is free but other workers' trials are still running, this worker waits for them
        (one of them may die and free its slot).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        worker = f"{self._host}:{os.getpid()}"
        storage = self.storage
        while deadline is None or time.monotonic() < deadline:
            self.stop.check()
            self.reap()
            slot = self.store.claim_slot(self.study_name, n_trials, worker)
            if slot is None:
                if self.store.slot_counts(self.study_name)[1] == 0:
                    return
                with self.stop.interruptible():
                    time.sleep(min(storage.heartbeat_s, 1.0))
                continue
            trial = self.study.ask()
            counted = False
            try:
                self.store.bind_slot(slot, trial._trial_id)
                with Heartbeat(storage.optuna, trial._trial_id, storage.heartbeat_s,
                               touch=partial(self._beat_store.touch_slot, slot, trial._trial_id)):
                    report = self.run_trial(trial)
                    if report.status in (Status.FAILED, Status.INTERRUPTED):
                        # Recorded with its class and message; the search goes on.
                        self.study.tell(trial, state=TrialState.FAIL)
                    else:
                        self.study.tell(trial, report.objective)
                counted = True
            except optuna.exceptions.UpdateFinishedTrialError:
                # Another worker took this trial for dead (no sign of life for the grace
                # period: a stalled process, a lost connection), failed and re-queued it, and
                # its slot may have been handed on: leave both and go on with a new trial.
                continue
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM) or broken: the trial ends FAIL, its place is
                # given back and its configuration queued, so a resumed search runs it again.
                try:
                    self.study.tell(trial, state=TrialState.FAIL)
                    if trial.params:
                        self.study.enqueue_trial(trial.params)
                except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                    pass
                raise
            finally:
                self.store.finish_slot(slot, counted=counted, trial_id=trial._trial_id)
            if on_trial is not None:
                on_trial(report)

    def reap(self) -> None:
        """Fail the trials of dead workers: those whose Optuna heartbeat went stale, and those
        whose slot shows no sign of life for the grace period (a worker killed before its first
        heartbeat, which Optuna's stale check never sees)."""
        self._fail_stale_trials()
        grace = self.storage.grace_s
        for trial_id in self.store.reap_slots(self.study_name, grace, counted=self._counted):
            frozen = self.storage.optuna.get_trial(trial_id)
            if frozen.state != TrialState.RUNNING or not self._mark_reaped(trial_id):
                continue
            try:
                self.study.tell(frozen.number, state=TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                continue  # another worker got there first
            _record_lost(self.store, self.study, frozen,
                         f"its worker showed no sign of life for over {grace} s; re-queued")
            # Re-queued once, as Optuna's stale-heartbeat path does (the copy names the trial
            # it retries), so the two paths leave the same study.
            if frozen.params:
                self._retry(self.study, self.storage.optuna.get_trial(trial_id))
        # A worker killed between asking for a trial and binding it to its slot leaves a
        # RUNNING trial that no slot holds and that never beat: fail it after the grace period.
        bound = self.store.live_trial_ids(self.study_name)
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            started = frozen.datetime_start
            if frozen._trial_id in bound or started is None or \
                    time.time() - started.timestamp() < grace:
                continue
            try:
                self.study.tell(frozen.number, state=TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
                continue
            # An enqueued configuration (the plan's) it had taken is queued again, not lost.
            fixed = frozen.params or frozen.system_attrs.get("fixed_params")
            if fixed:
                self.study.enqueue_trial(fixed)

    def _mark_reaped(self, trial_id: int) -> bool:
        """Mark a dead worker's RUNNING trial as failed by a reaper, not by its worker (False
        when it has finished meanwhile): see ``_counted``. The mark is the trial's number: a
        re-queued copy inherits its system attributes, but not the mark's meaning."""
        storage = self.storage.optuna
        try:
            storage.set_trial_system_attr(trial_id, REAPED,
                                          storage.get_trial_number_from_id(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def _fail_stale_trials(self) -> None:
        """Optuna's ``fail_stale_trials``, with each trial marked as reaped before it fails."""
        storage = self.storage.optuna
        failed = []
        for trial_id in storage._get_stale_trial_ids(self.study._study_id):
            if not self._mark_reaped(trial_id):
                continue
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first
        on_stale = storage.get_heartbeat_stale_trial_callback()
        for trial_id in failed:
            on_stale(self.study, storage.get_trial(trial_id))

    def _counted(self, trial_id: int) -> bool:
        """Whether a trial counts towards the total: told by its own worker, with a result
        (COMPLETE), or with a recorded failure of its configuration. A worker killed between
        ``tell`` and finishing its slot leaves such a trial: its slot is finished as done, not
        released, or the study would run one trial more than asked."""
        frozen = self.storage.optuna.get_trial(trial_id)
        if frozen.state == TrialState.COMPLETE:
            return True
        return (frozen.state == TrialState.FAIL and frozen.system_attrs.get(REAPED) != frozen.number
                and frozen.user_attrs.get("failure_class") not in (None, "interrupted"))

    def run_trial(self, trial: Trial) -> TrialReport:
        """Propose, measure (or reuse) and record one configuration; what the trial concluded.

        Raises KeyboardInterrupt (the trial recorded as interrupted) when stopped.
        """
        config = self.space.suggest(trial, self.layouts, self.scenario.precision)
        trial.set_user_attr("config", config.to_dict())
        started = utcnow()
        key = self.key(config)
        trial.set_user_attr("key", key)
        try:
            earlier = self._claim_or_wait(trial, key)
            if earlier is not None:
                outcome = self._outcome_from(earlier)
                return self._finish(trial, config, key, outcome, started, reused_from=earlier.id)
            with self.stop.interruptible():
                outcome = evaluate(self.runner, config, self.scenario.workload,
                                   self.space.concurrency, self.scenario.slo, gate=self.gate)
            if outcome.status not in REUSABLE:
                # Not a result that stands for the config: a later trial may try it again.
                self.store.release_key(self.study_name, key, trial._trial_id)
            return self._finish(trial, config, key, outcome, started)
        except KeyboardInterrupt:
            # Raised only inside an interruptible stretch (see StopRequest), before anything of
            # this trial was recorded: record it once, as interrupted.
            self.runner.interrupt()
            self.store.release_key(self.study_name, key, trial._trial_id)
            if "measurement_id" not in trial.user_attrs:
                self._record(trial, config, key, failed_outcome(
                    Interrupted("interrupted by the user"), self.scenario.slo), started)
            raise
        except BaseException:
            # Anything else that breaks the trial (a runner's OSError, a database error) ends it
            # unrecorded: its claim on the config must go too, or the re-queued copy would wait
            # for this dead trial's result for ever.
            if "measurement_id" not in trial.user_attrs:
                self.store.release_key(self.study_name, key, trial._trial_id)
            raise

    def _claim_or_wait(self, trial: Trial, key: str) -> StoredMeasurement | None:
        """The stored result for ``key``, or None once this trial holds the right to measure it.

        When another worker is measuring the same configuration right now, wait for its result
        rather than measure it twice (if that worker fails or dies, its claim is released and
        this trial measures it).
        """
        while True:
            earlier = self.store.find_reusable(self.study_name, key)
            if earlier is not None:
                return earlier
            if self.store.claim_key(self.study_name, key, trial._trial_id):
                return None
            self._release_orphaned_claim(key)
            self.reap()
            with self.stop.interruptible():
                time.sleep(0.2)

    def _release_orphaned_claim(self, key: str) -> None:
        """Free ``key`` when the trial holding it has ended without a result that stands (its
        worker failed to release the claim: the database broke under it, or it was killed
        between ``tell`` and the release)."""
        holder = self.store.key_holder(self.study_name, key)
        if holder is None:
            return
        try:
            state = self.storage.optuna.get_trial(holder).state
        except KeyError:  # no such trial: nothing can ever release it but us
            state = TrialState.FAIL
        if state.is_finished():
            self.store.release_key(self.study_name, key, holder)

    # -- recording
    def _outcome_from(self, stored: StoredMeasurement) -> Outcome:
        if stored.status == Status.INFEASIBLE:
            failure = TrialFailure(stored.message or Status.INFEASIBLE.value)
            failure.infeasible = True
            failure.failure_class = stored.failure_class or Status.INFEASIBLE.value
            return failed_outcome(failure, self.scenario.slo)
        return outcome_of(stored.load_points, self.scenario.slo, stored.max_requests_in_flight)

    def _finish(self, trial: Trial, config: EngineConfig, key: str, outcome: Outcome,
                started, reused_from: int | None = None) -> TrialReport:
        self._record(trial, config, key, outcome, started, reused_from)
        for name, value in outcome.constraints.items():
            trial.set_constraint(name, value)
        return TrialReport(number=trial.number, config=config,
                           status=Status.REUSED if reused_from is not None else outcome.status,
                           feasible=outcome.feasible, objective=outcome.objective,
                           reused=reused_from is not None)

    def _record(self, trial: Trial, config: EngineConfig, key: str, outcome: Outcome, started,
                reused_from: int | None = None) -> None:
        f = outcome.failure
        status = Status.REUSED if reused_from is not None else outcome.status
        mid = self.store.add_measurement(StoredMeasurement(
            study_name=self.study_name, trial_number=trial.number, runner=self.runner.name,
            key=key, config=config, workload=self.scenario.workload, status=status,
            # A reused row points at the original instead of copying its load points, so every
            # load point in the database was measured once.
            load_points=() if reused_from is not None else outcome.load_points,
            feasible=outcome.feasible, objective=outcome.objective if outcome.point else None,
            operating_concurrency=outcome.point.concurrency if outcome.point else None,
            max_requests_in_flight=outcome.max_requests_in_flight,
            failure_class=f.failure_class if f else None, message=str(f) if f else None,
            log_tail=getattr(f, "log_tail", None) or None, log_path=getattr(f, "log_path", None),
            runner_settings=self.runner.settings(), versions=self._versions, raw=outcome.raw,
            reused_from=reused_from, host=self._host, started_at=started, finished_at=utcnow(),
        ))
        trial.set_user_attr("status", str(status))
        trial.set_user_attr("feasible", outcome.feasible)
        trial.set_user_attr("measurement_id", mid)
        if reused_from is not None:
            trial.set_user_attr("reused_from", reused_from)
        if f is not None:
            trial.set_user_attr("failure_class", f.failure_class)
            trial.set_user_attr("message", str(f)[:500])
        trial.set_user_attr("objective", outcome.objective)
        if outcome.point is not None:
            p = outcome.point
            trial.set_user_attr("concurrency", p.concurrency)
            trial.set_user_attr("output_tok_s", round(p.output_throughput, 2))
            trial.set_user_attr("tok_s_per_user", round(p.output_throughput_per_user, 2))


__all__ = [
    "GRACE_S", "HEARTBEAT_S", "Heartbeat", "StopRequest", "Storage", "TrialReport", "Tuner",
    "memory_gate", "open_storage", "versions",
]
