"""The Optuna study: propose a config, check it, measure its load curve, record, score.

One trial = one engine configuration. The runner measures it at a ladder of loads; the trial
keeps the highest-throughput load that meets the SLO (its *operating point*). The objective is
output tokens/s per GPU there; each SLO term and "fits in memory" go in as Optuna constraints
(<= 0 met), and a ``feasible`` user attribute says the same for optuna-dashboard.
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from autotune.config import EngineConfig, stable_hash
from autotune.db._models import utcnow
from autotune.db import (
    Store, StoredMeasurement, check_sqlite_file, engine_kwargs,
    install_sqlite_write_lock, parse_url, redact, sqlite_path,
)
from autotune.errors import Interrupted, TrialFailure, UserError
from autotune.measurement import MAX_CONCURRENCY, LoadPoint, Measurement
from autotune.runners import Runner
from autotune.scenario import Scenario
from autotune.slo import FITS, SLO
from autotune.space import Layout, SearchSpace
from autotune.specs import Workload
from autotune.strategy import make_sampler, plan_study, sim_prior, startup_configs

#: Heartbeat of a running trial, and how long without one before it counts as dead (seconds).
HEARTBEAT_S, GRACE_S = 30, 120

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats, their retry callback and grouped TPE are marked experimental; they are what we rely
# on deliberately, so their warnings would only be noise for users.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# autotune keeps heartbeats itself around ask/tell (see Heartbeat), which Optuna warns about.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def versions() -> dict[str, str]:
    """Software versions stored with every study and measurement."""
    out = {"python": platform.python_version()}
    for dist in ("autotune", "optuna", "sqlalchemy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
            out[dist] = "unknown"
    return out


# ---- storage ------------------------------------------------------------------------------
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


def open_storage(url: str, *, create: bool = True, heartbeat_s: int = HEARTBEAT_S,
                 grace_s: int = GRACE_S) -> Storage:
    """Open (and with ``create``, initialise) the database; UserError with one line if not."""
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if path is not None:
        check_sqlite_file(path, must_exist=not create)
    try:
        storage = optuna.storages.RDBStorage(
            parsed.render_as_string(hide_password=False), engine_kwargs=engine_kwargs(parsed),
            heartbeat_interval=heartbeat_s, grace_period=grace_s,
            skip_table_creation=not create,
        )
        install_sqlite_write_lock(storage.engine)
        store = Store(storage.engine)
        storage.heartbeat_stale_trial_callback = _on_stale_trial(store, grace_s)
        if create:
            store.ensure_schema()
        elif not store.has_schema():
            raise UserError(f"no autotune studies in {redact(parsed)} (run `autotune search` first)")
    except (DBAPIError, SQLAlchemyError) as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"cannot use database {redact(parsed)}: {first}") from None
    except (RuntimeError, ValueError) as exc:  # optuna: incompatible or unreadable schema
        raise UserError(f"cannot use database {redact(parsed)}: {exc}") from None
    return Storage(url=url, optuna=storage, store=store, heartbeat_s=heartbeat_s, grace_s=grace_s)


def _on_stale_trial(store: Store, grace_s: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """What happens to a trial whose worker stopped sending heartbeats (Optuna has failed it):
    its slot and key claim are freed, a ``lost`` row records it, and it is re-queued once."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        store.release_trial(study.study_name, trial._trial_id)
        if "config" in trial.user_attrs and "measurement_id" not in trial.user_attrs:
            store.add_measurement(StoredMeasurement(
                study_name=study.study_name, trial_number=trial.number,
                runner=study.user_attrs.get("scenario", {}).get("runner", "?"),
                key=trial.user_attrs.get("key", ""),
                config=EngineConfig.from_dict(trial.user_attrs["config"]),
                workload=Workload.from_dict(study.user_attrs["scenario"]["workload"]),
                status="lost", failure_class="worker_lost",
                message=f"no heartbeat from its worker for over {grace_s} s; re-queued",
                started_at=trial.datetime_start, finished_at=utcnow()))
        retry(study, trial)

    return on_stale


class Heartbeat:
    """Records a trial's heartbeat every ``interval_s`` seconds from a daemon thread."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="autotune-heartbeat")

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except SQLAlchemyError:
                pass  # a busy database: the next beat will do; the grace period covers it
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "Heartbeat":
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


# ---- operating point ----------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What one trial concluded about one configuration."""

    status: str  # ok | infeasible | failed | interrupted (see MeasurementRow)
    load_points: tuple[LoadPoint, ...] = ()
    point: LoadPoint | None = None  # operating point when feasible, else the closest point
    feasible: bool = False
    objective: float = 0.0  # output tok/s per GPU at ``point`` (0 when nothing ran)
    constraints: dict[str, float] = field(default_factory=dict)
    max_requests_in_flight: int | None = None
    failure: TrialFailure | None = None
    raw: dict = field(default_factory=dict)  # runner records per load (reports, logs)


def operating_point(points: Sequence[LoadPoint], slo: SLO) -> tuple[LoadPoint | None, bool]:
    """The highest-throughput point meeting ``slo`` (feasible=True), else the one that misses it
    by the least (its worst term's relative excess is smallest)."""
    if not points:
        return None, False
    meeting = [p for p in points if slo.met(p)]
    if meeting:
        # Ties go to the higher load: with dp replicas, loads below dp all put one request on
        # each replica, and the highest of them says how many requests are really in flight.
        return max(meeting, key=lambda p: (p.output_throughput_per_gpu, p.concurrency)), True
    return min(points, key=lambda p: max(slo.violations(p).values())), False


def outcome_of(points: Sequence[LoadPoint], slo: SLO, max_in_flight: int | None,
               raw: dict | None = None) -> Outcome:
    point, feasible = operating_point(points, slo)
    constraints = {FITS: 0.0, **slo.violations(point)}
    return Outcome(status="ok", load_points=tuple(points), point=point, feasible=feasible,
                   objective=point.output_throughput_per_gpu, constraints=constraints,
                   max_requests_in_flight=max_in_flight, raw=raw or {})


def failed_outcome(failure: TrialFailure, slo: SLO) -> Outcome:
    status = "infeasible" if failure.infeasible else (
        "interrupted" if isinstance(failure, Interrupted) else "failed")
    return Outcome(status=status, constraints={FITS: 1.0, **{b.name: 1.0 for b in slo.bounds}},
                   failure=failure)


@dataclass(frozen=True)
class Sweep:
    """The load points one trial measured (ascending load, "max" last), the requests that fit in
    flight, and each run's runner-specific record (reports, logs) keyed by its load."""

    points: tuple[LoadPoint, ...]
    capacity: int | None
    raw: dict[str, dict] = field(default_factory=dict)


class _Runs:
    """Runs one load at a time and keeps what a sweep returns."""

    def __init__(self, runner: Runner, config: EngineConfig, workload: Workload):
        self.runner, self.config, self.workload = runner, config, workload
        self.points: dict[int, LoadPoint] = {}
        self.raw: dict[str, dict] = {}
        self.capacity: int | None = None

    def run(self, load: int) -> LoadPoint:
        m: Measurement = self.runner.measure(self.config, self.workload, [load])
        point = m.load_points[-1]
        self.points[load] = point
        if m.raw:
            self.raw[str(load)] = m.raw
        self.capacity = self.capacity or m.max_requests_in_flight or None
        return point

    def sweep(self) -> Sweep:
        ordered = sorted(self.points.values(),
                         key=lambda p: (p.concurrency == MAX_CONCURRENCY, p.concurrency))
        return Sweep(tuple(ordered), self.capacity, self.raw)


#: How finely a trial pins its operating point between two rungs of the load ladder: it halves
#: the gap between the highest load meeting the SLO and the next rung (which misses it) until
#: the gap is at most this share of the load (or one request per replica). A power-of-two ladder
#: alone can report half of what a configuration sustains, and makes configurations that differ
#: by a hair at the SLO's edge look 2x apart; three more runs (8 -> 16: 12, 14, 15) fix both.
REFINE_RESOLUTION = 0.125


def _refine(runs: _Runs, slo: SLO) -> None:
    """Bisect the loads between the highest measured load meeting ``slo`` and the lowest
    higher one missing it (both numeric; "max" is not a load to bisect towards)."""
    if not slo:
        return
    met = {c: slo.met(p) for c, p in runs.points.items() if c != MAX_CONCURRENCY}
    good = max((c for c, ok in met.items() if ok), default=None)
    bad = min((c for c, ok in met.items() if not ok and good is not None and c > good),
              default=None)
    if good is None or bad is None:
        return
    if runs.capacity:  # loads above what fits in flight at once behave like "max"
        bad = min(bad, runs.capacity + 1)
    # Loads are split evenly over the dp replicas (rounded up), so only multiples of dp differ.
    step = runs.config.dp
    while bad - good > max(step, int(good * REFINE_RESOLUTION)):
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if slo.met(runs.run(mid)):
            good = mid
        else:
            bad = mid


def _ascending(ladder: Sequence[int]) -> list[int]:
    finite = sorted(c for c in ladder if c != MAX_CONCURRENCY)
    return finite + ([MAX_CONCURRENCY] if MAX_CONCURRENCY in ladder else [])


def measure_ladder(runner: Runner, config: EngineConfig, workload: Workload,
                   ladder: Sequence[int], slo: SLO) -> Sweep:
    """Measure ``config`` up the load ladder (ascending, then "max"), one load per run.

    Stops at the first load that misses the SLO: latency only grows with load, so higher loads
    would miss it too. Loads above what the KV cache holds at once behave like "max" and are
    skipped.
    """
    runs = _Runs(runner, config, workload)
    for load in _ascending(ladder):
        if runs.capacity and load != MAX_CONCURRENCY and load > runs.capacity:
            continue
        point = runs.run(load)
        if slo and not slo.met(point):
            break
    _refine(runs, slo)
    return runs.sweep()


def bisect_ladder(runner: Runner, config: EngineConfig, workload: Workload,
                  ladder: Sequence[int], slo: SLO) -> Sweep:
    """Find the operating point with as few runs as possible (for runners whose every run is
    costly): the same answer as ``measure_ladder`` when latency and throughput grow with load.

    Without an SLO the top of the ladder is the answer (one run). With one: the lowest load
    first (if it misses, nothing will meet the SLO), then the top, then bisection between the
    highest load known to meet the SLO and the lowest known to miss it.
    """
    runs = _Runs(runner, config, workload)
    loads = _ascending(ladder)

    def meets(index: int) -> bool:
        nonlocal loads
        load = loads[index]
        met = slo.met(runs.run(load))
        if runs.capacity:
            # Loads beyond what the KV cache holds at once behave like "max".
            loads = [c for c in loads if c == MAX_CONCURRENCY or c <= runs.capacity or c == load]
        return met

    if not slo:
        meets(len(loads) - 1)
        return runs.sweep()
    if not meets(0):
        return runs.sweep()
    good, bad = 0, len(loads)
    if len(loads) > 1:
        if meets(len(loads) - 1):
            good = len(loads) - 1
        else:
            bad = len(loads) - 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if meets(mid):
            good = mid
        else:
            bad = mid
    _refine(runs, slo)
    return runs.sweep()


def static_check(scenario: Scenario, config: EngineConfig) -> None:
    """Reject, before any run, a config the memory model says cannot work (raises TrialFailure)."""
    from autotune.runners.sim import SimRunner  # the model decides what fits

    SimRunner(scenario).capacity(config, scenario.workload)


# ---- the study ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialReport:
    """One finished trial, for progress displays."""

    number: int
    config: EngineConfig
    status: str
    feasible: bool
    objective: float
    reused: bool


class Tuner:
    """Runs one named study of one scenario against one runner and records every trial."""

    def __init__(self, scenario: Scenario, space: SearchSpace, runner: Runner, storage: Storage,
                 study_name: str | None = None, *, seed: int | None = None,
                 sampler: optuna.samplers.BaseSampler | None = None, prior: str | None = None):
        self.scenario, self.space, self.runner, self.storage = scenario, space, runner, storage
        self.study_name = study_name or scenario.default_study_name()
        self.layouts: list[Layout] = space.layouts(scenario)  # UserError when none is valid
        self.sampler = sampler or make_sampler(space, self.layouts, seed)
        self.prior = prior  # "sim" or None (checked by SearchJob before anything is opened)
        self.store: Store = storage.store
        self._versions = versions()
        self._host = socket.gethostname()
        self.stop = StopRequest()

    # -- set-up
    def open(self) -> optuna.Study:
        """Create or join the study (refused when it exists with another scenario)."""
        created = self.store.register_study(self.study_name, self.scenario.identity(),
                                            self.space_dict(), self._versions)
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
            plan_study(study, self.first_configs(),
                       adaptive=self.prior != "sim" and bool(self.scenario.slo.bounds))
        return study

    def first_configs(self) -> list[EngineConfig]:
        """The study's first trials: the model's prior, or one per layout."""
        if self.prior == "sim":
            return sim_prior(self.scenario, self.space, self.layouts)
        return startup_configs(self.space, self.layouts, self.scenario.precision,
                               latency_bound=bool(self.scenario.slo.bounds))

    def space_dict(self) -> dict:
        return {"source": self.space.source, "layouts": [lay.label for lay in self.layouts],
                "size": self.space.size(self.layouts)}

    def key(self, config: EngineConfig) -> str:
        """Identity of a measurement: runner settings, config, workload and load ladder."""
        return stable_hash(self.runner.settings(), config.to_dict(),
                           self.scenario.workload.to_dict(), {"ladder": list(self.space.concurrency)})

    # -- running
    def finished(self) -> int:
        """Trials that count towards ``--trials`` (interrupted and lost ones are re-run)."""
        return self.store.slot_counts(self.study_name)[0]

    def optimize(self, n_trials: int, *, timeout: float | None = None,
                 on_trial: Callable[[TrialReport], None] | None = None) -> None:
        """Run trials until the study holds ``n_trials`` finished ones — its total, shared with
        every other worker on the same study, never exceeded.

        Each trial first claims a slot (``autotune_slots``), then asks Optuna for a trial and
        keeps its heartbeat while it runs. A dead worker's trial goes stale after the grace
        period; whichever worker notices fails it, frees its slot and re-queues it once. When
        no slot is free but other workers' trials are still running, this worker waits for them
        (one of them may die and free its slot).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        worker = f"{self._host}:{os.getpid()}"
        storage = self.storage
        while deadline is None or time.monotonic() < deadline:
            self.stop.check()
            optuna.storages.fail_stale_trials(self.study)
            slot = self.store.claim_slot(self.study_name, n_trials, worker, storage.grace_s)
            if slot is None:
                if self.store.slot_counts(self.study_name)[1] == 0:
                    return
                with self.stop.interruptible():
                    time.sleep(min(storage.heartbeat_s, 1.0))
                continue
            trial = self.study.ask()
            self.store.bind_slot(slot, trial._trial_id)
            counted = False
            try:
                with Heartbeat(storage.optuna, trial._trial_id, storage.heartbeat_s):
                    try:
                        value = self.objective(trial)
                    except TrialFailure:
                        # Recorded with its class and message; the search goes on.
                        self.study.tell(trial, state=TrialState.FAIL)
                    else:
                        self.study.tell(trial, value)
                counted = True
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
                self.store.finish_slot(slot, counted=counted)
            if on_trial is not None:
                attrs = self.study._storage.get_trial(trial._trial_id).user_attrs
                on_trial(TrialReport(
                    number=trial.number, config=EngineConfig.from_dict(attrs["config"]),
                    status=attrs.get("status", "failed"), feasible=bool(attrs.get("feasible")),
                    objective=attrs.get("objective", 0.0),
                    reused=attrs.get("reused_from") is not None))

    def objective(self, trial: Trial) -> float:
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
            try:
                static_check(self.scenario, config)
                # A costly runner bisects the load ladder; a cheap one walks up all of it, which
                # keeps the whole load curve for the Pareto front and the report.
                sweep = bisect_ladder if self.runner.expensive else measure_ladder
                with self.stop.interruptible():
                    swept = sweep(self.runner, config, self.scenario.workload,
                                  self.space.concurrency, self.scenario.slo)
                outcome = outcome_of(swept.points, self.scenario.slo, swept.capacity, swept.raw)
            except TrialFailure as failure:
                outcome = failed_outcome(failure, self.scenario.slo)
            if outcome.status in ("failed", "interrupted"):
                # A later trial may try this configuration again.
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
            optuna.storages.fail_stale_trials(self.study)
            with self.stop.interruptible():
                time.sleep(0.2)

    # -- recording
    def _outcome_from(self, stored: StoredMeasurement) -> Outcome:
        if stored.status == "infeasible":
            failure = TrialFailure(stored.message or "infeasible")
            failure.infeasible = True
            failure.failure_class = stored.failure_class or "infeasible"
            return failed_outcome(failure, self.scenario.slo)
        return outcome_of(stored.load_points, self.scenario.slo, stored.max_requests_in_flight)

    def _finish(self, trial: Trial, config: EngineConfig, key: str, outcome: Outcome,
                started, reused_from: int | None = None) -> float:
        self._record(trial, config, key, outcome, started, reused_from)
        for name, value in outcome.constraints.items():
            trial.set_constraint(name, value)
        if outcome.status in ("failed", "interrupted"):
            raise outcome.failure  # Optuna marks the trial FAIL (caught) and the search goes on
        return outcome.objective

    def _record(self, trial: Trial, config: EngineConfig, key: str, outcome: Outcome, started,
                reused_from: int | None = None) -> None:
        f = outcome.failure
        status = "reused" if reused_from is not None else outcome.status
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
        trial.set_user_attr("status", status)
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


def trial_counts(measurements: Sequence[StoredMeasurement]) -> dict[str, int]:
    """How many measurements ended in each status."""
    out: dict[str, int] = {}
    for m in measurements:
        out[m.status] = out.get(m.status, 0) + 1
    return out


__all__ = [
    "FITS", "Outcome", "StopRequest", "Storage", "Sweep", "TrialReport", "Tuner",
    "bisect_ladder", "measure_ladder", "open_storage",
    "operating_point", "static_check", "trial_counts", "versions",
]
