"""``probe`` measures this machine for real (CPU + gloo here), and profiles steer the model."""

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.model import PerfModel, load_calibration
from autotune.model.perf import FABRIC_EFF
from autotune.probe import CommResult, HardwareProfile, MatmulResult
from autotune.profile import Profile
from autotune.specs import load_gpu, load_model

torch = pytest.importorskip("torch")
runner = CliRunner()


@pytest.fixture(scope="module")
def cpu_profile():
    from autotune.probe import probe

    return probe("here", quick=True)


def test_probe_measures_matmul_memory_and_collectives_on_the_cpu(cpu_profile):
    hw = cpu_profile
    assert hw.device == "cpu" and hw.backend == "gloo" and hw.memory_gib > 0
    assert {m.dtype for m in hw.matmul} >= {"fp32"}
    assert all(m.tflops > 0 for m in hw.matmul)
    assert hw.memory_tb_s > 0
    ops = {(c.op, c.bytes) for c in hw.comms}
    sizes = {c.bytes for c in hw.comms}
    assert len(sizes) >= 2 and all(("all_reduce", b) in ops and ("p2p", b) in ops for b in sizes)
    assert all(c.latency_us > 0 and c.bus_gb_s > 0 for c in hw.comms)
    # Bigger messages move more bytes per second (latency is amortised).
    ar = sorted((c for c in hw.comms if c.op == "all_reduce"), key=lambda c: c.bytes)
    assert ar[-1].bus_gb_s > ar[0].bus_gb_s
    assert HardwareProfile.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw


def synthetic(mem_tb_s=3.0, bf16=800.0, fp8=1500.0, bus=400.0, lat=12.0) -> HardwareProfile:
    return HardwareProfile(
        name="node7", device="cuda", device_name="NVIDIA H100 80GB HBM3", device_count=8,
        memory_gib=79.1, host="n7", torch_version="x", backend="nccl",
        matmul=(MatmulResult("bf16", 8192, bf16), MatmulResult("fp8", 8192, fp8)),
        memory_tb_s=mem_tb_s,
        comms=(CommResult("all_reduce", 1024, lat, 0.1), CommResult("all_reduce", 2**27, 900, bus)))


def test_a_profile_makes_the_model_achieve_the_measured_rates():
    gpu = load_gpu("h100")
    prof = Profile(name="node7", gpu="h100", hardware=synthetic())
    spec, cal = prof.apply(gpu, "fp8")
    base = load_calibration("h100", "fp8")
    assert spec.mem_bw_tb_s * base.mem_eff == pytest.approx(3.0)
    assert spec.tflops["fp8"] * base.gemm_eff == pytest.approx(1500.0)
    assert spec.nvlink_gb_s * base.ar_bw_eff == pytest.approx(400.0)
    assert cal.ar_latency_us == 12.0 and spec.memory_gib == 79.1
    assert Profile.from_dict(prof.to_dict()) == prof


def test_a_slower_node_profile_predicts_slower_decoding():
    model, gpu = load_model("llama-3.1-70b"), load_gpu("h100")
    cfg = EngineConfig(tp=4, precision="fp8")
    fast = Profile(name="f", hardware=synthetic(mem_tb_s=3.0)).apply(gpu, "fp8")
    slow = Profile(name="s", hardware=synthetic(mem_tb_s=1.5)).apply(gpu, "fp8")
    t_fast = PerfModel(model, fast[0], cfg, fast[1]).iteration_time(8, 8, 8 * 1024, False)
    t_slow = PerfModel(model, slow[0], cfg, slow[1]).iteration_time(8, 8, 8 * 1024, False)
    assert t_slow > 1.3 * t_fast


def test_probe_command_stores_a_profile_that_estimate_and_search_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["probe", "--name", "cpu", "--quick", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["hardware"]["device"] == "cpu"
    est = ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "128", "--osl", "16",
           "--json"]
    plain = json.loads(runner.invoke(app, est).stdout)
    profiled = runner.invoke(app, [*est, "--profile", "cpu"])
    assert profiled.exit_code == 0, profiled.stderr
    # A CPU is orders of magnitude slower than an H100's datasheet.
    assert json.loads(profiled.stdout)["latency_ms"]["tpot"]["mean"] > \
        10 * plain["latency_ms"]["tpot"]["mean"]
    missing = runner.invoke(app, [*est, "--profile", "gpu-node"])
    assert missing.exit_code == 2 and "profiles here: cpu" in missing.stderr


def test_probe_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
    r = runner.invoke(app, ["probe", "--name", "x"])
    assert r.exit_code == 2 and "autotune-llm[probe]" in r.stderr
    assert not (tmp_path / "autotune.db").exists()


def test_the_fabric_probe_runs_one_process_per_node_and_feeds_the_fabric(tmp_path, monkeypatch):
    """Two "nodes" that are this machine's loopback addresses, reached through the stand-in
    srun (tests/standin/launch.py): one real torch.distributed process on each, gloo over TCP."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "standin"))
    from launch import install

    bin_ = install(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "launch.jsonl"
    monkeypatch.setenv("AUTOTUNE_STANDIN_LAUNCH_LOG", str(log))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["probe", "--name", "two", "--quick", "--hosts",
                            "127.0.0.1,127.0.0.2", "--json"])
    assert r.exit_code == 0, r.stderr
    hw = HardwareProfile.from_dict(json.loads(r.stdout)["hardware"])
    assert hw.fabric_hosts == ("127.0.0.1", "127.0.0.2")
    assert len(hw.fabric) == 2 and all(c.latency_us > 0 and c.bus_gb_s > 0 for c in hw.fabric)
    launches = sorted((json.loads(x) for x in log.read_text().splitlines()),
                      key=lambda lc: lc["command"][lc["command"].index("--fabric-rank") + 1])
    assert [lc["argv"][1:4] for lc in launches] == [
        ["--nodes=1", "--nodelist=127.0.0.1", "--ntasks=1"],
        ["--nodes=1", "--nodelist=127.0.0.2", "--ntasks=1"]]
    assert [lc["command"][lc["command"].index("--fabric-rank") + 1] for lc in launches] == \
        ["0", "1"]
    spec, _ = Profile(name="two", hardware=hw).apply(load_gpu("h100"), "fp8")
    assert spec.fabric_latency_us == hw.fabric_latency_us()
    assert spec.fabric_gb_s * FABRIC_EFF == pytest.approx(hw.fabric_gb_s())
    bad = runner.invoke(app, ["probe", "--name", "x", "--hosts", "127.0.0.1"])
    assert bad.exit_code == 2 and "--hosts name 1" in bad.stderr


def test_a_node_whose_probe_process_fails_is_named_and_the_other_is_stopped(tmp_path,
                                                                            monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "standin"))
    from launch import install

    bin_ = install(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    # Node 1's own environment names a network interface it does not have: gloo fails there,
    # while node 0 would wait for it at the rendezvous.
    monkeypatch.setenv("AUTOTUNE_STANDIN_NODE_ENV",
                       json.dumps({"127.0.0.2": {"GLOO_SOCKET_IFNAME": "no-such-nic0"}}))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["probe", "--name", "two", "--quick", "--hosts",
                            "127.0.0.1,127.0.0.2"])
    assert r.exit_code == 2, r.output
    assert "fabric probe's process on 127.0.0.2 exited with" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
