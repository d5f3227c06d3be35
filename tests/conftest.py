import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from autotune.scenario import Scenario

TESTS = Path(__file__).resolve().parent
#: A small search space for the shared-study tests (real workers, real databases): few configs,
#: so that reuse, claims and slots all get exercised in a handful of trials.
SMALL_SPACE = """tp: [1, 2, 4, 8]
pp: [1, 2]
max_batch_size: [64, 256]
max_num_tokens: [4096, 8192]
kv_fraction: [0.9]
chunked_prefill: [true, false]
concurrency: [1, 16, max]
"""
#: The PostgreSQL server the shared-study tests use (.ci/run starts it).
PG_ADMIN = os.environ.get("AUTOTUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


#: The real engine's tests are the suite's long pole (minutes of vLLM servers, one unit on one
#: worker): collected first, so that pytest-xdist hands them out first while the workers
#: share everything else (``--no-loadscope-reorder`` keeps this order; xdist would otherwise
#: send the scopes with the most tests first and leave the engine's for the end).
LONG_POLE = ("test_vllm_engine.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_POLE)  # stable: the rest keep order


@pytest.fixture
def scenario_70b() -> Scenario:
    """Llama-3.1-70B in BF16 on 8xH100: needs at least two GPUs for its weights."""
    return Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=8, precision="bf16",
                          isl=1024, osl=128, slo=None)


@contextmanager
def fresh_postgres_database(prefix: str = "autotune"):
    """A new database on the real PostgreSQL server (its URL), dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} (.ci/run starts it): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url():
    """A fresh database on the real PostgreSQL server, dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url


def autotune_cmd(*args) -> list[str]:
    """argv that runs the installed CLI in a subprocess (the same interpreter as the tests)."""
    return [sys.executable, "-m", "autotune.cli", *map(str, args)]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(autotune_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env))
