"""The Store: reads and writes autotune's tables through one SQLAlchemy engine."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from autotune.config import EngineConfig
from autotune.db._models import (
    SCHEMA_VERSION,
    Base,
    EngineCacheRow,
    KeyClaimRow,
    LoadPointRow,
    MeasurementRow,
    Meta,
    ProfileRow,
    SlotRow,
    StudyRow,
    utcnow,
)
from autotune.db._retry import Retry
from autotune.errors import ScenarioMismatch, UserError
from autotune.measurement import REUSABLE, LoadPoint, Status
from autotune.scenario import identity_differences
from autotune.specs import Workload


def _retried(method):
    """``method`` called through the store's retry policy."""
    @functools.wraps(method)
    def call(self: Store, *args, **kwargs):
        return self.retry(method, self, *args, **kwargs)

    return call


@dataclass(frozen=True)
class StoredMeasurement:
    """One row of ``autotune_measurements`` with its load points, as plain values."""

    study_name: str
    trial_number: int
    runner: str
    key: str
    config: EngineConfig
    workload: Workload
    status: Status
    load_points: tuple[LoadPoint, ...] = ()
    feasible: bool = False
    objective: float | None = None
    operating_concurrency: int | None = None
    max_requests_in_flight: int | None = None
    failure_class: str | None = None
    message: str | None = None
    log_tail: str | None = None
    log_path: str | None = None
    runner_settings: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    reused_from: int | None = None
    host: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    id: int | None = None

    @property
    def operating_point(self) -> LoadPoint | None:
        """The load point the trial chose (highest throughput meeting the SLO), if any."""
        for p in self.load_points:
            if p.concurrency == self.operating_concurrency:
                return p
        return None


@dataclass(frozen=True)
class StudySummary:
    name: str
    scenario: dict
    created_at: datetime
    trials: int  # measurements recorded (any status)
    feasible: int
    failed: int
    best_objective: float | None  # output tok/s per GPU of the best feasible trial


class Store:
    """autotune's tables in the database behind ``engine`` (shared with Optuna's).

    Concurrency contract
    --------------------
    Any number of workers (threads or processes, on any machines) may share one Store's
    database; every method is one transaction and safe to call from all of them at once.

    - **Slots** (a study's ``--trials`` places). ``claim_slot`` hands each slot to one worker at
      a time: claims are serialised per study (the study row is locked), so ``total`` is never
      exceeded. Only the worker holding a slot binds it (``bind_slot``), shows it alive
      (``touch_slot``) and finishes it (``finish_slot``: done, or released for another trial).
    - **Dead workers.** A worker that dies leaves its slot neither done nor released. Any worker
      may release it once it has shown no sign of life (claim, bind or touch) for the grace
      period (``reap_slots``), or once Optuna has failed its trial for a stale heartbeat
      (``release_trial``); the slot's key claims go with it and the slot is claimed again.
      Exactly one caller reaps each slot.
    - **Key claims** (one measurement per configuration). ``claim_key`` succeeds for exactly
      one trial per key; only the holder releases it (``release_key``) when its result does
      not stand for the configuration, and a reaped trial's claims are released with its slot.
    - **Measurements** are append-only; ``find_reusable`` returns the first reusable one.
    """

    def __init__(self, engine: Engine, retry: Retry | None = None):
        self.engine = engine
        #: Every method is one or more whole transactions, so a transient failure (a dropped
        #: connection, a lock held too long) is met by calling it again (see ``_retry.py``).
        self.retry = retry or Retry()
        self._session = sessionmaker(engine, expire_on_commit=False)

    def with_retry(self, retry: Retry) -> Store:
        """The same database under another retry policy (the heartbeat thread has its own)."""
        return Store(self.engine, retry)

    # ---- schema ---------------------------------------------------------------------------
    @_retried
    def ensure_schema(self) -> None:
        """Create missing tables; refuse a database written by a newer schema or read-only."""
        Base.metadata.create_all(self.engine, checkfirst=True)
        try:
            with self._session.begin() as s:
                row = s.get(Meta, "schema_version")
                if row is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(row.value) > SCHEMA_VERSION:
                    raise UserError(f"the database was written by a newer autotune (schema "
                                    f"{row.value} > {SCHEMA_VERSION}); upgrade autotune")
                else:
                    # A write that changes nothing: a read-only database fails here, before
                    # any work is done, rather than after the first trial.
                    s.execute(update(Meta).where(Meta.key == "schema_version")
                              .values(value=Meta.value))
        except IntegrityError:
            pass  # another worker inserted the version row first: same schema, nothing to do

    @_retried
    def has_schema(self) -> bool:
        from sqlalchemy import inspect
        return inspect(self.engine).has_table(StudyRow.__tablename__)

    # ---- studies --------------------------------------------------------------------------
    @_retried
    def register_study(self, name: str, scenario: dict, space: dict, versions: dict) -> bool:
        """Record a new study's scenario (True), or check that an existing one has the same
        (False)."""
        for _ in range(2):  # a concurrent worker may insert it between our read and write
            with self._session() as s:
                row = s.scalar(select(StudyRow).where(StudyRow.name == name))
                if row is not None:
                    diffs = identity_differences(row.scenario, scenario)
                    if diffs:
                        raise ScenarioMismatch(
                            f"study {name!r} exists with another scenario ({'; '.join(diffs)}); "
                            "pick another --study name")
                    return False
                s.add(StudyRow(name=name, scenario=scenario, space=space, versions=versions))
                try:
                    s.commit()
                    return True
                except IntegrityError:
                    s.rollback()
        return False

    @_retried
    def study(self, name: str) -> StudyRow | None:
        with self._session() as s:
            return s.scalar(select(StudyRow).where(StudyRow.name == name))

    @_retried
    def last_used_study(self) -> str | None:
        """The study whose latest measurement is the most recent (the one searched last); None
        when no study has a measurement (an empty study is never the default)."""
        with self._session() as s:
            row = s.execute(select(MeasurementRow.study_name)
                            .order_by(MeasurementRow.finished_at.desc(),
                                      MeasurementRow.id.desc()).limit(1)).first()
            return row[0] if row else None

    @_retried
    def study_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(StudyRow.name).order_by(StudyRow.created_at)))

    @_retried
    def studies(self) -> list[StudySummary]:
        with self._session() as s:
            m = MeasurementRow
            stats = {
                r.study_name: r for r in s.execute(
                    select(m.study_name, func.count(m.id).label("trials"),
                           func.sum(m.feasible.cast(int_type())).label("feasible"),
                           func.sum((m.status == Status.FAILED.value).cast(int_type()))
                           .label("failed"),
                           func.max(func.nullif(m.objective * m.feasible.cast(int_type()), 0))
                           .label("best"))
                    .group_by(m.study_name))
            }
            out = []
            for row in s.scalars(select(StudyRow).order_by(StudyRow.created_at)):
                st = stats.get(row.name)
                out.append(StudySummary(
                    name=row.name, scenario=row.scenario, created_at=row.created_at,
                    trials=st.trials if st else 0, feasible=int(st.feasible or 0) if st else 0,
                    failed=int(st.failed or 0) if st else 0,
                    best_objective=float(st.best) if st and st.best is not None else None))
            return out

    # ---- measurements ---------------------------------------------------------------------
    @_retried
    def add_measurement(self, rec: StoredMeasurement) -> int:
        """Write one measurement and all its load points in one transaction; its id."""
        row = MeasurementRow(
            study_name=rec.study_name, trial_number=rec.trial_number, runner=rec.runner,
            key=rec.key, config=rec.config.to_dict(), workload=rec.workload.to_dict(),
            runner_settings=rec.runner_settings, status=Status(rec.status).value,
            failure_class=rec.failure_class, message=rec.message, log_tail=rec.log_tail,
            log_path=rec.log_path, feasible=rec.feasible, objective=rec.objective,
            operating_concurrency=rec.operating_concurrency,
            max_requests_in_flight=rec.max_requests_in_flight, reused_from=rec.reused_from,
            raw=rec.raw, versions=rec.versions, host=rec.host or socket.gethostname(),
            started_at=rec.started_at or utcnow(), finished_at=rec.finished_at or utcnow(),
        )
        row.load_points = [
            LoadPointRow(position=i, **{k: v for k, v in p.to_dict().items()})
            for i, p in enumerate(rec.load_points)
        ]
        with self._session.begin() as s:
            s.add(row)
            s.flush()
            return row.id

    @_retried
    def has_measurement(self, study_name: str, trial_number: int) -> bool:
        """Whether a row records trial ``trial_number`` of the study."""
        with self._session() as s:
            return s.scalar(select(func.count()).select_from(MeasurementRow).where(
                MeasurementRow.study_name == study_name,
                MeasurementRow.trial_number == trial_number)) > 0

    @_retried
    def find_reusable(self, study_name: str, key: str) -> StoredMeasurement | None:
        """The first measured (not reused, not failed) result with this key in the study."""
        with self._session() as s:
            row = s.scalar(
                select(MeasurementRow)
                .where(MeasurementRow.study_name == study_name, MeasurementRow.key == key,
                       MeasurementRow.status.in_([s.value for s in REUSABLE]))
                .order_by(MeasurementRow.id).limit(1))
            return _to_value(row) if row is not None else None

    @_retried
    def measurements(self, study_name: str, statuses: tuple[str, ...] | None = None
                     ) -> list[StoredMeasurement]:
        """The study's measurements in the order they were recorded."""
        with self._session() as s:
            q = select(MeasurementRow).where(MeasurementRow.study_name == study_name)
            if statuses:
                q = q.where(MeasurementRow.status.in_([str(st) for st in statuses]))
            rows = s.scalars(q.order_by(MeasurementRow.id)).all()
            return [_to_value(r) for r in rows]

    # ---- slots: the study's total number of trials, shared by all workers ------------------
    def _now(self, s) -> datetime:
        """The time by the database server's clock: a slot's signs of life are stamped and
        judged by one clock, however far the workers' machines drift apart. (A SQLite file is
        on one machine: its clock is the server's.)"""
        if self.engine.dialect.name == "sqlite":
            return utcnow()
        return s.scalar(select(func.now()))

    def _stamp(self):
        """The value that stamps a sign of life: the server's ``now()`` inside the statement
        itself (no extra round trip on the heartbeat's path), or the time here for SQLite."""
        return utcnow() if self.engine.dialect.name == "sqlite" else func.now()

    @_retried
    def claim_slot(self, study_name: str, total: int, worker: str) -> int | None:
        """Claim a place for one more trial (its slot id), or None when all ``total`` are taken:
        a new slot while fewer than ``total`` exist, else a released one."""
        for _ in range(5):  # PostgreSQL: a concurrent claim of the same slot number → retry
            try:
                with self._session.begin() as s:
                    # Serialise claims per study: PostgreSQL locks the study row; SQLite's
                    # BEGIN IMMEDIATE already holds the database's write lock.
                    s.execute(select(StudyRow.id).where(StudyRow.name == study_name)
                              .with_for_update())
                    slots = s.scalars(select(SlotRow).where(SlotRow.study_name == study_name)
                                      .order_by(SlotRow.slot)).all()
                    if len(slots) < total:
                        row = SlotRow(study_name=study_name, slot=len(slots), worker=worker,
                                      claimed_at=self._stamp())
                        s.add(row)
                        s.flush()
                        return row.id
                    for row in slots:
                        if row.slot < total and row.released and not row.done:
                            row.released, row.trial_id = False, None
                            row.worker, row.claimed_at = worker, self._stamp()
                            return row.id
                    return None
            except IntegrityError:
                continue
        return None

    @_retried
    def bind_slot(self, slot_id: int, trial_id: int) -> None:
        """Record the Optuna trial that holds the slot (and a sign of life)."""
        with self._session.begin() as s:
            s.execute(update(SlotRow).where(SlotRow.id == slot_id)
                      .values(trial_id=trial_id, claimed_at=self._stamp()))

    @_retried
    def touch_slot(self, slot_id: int, trial_id: int | None = None) -> None:
        """A sign of life of the slot's worker (its trial's heartbeat). With ``trial_id``, only
        while the slot still holds that trial: a worker whose slot was reaped and handed on
        must not keep the next holder's slot looking alive."""
        with self._session.begin() as s:
            q = update(SlotRow).where(SlotRow.id == slot_id, SlotRow.done.is_(False),
                                      SlotRow.released.is_(False))
            if trial_id is not None:
                q = q.where(SlotRow.trial_id == trial_id)
            s.execute(q.values(claimed_at=self._stamp()))

    @_retried
    def reap_slots(self, study_name: str, stale_after_s: float,
                   counted: Callable[[int], bool] | None = None) -> list[int]:
        """Release the slots whose worker showed no sign of life for ``stale_after_s`` (claimed,
        bound or touched longer ago), with their trials' key claims; the Optuna trial ids that
        were bound to them (the caller fails those trials).

        A stale slot whose trial ``counted`` says counts (its worker died after recording the
        trial's end, before finishing the slot) is finished as done instead, and not returned.

        Each orphan is released by exactly one caller, however many reap at once: the release
        is a conditional update, and only the caller whose update took it gets its trial id.
        """
        with self._session() as s:
            cutoff = self._now(s).timestamp() - stale_after_s
            live = s.execute(select(SlotRow.id, SlotRow.claimed_at, SlotRow.trial_id)
                             .where(SlotRow.study_name == study_name, SlotRow.done.is_(False),
                                    SlotRow.released.is_(False))).all()
        stale = [(slot_id, trial_id) for slot_id, at, trial_id in live if _ts(at) < cutoff]
        reaped: list[int] = []
        for slot_id, bound in stale:
            done = bound is not None and counted is not None and counted(bound)
            with self._session.begin() as s:
                # The release is conditional on the slot still being stale: when several workers
                # reap at once, the database lets exactly one update take it.
                taken = s.execute(
                    update(SlotRow)
                    .where(SlotRow.id == slot_id, SlotRow.done.is_(False),
                           SlotRow.released.is_(False), SlotRow.claimed_at < _moment(cutoff))
                    .values(released=not done, done=done)
                    .returning(SlotRow.trial_id)).all()
                if not taken or taken[0][0] is None or done:
                    continue  # finished, reaped by another worker, alive after all, or unbound
                trial_id = taken[0][0]
                s.execute(delete(KeyClaimRow).where(KeyClaimRow.study_name == study_name,
                                                    KeyClaimRow.trial_id == trial_id))
                reaped.append(trial_id)
        return reaped

    @_retried
    def finish_slot(self, slot_id: int, *, counted: bool, trial_id: int | None = None) -> None:
        """The slot's trial ended: it counts (``done``) or its place is given back. With
        ``trial_id``, only while the slot still holds that trial (once reaped and claimed by
        another worker, it is that worker's)."""
        with self._session.begin() as s:
            q = update(SlotRow).where(SlotRow.id == slot_id)
            if trial_id is not None:
                q = q.where(SlotRow.trial_id == trial_id)
            s.execute(q.values(done=counted, released=not counted))

    @_retried
    def live_trial_ids(self, study_name: str) -> set[int]:
        """The Optuna trial ids bound to the study's slots that are neither done nor released."""
        with self._session() as s:
            return set(s.scalars(select(SlotRow.trial_id).where(
                SlotRow.study_name == study_name, SlotRow.done.is_(False),
                SlotRow.released.is_(False), SlotRow.trial_id.is_not(None))))

    @_retried
    def release_trial(self, study_name: str, trial_id: int) -> None:
        """Give back the slot and key claims of a trial whose worker died."""
        with self._session.begin() as s:
            s.execute(update(SlotRow).where(SlotRow.study_name == study_name,
                                            SlotRow.trial_id == trial_id, SlotRow.done.is_(False))
                      .values(released=True))
            s.execute(delete(KeyClaimRow).where(KeyClaimRow.study_name == study_name,
                                                KeyClaimRow.trial_id == trial_id))

    @_retried
    def slot_counts(self, study_name: str) -> tuple[int, int]:
        """(finished trials that count towards the total, trials still in flight)."""
        with self._session() as s:
            rows = s.execute(select(SlotRow.done, SlotRow.released)
                             .where(SlotRow.study_name == study_name)).all()
        done = sum(1 for d, _ in rows if d)
        return done, sum(1 for d, r in rows if not d and not r)

    # ---- key claims: one measurement per configuration ---------------------------------------
    @_retried
    def claim_key(self, study_name: str, key: str, trial_id: int) -> bool:
        """True when this trial may measure ``key`` (nobody has, or is doing it)."""
        try:
            with self._session.begin() as s:
                s.add(KeyClaimRow(study_name=study_name, key=key, trial_id=trial_id))
            return True
        except IntegrityError:
            return False

    @_retried
    def key_holder(self, study_name: str, key: str) -> int | None:
        """The Optuna trial id that holds the claim on ``key``, if any."""
        with self._session() as s:
            return s.scalar(select(KeyClaimRow.trial_id).where(
                KeyClaimRow.study_name == study_name, KeyClaimRow.key == key))

    @_retried
    def release_key(self, study_name: str, key: str, trial_id: int) -> None:
        """Let another trial measure ``key`` (this trial, which held it, failed or stopped)."""
        with self._session.begin() as s:
            s.execute(delete(KeyClaimRow).where(KeyClaimRow.study_name == study_name,
                                                KeyClaimRow.key == key,
                                                KeyClaimRow.trial_id == trial_id))

    # ---- profiles -------------------------------------------------------------------------
    @_retried
    def save_profile(self, name: str, data: dict) -> None:
        with self._session.begin() as s:
            s.merge(ProfileRow(name=name, data=data, created_at=utcnow()))

    @_retried
    def profile(self, name: str) -> dict | None:
        with self._session() as s:
            row = s.get(ProfileRow, name)
            return dict(row.data) if row is not None else None

    @_retried
    def profile_names(self) -> list[str]:
        with self._session() as s:
            return list(s.scalars(select(ProfileRow.name).order_by(ProfileRow.name)))

    # ---- engine cache ---------------------------------------------------------------------
    @_retried
    def engine_get(self, key: str) -> dict | None:
        with self._session() as s:
            row = s.get(EngineCacheRow, key)
            return dict(row.info) if row is not None else None

    @_retried
    def engine_put(self, key: str, runner: str, info: dict) -> None:
        with self._session.begin() as s:
            s.merge(EngineCacheRow(key=key, runner=runner, info=info))


def _moment(timestamp: float) -> datetime:
    """A UTC datetime of ``timestamp`` in the form the database compares with stored ones
    (SQLite keeps naive UTC datetimes)."""
    return datetime.fromtimestamp(timestamp, UTC)


def _ts(moment: datetime) -> float:
    """Seconds since the epoch; SQLite hands back naive datetimes that were stored as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def int_type():
    from sqlalchemy import Integer
    return Integer


def _to_value(row: MeasurementRow) -> StoredMeasurement:
    return StoredMeasurement(
        id=row.id, study_name=row.study_name, trial_number=row.trial_number, runner=row.runner,
        key=row.key, config=EngineConfig.from_dict(row.config),
        workload=Workload.from_dict(row.workload), status=Status(row.status),
        load_points=tuple(
            LoadPoint(concurrency=p.concurrency, num_requests=p.num_requests,
                      request_throughput=p.request_throughput,
                      output_throughput=p.output_throughput,
                      output_throughput_per_gpu=p.output_throughput_per_gpu,
                      output_throughput_per_user=p.output_throughput_per_user,
                      duration_s=p.duration_s, latency_ms=p.latency_ms)
            for p in row.load_points),
        feasible=row.feasible, objective=row.objective,
        operating_concurrency=row.operating_concurrency,
        max_requests_in_flight=row.max_requests_in_flight, failure_class=row.failure_class,
        message=row.message, log_tail=row.log_tail, log_path=row.log_path,
        runner_settings=row.runner_settings, raw=row.raw, versions=row.versions,
        reused_from=row.reused_from, host=row.host, started_at=row.started_at,
        finished_at=row.finished_at,
    )


__all__ = ["Store", "StoredMeasurement", "StudySummary"]
