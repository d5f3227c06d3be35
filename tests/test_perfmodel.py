"""The performance model's physics: memory, iteration time, TP and PP behaviour.

These check directions and relations (more bandwidth is faster, weights shrink with TP, the
slowest pipeline stage sets the pace...), not fitted numbers.
"""

import json
from dataclasses import replace

import pytest
import yaml

from autotune.config import EngineConfig
from autotune.errors import OutOfMemory
from autotune.measurement import MAX_CONCURRENCY
from autotune.model import (
    BACKEND_CONSTANTS,
    BACKENDS,
    Calibration,
    PerfModel,
    Simulator,
    calibration_file,
    load_calibration,
)
from autotune.model.perf import EMBED_BYTES
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario
from autotune.specs import PRECISIONS, load_gpu, load_model, model_from_hf_config

CAL = Calibration()  # fixed constants: the physics, not the fit
H100, H200 = load_gpu("h100"), load_gpu("h200")
L70, L405, L8 = (load_model("llama-3.1-70b"), load_model("llama-3.1-405b"),
                 load_model("llama-3.1-8b"))


def perf(model=L70, gpu=H100, cal=CAL, **cfg):
    cfg.setdefault("precision", "fp8")
    return PerfModel(model, gpu, EngineConfig(**cfg), cal)


def decode(p, batch=64, ctx=1024):
    return p.iteration_time(batch, batch, batch * ctx, 0.0)


def prefill(p, tokens=8192):
    return p.iteration_time(tokens, 1, 0.0, tokens * tokens / 2)


def max_throughput(scenario, calibration=None, **cfg):
    runner = SimRunner(scenario, calibration)
    config = EngineConfig(precision=scenario.precision, kv_fraction=0.9, **cfg)
    (p,) = runner.measure(config, scenario.workload, [MAX_CONCURRENCY]).load_points
    return p.output_throughput


# ---- time ---------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_more_bandwidth_means_faster_decode_and_more_throughput(factor):
    fast = replace(H100, mem_bw_tb_s=H100.mem_bw_tb_s * factor)
    assert decode(perf(gpu=fast, tp=2)) < decode(perf(tp=2))
    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=1, precision="fp8",
                          isl=128, osl=512, slo=None)
    assert max_throughput(replace(scen, gpu=fast), CAL) > max_throughput(scen, CAL)


@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_more_flops_means_faster_prefill_and_more_throughput(factor):
    fast = replace(H100, tflops={k: v * factor for k, v in H100.tflops.items()})
    assert prefill(perf(gpu=fast, tp=2)) < prefill(perf(tp=2))
    # Decode of a small batch reads weights: FLOPs barely matter there.
    assert decode(perf(gpu=fast, tp=2), batch=1) == pytest.approx(decode(perf(tp=2), batch=1),
                                                                  rel=0.05)
    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=1, precision="fp8",
                          isl=2048, osl=64, slo=None)
    assert max_throughput(replace(scen, gpu=fast), CAL) > max_throughput(scen, CAL)


def test_iteration_time_grows_with_tokens_and_context():
    p = perf(tp=4)
    assert decode(p, batch=256) > decode(p, batch=16) > decode(p, batch=1)
    assert decode(p, ctx=8192) > decode(p, ctx=128)
    assert prefill(p, 8192) > prefill(p, 2048)


def test_small_batches_are_memory_bound_large_ones_compute_bound():
    p = perf(tp=1, model=L8)
    # Up to a few tokens the weights dominate: 8x the tokens costs far less than 8x the time.
    assert decode(p, batch=8, ctx=16) < 1.2 * decode(p, batch=1, ctx=16)
    # Prefill is FLOP-bound: twice the tokens, about twice the time.
    assert prefill(p, 16384) / prefill(p, 8192) > 1.8


def test_tensor_parallel_decode_is_faster_but_not_linearly():
    t1 = decode(perf(model=L8, tp=1), batch=1)
    t8 = decode(perf(model=L8, tp=8), batch=1)
    assert t8 < t1 < 8 * t8  # all-reduces and fixed costs do not shrink with TP


def test_all_reduce_costs_time():
    free_comms = replace(CAL, ar_latency_us=1e-6, ar_bw_eff=1e6)
    assert decode(perf(tp=8, cal=free_comms)) < decode(perf(tp=8))
    # ... and tp=1 has none to save.
    assert decode(perf(tp=1, cal=free_comms)) == pytest.approx(decode(perf(tp=1)))


def test_pipeline_adds_latency_for_one_sequence():
    one = perf(model=L405, gpu=H200, tp=1, pp=8)
    assert one.iteration_time(1, 1, 2048, 0) >= perf(model=L405, gpu=H200, tp=1).iteration_time(
        1, 1, 2048, 0)


def test_slowest_stage_sets_the_pipeline_pace():
    # 10 layers over 4 stages is 3+3+2+2: the two short stages wait for the long ones, so adding
    # a layer to each of them (3+3+3+3) costs nothing at saturation. (A small vocabulary keeps
    # the LM head, which the last stage adds, out of the comparison.)
    uneven = replace(L8, name="ten", layers=10, vocab=1024)
    even = replace(L8, name="twelve", layers=12, vocab=1024)
    batch, ctx, cal = 512, 512, replace(CAL, iter_overhead_ms=0.0, seq_overhead_us=0.0)
    t_uneven = decode(perf(model=uneven, pp=4, cal=cal), batch=batch, ctx=ctx)
    t_even = decode(perf(model=even, pp=4, cal=cal), batch=batch, ctx=ctx)
    assert t_even == pytest.approx(t_uneven, rel=0.03)
    # Without pipelining, 12 layers take 20% longer than 10.
    assert decode(perf(model=even, cal=cal), batch=batch, ctx=ctx) == \
        pytest.approx(1.2 * decode(perf(model=uneven, cal=cal), batch=batch, ctx=ctx), rel=0.01)


def test_moe_decode_reads_only_the_experts_it_routes_to():
    mixtral = load_model("mixtral-8x7b")
    p = perf(model=mixtral, tp=1)
    one = p.layer_time(1, 0, 0)
    dense_equivalent = (p.attn_w + mixtral.experts * p.expert_w) / p.bw
    assert one < 0.5 * dense_equivalent  # 2 of 8 experts read
    assert p.layer_time(64, 0, 0) > 2 * one  # 64 tokens touch nearly every expert


# ---- memory -------------------------------------------------------------------------------
def test_weights_per_gpu_shrink_with_tp_and_pp():
    w = {(tp, pp): perf(tp=tp, pp=pp).memory().weights for tp, pp in [(1, 1), (2, 1), (8, 1),
                                                                     (1, 2), (1, 8)]}
    assert w[(2, 1)] == pytest.approx(w[(1, 1)] / 2, rel=0.01)
    assert w[(8, 1)] == pytest.approx(w[(1, 1)] / 8, rel=0.05)  # KV projections replicated
    assert w[(1, 8)] < w[(1, 2)] < w[(1, 1)]


def test_embedding_on_the_first_stage_and_lm_head_on_the_last():
    m, bytes_w = L8, PRECISIONS["fp8"][0]
    layer = perf(model=m).attn_w + perf(model=m).expert_w
    embedding = m.vocab * m.hidden * EMBED_BYTES
    one_stage = perf(model=m).memory().weights
    assert one_stage == pytest.approx(m.layers * layer + 2 * embedding, rel=1e-6)
    # With two stages each holds half the layers and one of the two vocabulary matrices.
    assert perf(model=m, pp=2).memory().weights == \
        pytest.approx(m.layers / 2 * layer + embedding, rel=1e-6)
    assert bytes_w == 1.0


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    per_token = {tp: perf(tp=tp).memory().kv_bytes_per_token for tp in (1, 2, 4, 8, 16)}
    assert per_token[2] == per_token[1] / 2 and per_token[8] == per_token[1] / 8
    assert per_token[16] == per_token[8]  # 8 KV heads: each GPU keeps at least one


def test_kv_cache_holds_fewer_longer_requests_and_grows_with_its_fraction():
    mem = perf(tp=4).memory()
    assert mem.fits
    assert mem.requests_that_fit(1024) > mem.requests_that_fit(8192) > 0
    assert perf(tp=4, kv_fraction=0.95).memory().kv_tokens > \
        perf(tp=4, kv_fraction=0.5).memory().kv_tokens
    # Activations sized for more tokens per iteration leave less room for the KV cache.
    assert perf(tp=4, max_num_tokens=16384).memory().kv_tokens < \
        perf(tp=4, max_num_tokens=2048).memory().kv_tokens


def test_configs_that_do_not_fit_are_infeasible_with_the_reason():
    scen = Scenario.build(model="llama-3.1-405b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=2048, osl=128, slo=None)
    assert not perf(model=L405, tp=1).memory().fits
    with pytest.raises(OutOfMemory, match="GiB"):
        Simulator(scen.model, scen.gpu).capacity(EngineConfig(tp=2, precision="fp8"),
                                                 scen.workload)
    # 8 GPUs hold it.
    Simulator(scen.model, scen.gpu).capacity(EngineConfig(tp=8, precision="fp8"), scen.workload)


# ---- TP and PP end to end (the shipped constants) ----------------------------------------
@pytest.fixture(scope="module")
def llama405_h200():
    return Scenario.build(model="llama-3.1-405b", gpu="h200", num_gpus=8, precision="fp8",
                          isl=2048, osl=128, slo=None)


def test_tp_wins_at_concurrency_1_and_pp_at_saturation(llama405_h200):
    scen = llama405_h200

    def at(load, tp, pp):
        cfg = EngineConfig(tp=tp, pp=pp, precision="fp8")
        (p,) = SimRunner(scen).measure(cfg, scen.workload, [load]).load_points
        return p

    tp8, pp8 = at(1, 8, 1), at(1, 1, 8)
    assert tp8.output_throughput_per_user > 3 * pp8.output_throughput_per_user
    assert tp8.latency("ttft", "mean") < pp8.latency("ttft", "mean")
    assert at(MAX_CONCURRENCY, 1, 8).output_throughput > at(MAX_CONCURRENCY, 8, 1).output_throughput
    # Mixed layouts sit in between at concurrency 1.
    mixed = at(1, 4, 2).output_throughput_per_user
    assert pp8.output_throughput_per_user < mixed < tp8.output_throughput_per_user


def test_pipeline_needs_micro_batches_to_pay_off(llama405_h200):
    scen = llama405_h200

    def tput(load):
        cfg = EngineConfig(tp=1, pp=8, precision="fp8")
        (p,) = SimRunner(scen).measure(cfg, scen.workload, [load]).load_points
        return p.output_throughput

    assert tput(8) > 4 * tput(1)  # eight stages busy instead of one


# ---- constants and specs ------------------------------------------------------------------
@pytest.mark.parametrize("gpu,precision", [("h100", "fp8"), ("h100", "bf16"), ("h200", "fp8"),
                                           ("b200", "fp4")])
def test_shipped_constants_are_few_and_physical(gpu, precision):
    name = calibration_file(gpu, precision)
    assert name == f"{gpu}-{precision}.yaml"
    from importlib import resources
    data = yaml.safe_load(resources.files("autotune").joinpath("data", "calibration", name)
                          .read_text())
    backends = data.pop("backends", {}) or {}
    assert len(data) <= 12  # every constant has one meaning (see calibration.BOUNDS)
    assert set(backends) <= set(BACKENDS)
    for over in backends.values():
        assert set(over) == set(BACKEND_CONSTANTS)  # the runtime's, not the GPU's
    cal = load_calibration(gpu, precision)
    for eff in (cal.gemm_eff, cal.mem_eff, cal.attn_eff, cal.ar_bw_eff):
        assert 0 < eff <= 1
    assert cal.ar_latency_us > 0 and cal.iter_overhead_ms > 0
    assert cal.out_of_bounds() == []  # each within its physical range


def test_back_end_overrides_and_unknown_back_ends():
    base, trt = load_calibration("h100", "fp8"), load_calibration("h100", "fp8", "trt")
    assert replace(trt, iter_overhead_ms=base.iter_overhead_ms,
                   layer_overhead_us=base.layer_overhead_us) == base
    assert trt.layer_overhead_us < base.layer_overhead_us  # an engine fuses a layer's kernels
    with pytest.raises(ValueError, match="back end"):
        load_calibration("h100", "fp8", "vllm")
    # A GPU/precision without a file borrows the GPU's other precision, else the defaults.
    assert calibration_file("h200", "bf16") is not None
    assert calibration_file("a100", "bf16") is None
    assert load_calibration("a100", "bf16").gemm_eff > 0


def test_a_user_gpu_and_a_hf_config_are_modelled(tmp_path):
    gpu = tmp_path / "l40s.yaml"
    gpu.write_text(yaml.safe_dump({"name": "l40s", "memory_gib": 44.5, "mem_bw_tb_s": 0.864,
                                   "tflops": {"bf16": 362, "fp8": 733}, "nvlink_gb_s": 32}))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
        "num_local_experts": 8, "num_experts_per_tok": 2, "_name_or_path": "my-moe"}))
    model = model_from_hf_config(cfg)
    assert model.is_moe and model.experts_per_token == 2
    slow = PerfModel(model, load_gpu(str(gpu)), EngineConfig(tp=2, precision="fp8"))
    fast = PerfModel(model, H100, EngineConfig(tp=2, precision="fp8"))
    assert decode(slow) > 2 * decode(fast)  # a PCIe card without NVSwitch, a quarter of the HBM
    assert not slow.memory().fits or slow.memory().kv_tokens < fast.memory().kv_tokens


def test_a_file_that_gives_a_back_end_or_an_engine_the_gpus_constants_is_refused(
        tmp_path, monkeypatch):
    from importlib import resources

    from autotune.model import calibration
    shipped = resources.files("autotune").joinpath("data", "calibration")
    (tmp_path / "engines").mkdir()
    (tmp_path / "default.yaml").write_text(shipped.joinpath("default.yaml").read_text())
    (tmp_path / "h100-fp8.yaml").write_text(
        "gemm_eff: 0.7\nbackends:\n  trt: {iter_overhead_ms: 1.0, gemm_eff: 0.5}\n")
    (tmp_path / "engines" / "vllm.yaml").write_text("layer_overhead_us: 20\nmem_eff: 0.9\n")
    monkeypatch.setattr(calibration, "_calibration_folder", lambda: tmp_path)
    calibration.load_calibration.cache_clear()
    try:
        assert calibration.load_calibration("h100", "fp8").gemm_eff == 0.7
        with pytest.raises(ValueError, match="gemm_eff, which belong to the GPU"):
            calibration.load_calibration("h100", "fp8", "trt")
        with pytest.raises(ValueError, match="mem_eff, which belong to the GPU"):
            calibration.load_calibration("h100", "fp8", engine="vllm")
    finally:
        calibration.load_calibration.cache_clear()
