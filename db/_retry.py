"""Transient database failures, and how a worker rides them out.

A shared study lives as long as its database answers. Some failures pass by themselves: a
PostgreSQL connection dropped (``pg_terminate_backend``, a server restarted, a network blip), a
serialisation failure or deadlock between workers, SQLite's write lock held past the busy timeout,
a disk that filled up and is freed again. Those are retried with exponential backoff; anything
else (a missing table, a read-only database, bad SQL) is raised at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from autotune.db._engine import first_line
from autotune.errors import DatabaseUnavailable

#: Seconds a worker keeps retrying a database that fails transiently before it gives up. As long
#: as the default grace period (study.GRACE_S): by the time a worker gives up, its trial already
#: looks dead to the others, who re-run it.
RETRY_S = 120.0

#: What SQLite says when the failure passes by itself (its other OperationalErrors do not: no
#: such table, attempt to write a readonly database, ...).
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy",
                     "disk is full", "disk i/o error")

T = TypeVar("T")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (Optuna raises StorageInternalError from SQLAlchemy's error)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a database failure that may pass if the same call is made again."""
    for e in _causes(exc):
        if isinstance(e, (DisconnectionError, PoolTimeout)):
            return True
        if not isinstance(e, DBAPIError):
            continue
        if e.connection_invalidated:
            return True
        if not isinstance(e, (OperationalError, InterfaceError)):
            return False
        if type(e.orig).__module__.startswith("sqlite3"):
            return any(sign in str(e.orig).lower() for sign in _SQLITE_TRANSIENT)
        # PostgreSQL (psycopg): OperationalError covers a lost or refused connection, an
        # administrator's shutdown, a full disk, serialisation failures and deadlocks.
        return True
    return False


class Retry:
    """Calls a database function again while it fails transiently, for up to ``budget_s``
    seconds, pausing ``first_pause_s`` and doubling up to ``max_pause_s`` (with jitter, so that
    workers that lost the same server do not all come back at the same instant).

    Out of budget it raises DatabaseUnavailable, and from then on every call gets one try: a
    worker on its way out releases what it can without waiting a second budget per call.
    """

    def __init__(self, budget_s: float = RETRY_S, *, first_pause_s: float = 0.2,
                 max_pause_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.budget_s, self.first_pause_s, self.max_pause_s = budget_s, first_pause_s, max_pause_s
        self.sleep, self.clock = sleep, clock
        self.gave_up = False
        self.retries = 0  # calls made again so far (for tests and diagnostics)

    def __call__(self, fn: Callable[..., T], *args, **kwargs) -> T:
        start, pause = self.clock(), self.first_pause_s
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not transient(exc):
                    raise
                if self.gave_up or self.clock() - start + pause > self.budget_s:
                    self.gave_up = True
                    raise DatabaseUnavailable(
                        f"the database kept failing for {self.budget_s:g} s: {first_line(exc)}"
                    ) from exc
                self.sleep(pause * random.uniform(0.5, 1.0))
                self.retries += 1
                pause = min(2 * pause, self.max_pause_s)


#: One try, no retries: for callers with their own policy (the heartbeat thread).
def once() -> Retry:
    return Retry(0.0)


__all__ = ["RETRY_S", "Retry", "once", "transient"]
