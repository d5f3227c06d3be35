"""Faults a shared study must survive, injected deterministically into real workers on real
databases (tests/plugins/faults.py): a kill -9 at each step of a trial's life, database errors
in the statements behind each store and Optuna call, connections the PostgreSQL server drops, a
disk that fills up. After each one the study finishes with every trial counted once, no
configuration measured twice, nothing RUNNING and no key claimed by a dead trial."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from sqlalchemy import create_engine, text

from conftest import SMALL_SPACE, autotune_cmd, run_cli, subprocess_env

SPACE = SMALL_SPACE
TOTAL = 5
REAPED = "autotune:reaped"


@pytest.fixture
def args(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)

    def make(url: str) -> list:
        return ["search", "--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8",
                "--isl", "512", "--osl", "64", "--slo", "tpot:p99<=20ms", "--space", space,
                "--storage", url, "--study", "f", "--trials", TOTAL,
                "--runner", "plugins.faults:FaultySim", "--heartbeat", 1, "--grace", 3,
                "--seed", 0, "--json"]

    return make


def _url(backend, tmp_path, request):
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'f.db'}"
    return request.getfixturevalue("postgres_url")


def _fault(tmp_path, spec: str, **extra) -> dict:
    return {"AUTOTUNE_TEST_FAULT": spec, "AUTOTUNE_TEST_FAULT_LOG": tmp_path / "fired",
            "AUTOTUNE_TEST_RUN_S": 0.05, **extra}


def _fired(tmp_path) -> list[str]:
    log = tmp_path / "fired"
    return log.read_text().splitlines() if log.exists() else []


def assert_whole(url: str, name: str = "f", total: int = TOTAL) -> None:
    """The study's invariants once its searches have finished."""
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    engine = create_engine(url)
    with engine.connect() as c:
        rows = c.execute(text("select trial_number, status, key from autotune_measurements "
                              "where study_name = :n"), {"n": name}).all()
        slots = c.execute(text("select done, released from autotune_slots "
                               "where study_name = :n"), {"n": name}).all()
        claims = c.execute(text("select key, trial_id from autotune_key_claims "
                                "where study_name = :n"), {"n": name}).all()
    engine.dispose()
    states = {t.state for t in trials}
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING not in states
    # Counted once: the trials told by their own worker with a result or a recorded failure.
    counted = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE or (
        t.system_attrs.get(REAPED) != t.number
        and t.user_attrs.get("failure_class") not in (None, "interrupted"))]
    assert len(counted) == total
    assert sum(1 for done, _ in slots if done) == total
    assert not [s for s in slots if not s.done and not s.released], "a slot is still held"
    # At most one row per trial (a trial killed after recording its row gets no "lost" one).
    numbers = [r.trial_number for r in rows]
    assert len(numbers) == len(set(numbers))
    # No configuration measured twice: later proposals of it were reused.
    measured = [r.key for r in rows if r.status in ("ok", "infeasible")]
    assert len(measured) == len(set(measured))
    # Every claim left is held by a trial whose result stands for its configuration.
    standing = {r.key for r in rows if r.status in ("ok", "infeasible")}
    by_id = {t._trial_id: t for t in trials}
    for key, trial_id in claims:
        assert key in standing and by_id[trial_id].state.is_finished(), (key, trial_id)


# ---- kill -9 at each step of a trial's life ---------------------------------------------------
KILL_POINTS = ["after-ask", "after-bind", "measure", "after-record", "after-tell"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_worker_killed_at_each_step_of_a_trial_leaves_a_study_that_finishes(
        point, tmp_path, args):
    url = _url("sqlite", tmp_path, None)
    victim = run_cli(*args(url), **_fault(tmp_path, f"kill:{point}"))
    assert victim.returncode in (-signal.SIGKILL, 137), victim.stderr
    assert _fired(tmp_path) and f"kill {point}" in _fired(tmp_path)[0]
    r = run_cli(*args(url), AUTOTUNE_TEST_RUN_S=0.05, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["trials"] == TOTAL
    assert_whole(url)


@pytest.mark.parametrize("point", ["after-ask", "after-tell"])
def test_killed_workers_on_postgresql_leave_a_study_that_finishes(point, tmp_path, args,
                                                                   postgres_url):
    victim = run_cli(*args(postgres_url), **_fault(tmp_path, f"kill:{point}"))
    assert victim.returncode in (-signal.SIGKILL, 137), victim.stderr
    r = run_cli(*args(postgres_url), AUTOTUNE_TEST_RUN_S=0.05, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_whole(postgres_url)


# ---- transient database errors, retried ---------------------------------------------------------
#: A statement behind each call a trial makes: autotune's store, then Optuna's storage.
STATEMENTS = {
    "claim-slot": r"^insert into autotune_slots",
    "bind-slot": r"^update autotune_slots set trial_id",
    "claim-key": r"^insert into autotune_key_claims",
    "record": r"^insert into autotune_measurements",
    "finish-slot": r"^update autotune_slots set done",
    "ask": r"^insert into trials ",
    "suggest": r"^insert into trial_params",
    "user-attr": r"^insert into trial_user_attributes",
    "tell": r"^update trials set state",
    "heartbeat": r"trial_heartbeats",
    "touch-slot": r"^update autotune_slots set claimed_at",
    "find-reusable": r"^select [\s\S]*\sfrom autotune_measurements",
}


@pytest.mark.parametrize("call", list(STATEMENTS))
def test_a_locked_database_under_each_call_is_retried_and_the_search_goes_on(
        call, tmp_path, args):
    url = _url("sqlite", tmp_path, None)
    r = run_cli(*args(url), **_fault(tmp_path, f"db:{STATEMENTS[call]}:locked",
                                     AUTOTUNE_TEST_FAULT_TIMES=2))
    assert r.returncode == 0, r.stderr
    assert len(_fired(tmp_path)) == 2, "the fault did not fire"
    assert "Traceback" not in r.stderr
    assert json.loads(r.stdout)["trials"] == TOTAL
    assert_whole(url)


@pytest.mark.parametrize("call", ["claim-slot", "claim-key", "record", "tell", "heartbeat"])
def test_connections_the_postgresql_server_drops_are_retried(call, tmp_path, args, postgres_url):
    """``pg_terminate_backend`` of the worker's own connection, right before the statement."""
    r = run_cli(*args(postgres_url), **_fault(tmp_path, f"db:{STATEMENTS[call]}:drop"))
    assert r.returncode == 0, r.stderr
    assert _fired(tmp_path), "the fault did not fire"
    assert "Traceback" not in r.stderr
    assert_whole(postgres_url)


def test_a_disk_that_fills_up_and_is_freed_is_ridden_out(tmp_path, args):
    url = _url("sqlite", tmp_path, None)
    # Full for the next eight writes of measurements' rows and their load points.
    r = run_cli(*args(url), **_fault(tmp_path, r"db:^insert into autotune_(measurements|load):full",
                                     AUTOTUNE_TEST_FAULT_TIMES=8))
    assert r.returncode == 0, r.stderr
    assert _fired(tmp_path)
    assert_whole(url)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_that_keeps_failing_stops_the_worker_with_one_line_and_resume_finishes(
        backend, tmp_path, args, request):
    url = _url(backend, tmp_path, request)
    kind = "locked" if backend == "sqlite" else "drop"
    r = run_cli(*args(url), "--db-retry", 2,
                **_fault(tmp_path, f"db:{STATEMENTS['record']}:{kind}",
                         AUTOTUNE_TEST_FAULT_TIMES=0))
    assert r.returncode == 3, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "database kept failing for 2 s" in lines[0], r.stderr
    assert "resume" in lines[0]
    # Its trial and claims are reaped after the grace period; the resume finishes the study.
    r = run_cli(*args(url), AUTOTUNE_TEST_RUN_S=0.05, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_whole(url)


# ---- a PostgreSQL server stopped and started again ---------------------------------------------
def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: the PostgreSQL server binaries are needed "
                    "(apt-get install postgresql)")
    return path


@contextmanager
def private_postgres(folder: Path, port: int = 54329):
    """A PostgreSQL server of this test's own (initdb in ``folder``), which the test may stop
    and start; yields (url, stop, start). As root, the server runs as the postgres user."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = folder / "pgdata"
    data.mkdir()
    if as_user:
        shutil.chown(folder, "postgres")
        shutil.chown(data, "postgres")
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    ctl = [*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "pg.log"),
           "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"]

    def start():
        subprocess.run([*ctl, "start"], check=True, capture_output=True)

    def stop():
        subprocess.run([*ctl, "-m", "fast", "stop"], check=True, capture_output=True)

    start()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", stop, start
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], capture_output=True)


def _wait_for_trials(url: str, worker: subprocess.Popen, timeout: float = 120) -> None:
    """Until the worker has opened the study and finished a trial (a slot is done)."""
    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert worker.poll() is None, worker.communicate()
            try:
                with engine.connect() as c:
                    if c.execute(text("select count(*) from autotune_slots where done")).scalar():
                        return
            except Exception:  # the tables are not there yet
                pass
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise AssertionError("no trial finished")


def test_a_postgresql_server_stopped_for_seconds_and_restarted_is_ridden_out(tmp_path, args):
    folder = Path(tempfile.mkdtemp(prefix="autotune-pg-"))  # short: the socket path has a limit
    try:
        with private_postgres(folder) as (url, stop, start):
            argv = autotune_cmd(*args(url))
            worker = subprocess.Popen(argv, env=subprocess_env(AUTOTUNE_TEST_RUN_S=0.5),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _wait_for_trials(url, worker)
            assert worker.poll() is None, worker.communicate()
            stop()
            time.sleep(6)  # longer than the grace period: nobody else is there to reap
            assert worker.poll() is None, "the worker gave up while the server was down"
            start()
            out, err = worker.communicate(timeout=120)
            assert worker.returncode == 0, err
            assert "Traceback" not in err
            assert json.loads(out)["trials"] == TOTAL
            assert_whole(url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---- engines die with their worker ---------------------------------------------------------------
_ENGINE_OWNER = """
import sys, time
from pathlib import Path
from autotune.runners._process import Job, ProcessGroups
groups = ProcessGroups()
server = groups.start(Job(("sleep", "300"), Path(sys.argv[1])))
print(server.pid, flush=True)
time.sleep(300)
"""


def test_a_worker_killed_with_sigkill_takes_its_engine_processes_with_it(tmp_path):
    """An engine server outliving a kill -9 of its worker would hold the GPUs, and every trial
    after it would run out of memory."""
    from autotune.runners._process import group_alive

    owner = subprocess.Popen([sys.executable, "-c", _ENGINE_OWNER, str(tmp_path / "log")],
                             env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    server = int(owner.stdout.readline())
    assert group_alive(server)
    owner.kill()  # no clean-up runs
    owner.wait()
    deadline = time.monotonic() + 10
    while group_alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(server), "the engine outlived its worker"
