"""The model's latency regime: small all-reduces, per-layer and per-request fixed costs, the
constants of each serving engine, and the closed-loop benchmark a measured point came from.

Directions and ranges, checked on the shipped constants of every engine (the fitted numbers
themselves are reported by benchmarks/accuracy.py, not asserted here).
"""

from dataclasses import fields, replace

import numpy as np
import pytest

from autotune.config import EngineConfig
from autotune.model import (
    BOUNDS,
    DEFAULT_ENGINE,
    ENGINE_CONSTANTS,
    ENGINES,
    Benchmark,
    Calibration,
    PerfModel,
    Simulator,
    load_calibration,
)
from autotune.specs import Workload, load_gpu, load_model

H100, H200 = load_gpu("h100"), load_gpu("h200")
L8, L70, L405 = (load_model("llama-3.1-8b"), load_model("llama-3.1-70b"),
                 load_model("llama-3.1-405b"))
SHIPPED = [(gpu, precision, engine) for gpu, precision in
           (("h100", "fp8"), ("h100", "bf16"), ("h200", "fp8"), ("h200", "bf16"), ("b200", "fp4"))
           for engine in ENGINES]
#: Engine-specific constants: the rest belong to the GPU and are shared by every engine.
ENGINE_OWNED = set(ENGINE_CONSTANTS)


def token_time(model, gpu, tp, precision="fp8", engine=None, ctx=2048):
    """Seconds of one decode step of one request (batch 1) with the shipped constants."""
    p = PerfModel(model, gpu, EngineConfig(tp=tp, precision=precision), engine=engine)
    return p.iteration_time(1, 1, ctx, 0.0)


# ---- batch 1: more TP on NVLink is never slower -----------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model,gpu,precision,tps", [
    pytest.param(L8, H100, "bf16", (1, 2, 4, 8), id="8b-h100-bf16"),
    pytest.param(L8, H100, "fp8", (1, 2, 4, 8), id="8b-h100-fp8"),
    pytest.param(L8, H200, "fp8", (1, 2, 4, 8), id="8b-h200-fp8"),
    pytest.param(L70, H100, "fp8", (1, 2, 4, 8), id="70b-h100-fp8"),
    pytest.param(L405, H200, "fp8", (4, 8), id="405b-h200-fp8"),
])
def test_more_tp_is_not_slower_per_token_at_batch_1(model, gpu, precision, tps, engine):
    times = [token_time(model, gpu, tp, precision, engine) for tp in tps]
    assert times == sorted(times, reverse=True), dict(zip(tps, times))


def test_tp2_beats_tp1_for_8b_on_h100_nvlink():
    # Half the weights per GPU (~3 ms of HBM time saved) against 64 small all-reduces.
    assert token_time(L8, H100, 2, "bf16") < 0.8 * token_time(L8, H100, 1, "bf16")


def test_405b_tp8_token_stays_near_its_bandwidth_floor():
    # 51.3 GB of weights per GPU at 4.8 TB/s: 10.7 ms; NVIDIA measured ~18 ms.
    p = PerfModel(L405, H200, EngineConfig(tp=8, precision="fp8"))
    floor = p.memory().weights / (H200.mem_bw_tb_s * 1e12)
    t = token_time(L405, H200, 8)
    assert floor < t < 2.0 * floor


# ---- all-reduce: latency + bytes over bus bandwidth -------------------------------------
@pytest.mark.parametrize("gpu,precision,engine", SHIPPED)
def test_all_reduce_grows_with_bytes_from_a_physical_latency(gpu, precision, engine):
    p = PerfModel(L70, load_gpu(gpu), EngineConfig(tp=8, precision=precision), engine=engine)
    sizes = [0, 1, 64, 1024, 8192]
    costs = [p.allreduce_time(n) for n in sizes]
    assert costs == sorted(costs) and costs[-1] > costs[1]
    lo, hi = BOUNDS["ar_latency_us"]
    assert lo <= costs[0] * 1e6 <= hi  # a message of nothing costs just the latency
    # tp=1 has no all-reduce at all.
    p1 = PerfModel(L70, load_gpu(gpu), EngineConfig(tp=1, precision=precision), engine=engine)
    assert p1.allreduce_time(1024) == 0.0


@pytest.mark.parametrize("gpu,precision,engine", SHIPPED)
def test_shipped_constants_are_within_their_physical_ranges(gpu, precision, engine):
    cal = load_calibration(gpu, precision, engine=engine)
    assert cal.out_of_bounds() == []
    assert set(BOUNDS) == {f.name for f in fields(Calibration)}  # every constant has a range


def test_out_of_bounds_names_the_constant():
    assert replace(Calibration(), ar_latency_us=45.0).out_of_bounds() == ["ar_latency_us"]


# ---- fixed costs: per layer, per request -------------------------------------------------
def test_per_layer_fixed_cost_applies_without_tensor_parallelism():
    cal = Calibration()
    cfg = EngineConfig(tp=1, precision="fp8")
    base = PerfModel(L8, H100, cfg, replace(cal, layer_overhead_us=1.0))
    more = PerfModel(L8, H100, cfg, replace(cal, layer_overhead_us=21.0))
    extra = more.iteration_time(1, 1, 1024, 0.0) - base.iteration_time(1, 1, 1024, 0.0)
    assert extra == pytest.approx(L8.layers * 20e-6)


def test_request_overhead_delays_the_first_token_not_the_next_ones():
    cfg = EngineConfig(tp=1, precision="fp8", max_batch_size=8)
    work = Workload(isl=512, osl=64)

    def point(ms):
        sim = Simulator(L8, H100, replace(Calibration(), request_overhead_ms=ms))
        (p,) = sim.measure(cfg, work, [4]).load_points
        return p

    a, b = point(1.0), point(51.0)
    assert b.latency("ttft", "mean") - a.latency("ttft", "mean") == pytest.approx(50.0, rel=1e-6)
    assert b.latency("tpot", "mean") == pytest.approx(a.latency("tpot", "mean"))


# ---- one calibration per engine ----------------------------------------------------------
def test_a_vllm_calibration_is_loaded_for_engine_vllm():
    trt = load_calibration("h100", "fp8")
    assert load_calibration("h100", "fp8", engine=DEFAULT_ENGINE) == trt
    vllm = load_calibration("h100", "fp8", engine="vllm")
    assert vllm != trt
    changed = {f.name for f in fields(Calibration) if getattr(vllm, f.name) != getattr(trt, f.name)}
    assert changed and changed <= ENGINE_OWNED  # the GPU's physics is shared
    sim = Simulator(L70, H100, engine="vllm")
    assert sim.perf(EngineConfig(tp=4, precision="fp8")).cal == vllm
    with pytest.raises(ValueError, match="engine"):
        load_calibration("h100", "fp8", engine="tgi")


# ---- the benchmark a measured point came from --------------------------------------------
def test_benchmark_lengths_are_uniform_below_the_nominal_length():
    lengths = Benchmark().lengths(1000, 5000, np.random.default_rng(0))
    assert lengths.min() >= 800 and lengths.max() <= 1000
    assert 880 < lengths.mean() < 920


def test_a_staggered_closed_loop_waits_less_for_its_first_token_than_a_burst():
    cfg = EngineConfig(tp=1, precision="fp8", max_batch_size=64, max_num_tokens=2048)
    work = Workload(isl=2048, osl=256)
    cal = Calibration()

    def ttft(bench):
        (p,) = Simulator(L8, H100, cal, benchmark=bench).measure(cfg, work, [64]).load_points
        return p.latency("ttft", "mean"), p.num_requests

    burst, n_burst = ttft(Benchmark(prompts_per_concurrency=1, range_ratio=1.0))
    steady, n_steady = ttft(Benchmark())
    assert (n_burst, n_steady) == (64, 640)
    # 64 prompts of 2048 tokens through a 2048-token budget: the burst's mean request waits
    # for ~32 prefills; in the steady state a prompt arrives when a slot frees up.
    assert steady < 0.5 * burst


@pytest.mark.parametrize("concurrency", [8, 32])
def test_a_client_one_request_ahead_of_the_batch_waits_for_the_next_completion(concurrency):
    # The engine takes `concurrency` requests; a harness that keeps one more in flight makes
    # every new request wait for the next completion: TTFT grows by about one request's
    # duration / concurrency (the mean gap between completions), the decode speed does not
    # change (the batch is the same), and the wait shrinks as concurrency rises.
    cfg = EngineConfig(tp=1, precision="fp8", max_batch_size=concurrency, max_num_tokens=8192)
    work = Workload(isl=1024, osl=512)
    cal = Calibration()

    def point(queued):
        sim = Simulator(L8, H100, cal, benchmark=Benchmark(queued=queued))
        (p,) = sim.measure(cfg, work, [concurrency]).load_points
        return p

    plain, ahead = point(0), point(1)
    duration = plain.latency("tpot", "mean") * 0.9 * work.osl  # lengths average 0.9 x nominal
    extra = ahead.latency("ttft", "mean") - plain.latency("ttft", "mean")
    assert 0.7 * duration / concurrency < extra < 1.3 * duration / concurrency
    assert ahead.latency("tpot", "mean") == pytest.approx(plain.latency("tpot", "mean"), rel=0.05)
    assert ahead.num_requests == plain.num_requests  # the same prompts, 10 per concurrency
