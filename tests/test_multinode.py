"""Beyond one node: layouts that span nodes of an HGX system, costed with the fabric between
them (the model's physics, through its public interfaces and the CLI)."""

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.errors import InvalidConfig, UserError
from autotune.model import PerfModel, Simulator
from autotune.scenario import Scenario
from autotune.space import SearchSpace
from autotune.specs import FABRICS, Workload, load_gpu, load_model, with_nodes

runner = CliRunner()
MODEL = load_model("llama-3.1-405b")
H100 = load_gpu("h100")


def step(gpu, tp, pp, tokens=64, seqs=64, ctx=64 * 2048):
    """One decode iteration of a 405B BF16 replica (seconds)."""
    cfg = EngineConfig(tp=tp, pp=pp, dp=1, precision="bf16")
    return PerfModel(MODEL, gpu, cfg).iteration_time(tokens, seqs, ctx, 0)


@pytest.mark.parametrize("tp, pp", [(16, 1), (8, 2), (4, 4)])
def test_a_slower_fabric_never_makes_a_layout_that_spans_nodes_faster(tp, pp):
    times = [step(replace(H100, fabric_gb_s=bw, fabric_latency_us=lat), tp, pp)
             for bw, lat in [(100, 5), (50, 10), (25, 10), (25, 30), (5, 60)]]
    assert times == sorted(times)
    assert times[-1] > times[0]  # and it costs something


def test_a_layout_inside_one_node_does_not_see_the_fabric():
    for tp, pp in [(8, 1), (4, 2), (2, 4)]:
        fast = step(replace(H100, fabric_gb_s=100), tp, pp)
        slow = step(replace(H100, fabric_gb_s=1, fabric_latency_us=500), tp, pp)
        assert fast == slow


def test_tp_over_the_fabric_costs_more_than_pp_over_it_at_high_load():
    """TP16 all-reduces twice per layer over InfiniBand; TP8xPP2 sends one activation per
    micro-batch across it."""
    assert step(H100, 16, 1, tokens=256, seqs=256) > step(H100, 8, 2, tokens=256, seqs=256)


def test_placement_rules_over_nodes():
    sim = Simulator(MODEL, H100)
    work = Workload(isl=128, osl=16)
    for tp, pp in [(12, 1), (6, 2)]:
        with pytest.raises(InvalidConfig):
            sim.capacity(EngineConfig(tp=tp, pp=pp, dp=1, precision="fp8"), work)
    # 70B on two nodes: TP16 and TP8xPP2 span them; TP8 replicas stay inside one each.
    scen = Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=None, nodes=2,
                          precision="fp8", isl=1024, osl=128, slo=None)
    assert scen.num_gpus == 16 and scen.nodes == 2
    labels = {lay.label for lay in SearchSpace.load().layouts(scen)}
    assert {"tp16-pp1-dp1", "tp8-pp2-dp1", "tp8-pp1-dp2", "tp1-pp1-dp16"} <= labels


def test_nodes_fabrics_and_gpus_per_node():
    assert with_nodes(H100, fabric="efa").fabric_latency_us == FABRICS["efa"][1]
    assert with_nodes(H100, gpus_per_node=4).gpus_per_node == 4
    scen = Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=None, nodes=3,
                          gpus_per_node=4, fabric="roce-400g", precision="fp8", isl=8, osl=8,
                          slo=None)
    assert (scen.num_gpus, scen.gpu.fabric) == (12, "roce-400g")
    with pytest.raises(UserError, match="not whole ones"):
        Scenario.build(model="llama-3.1-70b", gpu="h100", num_gpus=12, precision="fp8", isl=8,
                       osl=8, slo=None)


def _estimate(*args):
    r = runner.invoke(app, ["estimate", "--model", "llama-3.1-405b", "--precision", "bf16",
                            "--gpu", "h100", "--nodes", "2", "--isl", "2048", "--osl", "256",
                            "--json", *map(str, args)])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_405b_bf16_on_two_nodes_pp_across_them_beats_tp_across_them_at_full_load():
    """810 GB of weights need both nodes: at full load TP8xPP2 serves more per GPU than TP16;
    at concurrency 1 TP16's token comes sooner (every GPU reads 1/16 of the weights)."""
    pp2 = _estimate("--tp", 8, "--pp", 2, "--concurrency", "max")
    tp16 = _estimate("--tp", 16, "--concurrency", "max")
    assert pp2["output_throughput_per_gpu"] > 1.2 * tp16["output_throughput_per_gpu"]
    one_pp2 = _estimate("--tp", 8, "--pp", 2, "--concurrency", 1)
    one_tp16 = _estimate("--tp", 16, "--concurrency", 1)
    assert one_tp16["output_throughput_per_user"] > one_pp2["output_throughput_per_user"]


def test_a_search_over_two_nodes_keeps_70b_replicas_inside_nodes(tmp_path):
    """Without an SLO that forces otherwise, spanning nodes only adds the fabric's costs."""
    url = f"sqlite:///{tmp_path / 'n.db'}"
    r = runner.invoke(app, ["search", "--model", "llama-3.1-70b", "--gpu", "h100", "--nodes", "2",
                            "--precision", "fp8", "--isl", "1024", "--osl", "128", "--trials", "25",
                            "--seed", "0", "--storage", url, "--json"])
    assert r.exit_code == 0, r.stderr
    best = json.loads(r.stdout)["best"]["config"]
    assert best["tp"] * best["pp"] <= 8 and best["dp"] >= 2, best
