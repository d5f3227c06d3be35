"""Opening a storage URL: checks that fail with one clear line, SQLite's write lock, redaction."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from autotune.errors import UserError

#: How long a SQLite writer waits for another worker's lock before giving up (seconds).
SQLITE_BUSY_TIMEOUT_S = 120
_SQLITE_MAGIC = b"SQLite format 3\x00"


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL (UserError when it is not one); plain postgresql means psycopg 3."""
    if "://" not in url:  # a bare file name: what the user most likely meant
        raise UserError(f"--storage {url!r} is not a database URL: for a SQLite file write "
                        f"sqlite:///{url} (or postgresql://host/db for PostgreSQL)")
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise UserError(f"--storage {redact(url)!r} is not a database URL "
                        "(e.g. sqlite:///autotune.db or postgresql+psycopg://host/db)") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def first_line(exc: BaseException) -> str:
    """The first line of a database error's message (the driver's own, when it has one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: Query parameters of a database URL that carry a secret (libpq's ``password``, ``sslpassword``,
#: a token): shown as ``***`` like the password in ``user:password@``.
_SECRET_PARAMS = ("password", "sslpassword", "passfile", "token", "secret")


def redact(url: str | URL) -> str:
    """``url`` with any password replaced by ``***`` (safe for output, logs and the database),
    whether it sits in ``user:password@`` or in the query (``?password=...``)."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable URL>"
    secret = {k: "***" for k in parsed.query if k.lower() in _SECRET_PARAMS}
    if secret:
        parsed = parsed.update_query_dict(secret)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def sqlite_path(url: URL) -> Path | None:
    """The file behind a SQLite URL (None for other databases and in-memory SQLite)."""
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    if url.query.get("uri") == "true" and url.database.startswith("file:"):
        return Path(url.database.removeprefix("file:"))  # sqlite's URI form: file:PATH?mode=ro
    return Path(url.database)


def check_sqlite_file(path: Path, *, must_exist: bool, write: bool = True) -> None:
    """UserError when the file is missing (if required), unwritable (if ``write``) or not a
    SQLite database."""
    if path.exists():
        if path.is_dir():
            raise UserError(f"database path {str(path)!r} is a directory")
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise UserError(
                f"{str(path)!r} is not a SQLite database (corrupt or another file type)")
        if write and not os.access(path, os.W_OK):
            raise UserError(f"database file {str(path)!r} is read-only")
        return
    if must_exist:
        raise UserError(f"no database at {str(path)!r} (run `autotune search` first, or pass "
                        "--storage)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot create database {str(path)!r}: "
                        f"folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot create database {str(path)!r}: "
                        f"folder {str(parent)!r} is read-only")


def writable(path: Path) -> bool:
    """Whether a SQLite database can be written here: the file, and its folder (where the
    write-ahead log and its index live)."""
    folder = path.parent if str(path.parent) else Path(".")
    return os.access(path, os.W_OK) and os.access(folder, os.W_OK)


def read_only_url(path: Path, *, archive: bool = False) -> URL:
    """A URL that opens a SQLite file read-only (``mode=ro``): how read commands open a study,
    so that they cannot change it whatever they do. An ``archive`` (a file this process may not
    write) is opened ``immutable=1``: not even the write-ahead log's index is touched, and a
    log still being written is not seen, so it is for finished studies."""
    mode = "immutable=1" if archive else "mode=ro"
    return make_url(f"sqlite:///file:{path.resolve()}?{mode}&uri=true")


def read_only(url: URL) -> bool:
    """Whether ``url`` is one of ``read_only_url``'s."""
    query = url.query
    return query.get("mode") == "ro" or query.get("immutable") == "1"


def engine_kwargs(url: URL, *, read_only: bool = False) -> dict:
    """Arguments for ``create_engine`` (and Optuna's RDBStorage) for this kind of database;
    ``read_only``: a PostgreSQL session that refuses every write (SQLite: ``read_only_url``)."""
    if url.drivername.startswith("sqlite"):
        # Autocommit at the driver level so that the ``begin`` hook below decides how each
        # transaction starts (pysqlite would otherwise defer BEGIN until the first write).
        return {"connect_args": {"isolation_level": None, "timeout": SQLITE_BUSY_TIMEOUT_S}}
    if read_only:
        return {"pool_pre_ping": True,
                "connect_args": {"options": "-c default_transaction_read_only=on"}}
    return {"pool_pre_ping": True}


def install_sqlite_write_lock(engine: Engine) -> None:
    """Take SQLite's write lock at the start of every transaction (``BEGIN IMMEDIATE``).

    Without it two workers can both read an enqueued trial as WAITING and both run it
    (shared/docs/optuna-notes.md); with it the second waits for the first to commit.
    """
    if not engine.url.drivername.startswith("sqlite") or read_only(engine.url):
        return  # a read-only connection takes no write lock (and cannot)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, record):  # pragma: no cover - exercised through every connection
        # Write-ahead log: readers (`autotune best`, progress polls) never block the workers'
        # writes, and a commit needs no fsync of the main file. synchronous=NORMAL stays safe
        # against a crashed process (only a power loss can drop the last commits), and makes
        # each of a trial's ~30 small commits cheap.
        if sqlite_path(engine.url) is not None:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(conn):  # pragma: no cover - exercised through every SQLite transaction
        conn.exec_driver_sql("BEGIN IMMEDIATE")


__all__ = ["check_sqlite_file", "engine_kwargs", "first_line", "install_sqlite_write_lock",
           "parse_url", "read_only", "read_only_url", "redact", "sqlite_path", "writable"]
