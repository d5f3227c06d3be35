"""Faults injected into a real worker, deterministically, for tests/test_faults.py.

Importing this module (the CLI does when ``--runner plugins.faults:FaultySim`` is given) installs
the faults that ``AUTOTUNE_TEST_FAULT`` names, in this process only:

``kill:POINT``
    SIGKILL this process at the ``AUTOTUNE_TEST_FAULT_AT``-th (default 2nd) time the worker
    passes POINT of a trial's life: ``after-ask`` (Optuna made the trial, no slot holds it yet),
    ``after-bind`` (the slot holds it, no heartbeat yet), ``measure`` (inside the measurement,
    after the first heartbeat), ``after-record`` (its measurement row written, the trial not yet
    told), ``after-tell`` (told, its slot not yet finished).
``db:PATTERN:KIND``
    The database fails the statements whose SQL matches the regular expression PATTERN, from the
    ``AUTOTUNE_TEST_FAULT_AT``-th match on, ``AUTOTUNE_TEST_FAULT_TIMES`` times (default 1; 0:
    every time from then on). KIND: ``locked`` (SQLite's "database is locked", as a writer that
    holds the lock past the busy timeout causes), ``drop`` (PostgreSQL: the server terminates the
    connection, ``pg_terminate_backend``, right before the statement runs), ``full`` (SQLite: the
    database cannot grow, ``PRAGMA max_page_count``, so the statement fails as on a full disk).

Each fault that fires appends a line to ``AUTOTUNE_TEST_FAULT_LOG`` so a test can tell it fired.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading

import optuna
from sqlalchemy import Engine, event

from autotune import study
from autotune.db import Store

from plugins.slow_sim import SlowSim

SPEC = os.environ.get("AUTOTUNE_TEST_FAULT", "")
AT = int(os.environ.get("AUTOTUNE_TEST_FAULT_AT", "2"))
TIMES = int(os.environ.get("AUTOTUNE_TEST_FAULT_TIMES", "1"))
LOG = os.environ.get("AUTOTUNE_TEST_FAULT_LOG")
_lock = threading.Lock()
_seen = {"n": 0, "fired": 0}


def _log(what: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\n")


def _kill(point: str) -> None:
    _log(f"kill {point}")
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after(owner, name: str, point: str) -> None:
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        count["n"] += 1
        if count["n"] == AT:
            _kill(point)
        return result

    setattr(owner, name, wrapper)


def _install_kill(point: str) -> None:
    if point == "after-ask":
        _kill_after(optuna.Study, "ask", point)
    elif point == "after-bind":
        _kill_after(Store, "bind_slot", point)
    elif point == "after-record":
        _kill_after(Store, "add_measurement", point)
    elif point == "after-tell":
        _kill_after(optuna.Study, "tell", point)
    elif point != "measure":  # measure: FaultySim.measure below
        raise ValueError(f"unknown kill point {point!r}")


def _should_fire(statement: str, pattern: re.Pattern) -> bool:
    if not pattern.search(statement):
        return False
    with _lock:
        _seen["n"] += 1
        if _seen["n"] < AT or (TIMES and _seen["fired"] >= TIMES):
            return False
        _seen["fired"] += 1
        return True


def _install_db(pattern: str, kind: str) -> None:
    regex = re.compile(pattern, re.IGNORECASE)

    @event.listens_for(Engine, "before_cursor_execute")
    def fail(conn, cursor, statement, parameters, context, executemany):
        if not _should_fire(statement, regex):
            if kind == "full":  # space freed again once the fault is over
                cursor.execute("PRAGMA max_page_count = 1073741823")
            return
        _log(f"db {kind} {statement.split()[0]} {pattern}")
        if kind == "locked":
            raise sqlite3.OperationalError("database is locked")
        if kind == "drop":
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        elif kind == "full":
            cursor.execute("PRAGMA page_count")
            (pages,) = cursor.fetchone()
            cursor.execute(f"PRAGMA max_page_count = {pages}")
        else:
            raise ValueError(f"unknown database fault {kind!r}")


for _spec in filter(None, SPEC.split(",")):
    _what, _, _rest = _spec.partition(":")
    if _what == "kill":
        _install_kill(_rest)
    elif _what == "db":
        _install_db(*_rest.rsplit(":", 1))
    else:
        raise ValueError(f"unknown fault {_spec!r}")

_measures = {"n": 0}


class FaultySim(SlowSim):
    """The sim runner, slowed by ``AUTOTUNE_TEST_RUN_S`` per run, with ``kill:measure``."""

    name = "faultysim"

    def measure(self, config, workload, loads):
        _measures["n"] += 1
        if SPEC == "kill:measure" and _measures["n"] == AT:
            _kill("measure")
        return super().measure(config, workload, loads)


__all__ = ["FaultySim", "study"]
