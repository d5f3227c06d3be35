"""The vllm runner against the stand-in ``vllm`` (autotune.runners.testing.vllm_standin): the
runner contract, literal command lines, server reuse and lifecycle, every failure class, and a
whole search -> best -> deploy. The same runner against a real vLLM engine is in
tests/test_vllm_engine.py."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.errors import (
    BadReport,
    Crashed,
    Interrupted,
    InvalidConfig,
    Killed,
    OutOfMemory,
    TimedOut,
    UserError,
)
from autotune.measurement import MAX_CONCURRENCY
from autotune.runners import get_runner
from autotune.runners._process import group_alive
from autotune.runners.testing import RunnerContract
from autotune.runners.testing.vllm_standin import make_standin
from autotune.runners.vllm import VllmRunner
from autotune.runners.vllm.argv import bench_argv, engine_args, range_ratio, serve_argv
from autotune.scenario import Scenario
from autotune.specs import Workload

#: Llama 3.1 8B's config.json fields the stand-in reads (as vLLM does).
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32,
            "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
            "vocab_size": 128256, "num_key_value_heads": 8, "max_position_embeddings": 131072}


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> dict:
    """The stand-in vllm (first on PATH) and a checkpoint folder with Llama 3.1 8B's config."""
    root = tmp_path_factory.mktemp("vllm-standin")
    env = make_standin(root / "tools")
    model = root / "llama-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    return {"env": env, "model": str(model), "vllm": str(root / "tools" / "bin" / "vllm"),
            "root": root}


@pytest.fixture
def on_path(standin, monkeypatch):
    for k, v in standin["env"].items():
        monkeypatch.setenv(k, v)
    return standin


def scenario(**kw) -> Scenario:
    args = dict(model="llama-3.1-8b", gpu="h100", num_gpus=8, precision="bf16", isl=1024,
                osl=128, slo=None, runner="vllm")
    return Scenario.build(**{**args, **kw})


def make_runner(standin, tmp_path, **options) -> VllmRunner:
    opts = dict(model_path=standin["model"], workspace=str(tmp_path / "ws"),
                vllm=standin["vllm"], num_requests=32, startup_timeout=30.0)
    return VllmRunner(scenario(), **{**opts, **options})


class TestVllmRunnerContract(RunnerContract):
    @pytest.fixture
    def runner(self, on_path, tmp_path):
        r = make_runner(on_path, tmp_path)
        yield r
        r.close()

    @pytest.fixture
    def oom_config(self) -> EngineConfig:
        # 16 GB of BF16 weights in 5% of an 80 GB GPU: nothing is left for a KV cache.
        return EngineConfig(tp=1, kv_fraction=0.05, precision="bf16")


# ---- command lines ------------------------------------------------------------------------------
def test_serve_argv_carries_every_setting_the_runner_honours():
    cfg = EngineConfig(tp=4, pp=2, dp=1, max_batch_size=128, max_num_tokens=4096,
                       kv_fraction=0.85, chunked_prefill=False, precision="fp8")
    args = engine_args(cfg, max_model_len=1152, quantization="fp8", kv_cache_dtype="fp8")
    argv = serve_argv("/m", args, vllm="vllm", port=8123)
    assert argv == [
        "vllm", "serve", "/m", "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "autotune", "--seed", "0",
        "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2",
        "--max-num-seqs", "128", "--max-num-batched-tokens", "4096",
        "--gpu-memory-utilization", "0.85", "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching", "--max-model-len", "1152",
        "--quantization", "fp8", "--kv-cache-dtype", "fp8"]
    # The deploy form reads the same arguments from one YAML file.
    assert serve_argv("/m", args, config_file="c.yaml")[-2:] == ["--config", "c.yaml"]


def test_bench_argv_has_the_study_lengths_load_and_detail():
    w = Workload(isl=1000, osl=200, isl_std=100, osl_std=0)
    argv = bench_argv(w, base_url="http://127.0.0.1:9", tokenizer="/m", concurrency=16,
                      num_prompts=64, warmups=4, result_dir="d", result_file="r.json")
    text = " ".join(argv)
    assert "--random-input-len 1000 --random-output-len 200" in text
    assert json.loads(argv[argv.index("--random-range-ratio") + 1]) == {
        "input": range_ratio(1000, 100), "output": 0.0}
    assert "--max-concurrency 16" in text and "--ignore-eos" in argv
    assert "--num-prompts 64" in text and "--num-warmups 4" in text
    assert "--metric-percentiles 50,90,95,99" in text and "--save-detailed" in argv
    # Every request at once: no concurrency limit at all.
    every = bench_argv(w, base_url="u", tokenizer="/m", concurrency=MAX_CONCURRENCY,
                       num_prompts=64, warmups=0, result_dir="d", result_file="r.json")
    assert "--max-concurrency" not in every
    # A uniform draw over [m(1-r), m(1+r)] has the standard deviation asked for.
    assert abs(1000 * range_ratio(1000, 100) / 3 ** 0.5 - 100) < 0.1


# ---- what a measurement holds -------------------------------------------------------------------
def test_token_gaps_and_vllms_own_percentiles_agree(on_path, tmp_path):
    with make_runner(on_path, tmp_path) as r:
        cfg = EngineConfig(tp=2, max_batch_size=32, max_num_tokens=2048, precision="bf16")
        m = r.measure(cfg, r.scenario.workload, [8])
    (point,) = m.load_points
    summary = m.raw["load_points"][0]["replicas"][0]["summary"]
    # One replica: the load point is vLLM's own figures (np.percentile over the same requests).
    for ours, theirs in (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2e", "e2el")):
        for stat in ("p50", "p90", "p99"):
            assert point.latency(ours, stat) == pytest.approx(summary[f"{stat}_{theirs}_ms"],
                                                              rel=1e-6)
    assert point.num_requests == 32
    assert m.max_requests_in_flight == 32  # the KV cache holds more: max-num-seqs bounds it
    assert r.settings()["vllm_version"] == "0.32.0"


def test_replicas_are_separate_servers_on_their_own_gpus_and_share_the_load(on_path, tmp_path):
    with make_runner(on_path, tmp_path) as r:
        cfg = EngineConfig(tp=2, dp=4, max_batch_size=64, max_num_tokens=2048,
                           precision="bf16")
        m = r.measure(cfg, r.scenario.workload, [8])
    servers = m.raw["servers"]
    assert [s["cuda_visible_devices"] for s in servers] == ["0,1", "2,3", "4,5", "6,7"]
    assert len({s["port"] for s in servers}) == 4
    for rep in m.raw["load_points"][0]["replicas"]:
        argv = rep["argv"]
        assert argv[argv.index("--max-concurrency") + 1] == "2"
        assert argv[argv.index("--num-prompts") + 1] == "8"  # 32 requests over 4 replicas
    assert m.load_points[0].num_requests == 32


def test_one_server_serves_a_config_across_measure_calls_and_stops_for_the_next(on_path,
                                                                               tmp_path, request):
    r = make_runner(on_path, tmp_path)
    request.addfinalizer(r.close)
    a = EngineConfig(tp=1, max_batch_size=16, max_num_tokens=2048, precision="bf16")
    b = EngineConfig(tp=2, max_batch_size=16, max_num_tokens=2048, precision="bf16")
    m1 = r.measure(a, r.scenario.workload, [1])
    first = r._live[1][0].proc.pid
    m2 = r.measure(a, r.scenario.workload, [4, 8])
    assert m2.raw["servers"] == m1.raw["servers"]  # the same server: not started again
    r.measure(b, r.scenario.workload, [1])
    assert not group_alive(first)  # the first config's whole group is gone
    second = r._live[1][0].proc.pid
    r.close()
    r.close()
    assert not group_alive(second)


# ---- failures -----------------------------------------------------------------------------------
CFG = EngineConfig(tp=2, max_batch_size=32, max_num_tokens=2048, precision="bf16")


@pytest.mark.parametrize("fault, failure, words", [
    ("start-crash", Crashed, "Engine core initialization failed"),
    ("start-killed", Killed, "SIGKILL"),
    ("start-hang", TimedOut, "not ready"),
    ("run-die", Crashed, "the server died during the load point"),
    ("engine-dead", Crashed, "the engine died during the load point: assert self.intermediate_"
                             "tensors is not None -> AssertionError"),
    ("partial", BadReport, r"24 of 32 requests completed \(8 failed\): Server disconnected"),
    ("bad-result", BadReport, "not JSON"),
])
def test_each_fault_is_its_failure_class_and_leaves_no_process(on_path, tmp_path, monkeypatch,
                                                               fault, failure, words):
    monkeypatch.setenv("AUTOTUNE_STANDIN_VLLM_FAULT", fault)
    r = make_runner(on_path, tmp_path, startup_timeout=3.0)
    started = []
    real = r._launch
    r._launch = lambda *a, **k: started.append(real(*a, **k)) or started[-1]
    try:
        with pytest.raises(failure, match=words) as info:
            r.measure(CFG, r.scenario.workload, [4])
        # Ended by the failure itself, not only by close: a server a load point failed on is
        # never reused for the next one.
        assert started and not any(group_alive(s.proc.pid) for s in started)
    finally:
        r.close()
    assert info.value.log_path and Path(info.value.log_path).exists()


@pytest.mark.parametrize("cfg, words", [
    (EngineConfig(tp=3, precision="bf16"), "not divisible by tp=3"),
    (EngineConfig(tp=1, max_batch_size=512, max_num_tokens=256, precision="bf16"),
     r"max_num_batched_tokens \(256\) must be >= max_num_seqs \(512\)"),
    (EngineConfig(tp=1, max_batch_size=64, max_num_tokens=512, chunked_prefill=False,
                  precision="bf16"),
     "without chunked prefill"),
    (EngineConfig(tp=4, pp=4, precision="bf16"), "needs 16 GPUs"),
])
def test_configs_vllm_refuses_are_invalid_before_any_server_starts(on_path, tmp_path, cfg, words):
    with make_runner(on_path, tmp_path) as r, pytest.raises(InvalidConfig, match=words):
        r.measure(cfg, r.scenario.workload, [1])
    assert not (tmp_path / "ws" / "runs").exists()


def test_a_layout_vllm_refuses_at_start_up_is_invalid(on_path, tmp_path):
    # Longer requests than the checkpoint's positions: vLLM's own check, read from its log.
    (Path(on_path["model"]).parent / "short").mkdir(exist_ok=True)
    short = Path(on_path["model"]).parent / "short"
    (short / "config.json").write_text(json.dumps({**LLAMA_8B, "max_position_embeddings": 512}))
    with make_runner(on_path, tmp_path, model_path=str(short)) as r, \
            pytest.raises(InvalidConfig, match="greater than the derived max_model_len"):
        r.measure(CFG, r.scenario.workload, [1])


def test_interrupt_while_a_server_starts_ends_its_whole_group(on_path, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTUNE_STANDIN_VLLM_FAULT", "start-hang")
    r = make_runner(on_path, tmp_path, startup_timeout=60.0)
    started = []
    real = r._launch
    r._launch = lambda *a, **k: started.append(real(*a, **k)) or started[-1]
    threading.Timer(1.0, r.interrupt).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            r.measure(CFG, r.scenario.workload, [1])
    finally:
        r.close()
    assert time.monotonic() - t0 < 20
    assert not any(group_alive(s.proc.pid) for s in started)


# ---- options ------------------------------------------------------------------------------------
def test_bad_options_are_one_line_user_errors(on_path, tmp_path):
    cls = get_runner("vllm")
    scen = scenario()
    with pytest.raises(UserError, match="vllm not found"):
        cls.check_options(scen, vllm=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no config.json"):
        cls.check_options(scen, model_path=str(tmp_path))
    with pytest.raises(UserError, match="pre-quantized fp4 checkpoint"):
        cls.check_options(scenario(gpu="b200", precision="fp4"), model_path=on_path["model"])
    with pytest.raises(UserError, match="does not take --backend"):
        cls.check_options(scen, backend="pytorch")
    with pytest.raises(UserError, match="startup-timeout must be a positive"):
        cls.check_options(scen, startup_timeout=0)


def test_fp8_of_a_bf16_checkpoint_is_quantized_on_load(on_path, tmp_path):
    r = VllmRunner(scenario(precision="fp8"), model_path=on_path["model"],
                   workspace=str(tmp_path / "ws"), vllm=on_path["vllm"])
    args = r.engine_args(EngineConfig(tp=1, precision="fp8"), r.scenario.workload)
    assert args["quantization"] == "fp8" and args["kv-cache-dtype"] == "fp8"
    assert r.settings()["quantization"] == "fp8"


# ---- a whole search -----------------------------------------------------------------------------
def test_search_best_and_deploy_with_the_vllm_runner(on_path, tmp_path):
    cli = CliRunner()
    db = f"sqlite:///{tmp_path / 'v.db'}"
    r = cli.invoke(app, [
        "search", "--runner", "vllm", "--vllm", on_path["vllm"], "--model", "llama-3.1-8b",
        "--model-path", on_path["model"], "--gpu", "h100", "--num-gpus", "8", "--precision",
        "bf16", "--isl", "1024", "--osl", "128", "--slo", "tpot:p99<=20ms", "--trials", "6",
        "--num-requests", "32", "--workspace", str(tmp_path / "ws"), "--storage", db,
        "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["trials"] == 6 and summary["best"]["runner"] == "vllm"
    launch = summary["best"]["launch"]
    assert launch["commands"][0][:3] == ["vllm", "serve", on_path["model"]]
    assert summary["best"]["engine"] == "vllm"

    out = tmp_path / "deploy"
    r = cli.invoke(app, ["deploy", "--storage", db, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["README.txt", "bench.sh", "config.json", "serve.sh",
                                       "vllm-config.yaml"]
    best = summary["best"]["config"]
    cfg = yaml.safe_load((out / "vllm-config.yaml").read_text())
    assert cfg["tensor-parallel-size"] == best["tp"]
    assert cfg["max-num-seqs"] == best["max_batch_size"]
    assert cfg["max-model-len"] == 1024 + 128
    serve = (out / "serve.sh").read_text()
    assert 'vllm serve "$MODEL"' in serve and "--config vllm-config.yaml" in serve
    bench = (out / "bench.sh").read_text()
    assert "vllm bench serve" in bench and '--tokenizer "$MODEL"' in bench


# ---- doctor -------------------------------------------------------------------------------------
def test_doctor_for_vllm_names_the_executable_version_and_model(on_path, tmp_path):
    r = CliRunner().invoke(app, ["doctor", "--runner", "vllm", "--vllm", on_path["vllm"],
                                 "--model-path", on_path["model"], "--workspace",
                                 str(tmp_path / "ws"), "--min-free-gb", "0", "--storage",
                                 f"sqlite:///{tmp_path / 'd.db'}", "--json"])
    report = json.loads(r.output)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["vllm"]["status"] == "ok" and "vLLM 0.32.0" in checks["vllm"]["detail"]
    assert checks["model"]["status"] == "warn"  # a config.json without weight files
    assert "32 layers" in checks["model"]["detail"]
    missing = CliRunner().invoke(app, ["doctor", "--runner", "vllm", "--vllm",
                                       str(tmp_path / "none"), "--json"])
    assert missing.exit_code == 1
    assert json.loads(missing.output)["checks"][0]["status"] == "fail"
    bad = CliRunner().invoke(app, ["doctor", "--runner", "sglang"])
    assert bad.exit_code == 2 and "doctor checks --runner trtllm or vllm" in bad.output


def test_a_cpu_build_of_vllm_needs_no_gpu(tmp_path, monkeypatch):
    env = make_standin(tmp_path / "cpu", version="0.32.0+cpu")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["doctor", "--runner", "vllm", "--vllm",
                                 str(tmp_path / "cpu" / "bin" / "vllm"), "--json"])
    checks = {c["name"]: c for c in json.loads(r.output)["checks"]}
    assert "a CPU build" in checks["vllm"]["detail"] and checks["GPUs"]["status"] == "skip"


@pytest.mark.parametrize("line, failure", [
    # vllm/v1/core/kv_cache_utils.py
    ("ValueError: To serve at least one request with the model's max seq len (8192), (1.00 GiB "
     "KV cache is needed, which is larger than the available KV cache memory (0.50 GiB).",
     OutOfMemory),
    ("ValueError: No available memory for the cache blocks. Try increasing "
     "`gpu_memory_utilization` when initializing the engine.", OutOfMemory),
    # vllm/v1/worker/gpu_worker.py and cpu_worker.py: the share asked for is not free
    ("ValueError: Free memory on device (10.5/79.2 GiB) on startup is less than desired GPU "
     "memory utilization (0.9, 71.3 GiB).", OutOfMemory),
    ("ValueError: Available memory on node 0 (6.07/23.54 GiB) on startup is less than desired "
     "CPU memory utilization (0.3, 7.06 GiB).", OutOfMemory),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", OutOfMemory),
    # vllm/config/model.py, vllm/config/scheduler.py
    ("ValueError: Total number of attention heads (64) must be divisible by tensor parallel "
     "size (3).", InvalidConfig),
    ("ValueError: max_num_batched_tokens (2048) is smaller than max_model_len (4096).",
     InvalidConfig),
    ("vllm serve: error: unrecognized arguments: --no-such-flag", Crashed),
])
def test_start_up_failures_are_classified_from_vllms_own_messages(tmp_path, line, failure):
    from autotune.runners.vllm._server import classify_start

    log = tmp_path / "server.log"
    log.write_text(f"(EngineCore pid=1) INFO 12-02 01:00:00 [core.py:1] starting\n"
                   f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{line}\n")
    found = classify_start(2 if "unrecognized" in line else 1, log)
    assert type(found) is failure and str(found)
    assert found.log_path == str(log)


def test_replicas_throughput_is_the_sum_of_each_replicas_own_rate():
    import numpy as np

    from autotune.runners.vllm._result import BenchResult, load_point

    def replica(t0: float) -> BenchResult:  # 10 requests, one after another, 1 s each
        start = t0 + np.arange(10.0)
        return BenchResult(start_s=start, ttft_s=np.full(10, 0.1), latency_s=np.full(10, 1.0),
                           itl_s=np.full(90, 0.01), output_tokens=np.full(10, 100))

    # The second benchmark started 5 s after the first: each ran 1000 tokens in 10 s.
    p = load_point([replica(0.0), replica(5.0)], concurrency=2, gpus=2)
    assert p.output_throughput == pytest.approx(200.0)  # not 2000 tokens / 15 s
    assert p.output_throughput_per_gpu == pytest.approx(100.0)
    assert p.request_throughput == pytest.approx(2.0)
    assert p.num_requests == 20 and p.latency("ttft", "p50") == pytest.approx(100.0)
