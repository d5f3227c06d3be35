"""The Store's conformance suite (autotune.db.testing) on each supported database."""

import pytest

from autotune.db.testing import StoreContract


class TestSQLite(StoreContract):
    @pytest.fixture
    def url(self, tmp_path) -> str:
        return f"sqlite:///{tmp_path / 'store.db'}"


class TestPostgreSQL(StoreContract):
    @pytest.fixture
    def url(self, postgres_url) -> str:
        return postgres_url
