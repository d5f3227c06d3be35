"""Trials per second of a shared study with 1, 2 and 4 worker processes, SQLite vs PostgreSQL.

Runs the real CLI (`autotune search --workers N`) with the sim runner on a small space, so the
figure is dominated by the study's own work: Optuna's sampling, the database round trips, slot
and key claims. Usage:

    python benchmarks/workers.py [--trials 100] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SPACE = """tp: [1, 2, 4, 8]
pp: [1, 2]
max_batch_size: [64, 256, 1024]
max_num_tokens: [4096, 8192]
kv_fraction: [0.85, 0.9]
chunked_prefill: [true, false]
concurrency: [1, 16, max]
"""
SCENARIO = ["--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "512",
            "--osl", "64", "--slo", "tpot:p99<=20ms"]


def run(url: str, workers: int, trials: int, space: Path) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "autotune.cli", "search", *SCENARIO, "--space", str(space),
            "--storage", url, "--study", "bench", "--trials", str(trials), "--workers",
            str(workers), "--seed", "0", "--json"]
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="admin URL of a PostgreSQL server (a scratch database is made there)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="autotune-bench-"))
    space = tmp / "space.yaml"
    space.write_text(SPACE)

    print(f"{'backend':<11}{'workers':>8}{'trials':>8}{'wall s':>9}{'trials/s':>10}"
          f"{'measured':>10}{'reused':>8}")
    for backend in ("sqlite", "postgresql"):
        for workers in (1, 2, 4):
            if backend == "sqlite":
                url = f"sqlite:///{tmp / f'w{workers}.db'}"
                cleanup = None
            else:
                import psycopg

                name = f"autotune_bench_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(args.pg, autocommit=True) as c:
                    c.execute(f'CREATE DATABASE "{name}"')
                url = args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
                url = f"{url}/{name}"
                cleanup = name
            try:
                wall, summary = run(url, workers, args.trials, space)
            finally:
                if cleanup:
                    with psycopg.connect(args.pg, autocommit=True) as c:
                        c.execute(f'DROP DATABASE IF EXISTS "{cleanup}" WITH (FORCE)')
            st = summary["statuses"]
            print(f"{backend:<11}{workers:>8}{summary['trials']:>8}{wall:>9.1f}"
                  f"{summary['trials'] / wall:>10.2f}"
                  f"{st.get('ok', 0) + st.get('infeasible', 0):>10}"
                  f"{st.get('reused', 0):>8}")


if __name__ == "__main__":
    main()
