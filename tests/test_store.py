"""The Store's conformance suite (autotune.db.testing) on each supported database."""

import pytest
from sqlalchemy import create_engine, text

from autotune.db import Store, engine_kwargs, parse_url
from autotune.db.testing import StoreContract

from conftest import fresh_postgres_database


class TestSQLite(StoreContract):
    @pytest.fixture
    def url(self, tmp_path) -> str:
        return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture(scope="module")
def pg_database():
    """One fresh PostgreSQL database for the module (making one costs about 0.5 s)."""
    with fresh_postgres_database("autotune_store") as url:
        yield url


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
