"""Layouts that span nodes, on the built-in model: what TP across nodes costs against PP across
them, and what a search over two nodes recommends.

Prints, for Llama 3.1 405B in BF16 on 2x8 H100 (810 GB of weights: more than one node holds) at
ISL 2048 / OSL 256, output tokens/s per GPU and TPOT of TP16, TP8xPP2 and TP4xPP4 at each
concurrency, on NDR InfiniBand and on a 4x slower fabric; then the best configuration of a
search of 405B BF16 (tpot:p99<=60ms) and of Llama 3.1 70B FP8 (no SLO) on two nodes. Usage:

    python benchmarks/multinode.py [--trials 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from autotune.config import EngineConfig
from autotune.errors import TrialFailure
from autotune.model import Simulator
from autotune.scenario import Scenario

LAYOUTS = ((16, 1), (8, 2), (4, 4))
LOADS = (1, 4, 16, 64, 256, -1)


def table(fabric_scale: float) -> None:
    scen = Scenario.build(model="llama-3.1-405b", gpu="h100", num_gpus=None, nodes=2,
                          precision="bf16", isl=2048, osl=256, slo=None)
    gpu = replace(scen.gpu, fabric_gb_s=scen.gpu.fabric_gb_s * fabric_scale)
    sim = Simulator(scen.model, gpu)
    print(f"\n405B BF16, 2x8 H100, ISL 2048 / OSL 256, fabric {gpu.fabric_gb_s:g} GB/s per GPU "
          f"({gpu.fabric_latency_us:g} us): tok/s per GPU (TPOT p50 ms)")
    print("concurrency  " + "  ".join(f"{f'tp{tp}-pp{pp}':>18}" for tp, pp in LAYOUTS))
    rows = {}
    for tp, pp in LAYOUTS:
        cfg = EngineConfig(tp=tp, pp=pp, dp=1, precision="bf16")
        try:
            rows[(tp, pp)] = sim.measure(cfg, scen.workload, list(LOADS)).load_points
        except TrialFailure as exc:
            rows[(tp, pp)] = exc
    for i, load in enumerate(LOADS):
        cells = []
        for lay in LAYOUTS:
            r = rows[lay]
            if isinstance(r, Exception):
                cells.append(f"{r.failure_class:>18}")
                continue
            p = r[i]
            cells.append(f"{p.output_throughput_per_gpu:9.1f} ({p.latency_ms['tpot']['p50']:5.1f})")
        print(f"{'max' if load < 0 else load:>11}  " + "  ".join(f"{c:>18}" for c in cells))


def search(args: list[str], trials: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "autotune.cli", "search", *args, "--trials", str(trials),
                "--seed", "0", "--storage", f"sqlite:///{Path(tmp) / 'm.db'}", "--json"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    a = parser.parse_args()
    table(1.0)
    table(0.25)
    for label, args in [
        ("405B BF16, 2x8 H100, 2048/256, tpot:p99<=60ms",
         ["--model", "llama-3.1-405b", "--precision", "bf16", "--gpu", "h100", "--nodes", "2",
          "--isl", "2048", "--osl", "256", "--slo", "tpot:p99<=60ms"]),
        ("70B FP8, 2x8 H100, 1024/128, no SLO",
         ["--model", "llama-3.1-70b", "--precision", "fp8", "--gpu", "h100", "--nodes", "2",
          "--isl", "1024", "--osl", "128"]),
    ]:
        s = search(args, a.trials)
        best = s["best"]
        c = best["config"]
        print(f"\nsearch {label} ({s['trials']} trials, {s['elapsed_s']:.0f} s): best "
              f"{best['label']}, batch {c['max_batch_size']}, tokens {c['max_num_tokens']}: "
              f"{best['throughput']['output_tok_s_per_gpu']:.1f} tok/s/GPU at concurrency "
              f"{best['concurrency']}, TPOT p99 {best['latency_ms']['tpot']['p99']:.1f} ms")


if __name__ == "__main__":
    main()
