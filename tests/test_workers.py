"""Many workers on one study, with real processes and real databases (SQLite and PostgreSQL):
nothing lost, nothing run twice, nothing left RUNNING, Ctrl-C and kill -9 survived."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from sqlalchemy import create_engine, text

from conftest import SMALL_SPACE, autotune_cmd, run_cli, subprocess_env

SPACE = SMALL_SPACE
SCENARIO = ["--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "512",
            "--osl", "64", "--slo", "tpot:p99<=20ms"]


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return str(path)


def study_state(url: str, name: str):
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    engine = create_engine(url)
    with engine.connect() as c:
        rows = c.execute(text("select trial_number, status, key from autotune_measurements "
                              "where study_name = :n"), {"n": name}).all()
        slots = c.execute(text("select done, released from autotune_slots where study_name = :n"),
                          {"n": name}).all()
    engine.dispose()
    return trials, rows, slots


def assert_consistent(url, name, total):
    trials, rows, slots = study_state(url, name)
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert optuna.trial.TrialState.WAITING not in states
    counted = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
               or t.user_attrs.get("failure_class") not in (None, "interrupted")]
    assert len(counted) == total
    assert sum(1 for d, _ in slots if d) == total
    # One measurement row per Optuna trial that proposed a config, each trial number once (a
    # worker killed before its trial proposed anything leaves nothing to record).
    assert sorted(r.trial_number for r in rows) == sorted(
        t.number for t in trials if "config" in t.user_attrs)
    # No configuration was measured twice (later proposals of it were reused).
    measured = [r.key for r in rows if r.status in ("ok", "infeasible")]
    assert len(measured) == len(set(measured))
    return trials, rows


#: Trials of the worker-path smoke test. The races on slots and key claims are tested with
#: threads by the StoreContract suite (tests/test_store.py); this is the real-process path.
TOTAL = 32


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_four_workers_run_exactly_the_total(backend, tmp_path, space, request):
    url = (f"sqlite:///{tmp_path / 'w.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    r = run_cli("search", *SCENARIO, "--space", space, "--storage", url, "--study", "w",
                "--trials", TOTAL, "--workers", 4, "--seed", 1, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["trials"] == TOTAL and sum(summary["statuses"].values()) == TOTAL
    assert "error" not in r.stderr.lower()
    trials, rows = assert_consistent(url, "w", TOTAL)
    assert len(trials) == TOTAL  # nothing was lost or re-run: exactly TOTAL Optuna trials
    assert {r.status for r in rows} <= {"ok", "reused", "infeasible"}
    # The four workers really did share the work.
    hosts = {t.user_attrs.get("measurement_id") for t in trials}
    assert len(hosts) == TOTAL


def _wait_for_running(url, name, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            study = optuna.load_study(study_name=name, storage=url)
            if study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) and \
                    len(study.trials) >= 2:
                return
        except KeyError:
            pass  # the study is not created yet
        time.sleep(0.2)
    raise AssertionError("no trial started")


@pytest.mark.parametrize("die_at", ["measure", "first-beat"])
def test_a_killed_worker_trial_is_failed_requeued_and_rerun(tmp_path, space, die_at):
    """The worker kills itself at a set point of a trial's life (inside a measurement, after
    the first heartbeat; or as the heartbeat starts, before any beat); a resumed search fails
    the dead trial after the grace period, re-queues what it was measuring, and finishes."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    args = ["search", *SCENARIO, "--space", space, "--storage", url, "--study", "k",
            "--trials", 4, "--runner", "plugins.slow_sim:SlowSim", "--heartbeat", 1,
            "--grace", 3, "--json"]
    victim = run_cli(*args, AUTOTUNE_TEST_RUN_S=0.05, AUTOTUNE_TEST_DIE_AT=die_at)
    assert victim.returncode in (-signal.SIGKILL, 137), victim.stderr
    (killed,) = optuna.load_study(study_name="k", storage=url).get_trials(
        states=(optuna.trial.TrialState.RUNNING,))

    started = time.monotonic()
    r = run_cli(*args, AUTOTUNE_TEST_RUN_S=0.05, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 60  # the grace period (3 s), not a wait for good
    trials, rows = assert_consistent(url, "k", 4)
    (dead,) = [t for t in trials if t.number == killed.number]
    assert dead.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    if die_at == "measure":  # it had proposed a config: recorded as lost and measured again
        assert {r.status for r in rows if r.trial_number == killed.number} == {"lost"}
        assert len(retries) == 1 and retries[0].params == killed.params
        assert retries[0].state == optuna.trial.TrialState.COMPLETE
    else:  # killed before it proposed anything: nothing to record or re-run
        assert not killed.params and not retries
        assert killed.number not in {r.trial_number for r in rows}


@pytest.mark.parametrize("workers, sig", [(1, signal.SIGINT), (2, signal.SIGTERM)],
                         ids=["1-SIGINT", "2-SIGTERM"])
def test_interrupt_records_the_trial_exits_130_and_resumes(tmp_path, space, sig, workers):
    url = f"sqlite:///{tmp_path / 'i.db'}"
    args = ["search", *SCENARIO, "--space", space, "--storage", url, "--study", "i",
            "--trials", 5, "--runner", "plugins.slow_sim:SlowSim", "--workers", workers]
    proc = subprocess.Popen(autotune_cmd(*args), env=subprocess_env(AUTOTUNE_TEST_RUN_S=2.0),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_running(url, "i", proc)
    # Ctrl-C in a terminal signals the whole foreground process group.
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    trials, rows, _ = study_state(url, "i")
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in trials]
    assert "interrupted" in {r.status for r in rows}

    r = run_cli(*args, AUTOTUNE_TEST_RUN_S=0.05)
    assert r.returncode == 0, r.stderr
    assert_consistent(url, "i", 5)


_CREATE = """
import pathlib, sys, time
from autotune.study import open_storage
folder = pathlib.Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
open_storage(sys.argv[1])
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_eight_workers_creating_a_new_database_at_once_all_open_it(backend, tmp_path, request):
    """All eight race to create the tables; the losers wait for the winner and open them."""
    url = (f"sqlite:///{tmp_path / 'new.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE, url, str(tmp_path), str(i)],
                              env=subprocess_env(), stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()  # released together, as workers started by one scheduler
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(e for e in errors if e)


def test_workers_of_a_parent_killed_with_sigkill_stop_and_the_study_resumes(tmp_path, space):
    from autotune.runners._process import group_alive

    url = f"sqlite:///{tmp_path / 'o.db'}"
    args = ["search", *SCENARIO, "--space", space, "--study", "o", "--trials", 6,
            "--runner", "plugins.slow_sim:SlowSim", "--workers", 2]
    # The URL comes from the environment: nothing of it in the command line `ps` shows.
    proc = subprocess.Popen(autotune_cmd(*args),
                            env=subprocess_env(AUTOTUNE_TEST_RUN_S=2.0, AUTOTUNE_STORAGE=url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_running(url, "o", proc)
    proc.kill()  # the parent only: it can pass nothing on to its workers
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while group_alive(proc.pid) and time.monotonic() < deadline:  # its workers, orphaned
        time.sleep(0.2)
    assert not group_alive(proc.pid), "the workers of a killed parent went on"
    trials, rows, _ = study_state(url, "o")
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in trials]
    assert "interrupted" in {r.status for r in rows}

    r = run_cli(*args, AUTOTUNE_TEST_RUN_S=0.05, AUTOTUNE_STORAGE=url)
    assert r.returncode == 0, r.stderr
    assert_consistent(url, "o", 6)
