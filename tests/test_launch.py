"""Runs over several nodes: where each replica's ranks go, the srun / mpirun lines that start
them, and the trtllm and vllm runners driving them through stand-in launchers
(tests/standin/launch.py: strict srun and mpirun that record each node's task and run node 0's
here) with the stand-in engines. The same vLLM flags against a real engine over two loopback
nodes are in tests/test_vllm_engine.py."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.errors import Crashed, InvalidConfig, UserError
from autotune.runners._launch import launch_prefix, place, resolve_hosts
from autotune.runners.testing.vllm_standin import make_standin
from autotune.runners.vllm import VllmRunner
from autotune.scenario import Scenario

STANDIN = Path(__file__).resolve().parent / "standin"
sys.path.insert(0, str(STANDIN))
from launch import install as install_launchers  # noqa: E402

#: Two "nodes" that are this machine: the stand-ins run node 0's task here, and a second
#: loopback address is another host to them (mpirun gives it only the -x variables).
HOSTS = ("127.0.0.1", "127.0.0.2")
cli = CliRunner()


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def launchers(tmp_path_factory) -> Path:
    """bin/ with the stand-in srun, mpirun and scontrol."""
    bin_ = tmp_path_factory.mktemp("launchers") / "bin"
    bin_.mkdir()
    install_launchers(bin_)
    # scontrol show hostnames, for one compressed list only (the real one expands any).
    _script(bin_ / "scontrol", "import sys\nassert sys.argv[1:3] == ['show', 'hostnames']\n"
                               "print('\\n'.join({'gpu[01-02]': ['gpu01', 'gpu02']}"
                               "[sys.argv[3]]))\n")
    return bin_


@pytest.fixture
def on_path(launchers, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", f"{launchers}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    log = tmp_path / "launch.jsonl"
    monkeypatch.setenv("AUTOTUNE_STANDIN_LAUNCH_LOG", str(log))
    return log


def cfg(**kw) -> EngineConfig:
    return EngineConfig(**{"max_batch_size": 64, "max_num_tokens": 4096, **kw})


# ---- placement and launch lines -----------------------------------------------------------------
def test_a_replica_over_two_nodes_takes_both_whole_and_small_ones_tile_a_node():
    (big,) = place(cfg(tp=8, pp=2), 8, HOSTS)
    assert big.hosts == HOSTS and big.leader == HOSTS[0] and big.ranks_per_node == 8
    assert all(s.whole and s.visible_devices is None for s in big.shares)
    small = place(cfg(tp=4, dp=4), 8, HOSTS)
    assert [(p.leader, p.shares[0].visible_devices) for p in small] == [
        (HOSTS[0], "0,1,2,3"), (HOSTS[0], "4,5,6,7"), (HOSTS[1], "0,1,2,3"), (HOSTS[1], "4,5,6,7")]
    with pytest.raises(InvalidConfig, match="needs 4 node"):
        place(cfg(tp=8, pp=2, dp=2), 8, HOSTS)
    with pytest.raises(InvalidConfig, match="does not tile"):
        place(cfg(tp=3), 8, HOSTS)


def test_srun_and_mpirun_lines_pin_ranks_to_the_replicas_nodes():
    srun = launch_prefix("srun", hosts=HOSTS, tasks=16, tasks_per_node=8)
    assert srun == ["srun", "--nodes=2", "--nodelist=127.0.0.1,127.0.0.2", "--ntasks=16",
                    "--ntasks-per-node=8", "--mpi=pmix"]
    assert launch_prefix("srun", hosts=HOSTS[1:], tasks=1, mpi=False) == [
        "srun", "--nodes=1", "--nodelist=127.0.0.2", "--ntasks=1"]
    mpirun = launch_prefix("mpirun", hosts=HOSTS, tasks=16, tasks_per_node=8,
                           env_names=["NCCL_DEBUG"])
    assert mpirun == ["mpirun", "-n", "16", "-H", "127.0.0.1:8,127.0.0.2:8", "-x", "NCCL_DEBUG"]
    assert launch_prefix("local", tasks=4) == []


def test_hosts_come_from_the_option_or_the_slurm_job(on_path, monkeypatch):
    assert resolve_hosts("a,b,c", 2) == ("a", "b")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    assert resolve_hosts(None, 2) == ("gpu01", "gpu02")  # expanded by scontrol
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1,n2")
    assert resolve_hosts(None, 2) == ("n1", "n2")
    for hosts, match in (("a", "2 nodes are needed; --hosts name 1"), ("a,a", "names a host twice"),
                         ("a,b c", "is not a host name")):
        with pytest.raises(UserError, match=match):
            resolve_hosts(hosts, 2)
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(UserError, match="pass --hosts"):
        resolve_hosts(None, 2)


@pytest.mark.parametrize("extra, message", [
    ([], "the study spans 2 nodes: the vllm runner reaches them with --launcher srun or mpirun"),
    (["--launcher", "srun"], "2 nodes need their host names: pass --hosts"),
    (["--launcher", "srun", "--hosts", "a"], "2 nodes are needed; --hosts name 1: a"),
    (["--launcher", "pdsh", "--hosts", "a,b"], "--launcher 'pdsh' is unknown"),
])
def test_a_study_over_nodes_without_a_way_to_reach_them_is_one_line_and_exit_2(
        on_path, tmp_path, extra, message):
    r = cli.invoke(app, ["search", "--model", "llama-3.1-70b", "--gpu", "h100", "--nodes", "2",
                         "--isl", "8", "--osl", "8", "--runner", "vllm", "--vllm", "/bin/true",
                         "--hf-name", "x/y", "--storage", f"sqlite:///{tmp_path / 'n.db'}",
                         *extra])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "n.db").exists()


# ---- the vllm runner over two nodes -------------------------------------------------------------
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 64,
             "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
             "vocab_size": 128256, "num_key_value_heads": 8, "max_position_embeddings": 131072}


@pytest.fixture
def vllm_standin(tmp_path, monkeypatch):
    for k, v in make_standin(tmp_path / "tools").items():
        monkeypatch.setenv(k, v)
    model = tmp_path / "llama-70b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    return {"vllm": str(tmp_path / "tools" / "bin" / "vllm"), "model": str(model)}


def vllm_runner(standin, tmp_path, launcher: str, **options) -> VllmRunner:
    scen = Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=None, nodes=2,
                          precision="bf16",
                          isl=256, osl=32, slo=None, runner="vllm")
    return VllmRunner(scen, model_path=standin["model"], vllm=standin["vllm"],
                      workspace=str(tmp_path / "ws"), num_requests=16, startup_timeout=30.0,
                      launcher=launcher, hosts=",".join(HOSTS), **options)


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_vllm_over_two_nodes_starts_one_server_per_node_and_measures_node_0(
        on_path, vllm_standin, tmp_path, launcher):
    with vllm_runner(vllm_standin, tmp_path, launcher, env={"NCCL_DEBUG": "INFO"}) as r:
        m = r.measure(cfg(tp=8, pp=2), r.scenario.workload, [4])
    (p,) = m.load_points
    assert p.output_throughput > 0 and m.config.gpus == 16
    launches = [json.loads(line) for line in on_path.read_text().splitlines()]
    assert len(launches) == 2
    by_host = {lc["tasks"][0]["host"]: lc for lc in launches}
    assert set(by_host) == set(HOSTS)
    for rank, host in enumerate(HOSTS):
        lc = by_host[host]
        (task,) = lc["tasks"]  # one vllm serve per node; it starts that node's ranks itself
        cmd = lc["command"]
        assert cmd[:2] == [vllm_standin["vllm"], "serve"]
        flag = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        assert flag["--tensor-parallel-size"] == "8" and flag["--pipeline-parallel-size"] == "2"
        assert flag["--nnodes"] == "2" and flag["--node-rank"] == str(rank)
        assert flag["--master-addr"] == HOSTS[0]
        assert ("--headless" in cmd) == (rank > 0)
        assert task["env"]["NCCL_DEBUG"] == "INFO"  # forwarded to the other node too
        assert "CUDA_VISIBLE_DEVICES" not in task["env"]  # each node's whole set of GPUs
    server = m.raw["servers"][0]
    assert server["host"] == HOSTS[0] and len(server["nodes"]) == 1


def test_vllm_replicas_inside_nodes_run_one_per_node_with_their_own_gpus(
        on_path, vllm_standin, tmp_path):
    with vllm_runner(vllm_standin, tmp_path, "mpirun") as r:
        (p,) = r.measure(cfg(tp=8, dp=2), r.scenario.workload, [4]).load_points
    assert p.concurrency == 4
    launches = [json.loads(line) for line in on_path.read_text().splitlines()]
    assert sorted(lc["tasks"][0]["host"] for lc in launches) == sorted(HOSTS)
    for lc in launches:
        assert "--nnodes" not in lc["command"]  # each replica within its node
        assert lc["argv"][:5] == ["mpirun", "-n", "1", "-H", f"{lc['tasks'][0]['host']}:1"]


def test_replicas_sharing_a_node_under_srun_ask_slurm_for_their_gpus_and_cpus(
        on_path, vllm_standin, tmp_path, monkeypatch):
    # The stand-in srun keeps the job's steps as Slurm does: a step that asks for no GPUs takes
    # the whole node, so two replicas on one node must each ask for theirs.
    monkeypatch.setenv("AUTOTUNE_STANDIN_SLURM_STATE", str(tmp_path / "steps"))
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "128")
    with vllm_runner(vllm_standin, tmp_path, "srun") as r:
        (p,) = r.measure(cfg(tp=4, dp=4), r.scenario.workload, [8]).load_points
    assert p.concurrency == 8
    launches = [json.loads(line) for line in on_path.read_text().splitlines()]
    assert sorted(lc["tasks"][0]["host"] for lc in launches) == sorted(HOSTS * 2)
    for lc in launches:
        assert "--gres=gpu:4" in lc["argv"] and "--cpus-per-task=64" in lc["argv"]
        assert "CUDA_VISIBLE_DEVICES" not in lc["tasks"][0]["env"]  # Slurm binds them


def test_another_node_that_fails_to_start_fails_the_start_and_leaves_nothing(
        on_path, vllm_standin, tmp_path, monkeypatch):
    # Node 1's own environment makes its vllm serve --headless crash at start-up; node 0 would
    # wait for it at the rendezvous until its timeout.
    monkeypatch.setenv("AUTOTUNE_STANDIN_NODE_ENV", json.dumps(
        {HOSTS[1]: {"AUTOTUNE_STANDIN_VLLM_FAULT": "start-crash"}}))
    with vllm_runner(vllm_standin, tmp_path, "srun") as r:
        with pytest.raises(Crashed, match="another node's vllm serve --headless: .*Engine core"):
            r.measure(cfg(tp=8, pp=2), r.scenario.workload, [1])
        assert not processes_under(tmp_path / "ws")  # node 0's server was stopped too


def processes_under(folder: Path) -> list[int]:
    """Processes whose working directory is inside ``folder`` (the servers run there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").startswith(str(folder)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ---- deploying over two nodes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def study_405b(tmp_path_factory) -> str:
    """A built-in-model study of 405B BF16 on two H100 nodes (810 GB of weights: both needed)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('nodes') / 'n.db'}"
    r = cli.invoke(app, ["search", "--model", "llama-3.1-405b", "--precision", "bf16", "--gpu",
                         "h100", "--nodes", "2", "--isl", "2048", "--osl", "256", "--trials",
                         "12", "--seed", "0", "--storage", url, "--json"])
    assert r.exit_code == 0, r.output
    return url


@pytest.fixture
def logging_engines(tmp_path, on_path, launchers, monkeypatch):
    """trtllm-serve, trtllm-llmapi-launch and vllm that log their argv and exit; the job's
    nodes gpu01 and gpu02 (expanded by the stand-in scontrol)."""
    bin_, log = tmp_path / "engines", tmp_path / "engines.jsonl"
    bin_.mkdir()
    for name in ("trtllm-serve", "vllm"):
        _script(bin_ / name, "import json, os, sys\n"
                             f"open({str(log)!r}, 'a').write(json.dumps({{'argv': "
                             "[os.path.basename(sys.argv[0])] + sys.argv[1:], 'node': "
                             "os.environ.get('SLURMD_NODENAME')}) + '\\n')\n")
    _script(bin_ / "trtllm-llmapi-launch", "import os, sys\nos.execvp(sys.argv[1], sys.argv[1:])\n")
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{launchers}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    return lambda: [json.loads(x) for x in log.read_text().splitlines()]


def _deploy(study: str, out: Path, *extra) -> dict:
    r = cli.invoke(app, ["deploy", "--storage", study, "--out", str(out), "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_trtllm_deployment_over_two_nodes_is_one_srun_world(study_405b, tmp_path,
                                                              logging_engines, on_path):
    import subprocess

    from autotune.runners.trtllm.argv import serve_argv

    out = tmp_path / "deploy"
    done = _deploy(study_405b, out)
    config = EngineConfig.from_dict(done["recommendation"]["config"])
    assert config.gpus == 16
    assert {"slurm.sbatch", "lws.yaml", "serve.sh"} <= set(done["files"])
    serve, batch = (out / "serve.sh").read_text(), (out / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in batch and 'cd "$(dirname "$0")"' in serve  # salloc: its folder
    assert [x for x in serve.splitlines() if "srun" in x] == \
        [x for x in batch.splitlines() if "srun" in x]
    job = subprocess.run(["bash", str(out / "slurm.sbatch")], capture_output=True, text=True,
                         timeout=60, cwd=out, env=dict(os.environ, SLURM_SUBMIT_DIR=str(out),
                                                       SLURM_CPUS_ON_NODE="128"))
    assert job.returncode == 1, job.stderr  # the replica's end ends the job (here: at once)
    (launch,) = [json.loads(x) for x in on_path.read_text().splitlines()]
    # One rank per GPU, each with its GPU's share of the node's CPUs (128 / 8).
    assert launch["argv"][:7] == ["srun", "--nodes=2", "--nodelist=gpu01,gpu02", "--ntasks=16",
                                  "--ntasks-per-node=8", "--cpus-per-task=16", "--mpi=pmix"]
    assert [t["host"] for t in launch["tasks"]] == ["gpu01"] * 8 + ["gpu02"] * 8
    (served,) = logging_engines()
    model = done["recommendation"]["launch"]["commands"][0][1]
    assert served["argv"] == serve_argv(config, model, port=8000)
    docs = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "LeaderWorkerSet", "Service"]
    lws = docs[1]["spec"]
    assert lws["replicas"] == 1 and lws["leaderWorkerTemplate"]["size"] == 2
    leader = lws["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "mpirun --allow-run-as-root -n 16 -H \"$HOSTS\"" in leader["command"][2]
    assert "/etc/autotune/extra_llm_api_options.yaml" in leader["command"][2]
    assert docs[0]["data"]["extra_llm_api_options.yaml"] == \
        (out / "extra_llm_api_options.yaml").read_text()


def test_a_vllm_deployment_over_two_nodes_runs_one_server_per_node(study_405b, tmp_path,
                                                                   logging_engines, on_path):
    import subprocess

    out = tmp_path / "deploy"
    _deploy(study_405b, out, "--engine", "vllm")
    job = subprocess.run(["bash", str(out / "serve.sh")], capture_output=True, text=True,
                         timeout=60, cwd=out, env=dict(os.environ, SLURM_SUBMIT_DIR=str(out)))
    assert job.returncode == 1, job.stderr
    served = sorted(logging_engines(), key=lambda c: c["node"])
    assert [c["node"] for c in served] == ["gpu01", "gpu02"]
    for rank, call in enumerate(served):
        argv = call["argv"]
        flag = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)}
        assert flag["--nnodes"] == "2" and flag["--node-rank"] == str(rank)
        assert flag["--master-addr"] == "gpu01" and flag["--config"] == "vllm-config.yaml"
        assert ("--headless" in argv) == (rank == 1)
    docs = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
    template = docs[1]["spec"]["leaderWorkerTemplate"]
    leader = template["leaderTemplate"]["spec"]["containers"][0]["command"]
    worker = template["workerTemplate"]["spec"]["containers"][0]["command"]
    assert leader[:2] == ["vllm", "serve"] and "--headless" not in leader
    assert leader[leader.index("--node-rank") + 1] == "0"
    assert worker[worker.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
    assert worker[worker.index("--master-addr") + 1] == "$(LWS_LEADER_ADDRESS)"
    assert "--headless" in worker
    assert leader[leader.index("--config") + 1] == "/etc/autotune/vllm-config.yaml"
    assert yaml.safe_load(docs[0]["data"]["vllm-config.yaml"]) == \
        yaml.safe_load((out / "vllm-config.yaml").read_text())
