"""How close the ``sim`` runner is to what TensorRT-LLM measured.

Runs the performance model on every H100/H200/B200 max-throughput row of NVIDIA's published
numbers (``../shared/data/published_perf.csv``) that it can model, and prints the error per row,
per (GPU, model, version) group and overall (mean absolute percentage error), for the rows the
constants were fitted on and for the held-out rows; then which rows were skipped and why; then
Llama 3.1 405B FP8 on 8xH200 at ISL 2048 / OSL 128 under TP8, PP8, TP4xPP2 and TP2xPP4.

A row is an offline max-throughput run: every request of NVIDIA's data set issued at once. The
model reproduces it at unlimited concurrency with the same number of requests and the engine
limits NVIDIA's runs got: NVIDIA "left many options at their default settings", and
``trtllm-bench`` then picks ``max_batch_size`` and ``max_num_tokens`` itself from the model's size,
the GPUs' memory and the data set's lengths (``tensorrt_llm/bench/build/tuning.py``), which
``bench_limits`` reproduces. Usage:

    python benchmarks/accuracy.py [--csv PATH] [--rows] [--jobs 2]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import pandas as pd

from autotune.config import EngineConfig
from autotune.errors import TrialFailure
from autotune.measurement import MAX_CONCURRENCY
from autotune.model import Benchmark, Calibration, ContextWait, Simulator, load_calibration
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario
from autotune.specs import PRECISIONS as PRECISIONS_BYTES
from autotune.specs import ModelSpec, Workload, load_gpu, load_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "published_perf.csv"

GPUS = {"H100-SXM-80GB": "h100", "H200-SXM-141GB": "h200", "B200-180GB (DGX B200)": "b200"}
PRECISIONS = {"FP8": "fp8", "FP4": "fp4", "BF16": "bf16", "FP16": "bf16",
              "Mixed(FP16/BF16)": "bf16"}
MODELS = {
    "Llama-2-7B": "llama-2-7b", "Llama-2-70B": "llama-2-70b",
    "Llama-3-8B": "llama-3-8b", "Llama-3-70B": "llama-3-70b",
    "Llama-3.1-8B": "llama-3.1-8b", "Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "Llama-3.1-70B": "llama-3.1-70b", "Llama-3.1-70B-Instruct": "llama-3.1-70b",
    "Llama-3.3-70B-Instruct": "llama-3.3-70b",
    "Llama-3.1-405B": "llama-3.1-405b", "Llama-3.1-405B-Instruct": "llama-3.1-405b",
    "Mistral-7B": "mistral-7b", "Mixtral-8x7B": "mixtral-8x7b", "Mixtral-8x22B": "mixtral-8x22b",
    "GPT-J-6B": "gpt-j-6b", "Falcon-180B": "falcon-180b", "Qwen3-30B-A3B": "qwen3-30b-a3b",
}
#: Models of the CSV the catalog cannot describe, and why.
UNMODELLED = {
    "Llama-4-Maverick-17B-128E-Instruct": "Llama 4: MoE interleaved with dense layers, a shared "
                                          "expert and chunked attention (not Mixtral-style)",
    "Llama-4-Scout-17B-16E-Instruct": "Llama 4: MoE with a shared expert and chunked attention "
                                      "(not Mixtral-style)",
    "GPT-OSS-120B": "GPT-OSS: sliding-window attention with sinks, MXFP4 experts",
    "GPT-OSS-20B": "GPT-OSS: sliding-window attention with sinks, MXFP4 experts",
    "DeepSeek-R1-0528": "DeepSeek-R1: multi-head latent attention and shared experts",
    "Qwen3-235B-A22B": "run with attention data parallelism + expert parallelism (NVIDIA's MoE "
                       "command), which the model does not describe",
    "Llama-7B": "Llama 1 (pre-in-flight-batching v0.6.1 page)",
    "Llama-70B": "Llama 1 (pre-in-flight-batching v0.6.1 page)",
}
#: Requests in NVIDIA's data set per (ISL, OSL) (perf-overview.md, "Preparing a Dataset").
NUM_REQUESTS = {(128, 128): 30000, (128, 2048): 3000, (128, 4096): 1500, (1000, 2000): 1500,
                (2048, 128): 3000, (2048, 2048): 1500, (5000, 500): 1500, (1000, 1000): 3000,
                (500, 2000): 3000, (20000, 2000): 1000, (1024, 1024): 3000, (8192, 1024): 1500,
                (1024, 8192): 1500, (32768, 1024): 1000, (1024, 32768): 1000}
KV_FRACTION = 0.95  # NVIDIA's "--kv_cache_free_gpu_mem_fraction 0.95 in most cases"
#: Bytes per weight that trtllm-bench's heuristic assumes for each precision.
BENCH_WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
HELD_OUT_EVERY = 4  # one (model, ISL/OSL) combination in four is never fitted on


@dataclass(frozen=True)
class Row:
    index: int  # row of the CSV (0-based, header excluded)
    version: str
    backend: str  # trt | pytorch | pytorch-no-graphs
    gpu: str
    model: str
    precision: str
    tp: int
    pp: int
    dp: int
    isl: int
    osl: int
    measured: float  # output tokens/s of all GPUs of the row

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.gpu, self.model, self.version)

    @property
    def held_out(self) -> bool:
        key = f"{self.model}|{self.isl}|{self.osl}".encode()
        return zlib.crc32(key) % HELD_OUT_EVERY == 0

    @property
    def num_requests(self) -> int:
        if (self.isl, self.osl) in NUM_REQUESTS:
            return NUM_REQUESTS[(self.isl, self.osl)]
        seq = self.isl + self.osl
        return 30000 if seq <= 256 else 3000 if seq <= 2500 else 1500 if seq <= 10000 else 1000


@dataclass(frozen=True)
class OnlineRow:
    """One offered load of the 0.14 online-serving sweep (Triton, Poisson arrivals)."""

    gpu: str
    model: str
    precision: str
    tp: int
    isl: int
    osl: int
    qps: float
    ttft_ms: float  # mean time to first token
    itl_ms: float  # mean inter-token latency
    output_tok_s: float

    @property
    def held_out(self) -> bool:
        key = f"{self.model}|{self.isl}|{self.osl}".encode()
        return zlib.crc32(key) % HELD_OUT_EVERY == 0


ONLINE_REQUESTS = 500  # "500 requests" per offered rate (the doc's online-serving table)


def load_online(csv: Path) -> list[OnlineRow]:
    """The online-serving rows (mean TTFT, mean ITL, output tokens/s at each offered rate)."""
    df = pd.read_csv(csv)
    df = df[df.notes.str.contains("online serving", na=False)].copy()
    df["qps"] = df.notes.str.extract(r"QPS=(\d+)")[0].astype(float)
    out = []
    keys = ["gpu", "model", "precision", "tp", "isl", "osl", "qps"]
    for key, g in df.groupby(keys, sort=True):
        v = dict(zip(g.metric, g.value))
        gpu, model, precision, tp, isl, osl, qps = key
        if gpu not in GPUS or model not in MODELS or not {"mean_ttft_ms", "mean_itl_ms"} <= set(v):
            continue
        out.append(OnlineRow(GPUS[gpu], MODELS[model], PRECISIONS[precision], int(tp), int(isl),
                             int(osl), float(qps), v["mean_ttft_ms"], v["mean_itl_ms"],
                             v.get("output_throughput_tok_s", float("nan"))))
    return out


def predict_online(row: OnlineRow,
                   calibration: Calibration | None = None) -> tuple[float, float, float]:
    """Modelled (mean TTFT ms, mean ITL ms, output tokens/s) of an online-serving row.

    The deployment's limits are not published: TensorRT-LLM's defaults are assumed.
    """
    cal = calibration or load_calibration(row.gpu, row.precision, "trt")
    scen = _scenario(row.gpu, row.model, row.precision, row.tp, row.isl, row.osl)
    config = EngineConfig(tp=row.tp, precision=row.precision)
    (p,) = SimRunner(scen, cal).measure_rates(config, scen.workload, [row.qps],
                                              num_requests=ONLINE_REQUESTS)
    return p.latency("ttft", "mean"), p.latency("itl", "mean"), p.output_throughput


def report_online(rows: list[OnlineRow]) -> None:
    print("\nOnline serving: 0.14, Triton, BF16, Poisson arrivals at a fixed rate (calibrate.py "
          "fits on the rows not held out; not part of the MAPE above)")
    print(f"{'gpu':4} {'model':14} {'tp':>2} {'isl/osl':>8} {'qps':>4} {'TTFT ms':>8} {'model':>7} "
          f"{'ITL ms':>7} {'model':>7}  split")
    errs: dict[bool, list[float]] = {False: [], True: []}
    for r in rows:
        ttft, itl, _ = predict_online(r)
        errs[r.held_out] += [ape(ttft, r.ttft_ms), ape(itl, r.itl_ms)]
        print(f"{r.gpu:4} {r.model:14} {r.tp:>2} {f'{r.isl}/{r.osl}':>8} {r.qps:>4.0f} "
              f"{r.ttft_ms:>8.0f} {ttft:>7.0f} {r.itl_ms:>7.0f} {itl:>7.1f}  "
              f"{'held-out' if r.held_out else 'fit'}")
    ttft_all = [ape(predict_online(r)[0], r.ttft_ms) for r in rows]
    itl_all = [ape(predict_online(r)[1], r.itl_ms) for r in rows]
    print(f"mean absolute error over {len(rows)} loads: TTFT {mape(ttft_all):.0f}%, "
          f"ITL {mape(itl_all):.0f}% (TTFT and ITL together: fit {mape(errs[False]):.0f}%, "
          f"held-out {mape(errs[True]):.0f}%)")


def version_of(source_version: str) -> tuple[str | None, str | None]:
    """(short version, back end) of a CSV ``source_version``; back end None: not comparable."""
    v = source_version.strip()
    for prefix, short, backend in (
        ("0.12", "0.12", "trt"), ("0.13", "0.13", "trt"), ("0.14", "0.14", "trt"),
        ("0.15", "0.15", "trt"), ("0.17", "0.17", "trt"), ("0.19", "0.19", "pytorch"),
        ("0.20-0.21", "0.21", "pytorch"), ("0.20", "0.20", "pytorch-no-graphs"),
        ("1.0", "1.0", "pytorch"), ("1.1", "1.1", "pytorch"),
    ):
        if v.startswith(prefix):
            return short, backend
    return v.split()[0], None


def load_rows(csv: Path) -> tuple[list[Row], list[tuple[int, str, str]]]:
    """The rows the model can be compared on, and (index, label, reason) for every other one."""
    df = pd.read_csv(csv)
    rows: list[Row] = []
    skipped: list[tuple[int, str, str]] = []
    for i, r in df.iterrows():
        label = (f"{r.source_version.split()[0]} {r.gpu} {r.model} {r.precision} tp{r.tp}"
                 f"{'' if r.pp == 1 else f'pp{r.pp}'} {r.isl}/{r.osl} {r.metric}")
        short, backend = version_of(str(r.source_version))
        notes = str(r.notes)
        if r.gpu not in GPUS:
            why = ("Grace superchip (GH200/GB200), not in the GPU catalog"
                   if r.gpu.startswith("G") else "PCIe card without NVLink, not in the GPU catalog")
        elif backend is None:
            why = "pre-in-flight-batching page (static batch or batch-1 latency)"
        elif r.metric not in ("output_tok_s_total", "output_tok_s_per_gpu"):
            why = "online-serving sweep at a fixed request rate, not a max-throughput row"
        elif r.model in UNMODELLED:
            why = UNMODELLED[r.model]
        elif r.model not in MODELS:
            why = "model not in the catalog"
        elif "attention-DP" in notes and f"{r.model}" in notes:
            why = "attention data parallelism + expert parallelism"
        elif PRECISIONS.get(r.precision) == "fp4" and GPUS[r.gpu] != "b200":
            why = "FP4 needs Blackwell tensor cores"
        else:
            why = ""
        if why:
            skipped.append((int(i), label, why))
            continue
        gpus = int(r.num_gpus)
        total = float(r.value) * (gpus if r.metric == "output_tok_s_per_gpu" else 1)
        tp, pp = int(r.tp), int(r.pp)
        rows.append(Row(index=int(i), version=short, backend=backend, gpu=GPUS[r.gpu],
                        model=MODELS[r.model], precision=PRECISIONS[r.precision], tp=tp, pp=pp,
                        dp=max(1, gpus // (tp * pp)), isl=int(r.isl), osl=int(r.osl),
                        measured=total))
    return rows, skipped


@cache
def _scenario(gpu: str, model: str, precision: str, gpus: int, isl: int, osl: int) -> Scenario:
    # NVIDIA's published runs go past some models' context (GPT-J and Falcon-180B at 2,048
    # tokens were run at 128/2048 and 2048/2048): replay them as published.
    return Scenario.build(model=model, gpu=gpu, num_gpus=gpus, precision=precision, isl=isl,
                          osl=osl, slo=None, check_context=False)


def throughput(row: Row, calibration: Calibration, limits: tuple[int, int]) -> float:
    """Modelled output tokens/s of ``row`` under one pair of engine limits (0: does not fit)."""
    b, t = limits
    scen = _scenario(row.gpu, row.model, row.precision, row.tp * row.pp * row.dp, row.isl,
                     row.osl)
    config = EngineConfig(tp=row.tp, pp=row.pp, dp=row.dp, max_batch_size=b, max_num_tokens=t,
                          kv_fraction=KV_FRACTION, chunked_prefill=True, precision=row.precision)
    runner = SimRunner(scen, calibration, num_requests=row.num_requests)
    try:
        (point,) = runner.measure(config, scen.workload, [MAX_CONCURRENCY]).load_points
    except TrialFailure:
        return 0.0
    return point.output_throughput


def bench_limits(model: str, gpu: str, precision: str, tp: int, pp: int, isl: int,
                 osl: int) -> tuple[int, int]:
    """(max_batch_size, max_num_tokens) as ``trtllm-bench`` chooses them when not given.

    Its heuristic (``calc_engine_setting`` + ``finetune_setting``): the requests of ISL + OSL
    tokens whose KV cache fits in 95 % of the memory the weights leave, capped at 4096 and split
    over the pipeline stages, rounded up "optimistically"; tokens for them plus their prompts.
    """
    m, g = load_model(model), load_gpu(gpu)
    kv_bytes = PRECISIONS_BYTES[precision][1]
    per_token_gb = 2 * m.layers * max(tp, m.kv_heads) * m.head_dim * kv_bytes / 2**30
    engine_gb = m.total_params * BENCH_WEIGHT_BYTES[precision] / 2**30
    cache_gb = (g.memory_gib * tp * pp - engine_gb) * 0.95
    requests = cache_gb / (per_token_gb * (isl + osl))
    raw_bs = min(requests, 4096) / pp
    raw_tokens = min(raw_bs * (1 + isl / osl), 32768)
    bs = max(64, _round_up(raw_bs, ((256, 32), (1024, 128), (math.inf, 256))))
    tokens = max(2048, _round_up(raw_tokens, ((4096, 256), (8192, 512), (math.inf, 1024))))
    return bs, tokens


def _round_up(x: float, tiers: tuple[tuple[float, int], ...]) -> int:
    """``x`` rounded up to a multiple of the step of the first tier whose bound exceeds it."""
    step = next(step for bound, step in tiers if x < bound)
    return step * math.ceil(x / step)


def limits_for(row: Row) -> list[tuple[int, int]]:
    """trtllm-bench's limits, then smaller token limits (what one does when it runs out of
    memory: the activations of ``max_num_tokens`` take room from the KV cache)."""
    bs, tokens = bench_limits(row.model, row.gpu, row.precision, row.tp, row.pp, row.isl, row.osl)
    return [(bs, tokens)] + [(bs, t) for t in (8192, 4096, 2048) if t < tokens]


def predict(row: Row, calibration: Calibration | None = None,
            limits: list[tuple[int, int]] | None = None) -> tuple[float, tuple[int, int] | None]:
    """Modelled output tokens/s of ``row`` and the limits it ran with (the first that fits)."""
    cal = calibration or load_calibration(row.gpu, row.precision, row.backend)
    for lim in limits or limits_for(row):
        tput = throughput(row, cal, lim)
        if tput > 0:
            return tput, lim
    return 0.0, None


def case_key(row: Row) -> tuple:
    """Rows with the same key get the same prediction (the same run in another version)."""
    return (row.gpu, row.model, row.precision, row.tp, row.pp, row.dp, row.isl, row.osl,
            row.backend)


def _predict_one(args):
    row, cal = args
    return predict(row, cal)


def predict_all(rows: list[Row], calibrations: dict | None = None,
                jobs: int = 1) -> list[tuple[float, tuple[int, int] | None]]:
    """(prediction, best limits) for ``rows``; ``calibrations`` maps (gpu, precision, back end)
    to constants (default: the shipped files)."""
    firsts: dict[tuple, Row] = {}
    for r in rows:
        firsts.setdefault(case_key(r), r)
    work = [(r, calibrations.get((r.gpu, r.precision, r.backend)) if calibrations else None)
            for r in firsts.values()]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            out = list(pool.map(_predict_one, work, chunksize=4))
    else:
        out = [_predict_one(w) for w in work]
    by_key = dict(zip(firsts, out))
    return [by_key[case_key(r)] for r in rows]


def ape(pred: float, measured: float) -> float:
    return abs(pred - measured) / measured * 100


def mape(errors: list[float]) -> float:
    return statistics.fmean(errors) if errors else float("nan")


def report(rows: list[Row], preds: list[float], skipped, *, show_rows: bool) -> dict:
    errs = [ape(p, r.measured) for r, p in zip(rows, preds)]
    if show_rows:
        print(f"{'row':>5} {'ver':>4} {'gpu':4} {'model':15} {'prec':4} {'layout':8} "
              f"{'isl/osl':>11} {'measured':>9} {'model':>9} {'err%':>6}  split")
        for r, p in zip(rows, preds):
            lay = f"tp{r.tp}" + (f"pp{r.pp}" if r.pp > 1 else "")
            print(f"{r.index + 2:>5} {r.version:>4} {r.gpu:4} {r.model:15} {r.precision:4} "
                  f"{lay:8} {f'{r.isl}/{r.osl}':>11} {r.measured:>9.0f} {p:>9.0f} "
                  f"{(p - r.measured) / r.measured * 100:>+6.1f}  "
                  f"{'held-out' if r.held_out else 'fit'}")
        print()
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r.group].append(i)
    print(f"{'gpu':4} {'model':15} {'ver':>4} {'rows':>4} {'MAPE%':>6} {'bias%':>6}")
    worst = (None, 0.0)
    for key in sorted(groups, key=lambda k: (k[0], k[1], float(k[2]))):
        idx = groups[key]
        m = mape([errs[i] for i in idx])
        bias = statistics.fmean((preds[i] - rows[i].measured) / rows[i].measured * 100
                                for i in idx)
        print(f"{key[0]:4} {key[1]:15} {key[2]:>4} {len(idx):>4} {m:>6.1f} {bias:>+6.1f}")
        if m > worst[1]:
            worst = (key, m)
    print()
    summary = {}
    for name, sel in (("all", lambda r: True),
                      ("H100+H200", lambda r: r.gpu in ("h100", "h200")),
                      ("h100", lambda r: r.gpu == "h100"), ("h200", lambda r: r.gpu == "h200"),
                      ("b200", lambda r: r.gpu == "b200")):
        fit = [e for r, e in zip(rows, errs) if sel(r) and not r.held_out]
        held = [e for r, e in zip(rows, errs) if sel(r) and r.held_out]
        both = fit + held
        summary[name] = (mape(both), mape(fit), mape(held), len(both))
        print(f"MAPE {name:10} {mape(both):5.1f}%  (fit {mape(fit):5.1f}% on {len(fit)} rows, "
              f"held-out {mape(held):5.1f}% on {len(held)} rows)")
    if worst[0]:
        print(f"worst group: {' '.join(worst[0])} {worst[1]:.1f}%")
    within = sum(e <= 10 for e in errs) / len(errs) * 100
    print(f"rows within 10%: {within:.0f}%, within 25%: "
          f"{sum(e <= 25 for e in errs) / len(errs) * 100:.0f}%")
    return summary



# ---- the latency regime: measured serving points (measured_serving.csv) -------------------
SERVING_CSV = ROOT.parent / "shared" / "data" / "measured_serving.csv"
SERVING_GPUS = {"h100_sxm": "h100", "h200_sxm": "h200", "b200_sxm": "b200"}
#: Dense checkpoints of the serving data -> catalog models (Qwen3-32B is described below).
SERVING_MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "nvidia/Llama-3.1-8B-Instruct-FP8":
    "llama-3.1-8b", "meta-llama/Llama-3.1-70B": "llama-3.1-70b", "Qwen/Qwen3-32B": "qwen3-32b",
    "nvidia/Qwen3-32B-NVFP4": "qwen3-32b",
}
#: Qwen3-32B is not in the catalog (its config.json: 64 layers, hidden 5120, 64 query and 8 KV
#: heads of 128, MLP 25600, vocabulary 151936, untied embeddings).
EXTRA_MODELS = {"qwen3-32b": ModelSpec(name="qwen3-32b", layers=64, hidden=5120, heads=64,
                                       kv_heads=8, ffn=25600, vocab=151936, head_dim=128,
                                       max_context=40960)}
SERVING_ENGINES = ("trtllm", "vllm", "sglang")
#: The limits the serving runs got: InferenceX starts each engine with at most ``concurrency``
#: sequences (``--max-num-seqs $CONC``), 8192 batched tokens and chunked prefill, and 90 % of
#: the memory (``--gpu-memory-utilization 0.9``).
SERVING_MAX_NUM_TOKENS = 8192
SERVING_KV_FRACTION = 0.9
#: Engines whose memory fraction is of the whole GPU (vLLM's ``--gpu-memory-utilization``,
#: SGLang's ``--mem-fraction-static``: weights, activations and KV cache together), not of
#: the memory the weights leave (TensorRT-LLM's ``free_gpu_memory_fraction``).
WHOLE_GPU_FRACTION = ("vllm", "sglang")
#: Requests a sweep's client keeps waiting beyond the engine's batch slots
#: (``Benchmark.queued``), by sweep (``ServingRow.sweep``: the AIConfigurator gap-analysis
#: file a row came from); every other sweep none (InferenceX starts the engine with
#: ``--max-num-seqs $CONC`` and runs ``$CONC`` clients). A queued client shows in the TTFT: a
#: base plus one request's duration / concurrency, the wait for the next completion, so at a
#: fixed ISL and concurrency TTFT grows with OSL x TPOT / concurrency at a slope of 1. Fitted on
#: the fit rows at concurrency <= 64 (``benchmarks/accuracy.py --sweeps`` prints each sweep's
#: slope): the Llama 3.1 8B sweep of 1.0.0rc3 on H100 0.99, its Qwen3-32B and Qwen3-235B
#: sweeps (same harness, release and GPU) 0.13 and 0.01, InferenceX 0.01.
QUEUED_SWEEPS = {"h100_sxm/trtllm/1.0.0rc3/meta-llama_Llama-3.1-8B-Instruct.csv": 1}
#: Concurrency bands of the latency tables.
BANDS = (("1", 1, 1), ("2-16", 2, 16), ("17-128", 17, 128), (">128", 129, 10**9))


@dataclass(frozen=True)
class ServingRow:
    """One measured operating point: mean TTFT and TPOT at a closed-loop concurrency."""

    index: int  # row of measured_serving.csv (0-based, header excluded)
    engine: str  # trtllm | vllm | sglang
    version: str
    gpu: str
    model: str
    precision: str
    tp: int
    pp: int
    isl: int
    osl: int
    concurrency: int
    ttft_ms: float
    tpot_ms: float
    harness: str = "inferencex"  # who measured it: inferencex | aic
    sweep: str = ""  # the gap-analysis file of an aic row (QUEUED_SWEEPS), "" for InferenceX
    ep: int = 1  # MoE rows: expert parallelism inside the tp GPUs of a stage
    attention_dp: bool = False  # MoE rows: attention data-parallel over them
    measured: str = ""  # the run's date (YYYY-MM-DD) where its provenance gives it

    @property
    def config(self) -> EngineConfig:
        """The configuration the run served, with its launch script's limits
        (``launch_limits``); under attention DP the batch limit is per rank (the run's
        concurrency dealt out to the ranks)."""
        ranks = self.tp if self.attention_dp else 1
        tokens, chunked, kv = launch_limits(self)
        return EngineConfig(tp=self.tp, pp=self.pp, max_batch_size=-(-self.concurrency // ranks),
                            max_num_tokens=tokens, kv_fraction=kv, chunked_prefill=chunked,
                            precision=self.precision, ep=self.ep,
                            attention_dp=self.attention_dp)

    @property
    def family(self) -> str:
        """TP (experts tensor-parallel), TEP (expert-parallel, attention TP) or DEP (expert-
        parallel, attention DP), as practitioners name MoE layouts."""
        if self.attention_dp:
            return "DEP" if self.ep > 1 else "DP-attention"
        return "TEP" if self.ep > 1 else "TP"

    @property
    def deployment(self) -> str:
        """What is held out together: one engine, GPU, model, precision, layout and workload
        (a whole concurrency sweep)."""
        return (f"{self.engine}|{self.gpu}|{self.model}|{self.precision}|tp{self.tp}pp{self.pp}"
                f"|{self.isl}/{self.osl}")

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.deployment.encode()) % HELD_OUT_EVERY == 0

    @property
    def band(self) -> str:
        return next(name for name, lo, hi in BANDS if lo <= self.concurrency <= hi)


#: DeepSeek-V3/R1, which InferenceX runs with the same TensorRT-LLM scripts.
DEEPSEEK = ("deepseek-r1", "deepseek-v3")


def launch_limits(row: ServingRow) -> tuple[int, bool, float]:
    """(max_num_tokens, chunked prefill, KV share) the engine of ``row`` ran with.

    InferenceX's TensorRT-LLM scripts (``SemiAnalysisAI/InferenceX`` at 843c6254,
    ``benchmarks/single_node/fixed_seq_len/dsr1_*_trt.sh``, ``deprecated/gptoss_fp4_*_trt.sh``;
    the Llama 70B ones ``benchmarks/70b_*_trt_slurm.sh`` until their removal in 2582bce4,
    2025-10-29) never turn chunked prefill on, so TensorRT-LLM's default (off) applied; their
    token budgets and memory shares:

    - DeepSeek-R1 (and the rows named DeepSeek-V3): ``(CONC + ISL + 64)`` rounded up to 64
      tokens (ec90f3fe, 2025-09-18), at least 8192 from 64af5a77 (2026-01-21);
      ``free_gpu_memory_fraction`` 0.75 on H200, 0.8 on B200;
    - gpt-oss-120b: ``MAX_NUM_TOKENS=20000``, 0.85;
    - Llama 3.3 70B: ``--max_num_tokens 16384`` (1b563c85, 2025-09-18), memory share unset
      (TensorRT-LLM's default 0.9).

    A row without a date gets no 8192 floor. Not modelled: the batching delay the reworked
    DeepSeek-R1 FP8 B200 script sets at 1024/1024 from concurrency 64 (``ec7bafaa``,
    2026-01-29: ``batch_wait_timeout_iters: 40``, ``batch_wait_max_tokens_ratio: 0.8``).

    Every other row: vLLM's InferenceX limits (8192 batched tokens, chunked prefill, 90 % of
    the memory), which the gap-analysis sweeps are taken to share (their launch settings are
    not published).
    """
    if row.engine != "trtllm" or row.harness != "inferencex":
        return SERVING_MAX_NUM_TOKENS, True, SERVING_KV_FRACTION
    if row.model in DEEPSEEK:
        tokens = -(-(row.concurrency + row.isl + 64) // 64) * 64
        if row.measured >= "2026-01-21":
            tokens = max(tokens, 8192)
        return tokens, False, 0.75 if row.gpu == "h200" else 0.8
    if row.model.startswith("gpt-oss"):
        return 20000, False, 0.85
    return 16384, False, SERVING_KV_FRACTION


def _measured(source: str) -> str:
    """The date a row was measured (``measured=YYYY-MM-DD...`` in its provenance), or ""."""
    found = re.search(r"measured=(\d{4}-\d{2}-\d{2})", source)
    return found.group(1) if found else ""


def _serving_precision(r) -> str:
    """The precision of a row; missing on some, then the checkpoint's (BF16 unless named)."""
    if isinstance(r.precision, str) and r.precision in ("fp8", "fp4", "bf16"):
        return r.precision
    name = r.model_path.lower()
    return "fp8" if "fp8" in name else "fp4" if "fp4" in name else "bf16"


def _harness(source: str) -> str:
    """Which harness measured a row, from its ``silicon_data_source``."""
    return "aic" if "aic-auto-gap-analysis" in source else "inferencex"


def _sweep(source: str) -> str:
    """The gap-analysis file an aic row came from (``<system>/<engine>/<version>/<file>``),
    "" for the others."""
    found = re.search(r"aic-auto-gap-analysis/data/([^;]+)", source)
    return found.group(1).strip() if found else ""


def load_serving(csv: Path = SERVING_CSV) -> tuple[list[ServingRow], dict[str, int]]:
    """The dense aggregated rows the model can describe, and how many others were skipped why."""
    df = pd.read_csv(csv)
    rows: list[ServingRow] = []
    skipped: dict[str, int] = defaultdict(int)
    for i, r in df.iterrows():
        precision = _serving_precision(r)
        if r["mode"] != "agg":
            why = "disaggregated (separate prefill and decode workers)"
        elif r.model_path not in SERVING_MODELS:
            why = "MoE or model not described (a later issue)"
        elif r.system not in SERVING_GPUS:
            why = f"system {r.system} not in the GPU catalog"
        elif r.backend not in SERVING_ENGINES:
            why = f"engine {r.backend}"
        elif float(r.attention_dp_size or 1) > 1 if not pd.isna(r.attention_dp_size) else False:
            why = "attention data parallelism"
        elif precision == "fp4" and SERVING_GPUS[r.system] != "b200":
            why = "FP4 needs Blackwell tensor cores"
        else:
            why = ""
        if why:
            skipped[why] += 1
            continue
        rows.append(ServingRow(
            index=int(i), engine=r.backend, version=str(r.backend_version),
            gpu=SERVING_GPUS[r.system], model=SERVING_MODELS[r.model_path], precision=precision,
            tp=int(r.tp_size), pp=int(r.pp_size), isl=int(r.isl), osl=int(r.osl),
            concurrency=int(r.batch_size), ttft_ms=float(r.silicon_ttft_ms),
            tpot_ms=float(r.silicon_tpot_ms), harness=_harness(str(r.silicon_data_source)),
            sweep=_sweep(str(r.silicon_data_source)),
            measured=_measured(str(r.silicon_data_source))))
    return rows, dict(skipped)


def serving_model(name: str) -> ModelSpec:
    return EXTRA_MODELS[name] if name in EXTRA_MODELS else load_model(name)


def predict_serving(row: ServingRow, calibration: Calibration | None = None
                    ) -> tuple[float, float]:
    """Modelled (mean TTFT ms, mean TPOT ms) of a serving row: its closed loop at its
    concurrency, run as InferenceX runs it (``Benchmark``), under its engine's constants."""
    point = serving_point(row, calibration)
    if point is None:
        return math.nan, math.nan
    return point.latency("ttft", "mean"), point.latency("tpot", "mean")


#: The Llama 70B names of the serving rows (InferenceX ran Llama 3.3 70B as Llama 3.1 70B).
DENSE_70B = ("llama-3.1-70b", "llama-3.3-70b")


def context_wait(row: ServingRow) -> ContextWait | None:
    """How the engine of a serving row held new prompts back, from InferenceX's launch scripts
    (``SemiAnalysisAI/InferenceX`` ``benchmarks/``; None: it did not).

    - TensorRT-LLM under attention DP: ``attention_dp_config: {enable_balance: true,
      timeout_iters: 60, batching_wait_iters: 0}`` in every DeepSeek-R1 script since commit
      ec90f3fe7 (2025-09-18), taken for every attention-DP row of that harness (the rows named
      DeepSeek-V3 included: no script of InferenceX's says otherwise): prompts wait until every
      rank has one, 60 iterations at most;
    - TensorRT-LLM, Llama 3.3 70B at 1024/1024 below TP8 (``70b_*_trt_*.sh`` from 1b563c858,
      2025-09-18, to 2025-10-30, the runs of 2025-10-29 included): ``batch_wait_timeout_iters:
      20``, ``batch_wait_max_tokens_ratio: 0.9`` of ``--max_num_tokens 16384``.
    """
    if row.engine != "trtllm" or row.harness != "inferencex":
        return None
    if row.attention_dp:
        return ContextWait(timeout_iters=60, min_requests=row.tp, min_decoding=row.tp)
    if row.model in DENSE_70B and (row.isl, row.osl) == (1024, 1024) and row.tp < 8:
        return ContextWait(timeout_iters=20, min_tokens=int(0.9 * 16384))
    return None


def serving_point(row: ServingRow, calibration: Calibration | None = None):
    """The modelled load point of a serving row (None when the model cannot run it)."""
    cal = calibration or load_calibration(row.gpu, row.precision, engine=row.engine)
    config = row.config
    sim = Simulator(serving_model(row.model), load_gpu(row.gpu), cal, engine=row.engine,
                    benchmark=Benchmark(queued=QUEUED_SWEEPS.get(row.sweep, 0)),
                    context_wait=context_wait(row))
    if row.engine in WHOLE_GPU_FRACTION:
        config = replace(config, kv_fraction=_whole_gpu_kv_fraction(sim, config))
    try:
        (p,) = sim.measure(config, Workload(isl=row.isl, osl=row.osl),
                           [row.concurrency]).load_points
    except TrialFailure:
        return None
    return p


def _whole_gpu_kv_fraction(sim: Simulator, config: EngineConfig) -> float:
    """The share of the memory the weights, activations and reserve leave (the model's
    ``kv_fraction``) that a fraction ``SERVING_KV_FRACTION`` of the whole GPU leaves the KV
    cache; at least a hundredth (the engine ran: the model's reserve is then too large)."""
    plan = sim.perf(replace(config, kv_fraction=1.0)).memory()
    free = plan.total - plan.weights - plan.activations - plan.reserve
    if free <= 0:
        return SERVING_KV_FRACTION
    kv = free - (1 - SERVING_KV_FRACTION) * plan.total
    return min(1.0, max(kv / free, 0.01))


def _predict_serving_one(args):
    row, cal = args
    return predict_serving(row, cal)


def predict_serving_all(rows: list[ServingRow], jobs: int = 1) -> list[tuple[float, float]]:
    work = [(r, None) for r in rows]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_predict_serving_one, work, chunksize=4))
    return [_predict_serving_one(w) for w in work]


def report_serving(rows: list[ServingRow], preds: list[tuple[float, float]], skipped: dict,
                   *, show_rows: bool = False) -> dict:
    """TPOT and TTFT MAPE per engine, GPU, model and concurrency band: held-out rows, with
    the fitted rows' figures beside; returns {engine: (tpot held, ttft held, tpot fit, ttft
    fit, rows held, rows fit)}."""
    print("\nLatency regime: measured mean TTFT / TPOT of dense aggregated deployments "
          "(measured_serving.csv), closed loop at each concurrency, as InferenceX runs it")
    if show_rows:
        print(f"{'row':>5} {'engine':6} {'gpu':4} {'model':13} {'prec':4} {'tp':>2} "
              f"{'isl/osl':>10} {'conc':>4} {'TTFT':>8} {'model':>8} {'TPOT':>6} {'model':>6}"
              "  split")
        for r, (ttft, tpot) in zip(rows, preds):
            print(f"{r.index + 2:>5} {r.engine:6} {r.gpu:4} {r.model:13} {r.precision:4} "
                  f"{r.tp:>2} {f'{r.isl}/{r.osl}':>10} {r.concurrency:>4} {r.ttft_ms:>8.0f} "
                  f"{ttft:>8.0f} {r.tpot_ms:>6.1f} {tpot:>6.1f}  "
                  f"{'held-out' if r.held_out else 'fit'}")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r.engine, r.gpu, r.model, r.band)].append(i)
    band_order = [b[0] for b in BANDS]

    def errs(idx, k, measured):
        return [ape(preds[i][k], getattr(rows[i], measured)) for i in idx
                if not math.isnan(preds[i][k])]

    print(f"{'engine':6} {'gpu':4} {'model':13} {'conc':>6} {'held':>4} {'TPOT%':>6} "
          f"{'TTFT%':>6} | {'fit':>4} {'TPOT%':>6} {'TTFT%':>6}")
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], band_order.index(k[3]))):
        held = [i for i in groups[key] if rows[i].held_out]
        fit = [i for i in groups[key] if not rows[i].held_out]
        print(f"{key[0]:6} {key[1]:4} {key[2]:13} {key[3]:>6} {len(held):>4} "
              f"{mape(errs(held, 1, 'tpot_ms')):>6.1f} {mape(errs(held, 0, 'ttft_ms')):>6.1f} | "
              f"{len(fit):>4} {mape(errs(fit, 1, 'tpot_ms')):>6.1f} "
              f"{mape(errs(fit, 0, 'ttft_ms')):>6.1f}")
    summary = {}
    for engine in SERVING_ENGINES:
        held = [i for i, r in enumerate(rows) if r.engine == engine and r.held_out]
        fit = [i for i, r in enumerate(rows) if r.engine == engine and not r.held_out]
        if not held and not fit:
            continue
        s = (mape(errs(held, 1, "tpot_ms")), mape(errs(held, 0, "ttft_ms")),
             mape(errs(fit, 1, "tpot_ms")), mape(errs(fit, 0, "ttft_ms")), len(held), len(fit))
        summary[engine] = s
        print(f"MAPE {engine:6} held-out: TPOT {s[0]:5.1f}%  TTFT {s[1]:5.1f}%  on {s[4]} rows   "
              f"(fit: TPOT {s[2]:5.1f}%  TTFT {s[3]:5.1f}% on {s[5]} rows)")
    failed = sum(math.isnan(p[0]) for p in preds)
    print(f"{failed} rows the model cannot run (out of memory); skipped "
          f"{sum(skipped.values())} rows: "
          + "; ".join(f"{n} {why}" for why, n in sorted(skipped.items(), key=lambda kv: -kv[1])))
    return summary


def print_skipped(skipped) -> None:
    by_reason: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, label, why in skipped:
        by_reason[why].append((i, label))
    print(f"\nSkipped {len(skipped)} rows:")
    for why, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(items):4} {why}")


def layouts_405b() -> None:
    """Llama 3.1 405B FP8 on 8xH200, ISL 2048 / OSL 128: per-user speed and max throughput."""
    scen = Scenario.build(model="llama-3.1-405b", gpu="h200", num_gpus=8, precision="fp8",
                          isl=2048, osl=128, slo=None)
    print("\nLlama 3.1 405B FP8, 8xH200, ISL 2048 / OSL 128 (PyTorch back-end constants)")
    print(f"{'':9} {'--- concurrency 1 ---':^28} {'-- max throughput --':^24}")
    print(f"{'layout':9} {'tok/s/user':>10} {'TPOT ms':>8} {'TTFT ms':>8} {'output tok/s':>13} "
          f"{'tok/s/user':>10}")
    for tp, pp in ((8, 1), (1, 8), (4, 2), (2, 4)):
        cfg = EngineConfig(tp=tp, pp=pp, kv_fraction=KV_FRACTION, precision="fp8")
        (one,) = SimRunner(scen).measure(cfg, scen.workload, [1]).load_points
        bs, tokens = bench_limits("llama-3.1-405b", "h200", "fp8", tp, pp, 2048, 128)
        cfg = replace(cfg, max_batch_size=bs, max_num_tokens=tokens)
        (top,) = SimRunner(scen, num_requests=3000).measure(
            cfg, scen.workload, [MAX_CONCURRENCY]).load_points
        print(f"{f'TP{tp}xPP{pp}':9} {one.output_throughput_per_user:>10.1f} "
              f"{one.latency('tpot', 'mean'):>8.1f} {one.latency('ttft', 'mean'):>8.0f} "
              f"{top.output_throughput:>13.0f} {top.output_throughput_per_user:>10.1f}")


# ---- mixture-of-experts models (issue 19) -----------------------------------------------------
#: MoE checkpoints of the serving data -> catalog models. MiniMax-M2.5 has M2's architecture
#: (its config.json); Kimi-K2.5's language model is Kimi-K2's.
MOE_MODELS = {
    "deepseek-ai/DeepSeek-R1": "deepseek-r1", "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "nvidia/DeepSeek-R1-NVFP4": "deepseek-r1", "Qwen/Qwen3-235B-A22B-FP8": "qwen3-235b-a22b",
    "openai/gpt-oss-120b": "gpt-oss-120b", "MiniMaxAI/MiniMax-M2.5": "minimax-m2",
    "moonshotai/Kimi-K2.5": "kimi-k2",
}


def load_moe(csv: Path = SERVING_CSV) -> tuple[list[ServingRow], dict[str, int]]:
    """The aggregated MoE rows of catalog models on catalog GPUs and engines (none is fitted
    on: the constants are the dense fits'), and how many others were skipped why."""
    df = pd.read_csv(csv)
    rows: list[ServingRow] = []
    skipped: dict[str, int] = defaultdict(int)
    for i, r in df.iterrows():
        if r["mode"] != "agg" or r.model_path not in MOE_MODELS:
            continue
        precision = _serving_precision(r)
        if load_model(MOE_MODELS[r.model_path]).expert_format:
            # gpt-oss: MXFP4 experts (the model's expert_format), the rest in 16-bit.
            precision = "bf16"
        adp = 1 if pd.isna(r.attention_dp_size) else int(r.attention_dp_size)
        ep = 1 if pd.isna(r.moe_ep_size) else int(r.moe_ep_size)
        mtp = 1 if pd.isna(r.moe_tp_size) else int(r.moe_tp_size)
        tp, ep = _unsquared(int(r.tp_size), adp, mtp, ep)
        # batch_size is per attention-DP rank on these rows: the run's own concurrency is in
        # its provenance (silicon_concurrency=N).
        conc = re.search(r"silicon_concurrency=(\d+)", str(r.silicon_data_source))
        concurrency = int(conc.group(1)) if conc else int(r.batch_size) * adp
        why = ("system not in the GPU catalog" if r.system not in SERVING_GPUS
               else f"engine {r.backend}" if r.backend not in ("trtllm", "vllm")
               else "FP4 needs Blackwell" if precision == "fp4"
               and SERVING_GPUS[r.system] != "b200"
               else "layout outside MoE TP x EP = tp" if tp % ep else "")
        if why:
            skipped[why] += 1
            continue
        rows.append(ServingRow(
            index=int(i), engine=r.backend, version=str(r.backend_version),
            gpu=SERVING_GPUS[r.system], model=MOE_MODELS[r.model_path], precision=precision,
            tp=tp, pp=int(r.pp_size), isl=int(r.isl), osl=int(r.osl),
            concurrency=concurrency, ttft_ms=float(r.silicon_ttft_ms),
            tpot_ms=float(r.silicon_tpot_ms), harness=_harness(str(r.silicon_data_source)),
            sweep=_sweep(str(r.silicon_data_source)), ep=ep, attention_dp=adp > 1,
            measured=_measured(str(r.silicon_data_source))))
    return rows, dict(skipped)


def _unsquared(tp: int, adp: int, moe_tp: int, ep: int) -> tuple[int, int]:
    """(GPUs per stage, EP) of a MoE row. Some rows square the GPU count of an expert-parallel
    layout (AIConfigurator's encodings: TensorRT-LLM's EP over N GPUs as tp N^2, moe_tp N,
    ep N; its attention DP as attention_dp N^2, moe_tp N, ep N; vLLM's DP + EP as tp N,
    attention_dp N, ep N^2; the same runs appear unsquared on earlier dates): such a row runs on
    N GPUs, every one holding its own experts."""
    world = tp * adp
    root = math.isqrt(world)
    if root > 1 and root * root == world and (
            # TensorRT-LLM's forms only beyond one node (tp 4, moe_tp 2, ep 2 is a real layout)
            (moe_tp == ep == root and world > 8)
            or (moe_tp == 1 and tp == adp == root and ep == world)):
        return root, root
    return world, ep


def predict_moe(row: ServingRow) -> tuple[float, float, float]:
    """Modelled (mean TTFT ms, mean TPOT ms, output tok/s per GPU) of a MoE row."""
    p = serving_point(row)
    if p is None:
        return math.nan, math.nan, math.nan
    return p.latency("ttft", "mean"), p.latency("tpot", "mean"), p.output_throughput_per_gpu


def _measured_per_gpu(s: ServingRow) -> float:
    """Output tok/s per GPU of a measured row (shared/data/README.md's formula)."""
    return s.concurrency * s.osl / (s.ttft_ms + (s.osl - 1) * s.tpot_ms) * 1000 / (s.tp * s.pp)


def report_moe(rows: list[ServingRow], preds: list[tuple[float, float, float]],
               skipped: dict[str, int]) -> dict:
    """TPOT and TTFT MAPE per engine, GPU and model, and whether the model ranks the layout
    families right wherever the data measured two or more at the same point."""
    print("\nMixture-of-experts models, aggregated serving (no MoE constant is fitted: every "
          "row is unseen)\n")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if not math.isnan(preds[i][1]):
            groups[(r.engine, r.gpu, r.model)].append(i)
    print(f"{'engine':7} {'GPU':5} {'model':16} {'rows':>5} {'TPOT':>7} {'TTFT':>7}  layouts")
    out = {"groups": []}
    for key in sorted(groups):
        idx = groups[key]
        tpot = mape([ape(preds[i][1], rows[i].tpot_ms) for i in idx])
        ttft = mape([ape(preds[i][0], rows[i].ttft_ms) for i in idx])
        fams = sorted({rows[i].family for i in idx})
        print(f"{key[0]:7} {key[1]:5} {key[2]:16} {len(idx):>5} {tpot:>6.1f}% {ttft:>6.1f}%  "
              f"{', '.join(fams)}")
        out["groups"].append({"engine": key[0], "gpu": key[1], "model": key[2],
                              "rows": len(idx), "tpot_mape": tpot, "ttft_mape": ttft})
    failed = sum(1 for p in preds if math.isnan(p[1]))
    # Layout ranking: the same engine, GPU, model, precision, lengths and concurrency measured
    # with two or more families; the fastest per user (lowest TPOT) and the most per GPU.
    points: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        s = r
        if not math.isnan(preds[i][1]):
            points[(s.engine, s.gpu, s.model, s.precision, s.isl, s.osl,
                    s.concurrency)].append(i)
    ranked = {"user": [0, 0], "gpu": [0, 0]}
    by_band: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for idx in points.values():
        best_family: dict[str, int] = {}
        for i in idx:  # each family's best layout at this point, by the measurement
            f = rows[i].family
            if f not in best_family or (rows[i].tpot_ms
                                        < rows[best_family[f]].tpot_ms):
                best_family[f] = i
        if len(best_family) < 2:
            continue
        cands = list(best_family.values())
        user_ok = (min(cands, key=lambda i: rows[i].tpot_ms)
                   == min(cands, key=lambda i: preds[i][1]))
        gpu_ok = (max(cands, key=lambda i: _measured_per_gpu(rows[i]))
                  == max(cands, key=lambda i: preds[i][2]))
        band = rows[cands[0]].band
        for name, ok in (("user", user_ok), ("gpu", gpu_ok)):
            ranked[name][0] += ok
            ranked[name][1] += 1
        b = by_band[band]
        b[0] += user_ok
        b[1] += 1
        b[2] += gpu_ok
        b[3] += 1
    print(f"\n{failed} rows the model cannot run (out of memory in its plan); skipped: "
          + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    if ranked["user"][1]:
        print(f"layout family ranked right where two or more were measured at one point: "
              f"fastest per user {ranked['user'][0]}/{ranked['user'][1]}, most per GPU "
              f"{ranked['gpu'][0]}/{ranked['gpu'][1]}")
        for band, (u, n, g, m) in sorted(by_band.items()):
            print(f"  concurrency {band:>6}: per user {u}/{n}, per GPU {g}/{m}")
    out["ranking"] = ranked
    return out


def queue_slopes(rows: list[ServingRow], max_concurrency: int = 64) -> dict[str, tuple]:
    """Per sweep: how measured TTFT grows with one request's duration / concurrency
    (OSL x TPOT / concurrency) between rows of the same deployment, ISL and concurrency that
    differ in OSL, on the fit rows at concurrency <= ``max_concurrency`` (above it the KV
    cache can bind). A client one request ahead of the engine's batch gives a slope of 1
    (``QUEUED_SWEEPS``), one that is not about 0. Returns sweep -> (rows, pairs, slope)."""
    groups: dict[str, dict[tuple, list[ServingRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not r.held_out and r.concurrency <= max_concurrency:
            groups[r.sweep or r.harness][(r.engine, r.version, r.gpu, r.model, r.precision,
                                          r.tp, r.pp, r.ep, r.attention_dp, r.isl,
                                          r.concurrency)].append(r)
    out = {}
    for sweep, by_key in sorted(groups.items()):
        xs, ys = [], []
        for same in by_key.values():
            if len({r.osl for r in same}) < 2:
                continue
            waits = [r.osl * r.tpot_ms / r.concurrency for r in same]
            mean_wait, mean_ttft = statistics.fmean(waits), statistics.fmean(
                r.ttft_ms for r in same)
            xs += [w - mean_wait for w in waits]
            ys += [r.ttft_ms - mean_ttft for r in same]
        n = sum(len(v) for v in by_key.values())
        slope = (sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
                 if len(xs) > 3 and any(xs) else math.nan)
        out[sweep] = (n, len(xs), slope)
    return out


def implied_peak_share(row: ServingRow) -> float:
    """The share of the GPU's dense peak (its precision's FLOP/s) that a dense row's measured
    rate needs for the linear layers alone: requests/s (concurrency over one request's
    duration) x 2 FLOPs per parameter and token (the layers' for ISL + OSL tokens, the LM
    head's for OSL), over its tp x pp GPUs. Attention,
    element-wise work and the engine's gaps come on top, so a share near 1 is more than the
    GPU can do at the lengths the row states."""
    m, gpu = serving_model(row.model), load_gpu(row.gpu)
    rate = row.concurrency / ((row.ttft_ms + (row.osl - 1) * row.tpot_ms) / 1000)
    # Every token passes the layers; only a produced token the LM head (a prompt's logits are
    # the last position's); the input embedding is a lookup, no GEMM.
    layers = m.total_params - (1 if m.tied_embeddings else 2) * m.embedding_params
    flops = rate * 2 * ((row.isl + row.osl) * layers + row.osl * m.embedding_params)
    flops /= row.tp * row.pp
    return flops / gpu.peak_flops(row.precision)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--rows", action="store_true", help="print every row's error")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--serving-csv", type=Path, default=SERVING_CSV)
    ap.add_argument("--only", choices=("throughput", "latency", "405b", "moe"),
                    help="print one part only")
    ap.add_argument("--sweeps", action="store_true",
                    help="print each serving sweep's TTFT slope (QUEUED_SWEEPS), the rows whose "
                         "rate needs the most of the GPU's peak, and stop")
    args = ap.parse_args(argv)
    if args.sweeps:
        dense = load_serving(args.serving_csv)[0]
        everything = dense + load_moe(args.serving_csv)[0]
        print("sweep (fit rows, concurrency <= 64)                                 rows  pairs "
              "slope  queued")
        for sweep, (n, pairs, slope) in queue_slopes(everything).items():
            print(f"{sweep:68} {n:5} {pairs:5} {slope:6.2f}  {QUEUED_SWEEPS.get(sweep, 0)}")
        heavy = sorted(((implied_peak_share(r), r) for r in dense), key=lambda x: -x[0])
        print(f"\nthe 10 of {len(dense)} dense rows whose measured rate needs the largest share "
              f"of the GPU's dense peak for the linear layers alone (implied_peak_share)")
        for share, r in heavy[:10]:
            print(f"  line {r.index + 2:5} {r.engine} {r.gpu} {r.model} {r.precision} tp{r.tp} "
                  f"{r.isl}/{r.osl} c{r.concurrency}: {share:.2f}"
                  f"{' (held out)' if r.held_out else ''}  {r.sweep or r.harness}")
        return 0
    if args.only in (None, "throughput"):
        rows, skipped = load_rows(args.csv)
        preds = [p for p, _ in predict_all(rows, jobs=args.jobs)]
        report(rows, preds, skipped, show_rows=args.rows)
        print_skipped(skipped)
        report_online(load_online(args.csv))
    if args.only in (None, "latency"):
        serving, skipped_serving = load_serving(args.serving_csv)
        report_serving(serving, predict_serving_all(serving, jobs=args.jobs), skipped_serving,
                       show_rows=args.rows)
    if args.only in (None, "405b"):
        layouts_405b()
    if args.only in (None, "moe"):
        moe, skipped_moe = load_moe(args.serving_csv)
        with ProcessPoolExecutor(args.jobs) as pool:
            preds = list(pool.map(predict_moe, moe, chunksize=4))
        report_moe(moe, preds, skipped_moe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
