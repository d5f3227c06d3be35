"""A shared study under faults, as an operator would cause them: workers × trials × kills → counts.

Starts ``--workers`` independent ``autotune search`` processes (the built-in model, so a trial
takes milliseconds and most kills land in database code) on one study, SIGKILLs a random one of
them ``--kills`` times while they run and starts a replacement each time; on PostgreSQL it also
drops every worker connection ``--drops`` times (``pg_terminate_backend``). Then one more worker
finishes the study, and the script counts what a shared study must get exactly right:

    trials counted      = --trials          (slots done, and trials told by their own worker)
    measured twice      = 0                 (configurations measured more than once)
    left RUNNING/WAITING = 0
    claims by dead trials = 0
    tracebacks          = 0                 (every worker that stopped said so in one line)

Usage:

    python benchmarks/stress.py [--workers 8] [--trials 300] [--kills 15] [--drops 5]
                                [--backend sqlite|postgresql|both]
                                [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

SPACE = """tp: [1, 2, 4, 8]
pp: [1, 2]
max_batch_size: [64, 128, 256, 512, 1024]
max_num_tokens: [2048, 4096, 8192]
kv_fraction: [0.85, 0.9]
chunked_prefill: [true, false]
concurrency: [1, 16, max]
"""
SCENARIO = ["--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "512",
            "--osl", "64", "--slo", "tpot:p99<=20ms"]
REAPED = "autotune:reaped"


def worker_argv(url: str, space: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "autotune.cli", "search", *SCENARIO, "--space", str(space),
            "--study", "stress", "--trials", str(trials), "--heartbeat", "1", "--grace", "4",
            "--json"]


def start(argv: list[str], url: str, log: Path) -> subprocess.Popen:
    # The URL travels in the environment, as an operator keeps a password out of `ps`.
    env = {**os.environ, "AUTOTUNE_STORAGE": url}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            start_new_session=True)


def drop_connections(admin_url: str, database: str) -> int:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as c:
        rows = c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchall()
    return len(rows)


def counts(url: str, trials: int) -> dict:
    import optuna
    from sqlalchemy import create_engine, text

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    all_trials = optuna.load_study(study_name="stress", storage=url).get_trials(deepcopy=False)
    engine = create_engine(url)
    with engine.connect() as c:
        rows = c.execute(text("select trial_number, status, key from autotune_measurements "
                              "where study_name = 'stress'")).all()
        slots = c.execute(text("select done, released from autotune_slots "
                               "where study_name = 'stress'")).all()
        claims = c.execute(text("select key, trial_id from autotune_key_claims "
                                "where study_name = 'stress'")).all()
    engine.dispose()
    state = Counter(t.state.name for t in all_trials)
    counted = sum(1 for t in all_trials if t.state.name == "COMPLETE" or (
        t.state.name == "FAIL" and t.system_attrs.get(REAPED) != t.number
        and t.user_attrs.get("failure_class") not in (None, "interrupted")))
    measured = [r.key for r in rows if r.status in ("ok", "infeasible")]
    standing = set(measured)
    finished = {t._trial_id for t in all_trials if t.state.is_finished()}
    numbers = Counter(r.trial_number for r in rows)
    return {
        "trials asked": trials, "trials counted": counted,
        "slots done": sum(1 for d, _ in slots if d),
        "measured twice": len(measured) - len(standing),
        "rows for one trial > 1": sum(1 for n in numbers.values() if n > 1),
        "left RUNNING": state.get("RUNNING", 0), "left WAITING": state.get("WAITING", 0),
        "claims by dead trials": sum(1 for k, t in claims
                                     if k not in standing or t not in finished),
        "lost (re-run)": sum(1 for r in rows if r.status == "lost"),
        "Optuna trials": len(all_trials),
    }


def run(backend: str, args, folder: Path) -> dict:
    space = folder / "space.yaml"
    space.write_text(SPACE)
    admin, database = args.pg, None
    if backend == "sqlite":
        url = f"sqlite:///{folder / 'stress.db'}"
    else:
        import psycopg

        database = f"stress_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{database}"')
        url = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + \
            f"/{database}"
    rng = random.Random(args.seed)
    argv = worker_argv(url, space, args.trials)
    logs = iter(folder / f"worker-{i}.log" for i in range(10_000))
    procs = [start(argv, url, next(logs)) for _ in range(args.workers)]
    kills = drops = 0
    started = time.monotonic()
    events = ["kill"] * args.kills + (["drop"] * args.drops if database else [])
    rng.shuffle(events)
    try:
        for what in events:
            time.sleep(rng.uniform(0.2, args.pause))
            live = [p for p in procs if p.poll() is None]
            if not live:
                break
            if what == "kill":
                victim = rng.choice(live)
                os.kill(victim.pid, signal.SIGKILL)  # only processes this script started
                victim.wait()
                kills += 1
                procs.append(start(argv, url, next(logs)))
            else:
                drop_connections(admin, database)
                drops += 1
        codes = Counter()
        for p in procs:
            codes[p.wait(timeout=args.timeout)] += 1
        final = subprocess.run(argv, env={**os.environ, "AUTOTUNE_STORAGE": url},
                               capture_output=True, text=True, timeout=args.timeout)
        codes[f"final {final.returncode}"] += 1
        elapsed = time.monotonic() - started
        tracebacks = sum("Traceback" in p.read_text() for p in folder.glob("worker-*.log"))
        tracebacks += "Traceback" in final.stderr
        out = {"backend": backend, "workers": args.workers, "kills": kills, "drops": drops,
               **counts(url, args.trials), "tracebacks": tracebacks,
               "exit codes": dict(codes), "seconds": round(elapsed, 1)}
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        if database:
            import psycopg

            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--drops", type=int, default=5, help="PostgreSQL only")
    parser.add_argument("--pause", type=float, default=2.0,
                        help="most seconds between two faults")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    for backend in backends:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(backend, args, Path(tmp)))
    keys = list(results[0])
    width = max(map(len, keys))
    for key in keys:
        print(f"{key:<{width}}  " + "  ".join(f"{str(r[key]):<24}" for r in results))


if __name__ == "__main__":
    main()
