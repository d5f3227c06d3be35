"""How long the ``sim`` runner takes to measure one configuration's full load sweep.

A search of thousands of configurations stays interactive only if one sweep (the default
space's 12 loads: 1, 2, 4 ... 1024 and "max") costs tens of milliseconds. This times
``SimRunner.measure`` over a fixed, varied set of configurations (models, layouts, limits,
workloads) and prints the median and the slowest. Usage:

    python benchmarks/speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

from autotune.config import EngineConfig
from autotune.errors import TrialFailure
from autotune.measurement import MAX_CONCURRENCY
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario

LOADS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, MAX_CONCURRENCY]
SCENARIOS = [
    # model, gpu, precision, isl, osl, isl_std, osl_std
    ("llama-3.1-8b", "h100", "fp8", 128, 128, 0, 0),
    ("llama-3.1-70b", "h100", "fp8", 1024, 256, 0, 0),
    ("llama-3.1-405b", "h200", "fp8", 2048, 128, 0, 0),
    ("mixtral-8x7b", "h200", "fp8", 1000, 1000, 0, 0),
    ("llama-3.1-70b", "h200", "fp8", 5000, 500, 500, 100),  # lengths drawn from distributions
]
LAYOUTS = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 8), (4, 2), (2, 4)]
LIMITS = [(256, 8192), (2048, 8192), (64, 2048)]


def configs():
    for (model, gpu, prec, isl, osl, isl_std, osl_std), (tp, pp), (b, t) in itertools.product(
            SCENARIOS, LAYOUTS, LIMITS):
        scen = Scenario.build(model=model, gpu=gpu, num_gpus=8, precision=prec, isl=isl, osl=osl,
                              isl_std=isl_std, osl_std=osl_std, slo=None)
        yield scen, EngineConfig(tp=tp, pp=pp, dp=8 // (tp * pp), max_batch_size=b,
                                 max_num_tokens=t, precision=prec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="timings per configuration (best kept)")
    args = ap.parse_args(argv)
    times: list[tuple[float, str]] = []
    infeasible = 0
    for scen, cfg in configs():
        runner = SimRunner(scen)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            try:
                runner.measure(cfg, scen.workload, LOADS)
            except TrialFailure:
                infeasible += 1
                break
            best = min(best, time.perf_counter() - t0)
        else:
            times.append((best * 1e3, f"{scen.model.name} {scen.workload.label()} {cfg.label()}"))
    ms = sorted(t for t, _ in times)
    q = statistics.quantiles(ms, n=10)
    print(f"one configuration's sweep of {len(LOADS)} loads, {len(ms)} configurations "
          f"({infeasible} more do not fit):")
    print(f"  median {statistics.median(ms):.1f} ms, p90 {q[-1]:.1f} ms, max {ms[-1]:.1f} ms")
    for t, label in sorted(times, reverse=True)[:3]:
        print(f"  slowest: {t:6.1f} ms  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
