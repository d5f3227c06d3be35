"""Persistence: autotune's tables beside Optuna's in one SQLAlchemy database."""

from autotune.db._engine import (
    check_sqlite_file,
    engine_kwargs,
    first_line,
    install_sqlite_write_lock,
    parse_url,
    read_only_url,
    redact,
    sqlite_path,
    writable,
)
from autotune.db._models import SCHEMA_VERSION, utcnow
from autotune.db._retry import RETRY_S, Retry, once, transient
from autotune.db._store import Store, StoredMeasurement, StudySummary

__all__ = [
    "RETRY_S", "SCHEMA_VERSION", "Retry", "Store", "StoredMeasurement", "StudySummary",
    "check_sqlite_file", "engine_kwargs", "first_line", "install_sqlite_write_lock", "parse_url",
    "once", "read_only_url", "redact", "sqlite_path", "transient", "utcnow", "writable",
]
