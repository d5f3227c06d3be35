"""Mixture-of-experts models: their specs, the ep / attention-DP layouts and their rules, the
model's MoE physics (directions, not fitted numbers) and the engines' command lines."""

import json

import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig, parse_layout
from autotune.errors import InvalidConfig
from autotune.measurement import MAX_CONCURRENCY
from autotune.model import Calibration, Simulator, check_layout
from autotune.runners.trtllm.argv import llm_api_options, serve_argv, throughput_argv
from autotune.runners.vllm.argv import engine_args, flags
from autotune.scenario import Scenario
from autotune.space import Layout, SearchSpace
from autotune.specs import Workload, load_gpu, load_model, model_from_hf_config

R1 = load_model("deepseek-r1")
H200 = load_gpu("h200")
CAL = Calibration()  # fixed constants: the physics, not the fit

DEEPSEEK_V3_CONFIG = {  # the published config.json's architecture fields
    "num_hidden_layers": 61, "hidden_size": 7168, "num_attention_heads": 128,
    "num_key_value_heads": 128, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1,
    "first_k_dense_replace": 3, "vocab_size": 129280, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "max_position_embeddings": 163840, "_name_or_path": "deepseek-ai/DeepSeek-V3",
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}


def sim_point(model, config, load, isl=1024, osl=1024, gpu=H200):
    (p,) = Simulator(model, gpu, CAL).measure(config, Workload(isl, osl), [load]).load_points
    return p


# ---- specs ---------------------------------------------------------------------------------
def test_a_deepseek_config_json_is_read_as_the_catalog_describes_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DEEPSEEK_V3_CONFIG))
    parsed = model_from_hf_config(path)
    catalog = load_model("deepseek-v3")
    for field in ("layers", "hidden", "heads", "ffn", "experts", "experts_per_token",
                  "shared_experts", "shared_ffn", "dense_layers", "dense_ffn", "kv_lora_rank",
                  "q_lora_rank", "rope_head_dim", "v_head_dim", "head_dim", "max_context"):
        assert getattr(parsed, field) == getattr(catalog, field), field
    assert parsed.is_moe and parsed.is_mla
    assert 665e9 < parsed.total_params < 675e9  # DeepSeek-V3: 671B without the MTP module
    # MLA caches one 576-wide latent per token and layer, not 2 x 128 heads x 192.
    assert parsed.kv_width == 512 + 64


def test_gpt_oss_experts_are_mxfp4_and_half_its_layers_slide(tmp_path):
    cfg = {"num_hidden_layers": 4, "hidden_size": 2880, "num_attention_heads": 64,
           "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880,
           "num_local_experts": 128, "num_experts_per_tok": 4, "vocab_size": 201088,
           "sliding_window": 128, "quantization_config": {"quant_method": "mxfp4"},
           "layer_types": ["sliding_attention", "full_attention"] * 2}
    path = tmp_path / "gpt-oss.json"
    path.write_text(json.dumps(cfg))
    m = model_from_hf_config(path)
    assert (m.expert_format, m.sliding_layers, m.sliding_window) == ("mxfp4", 2, 128)
    assert 115e9 < load_model("gpt-oss-120b").total_params < 119e9  # 117B published
    # MXFP4 experts weigh about half of FP8 ones.
    fp8 = load_model("gpt-oss-120b").__class__(**{**load_model("gpt-oss-120b").to_dict(),
                                                  "expert_format": ""})
    cfg8 = EngineConfig(tp=1, precision="fp8")
    w4 = Simulator(load_model("gpt-oss-120b"), H200, CAL).perf(cfg8).memory().weights
    w8 = Simulator(fp8, H200, CAL).perf(cfg8).memory().weights
    assert 0.5 < w4 / w8 < 0.6


# ---- layouts -------------------------------------------------------------------------------
@pytest.mark.parametrize("config, words", [
    (EngineConfig(tp=8, ep=3), "does not divide tp"),
    (EngineConfig(tp=1, attention_dp=True), "attention DP needs tp >= 2"),
    (EngineConfig(tp=8, ep=16), "does not divide tp"),
])
def test_moe_layout_rules(config, words):
    with pytest.raises(InvalidConfig, match=words):
        check_layout(R1, config)
    check_layout(R1, EngineConfig(tp=8, ep=8, attention_dp=True))


def test_dense_models_take_no_expert_parallelism():
    with pytest.raises(InvalidConfig, match="dense model"):
        check_layout(load_model("llama-3.1-70b"), EngineConfig(tp=8, ep=8))


def test_a_moe_space_has_ep_and_attention_dp_layouts_and_a_dense_one_none():
    space = SearchSpace.load()
    moe = Scenario.build(model="deepseek-r1", gpu="h200", num_gpus=8, precision="fp8",
                         isl=1024, osl=1024, slo=None)
    labels = {lay.label for lay in space.layouts(moe)}
    assert {"tp8-pp1-dp1", "tp8-pp1-dp1-ep8", "tp8-pp1-dp1-ep8-adp"} <= labels
    assert all(Layout.parse(label).label == label for label in labels)
    dense = Scenario.build(model="llama-3.1-70b", gpu="h200", num_gpus=8, precision="fp8",
                           isl=1024, osl=128, slo=None)
    assert all(lay.ep == 1 and not lay.attention_dp for lay in space.layouts(dense))
    config = EngineConfig(tp=8, ep=8, attention_dp=True, precision="fp8")
    assert SearchSpace.params_of(config)["layout"] == "tp8-pp1-dp1-ep8-adp"
    assert parse_layout("tp8-pp1-dp1-ep8-adp") == (8, 1, 1, 8, True)


def test_a_dense_config_keeps_its_stored_form():
    # Stored studies, cache keys and the model's seeds hash to_dict(): unchanged for dense.
    dense = EngineConfig(tp=4)
    assert "ep" not in dense.to_dict() and "attention_dp" not in dense.to_dict()
    moe = EngineConfig(tp=8, ep=8, attention_dp=True)
    assert EngineConfig.from_dict(moe.to_dict()) == moe
    assert moe.label().startswith("tp8-pp1-dp1-ep8-adp ")


# ---- physics -------------------------------------------------------------------------------
def test_attention_dp_multiplies_an_mla_models_kv_cache():
    tep = Simulator(R1, H200, CAL).perf(EngineConfig(tp=8, ep=8)).memory()
    dep = Simulator(R1, H200, CAL).perf(EngineConfig(tp=8, ep=8, attention_dp=True)).memory()
    # Every TP rank caches every request's latent; under DP each rank its own requests only
    # (a little less per GPU: the attention weights are no longer split).
    assert 4 * tep.kv_tokens < dep.kv_tokens < 8 * tep.kv_tokens
    assert dep.weights > tep.weights


def test_tep_is_faster_per_user_at_low_load_and_dep_serves_more_at_high_load():
    tep, dep = EngineConfig(tp=8, ep=8), EngineConfig(tp=8, ep=8, attention_dp=True)
    low = {name: sim_point(R1, c, 1) for name, c in (("tep", tep), ("dep", dep))}
    assert low["tep"].latency("tpot", "mean") < low["dep"].latency("tpot", "mean")
    high = {name: sim_point(R1, c, MAX_CONCURRENCY) for name, c in (("tep", tep), ("dep", dep))}
    assert high["dep"].output_throughput_per_gpu > high["tep"].output_throughput_per_gpu


def test_a_token_reads_only_its_experts():
    # At batch 1, DeepSeek-R1 reads ~37B of its 671B parameters: well under a tenth.
    perf = Simulator(R1, H200, CAL).perf(EngineConfig(tp=8, precision="fp8"))
    one = perf.iteration_time(1, 1, 1024, 0.0)
    floor = perf.memory().weights / perf.bw
    assert one < 0.25 * floor


def test_expert_parallelism_pays_for_imbalance_at_low_load():
    # Top-8 routing over 8 groups of experts leaves the busiest GPU more than its share of
    # expert weights to read; MoE TP splits every expert evenly.
    ep = Simulator(R1, H200, CAL).perf(EngineConfig(tp=8, ep=8, precision="fp8"))
    tp = Simulator(R1, H200, CAL).perf(EngineConfig(tp=8, ep=1, precision="fp8"))
    assert ep.iteration_time(1, 1, 1024, 0.0) > tp.iteration_time(1, 1, 1024, 0.0)


# ---- engines -------------------------------------------------------------------------------
def test_trtllm_command_lines_carry_ep_and_attention_dp():
    dep = EngineConfig(tp=8, ep=8, attention_dp=True, precision="fp8")
    argv = throughput_argv(dep, bench="trtllm-bench", model="deepseek-ai/DeepSeek-R1",
                           concurrency=64, num_requests=640, dataset="d.jsonl",
                           options_file="o.yaml", report="r.json")
    assert argv[argv.index("--tp") + 1] == "8" and argv[argv.index("--ep") + 1] == "8"
    assert llm_api_options(dep)["enable_attention_dp"] is True
    assert "enable_attention_dp" not in llm_api_options(EngineConfig(tp=8, ep=8))
    serve = serve_argv(dep, "deepseek-ai/DeepSeek-R1")
    assert serve[serve.index("--ep_size") + 1] == "8"
    assert "--ep" not in throughput_argv(
        EngineConfig(tp=8), bench="trtllm-bench", model="m", concurrency=1, num_requests=8,
        dataset="d", options_file="o", report="r")


def test_vllm_flags_map_attention_dp_to_data_parallel_ranks():
    dep = flags(engine_args(EngineConfig(tp=8, ep=8, attention_dp=True), max_model_len=2048))
    assert dep[dep.index("--tensor-parallel-size") + 1] == "1"
    assert dep[dep.index("--data-parallel-size") + 1] == "8"
    assert "--enable-expert-parallel" in dep
    tep = flags(engine_args(EngineConfig(tp=8, ep=8), max_model_len=2048))
    assert tep[tep.index("--tensor-parallel-size") + 1] == "8"
    assert "--data-parallel-size" not in tep and "--enable-expert-parallel" in tep
    plain = flags(engine_args(EngineConfig(tp=8), max_model_len=2048))
    assert "--enable-expert-parallel" not in plain


def test_estimate_takes_ep_and_attention_dp():
    cli = CliRunner()
    out = cli.invoke(app, ["estimate", "--model", "deepseek-r1", "--gpu", "h200",
                           "--num-gpus", "8", "--tp", "8", "--ep", "8", "--attention-dp",
                           "--isl", "1024", "--osl", "1024", "--concurrency", "64", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["config"]["ep"] == 8 and data["config"]["attention_dp"] is True
    bad = cli.invoke(app, ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--tp", "2",
                           "--ep", "2", "--isl", "128", "--osl", "128"])
    assert bad.exit_code == 2 and "dense model" in bad.output


def test_a_moe_search_on_the_sim_recommends_a_moe_layout(tmp_path):
    cli = CliRunner()
    db = f"sqlite:///{tmp_path / 'moe.db'}"
    out = cli.invoke(app, ["search", "--model", "qwen3-30b-a3b", "--gpu", "h100",
                           "--num-gpus", "2", "--isl", "512", "--osl", "256", "--trials", "12",
                           "--storage", db, "--study", "moe"])
    assert out.exit_code == 0, out.output
    best = cli.invoke(app, ["best", "--storage", db, "--study", "moe", "--json"])
    assert best.exit_code == 0, best.output
    config = json.loads(best.output)["best"][0]["config"]
    assert config["tp"] * config["pp"] * config["dp"] == 2
    assert config.get("ep", 1) in (1, 2)
