"""The Store's conformance suite (autotune.db.testing) on each supported database."""

import pytest
from sqlalchemy import create_engine, text

from autotune.db import Store, engine_kwargs, parse_url
from autotune.db.testing import StoreContract


class TestSQLite(StoreContract):
    @pytest.fixture
    def url(self, tmp_path) -> str:
        return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(scope="module")
def pg_database():
    """One fresh PostgreSQL database for the module (making one costs about 0.5 s)."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    from conftest import PG_ADMIN

    name = f"autotune_store_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} (.ci/run starts it): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TestPostgreSQL(StoreContract):
    @pytest.fixture
    def url(self, pg_database) -> str:
        """The module's database, emptied: every test starts from no rows."""
        parsed = parse_url(pg_database)
        engine = create_engine(parsed, **engine_kwargs(parsed))
        Store(engine).ensure_schema()
        with engine.begin() as conn:
            tables = [r[0] for r in conn.execute(text(
                "select tablename from pg_tables where tablename like 'autotune_%' "
                "and tablename <> 'autotune_meta'"))]
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        engine.dispose()
        return pg_database
