"""The trtllm runner against the stand-in trtllm-bench (tests/standin/trtllm-bench): argv, report
layouts, every failure class, the engine cache, literal arguments and a whole search."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.deploy import bench_argvs
from autotune.errors import (
    BadReport,
    BuildFailed,
    BuildOutOfMemory,
    Crashed,
    Interrupted,
    InvalidConfig,
    Killed,
    OutOfMemory,
    SequenceLimit,
    TimedOut,
    UserError,
)
from autotune.measurement import BENCH_REQUESTS, MAX_CONCURRENCY, STATISTICS, replica_load
from autotune.model import Simulator
from autotune.runners import EngineBuilder, get_runner
from autotune.runners._process import group_alive
from autotune.runners.testing import RunnerContract
from autotune.runners.trtllm import TrtllmRunner
from autotune.runners.trtllm._report import parse_report
from autotune.runners.trtllm.argv import llm_api_options, throughput_argv
from autotune.runners.trtllm.releases import Release, Version
from autotune.scenario import Scenario
from autotune.specs import Workload

STANDIN = Path(__file__).resolve().parent / "standin" / "trtllm-bench"
sys.path.insert(0, str(STANDIN.parent))
from launch import install as install_launchers  # noqa: E402

VERSION = "1.0.0"
#: The releases the stand-in emulates (tests/standin/trtllm-bench): release -> its version.
RELEASES = {"1.0": "1.0.0", "1.2": "1.2.0", "1.3": "1.3.0rc2", "main": "1.4.0.dev2026112500"}
HF = "meta-llama/Llama-3.1-8B-Instruct"


def _script(path: Path, body: str) -> Path:
    """An executable Python script run by this interpreter (the venv that has autotune)."""
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """bin/ with the stand-in trtllm-bench, trtllm-llmapi-launch, mpirun and srun; site/ with
    tensorrt_llm package metadata (how the runner learns the version)."""
    root = tmp_path_factory.mktemp("trtllm-tools")
    bin_ = root / "bin"
    bin_.mkdir()
    _script(bin_ / "trtllm-bench",
            f"import runpy\nrunpy.run_path({str(STANDIN)!r}, run_name='__main__')\n")
    _script(bin_ / "trtllm-llmapi-launch", "import os, sys\nos.execvp(sys.argv[1], sys.argv[1:])\n")
    # The stand-in srun and mpirun (tests/standin/launch.py): strict, recording each node's task.
    install_launchers(bin_)
    for version in {VERSION, "0.19.0", *RELEASES.values()}:
        dist = root / f"site-{version}" / f"tensorrt_llm-{version}.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: {version}\n")
    return root


class Standin:
    """Controls the stand-in through its environment and reads what it was asked to do."""

    def __init__(self, root: Path, tmp: Path, monkeypatch, version: str = VERSION):
        self.bin, self.tmp, self.mp = root / "bin", tmp, monkeypatch
        self.version = version
        self.log = tmp / "invocations.jsonl"
        self.launch_log = tmp / "launch.jsonl"
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            filter(None, [str(root / f"site-{version}"), os.environ.get("PYTHONPATH")])))
        monkeypatch.setenv("TRTLLM_STANDIN_LOG", str(self.log))
        monkeypatch.setenv("AUTOTUNE_STANDIN_LAUNCH_LOG", str(self.launch_log))
        for var in ("TRTLLM_STANDIN_FAIL", "TRTLLM_STANDIN_LAYOUT", "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(var, raising=False)

    @property
    def exe(self) -> str:
        return str(self.bin / "trtllm-bench")

    def fail(self, mode: str) -> None:
        self.mp.setenv("TRTLLM_STANDIN_FAIL", mode)

    def calls(self, command: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in calls if command is None or command in c["argv"]]


@pytest.fixture
def standin(tools, tmp_path, monkeypatch, request) -> Standin:
    """The stand-in as TensorRT-LLM ``VERSION`` (parametrize indirectly for another)."""
    return Standin(tools, tmp_path, monkeypatch, getattr(request, "param", VERSION))


@pytest.fixture
def scenario() -> Scenario:
    """Llama-3.1-8B (FP8) on 8xH100."""
    return Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=8, precision=None,
                          isl=1024, osl=128, slo=None, runner="trtllm")


@pytest.fixture
def make_runner(standin, scenario, tmp_path):
    made = []

    def make(**options) -> TrtllmRunner:
        opts = {"trtllm_bench": standin.exe, "workspace": str(tmp_path / "ws"),
                "num_requests": 32, "run_timeout": 60.0, "drain_timeout": 10.0, **options}
        made.append(TrtllmRunner(scenario, **opts))
        return made[-1]

    yield make
    for runner in made:
        runner.close()


def cfg(**kw) -> EngineConfig:
    base = {"tp": 2, "pp": 1, "dp": 1, "max_batch_size": 64, "max_num_tokens": 4096,
            "precision": "fp8"}
    return EngineConfig(**{**base, **kw})


# ---- the shared contract ----------------------------------------------------------------------
@pytest.mark.parametrize("standin", list(RELEASES.values()), ids=list(RELEASES), indirect=True)
class TestTrtllmRunnerContract(RunnerContract):
    @pytest.fixture
    def runner(self, make_runner):
        return make_runner()

    @pytest.fixture
    def oom_config(self):
        # A KV-cache share too small for one 1152-token request of Llama-3.1-8B.
        return EngineConfig(tp=1, kv_fraction=0.0005, precision="fp8")


def test_registered_and_lazy():
    assert get_runner("trtllm") is TrtllmRunner
    assert issubclass(TrtllmRunner, EngineBuilder)
    code = ("import sys, autotune.runners.trtllm; "
            "print(any(m.split('.')[0] in ('tensorrt_llm', 'torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- argv -------------------------------------------------------------------------------------
def test_pytorch_argv_is_exact(make_runner, tmp_path):
    r = make_runner(warmup=3)
    argv = r.throughput_argv(cfg(kv_fraction=0.85), concurrency=16, num_requests=64,
                             dataset=Path("/d/data.jsonl"), options_file=Path("/d/o.yaml"),
                             report=Path("/d/r.json"), requests=Path("/d/q.json"))
    assert argv == [
        r.tools.bench, "--model", HF, "--workspace", str(tmp_path / "ws" / "bench"),
        "throughput", "--backend", "pytorch", "--tp", "2", "--pp", "1",
        "--max_batch_size", "64", "--max_num_tokens", "4096",
        "--kv_cache_free_gpu_mem_fraction", "0.85", "--extra_llm_api_options", "/d/o.yaml",
        "--dataset", "/d/data.jsonl", "--num_requests", "64", "--warmup", "3",
        "--concurrency", "16", "--streaming", "--eos_id", "-1",
        "--report_json", "/d/r.json", "--request_json", "/d/q.json",
    ]
    assert r.options_yaml(cfg())["cuda_graph_config"]["max_batch_size"] == 64


def test_tensorrt_build_and_run_argv_are_exact(make_runner, tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    r = make_runner(backend="tensorrt", model_path=str(model))
    ws = tmp_path / "ws"
    assert r.build_argv(cfg(pp=2), ws / "engines" / "k", 1152) == [
        r.tools.bench, "--model", HF, "--model_path", str(model),
        "--workspace", str(ws / "engines" / "k"), "build", "--tp_size", "2", "--pp_size", "2",
        "--quantization", "FP8", "--max_seq_len", "1152", "--max_batch_size", "64",
        "--max_num_tokens", "4096",
    ]
    engine = {"engine_dir": "/e/tp_2_pp_1", "limits": {"max_batch_size": 32,
                                                       "max_num_tokens": 8192}}
    argv = r.throughput_argv(cfg(), concurrency=MAX_CONCURRENCY, num_requests=8,
                             dataset=Path("d"), options_file=Path("o"), report=Path("r"),
                             requests=Path("q"), engine=engine)
    i = argv.index("throughput")
    # The engine carries tp/pp; a runtime limit never exceeds the built one (64 -> 32).
    assert argv[i:i + 9] == ["throughput", "--backend", "tensorrt", "--engine_dir",
                             "/e/tp_2_pp_1", "--max_batch_size", "32", "--max_num_tokens", "4096"]
    assert "--tp" not in argv and argv[argv.index("--concurrency") + 1] == "-1"
    assert "cuda_graph_config" not in r.options_yaml(cfg())
    bf16 = cfg(precision="bf16")
    assert "--quantization" not in r.build_argv(bf16, ws, 1152)


@pytest.mark.parametrize("load, per_replica", [(64, "32"), (MAX_CONCURRENCY, "-1")],
                         ids=["fixed-load", "max-load"])
def test_bench_sh_runs_the_runners_command_line(make_runner, load, per_replica):
    """bench.sh and the trtllm runner share one builder: the same flags and values, only the
    executable's path and the files differ."""
    cfg = EngineConfig(tp=4, pp=2, dp=2, max_batch_size=256, max_num_tokens=4096,
                       kv_fraction=0.85)
    model = "meta-llama/Llama-3.1-70B-Instruct"
    _, bench = bench_argvs(cfg, model, Workload(1024, 128), load)
    runner = make_runner()
    n = BENCH_REQUESTS.requests(replica_load(load, cfg.dp))
    ran = runner.throughput_argv(cfg, concurrency=replica_load(load, cfg.dp), num_requests=n,
                                 dataset=Path("d"), options_file=Path("o"), report=Path("r"),
                                 requests=Path("q"))

    def flags(argv):
        rest = argv[argv.index("throughput") + 1:]
        out = {}
        for i, tok in enumerate(rest):
            if tok.startswith("--"):
                nxt = rest[i + 1] if i + 1 < len(rest) else None
                out[tok] = nxt if nxt is not None and not nxt.startswith("--") else True
        return {k: v for k, v in out.items() if k not in (
            "--dataset", "--extra_llm_api_options", "--report_json", "--request_json")}

    want = flags(ran)
    assert flags(bench) == want
    assert want["--concurrency"] == per_replica and want["--tp"] == "4" and want["--pp"] == "2"
    assert want["--streaming"] is True and want["--eos_id"] == "-1"
    assert bench[:3] == ["trtllm-bench", "--model", model]


@pytest.mark.parametrize("launcher, prefix", [
    ("mpirun", ["mpirun", "-n", "8", "-x", "CUDA_VISIBLE_DEVICES", "-x", "NCCL_DEBUG",
                "trtllm-llmapi-launch"]),
    ("srun", ["srun", "--ntasks=8", "--mpi=pmix", "trtllm-llmapi-launch"]),
])
def test_external_launchers_wrap_trtllm_bench(make_runner, launcher, prefix, monkeypatch):
    for name in [k for k in os.environ if k.startswith(("NCCL_", "TLLM_", "TRTLLM_", "HF_",
                                                         "UCX_"))]:
        monkeypatch.delenv(name)
    if launcher == "mpirun":  # variables NCCL, TensorRT-LLM and Hugging Face read reach the ranks
        monkeypatch.setenv("HF_TOKEN", "x")
        prefix = prefix[:5] + ["-x", "HF_TOKEN"] + prefix[5:]
    r = make_runner(launcher=launcher, env={"NCCL_DEBUG": "INFO"})
    argv = r.throughput_argv(cfg(tp=4, pp=2), concurrency=4, num_requests=8, dataset=Path("d"),
                             options_file=Path("o"), report=Path("r"), requests=Path("q"),
                             replica_env=("CUDA_VISIBLE_DEVICES",))
    n = len(prefix)
    assert [Path(a).name for a in argv[:n]] == prefix
    assert argv[n] == r.tools.bench and argv[n + 1:n + 3] == ["--model", HF]
    assert Path(r.tools.wrapper).parent == Path(r.tools.bench).parent


def test_mpirun_run_passes_the_users_environment(make_runner, standin):
    r = make_runner(launcher="mpirun", env={"AUTOTUNE_TEST_FLAG": "on"})
    (p,) = r.measure(cfg(), r.scenario.workload, [2]).load_points
    assert p.output_throughput > 0
    (launch,) = [json.loads(x) for x in standin.launch_log.read_text().splitlines()]
    assert launch["argv"][:5] == ["mpirun", "-n", "2", "-x", "AUTOTUNE_TEST_FLAG"]
    assert "TRTLLM_STANDIN_LOG" in launch["argv"]  # our environment's TensorRT-LLM variables too
    (call,) = standin.calls("throughput")
    assert call["env"]["AUTOTUNE_TEST_FLAG"] == "on"


#: Two "nodes" that are this machine; to the stand-in mpirun the second is another host, whose
#: ranks get only the variables -x names.
HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.mark.parametrize("launcher, prefix", [
    ("srun", ["srun", "--nodes=2", "--nodelist=127.0.0.1,127.0.0.2", "--ntasks=16",
              "--ntasks-per-node=8", "--mpi=pmix", "trtllm-llmapi-launch"]),
    ("mpirun", ["mpirun", "-n", "16", "-H", "127.0.0.1:8,127.0.0.2:8"]),
])
def test_a_replica_over_two_nodes_is_one_mpi_world_on_both(standin, tmp_path, launcher,
                                                           prefix):
    scen = Scenario.build(model="llama-3.1-405b", gpu="h100", num_gpus=None, nodes=2,
                          precision="fp8",
                          isl=1024, osl=128, slo=None, runner="trtllm")
    with TrtllmRunner(scen, trtllm_bench=standin.exe, launcher=launcher, hosts=",".join(HOSTS),
                      workspace=str(tmp_path / "ws"), num_requests=16, run_timeout=60.0,
                      env={"NCCL_IB_HCA": "mlx5"}) as r:
        (p,) = r.measure(cfg(tp=8, pp=2), scen.workload, [4]).load_points
        assert p.output_throughput > 0
        with pytest.raises(InvalidConfig, match="needs 32 GPUs; the study has 16"):
            r.measure(cfg(tp=8, pp=2, dp=2), scen.workload, [1])
    (launch,) = [json.loads(x) for x in standin.launch_log.read_text().splitlines()]
    assert [Path(a).name for a in launch["argv"][:len(prefix)]] == prefix
    assert [t["host"] for t in launch["tasks"]] == [HOSTS[0]] * 8 + [HOSTS[1]] * 8
    # Every rank, the other node's too, gets the user's variables (mpirun: through -x).
    assert all(t["env"].get("NCCL_IB_HCA") == "mlx5" for t in launch["tasks"])
    (call,) = standin.calls("throughput")
    assert call["argv"][call["argv"].index("--tp") + 1] == "8"


def test_replicas_inside_nodes_under_srun_are_steps_that_ask_for_their_gpus(standin, tmp_path,
                                                                           monkeypatch):
    # Slurm's step rule (the stand-in srun keeps it): a step asking for no GPUs takes its whole
    # node, so four replicas side by side on two nodes each ask for their four.
    monkeypatch.setenv("AUTOTUNE_STANDIN_SLURM_STATE", str(tmp_path / "steps"))
    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=None, nodes=2,
                          precision="fp8", isl=1024, osl=128, slo=None, runner="trtllm")
    with TrtllmRunner(scen, trtllm_bench=standin.exe, launcher="srun", hosts=",".join(HOSTS),
                      workspace=str(tmp_path / "ws"), num_requests=16, run_timeout=60.0) as r:
        (p,) = r.measure(cfg(tp=4, dp=4), scen.workload, [8]).load_points
    assert p.concurrency == 8
    launches = [json.loads(x) for x in standin.launch_log.read_text().splitlines()]
    assert sorted(lc["tasks"][0]["host"] for lc in launches) == sorted(HOSTS * 2)
    assert all("--gres=gpu:4" in lc["argv"] and lc["tasks"][0]["env"].get(
        "CUDA_VISIBLE_DEVICES") is None for lc in launches)


def test_replicas_inside_nodes_of_a_two_node_study_get_their_gpus_on_their_node(standin,
                                                                                 tmp_path):
    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=None, nodes=2,
                          precision="fp8",
                          isl=1024, osl=128, slo=None, runner="trtllm")
    with TrtllmRunner(scen, trtllm_bench=standin.exe, launcher="mpirun", hosts=",".join(HOSTS),
                      workspace=str(tmp_path / "ws"), num_requests=16, run_timeout=60.0) as r:
        (p,) = r.measure(cfg(tp=4, dp=4), scen.workload, [8]).load_points
    assert p.concurrency == 8
    launches = [json.loads(x) for x in standin.launch_log.read_text().splitlines()]
    placed = sorted((lc["tasks"][0]["host"], lc["tasks"][0]["env"]["CUDA_VISIBLE_DEVICES"])
                    for lc in launches)
    assert placed == [(HOSTS[0], "0,1,2,3"), (HOSTS[0], "4,5,6,7"),
                      (HOSTS[1], "0,1,2,3"), (HOSTS[1], "4,5,6,7")]


# ---- reports ----------------------------------------------------------------------------------
def _run_standin(standin: Standin, tmp: Path, *, streaming: bool, layout: str) -> tuple[Path, Path]:
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"task_id": i, "input_ids": list(range(5, 5 + 64)),
                                        "output_tokens": 16}) + "\n" for i in range(24)))
    report, requests = tmp / f"r-{layout}-{streaming}.json", tmp / f"q-{layout}-{streaming}.json"
    argv = [standin.exe, "--model", HF, "throughput", "--dataset", str(data), "--tp", "2",
            "--concurrency", "4", "--report_json", str(report), "--request_json", str(requests)]
    env = {**os.environ, "TRTLLM_STANDIN_LAYOUT": layout}
    subprocess.run(argv + (["--streaming"] if streaming else []), env=env, check=True,
                   capture_output=True)
    return report, requests


def test_both_report_layouts_parse_to_the_same_measurement(standin, tmp_path):
    new_report, new_requests = _run_standin(standin, tmp_path, streaming=True, layout="new")
    old_report, old_requests = _run_standin(standin, tmp_path, streaming=True, layout="old")
    data = json.loads(old_report.read_text())
    assert "p90" not in data["streaming_metrics"]["tpot_percentiles"] and "machine" not in data
    new, old = parse_report(new_report, new_requests), parse_report(old_report, old_requests)
    assert new.derived == () and set(old.derived) == {"e2e.p90", "ttft.p90", "tpot.p90"}
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert set(old.latency_ms[metric]) == set(STATISTICS)
        assert old.latency_ms[metric] == pytest.approx(new.latency_ms[metric], rel=1e-6)
    assert old.output_throughput == pytest.approx(new.output_throughput)
    assert new.version == VERSION and new.world_size == 2 and new.num_requests == 24
    # Without the per-request file p90 is bounded by p95, never invented lower.
    bounded = parse_report(old_report, None)
    assert bounded.latency_ms["tpot"]["p90"] == bounded.latency_ms["tpot"]["p95"]
    assert "tpot.p90<=p95" in bounded.derived


def test_old_layout_without_streaming_metrics(standin, tmp_path):
    report, requests = _run_standin(standin, tmp_path, streaming=False, layout="old")
    assert "streaming_metrics" not in json.loads(report.read_text())
    with pytest.raises(BadReport, match="no streaming_metrics"):
        parse_report(report, requests)  # first-token times are -1 without streaming
    # An older version that streamed but wrote no streaming section: from per-request records.
    rows = json.loads(requests.read_text())
    for row in rows:
        row["first_token_timestamp"] = row["start_timestamp"] + 5_000_000
    requests.write_text(json.dumps(rows))
    result = parse_report(report, requests)
    assert result.latency_ms["ttft"]["p50"] == pytest.approx(5.0)
    assert {"ttft", "tpot", "per_user"} <= set(result.derived)


@pytest.mark.parametrize("text, message", [
    (None, "wrote no report"),
    ('{"performance": {"total_la', "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"engine": {}}', "no 'performance' section"),
    ('{"performance": {"system_output_throughput_tok_s": "fast"}}', "not a number"),
    ('{"performance": {"system_output_throughput_tok_s": 0, "request_throughput_req_s": 1,'
     ' "total_latency_ms": 1}}', "is 0"),
], ids=["missing", "truncated", "not-object", "no-performance", "string", "zero"])
def test_unusable_reports_are_bad_reports(tmp_path, text, message):
    path = tmp_path / "report.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(BadReport, match=message):
        parse_report(path, None)


# ---- failures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, backend, error, message", [
    ("invalid", "pytorch", InvalidConfig, "refused the layout"),
    ("mapping", "tensorrt", InvalidConfig, "Parallelism mapping of TP2-PP1"),
    ("build-oom", "tensorrt", BuildOutOfMemory, "Error Code 2: OutOfMemory"),
    ("build-fail", "tensorrt", BuildFailed, "Engine building failed"),
    ("seqlen", "tensorrt", SequenceLimit, "Engine supports a max sequence of 1152"),
    ("killed", "pytorch", Killed, "SIGKILL"),
    ("no-report", "pytorch", BadReport, "wrote no report"),
    ("garbage", "pytorch", BadReport, "not JSON"),
    ("crash", "pytorch", Crashed, "Executor worker returned error"),
    ("nccl", "pytorch", Crashed, "MPI/NCCL"),
    ("oom-exit0", "pytorch", OutOfMemory, "wrote no report"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_failures_are_classified_with_the_log(make_runner, standin, mode, backend, error,
                                              message):
    standin.fail(mode)
    r = make_runner(backend=backend)
    with pytest.raises(error, match=message) as info:
        r.measure(cfg(), r.scenario.workload, [4])
    failure = info.value
    assert failure.log_path and Path(failure.log_path).is_file()
    assert failure.log_tail and len(failure.log_tail.splitlines()) <= 40
    assert failure.infeasible == error.infeasible


def test_build_warnings_about_skipped_tactics_are_not_oom(make_runner, standin):
    r = make_runner(backend="tensorrt")
    r.measure(cfg(), r.scenario.workload, [1])  # the stand-in always prints such a warning
    assert len(standin.calls("build")) == 1
    log = Path(r.workspace, "engines").glob("*/build.log")
    assert "Skipping tactic" in next(log).read_text()


def test_runtime_oom_is_retried_once_with_a_lower_kv_share(make_runner, standin):
    standin.fail("oom-above:0.9")
    r = make_runner()
    m = r.measure(cfg(kv_fraction=0.95), r.scenario.workload, [4, 8])
    assert [p.concurrency for p in m.load_points] == [4, 8]
    first, second = m.raw["load_points"]
    assert first["kv_fraction"] == 0.9 and first["retries"][0]["kv_fraction"] == 0.95
    assert second["kv_fraction"] == 0.9 and second["retries"] == []  # remembered: no new OOM
    assert len(standin.calls("throughput")) == 3
    yaml_text = Path(first["options_file"]).read_text()
    assert "free_gpu_memory_fraction: 0.9" in yaml_text


def test_runtime_oom_twice_is_infeasible(make_runner, standin):
    standin.fail("oom")
    r = make_runner()
    with pytest.raises(OutOfMemory, match="also with kv_fraction lowered to 0.85") as info:
        r.measure(cfg(), r.scenario.workload, [4])
    assert info.value.infeasible and "torch.OutOfMemoryError" in info.value.log_tail
    assert len(standin.calls("throughput")) == 2


def _wait_for(path: Path, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return [int(x) for x in path.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_hang_is_killed_with_its_whole_process_group(make_runner, standin, monkeypatch):
    standin.fail("hang")
    pids = standin.tmp / "pids"
    monkeypatch.setenv("TRTLLM_STANDIN_PIDS", str(pids))
    r = make_runner(run_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(TimedOut, match="within 2 s") as info:
        r.measure(cfg(), r.scenario.workload, [1])
    assert time.monotonic() - started < 20
    leader, _child = _wait_for(pids)
    assert not group_alive(leader)  # the stand-in and its child (a "rank") are both gone
    assert "Waiting for all ranks" in info.value.log_tail


def test_interrupt_kills_the_run_and_raises_interrupted(make_runner, standin, monkeypatch):
    standin.fail("hang")
    pids = standin.tmp / "pids"
    monkeypatch.setenv("TRTLLM_STANDIN_PIDS", str(pids))
    r = make_runner(run_timeout=120.0)
    caught = []

    def measure():
        try:
            r.measure(cfg(), r.scenario.workload, [1])
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            caught.append(exc)

    thread = threading.Thread(target=measure)
    thread.start()
    leader, _child = _wait_for(pids)
    r.interrupt()
    thread.join(30)
    assert not thread.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], Interrupted)
    assert not group_alive(leader)


def test_usage_errors_are_exit_2_like_click(standin, tmp_path):
    out = subprocess.run([standin.exe, "--model", HF, "throughput", "--no_such_flag", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Error: No such option: --no_such_flag" in out.stderr
    out = subprocess.run([standin.exe, "--model", HF, "throughput", "--backend", "onnx"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Invalid value for '--backend'" in out.stderr
    out = subprocess.run([standin.exe, "throughput"], capture_output=True, text=True)
    assert out.returncode == 2 and "Missing option '--model'" in out.stderr
    out = subprocess.run([standin.exe, "--model", HF, "throughput", "--dataset",
                          str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert out.returncode == 2 and "does not exist" in out.stderr


# ---- engines ----------------------------------------------------------------------------------
def test_engine_cache_builds_once_per_engine_settings(make_runner, standin, tmp_path):
    from sqlalchemy import create_engine

    from autotune.db import Store

    store = Store(create_engine(f"sqlite:///{tmp_path / 'cache.db'}"))
    store.ensure_schema()
    r = make_runner(backend="tensorrt", store=store)
    a = r.measure(cfg(kv_fraction=0.9), r.scenario.workload, [1])
    b = r.measure(cfg(kv_fraction=0.85, chunked_prefill=False, dp=2), r.scenario.workload, [2])
    assert len(standin.calls("build")) == 1
    assert a.raw["engine"]["reused"] is False and b.raw["engine"]["reused"] is True
    key = r.engine_key(cfg())
    assert a.raw["engine"]["key"] == key == r.engine_key(cfg(kv_fraction=0.5, dp=4))
    assert key != r.engine_key(cfg(max_batch_size=128)) != r.engine_key(cfg(tp=4))
    engine_dir = Path(store.engine_get(key)["engine_dir"])
    assert (engine_dir / "config.json").is_file() and engine_dir.name == "tp_2_pp_1"

    make_runner(backend="tensorrt").measure(cfg(), r.scenario.workload, [1])  # same workspace
    # Another workspace, same database: the engine path recorded there is reused.
    other = make_runner(backend="tensorrt", store=store, workspace=str(tmp_path / "other"))
    other.measure(cfg(), r.scenario.workload, [1])
    assert len(standin.calls("build")) == 1
    make_runner(backend="tensorrt").measure(cfg(max_batch_size=32), r.scenario.workload, [1])
    assert len(standin.calls("build")) == 2


def test_failed_build_is_remembered(make_runner, standin):
    standin.fail("build-oom")
    r = make_runner(backend="tensorrt")
    with pytest.raises(BuildOutOfMemory):
        r.measure(cfg(), r.scenario.workload, [1])
    with pytest.raises(BuildOutOfMemory, match="earlier build"):
        r.measure(cfg(kv_fraction=0.8), r.scenario.workload, [1])
    assert len(standin.calls("build")) == 1


def test_sequence_limit_rebuilds_once_with_the_needed_length(make_runner, standin, tmp_path):
    data = tmp_path / "prompts.jsonl"  # text prompts: lengths unknown before the run
    data.write_text("".join(json.dumps({"task_id": i, "prompt": "word " * 1500,
                                        "output_tokens": 128}) + "\n" for i in range(8)))
    r = make_runner(backend="tensorrt", dataset=str(data))
    (p,) = r.measure(cfg(), r.scenario.workload, [2]).load_points
    builds = standin.calls("build")
    assert [c["argv"][c["argv"].index("--max_seq_len") + 1] for c in builds] == ["1152", "1628"]
    assert p.num_requests == 8
    assert r.settings()["dataset"].startswith("user:")


# ---- inputs and identity ----------------------------------------------------------------------
def test_settings_hold_what_changes_results(make_runner):
    s = make_runner(env={"HF_TOKEN": "secret", "NCCL_ALGO": "Ring"}).settings()
    assert s["trtllm_version"] == VERSION and s["backend"] == "pytorch"
    assert s["num_requests"] == 32 and s["model"] == HF and s["streaming"] is True
    assert s["env"] == {"HF_TOKEN": "<redacted>", "NCCL_ALGO": "Ring"}
    assert make_runner(num_requests=None).settings()["num_requests"] == "auto"


def test_synthetic_dataset_is_written_once_and_reused(make_runner):
    r = make_runner()
    m = r.measure(cfg(), r.scenario.workload, [1])
    path = Path(m.raw["dataset"])
    lines = path.read_text().splitlines()
    assert len(lines) == 32
    row = json.loads(lines[0])
    assert set(row) == {"task_id", "input_ids", "output_tokens"}
    assert len(row["input_ids"]) == 1024 and row["output_tokens"] == 128
    assert all(100 <= t < 128256 - 1000 for t in row["input_ids"])
    stamp = path.stat().st_mtime_ns
    again = make_runner().measure(cfg(), r.scenario.workload, [1])
    assert Path(again.raw["dataset"]) == path and path.stat().st_mtime_ns == stamp


def test_replicas_run_side_by_side_on_their_own_gpus(make_runner, standin):
    r = make_runner()
    (one,) = r.measure(cfg(), r.scenario.workload, [8]).load_points
    (two,) = r.measure(cfg(dp=2), r.scenario.workload, [16]).load_points
    gpus = sorted(c["cuda_visible_devices"] for c in standin.calls("throughput")[1:])
    assert gpus == ["0,1", "2,3"]
    # Each replica holds 8 requests like the single one: throughput doubles, per GPU stays.
    assert two.output_throughput == pytest.approx(2 * one.output_throughput, rel=0.05)
    assert two.output_throughput_per_gpu == pytest.approx(one.output_throughput_per_gpu, rel=0.05)
    assert two.num_requests == 32


WEIRD = "m0del's \"dir\" $(touch pwned); `id` | & * ?"


def test_names_and_paths_reach_the_subprocess_literally(make_runner, standin, scenario, tmp_path):
    model = tmp_path / WEIRD
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}))
    hf = "org/" + WEIRD
    r = make_runner(model_path=str(model), hf_name=hf, workspace=str(tmp_path / f"ws {WEIRD}"))
    r.measure(cfg(), scenario.workload, [1])
    (call,) = standin.calls("throughput")
    argv = call["argv"]
    assert argv[argv.index("--model") + 1] == hf
    assert argv[argv.index("--model_path") + 1] == str(model.resolve())
    assert WEIRD in argv[argv.index("--report_json") + 1]
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


@pytest.mark.parametrize("options, message", [
    ({"backend": "onnx"}, "--backend 'onnx' is not a trtllm back end"),
    ({"launcher": "ssh"}, "--launcher 'ssh' is unknown"),
    ({"trtllm_bench": "/nonexistent/trtllm-bench"}, "trtllm-bench not found"),
    ({"num_requests": 0}, "--num-requests must be a positive integer"),
    ({"run_timeout": -1}, "--run-timeout must be a positive"),
    ({"model_path": "/nonexistent/model"}, "is not a folder"),
    ({"colour": "blue"}, "runner .trtllm. does not take --colour"),
], ids=["backend", "launcher", "executable", "requests", "timeout", "model-path", "unknown"])
def test_bad_options_are_user_errors_before_anything_runs(standin, scenario, tmp_path,
                                                          options, message):
    opts = {"trtllm_bench": standin.exe, "workspace": str(tmp_path / "ws"), **options}
    with pytest.raises(UserError, match=message):
        TrtllmRunner.check_options(scenario, **opts)
    with pytest.raises(UserError, match=message):
        TrtllmRunner(scenario, **opts)
    assert not (tmp_path / "ws").exists()
    assert standin.calls() == []


def test_external_launcher_needs_its_tools(standin, scenario, tmp_path, monkeypatch):
    lonely = tmp_path / "bin"
    lonely.mkdir()
    monkeypatch.setenv("PATH", str(lonely))
    with pytest.raises(UserError, match="'srun' is not on PATH"):
        TrtllmRunner.check_options(scenario, trtllm_bench=standin.exe, launcher="srun")
    _script(lonely / "srun", "")
    bench = _script(lonely / "trtllm-bench", "")
    with pytest.raises(UserError, match="needs trtllm-llmapi-launch"):
        TrtllmRunner.check_options(scenario, trtllm_bench=str(bench), launcher="srun")


# ---- end to end -------------------------------------------------------------------------------
SPACE = """\
tp: [4, 8]
pp: [1]
max_batch_size: [64, 256]
max_num_tokens: [8192]
kv_fraction: [0.9]
chunked_prefill: [true]
concurrency: [1, 8, 64, max]
"""


def test_search_then_best_against_the_standin(standin, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(SPACE)
    db = f"sqlite:///{tmp_path / 'study.db'}"
    cli = CliRunner()
    r = cli.invoke(app, [
        "search", "--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "1024",
        "--osl", "128", "--slo", "tpot:p99<=20ms", "--runner", "trtllm", "--trials", "4",
        "--seed", "0", "--space", "space.yaml", "--storage", db, "--study", "gpu-node",
        "--trtllm-bench", standin.exe, "--workspace", "ws", "--num-requests", "24",
        "--run-timeout", "60", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["trials"] == 4 and summary["best"]["runner"] == "trtllm"
    assert standin.calls("throughput")
    r = cli.invoke(app, ["best", "--storage", db, "--study", "gpu-node"])
    assert r.exit_code == 0, r.output
    assert f"trtllm-serve {HF} --backend pytorch --tp_size" in r.stdout

    from autotune.study import open_storage

    rows = open_storage(db, create=False).store.measurements("gpu-node")
    assert {m.runner for m in rows} == {"trtllm"}
    assert all(m.runner_settings["trtllm_version"] == VERSION for m in rows)


def test_search_with_a_bad_backend_is_one_line_and_exit_2(standin, tmp_path):
    r = CliRunner().invoke(app, [
        "search", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "128", "--osl", "16",
        "--runner", "trtllm", "--backend", "onnx", "--trtllm-bench", standin.exe,
        "--workspace", str(tmp_path / "ws"), "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "--backend 'onnx'" in r.output


def test_sigterm_during_a_run_kills_its_group_and_records_the_trial(standin, tmp_path,
                                                                     monkeypatch):
    import signal

    from autotune.study import open_storage

    standin.fail("hang")
    pids = tmp_path / "pids"
    monkeypatch.setenv("TRTLLM_STANDIN_PIDS", str(pids))
    (tmp_path / "space.yaml").write_text(SPACE)
    db = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "search", "--model", "llama-3.1-8b", "--gpu",
         "h100", "--isl", "1024", "--osl", "128", "--runner", "trtllm", "--trials", "2",
         "--space", "space.yaml", "--storage", db, "--study", "stop", "--trtllm-bench",
         standin.exe, "--workspace", "ws", "--num-requests", "8", "--json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        leader, _child = _wait_for(pids, timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert not group_alive(leader)
    (row,) = open_storage(db, create=False).store.measurements("stop")
    assert row.status == "interrupted" and row.runner == "trtllm"


# ---- releases ---------------------------------------------------------------------------------
def _release(version: str) -> Release:
    return Release(Version.parse(version))


@pytest.mark.parametrize("version, padding", [
    ("0.19.0", None), ("1.0.0rc3", "padding_enabled"), ("1.0.0rc4", "enable_padding"),
    ("1.0.0", "enable_padding"), ("1.3.0rc2", "enable_padding"), (None, "enable_padding"),
], ids=["0.19", "1.0rc3", "1.0rc4", "1.0", "1.3rc", "unknown"])
def test_yaml_names_the_fields_of_its_release(version, padding):
    opts = llm_api_options(cfg(), "pytorch", _release(version) if version else Release(None))
    # The whole kv_cache_config, as trtllm-bench sets it: prefix reuse off.
    assert opts["kv_cache_config"] == {"free_gpu_memory_fraction": 0.9,
                                       "enable_block_reuse": False}
    if padding is None:
        assert "cuda_graph_config" not in opts
    else:
        assert opts["cuda_graph_config"] == {padding: True, "max_batch_size": 64}


@pytest.mark.parametrize("version, has_eos", [("0.19.0", False), ("0.20.0", True),
                                              ("1.2.0", True)])
def test_eos_id_only_where_the_release_has_it(version, has_eos):
    argv = throughput_argv(cfg(), bench="trtllm-bench", model=HF, concurrency=4, num_requests=8,
                           dataset="d", options_file="o", report="r", release=_release(version))
    assert ("--eos_id" in argv) is has_eos and "--streaming" in argv


@pytest.mark.parametrize("standin", list(RELEASES.values()), ids=list(RELEASES), indirect=True)
def test_each_release_runs_what_autotune_asks(make_runner, standin):
    """The stand-in refuses, as each release's click and strict LLM arguments do, any option or
    YAML field that release does not know: a run passing means the argv and YAML fit it."""
    r = make_runner()
    assert r.version == standin.version
    (p,) = r.measure(cfg(), r.scenario.workload, [4]).load_points
    assert p.output_throughput > 0
    (call,) = standin.calls("throughput")
    assert ("--eos_id" in call["argv"]) is r.release.eos_id


@pytest.mark.parametrize("standin", [RELEASES["1.3"], RELEASES["main"]], ids=["1.3", "main"],
                         indirect=True)
def test_tensorrt_back_end_is_refused_where_it_was_removed(standin, scenario, tmp_path):
    with pytest.raises(UserError, match=r"TensorRT-LLM 1\.[34]\S* has no TensorRT engine back"):
        TrtllmRunner.check_options(scenario, backend="tensorrt", trtllm_bench=standin.exe,
                                   workspace=str(tmp_path / "ws"))
    db = tmp_path / "s.db"
    r = CliRunner().invoke(app, [
        "search", "--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "128",
        "--osl", "16", "--runner", "trtllm", "--backend", "tensorrt", "--trtllm-bench",
        standin.exe, "--workspace", str(tmp_path / "ws"), "--storage", f"sqlite:///{db}"])
    assert r.exit_code == 2 and "removed in 1.3" in r.stderr
    assert not db.exists() and not (tmp_path / "ws").exists()  # nothing written


@pytest.mark.parametrize("standin", [RELEASES["1.2"]], ids=["1.2"], indirect=True)
def test_capacity_is_the_real_kv_cache_not_the_sizing_one(make_runner, standin):
    """1.x's PyTorch back end logs a small temporary KV cache before the real one: the
    capacity (loads above it are skipped) comes from the real one."""
    r = make_runner()
    big = cfg(max_batch_size=2048)  # the KV cache, not the batch limit, bounds what fits
    m = r.measure(big, r.scenario.workload, [4])
    log = Path(m.raw["load_points"][0]["replicas"][0]["log_path"]).read_text()
    assert "temporary for KV cache size estimation" in log
    _, cap = Simulator(r.scenario.model, r.scenario.gpu).capacity(big, r.scenario.workload)
    assert cap.fit < 2048 and m.max_requests_in_flight == cap.fit


@pytest.mark.parametrize("standin", [RELEASES["1.3"]], ids=["1.3"], indirect=True)
def test_the_installed_version_is_recorded_not_the_reports(make_runner, standin):
    r = make_runner()
    m = r.measure(cfg(), r.scenario.workload, [2])
    (replica,) = m.raw["load_points"][0]["replicas"]
    assert replica["report_version"] == "1.2"  # what 1.2 and later write, whatever they are
    assert replica["trtllm_version"] == r.settings()["trtllm_version"] == RELEASES["1.3"]


@pytest.mark.parametrize("mode", ["oom-malloc", "oom-executor"])
def test_more_out_of_memory_texts_are_out_of_memory(make_runner, standin, mode):
    r = make_runner()
    standin.fail(mode)
    with pytest.raises(OutOfMemory, match="also with kv_fraction lowered"):
        r.measure(cfg(), r.scenario.workload, [2])
    assert len(standin.calls("throughput")) == 2  # retried once at a lower KV share


def test_a_prompt_over_the_token_budget_without_chunking_is_invalid(make_runner, standin,
                                                                     tmp_path):
    r = make_runner()
    unchunked = cfg(chunked_prefill=False, max_num_tokens=512)  # the workload's prompts: 1024
    with pytest.raises(InvalidConfig, match="without chunked prefill"):
        r.measure(unchunked, r.scenario.workload, [2])
    assert not standin.calls("throughput")  # refused before anything ran
    # With the user's own data the length is the engine's to find: its error is classified.
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"task_id": i, "input_ids": list(range(900)),
                                        "output_tokens": 8}) + "\n" for i in range(8)))
    r = make_runner(dataset=str(data))
    with pytest.raises(InvalidConfig, match="should not exceed max_num_tokens"):
        r.measure(unchunked, r.scenario.workload, [2])


@pytest.mark.parametrize("standin, refused", [(RELEASES["1.0"], True), (RELEASES["1.2"], False)],
                         ids=["1.0", "1.2"], indirect=["standin"])
def test_datasets_without_task_id_where_the_release_needs_it(make_runner, standin, refused,
                                                             tmp_path):
    data = tmp_path / "no-task-id.jsonl"
    data.write_text("".join(json.dumps({"input_ids": list(range(64)), "output_tokens": 8}) + "\n"
                            for _ in range(8)))
    if refused:
        with pytest.raises(UserError, match="lacks task_id"):
            make_runner(dataset=str(data))
    else:
        r = make_runner(dataset=str(data))
        assert r.measure(cfg(), r.scenario.workload, [2]).load_points


def test_paths_with_spaces_are_refused_under_a_launcher(standin, scenario, tmp_path):
    with pytest.raises(UserError, match="has a space"):
        TrtllmRunner.check_options(scenario, launcher="mpirun", trtllm_bench=standin.exe,
                                   workspace=str(tmp_path / "my runs"))
    TrtllmRunner.check_options(scenario, launcher="local", trtllm_bench=standin.exe,
                               workspace=str(tmp_path / "my runs"))
