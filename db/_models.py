"""autotune's own tables, beside Optuna's in the same database.

Every table carries the ``autotune_`` prefix and there are no foreign keys into Optuna's tables
(Optuna owns and migrates those); a measurement names its Optuna trial by study name and trial
number. Bump ``SCHEMA_VERSION`` when a table changes.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the schema itself (``schema_version``)."""

    __tablename__ = "autotune_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class StudyRow(Base):
    """The scenario a study tunes for; every worker joining it must bring the same one."""

    __tablename__ = "autotune_studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    scenario: Mapped[dict] = mapped_column(JSON)
    space: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    versions: Mapped[dict] = mapped_column(JSON, default=dict)


class MeasurementRow(Base):
    """One trial's result: its config, how it ended and (through load points) its load curve.

    ``status``: an ``autotune.measurement.Status`` value: ``ok`` (measured), ``reused`` (the
    result of an earlier identical measurement, ``reused_from``), ``infeasible`` (the runner says
    it cannot run: out of memory, invalid layout), ``predicted`` (the model says the
    weights cannot fit: not run), ``failed`` (the run broke: crash, timeout, bad report),
    ``interrupted`` or ``lost`` (its worker died).
    """

    __tablename__ = "autotune_measurements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    runner: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(64), index=True)  # dedup key (settings+config+workload)
    config: Mapped[dict] = mapped_column(JSON)
    workload: Mapped[dict] = mapped_column(JSON)
    runner_settings: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    failure_class: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    feasible: Mapped[bool] = mapped_column(Boolean, default=False)
    objective: Mapped[float | None] = mapped_column(Float)  # output tok/s per GPU at the point
    operating_concurrency: Mapped[int | None] = mapped_column(Integer)
    max_requests_in_flight: Mapped[int | None] = mapped_column(Integer)
    reused_from: Mapped[int | None] = mapped_column(Integer)
    raw: Mapped[dict] = mapped_column(JSON, default=dict)
    versions: Mapped[dict] = mapped_column(JSON, default=dict)
    host: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    load_points: Mapped[list[LoadPointRow]] = relationship(
        back_populates="measurement", cascade="all, delete-orphan",
        order_by="LoadPointRow.position")


class LoadPointRow(Base):
    """Metrics at one offered load of one measurement (throughputs tok/s, latencies ms)."""

    __tablename__ = "autotune_load_points"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    measurement_id: Mapped[int] = mapped_column(ForeignKey("autotune_measurements.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    concurrency: Mapped[int] = mapped_column(Integer)
    num_requests: Mapped[int] = mapped_column(Integer)
    request_throughput: Mapped[float] = mapped_column(Float)
    output_throughput: Mapped[float] = mapped_column(Float)
    output_throughput_per_gpu: Mapped[float] = mapped_column(Float)
    output_throughput_per_user: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[dict] = mapped_column(JSON)
    measurement: Mapped[MeasurementRow] = relationship(back_populates="load_points")


class EngineCacheRow(Base):
    """A built engine any worker may reuse, keyed by a hash of the settings that change it."""

    __tablename__ = "autotune_engine_cache"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    runner: Mapped[str] = mapped_column(String(64))
    info: Mapped[dict] = mapped_column(JSON)  # path, engine settings, host, build time
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SlotRow(Base):
    """One of a study's ``--trials`` places. A worker claims a slot before it asks Optuna for a
    trial, so however many workers share the study it never runs more than its total.

    Life: claimed (``trial_id`` None) → bound to an Optuna trial → ``done``; or ``released``
    (the trial was interrupted or its worker died) and claimed again by another trial.
    """

    __tablename__ = "autotune_slots"
    __table_args__ = (UniqueConstraint("study_name", "slot"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    trial_id: Mapped[int | None] = mapped_column(Integer)  # Optuna's trial id (no foreign key)
    worker: Mapped[str] = mapped_column(String(256))
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done: Mapped[bool] = mapped_column(Boolean, default=False)
    released: Mapped[bool] = mapped_column(Boolean, default=False)


class KeyClaimRow(Base):
    """A configuration being (or already) measured in a study: a second worker proposing the same
    one waits for the result instead of measuring it again."""

    __tablename__ = "autotune_key_claims"
    study_name: Mapped[str] = mapped_column(String(512), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    trial_id: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProfileRow(Base):
    """A named profile: what ``probe`` measured and/or what ``calibrate`` fitted (JSON)."""

    __tablename__ = "autotune_profiles"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
