"""``autotune calibrate`` recovers a node's behaviour from a study's measurements.

The "real" node is the sim with secretly perturbed constants; the study measures it; calibrate
fits the constants back from those measurements alone, and must then predict configurations it
never saw within 5%.
"""

import json
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.model import Calibration, load_calibration
from autotune.profile import load_profile
from autotune.runners.sim import SimRunner
from autotune.scenario import Scenario
from autotune.space import SearchSpace
from autotune.study import Tuner, open_storage

pytest.importorskip("scipy")
runner = CliRunner()
SPACE = {"tp": [1, 2, 4, 8], "pp": [1, 2], "max_batch_size": [16, 64, 256],
         "max_num_tokens": [2048, 8192], "kv_fraction": [0.9], "chunked_prefill": [True],
         "concurrency": [1, 16, "max"]}


@pytest.fixture(scope="module")
def node():
    """The scenario, and the constants of the 'real' node nobody tells calibrate about."""
    scen = Scenario.build(model="llama-3.1-8b", gpu="h100", num_gpus=8, precision="fp8",
                          isl=512, osl=64, slo=None)
    base = load_calibration("h100", "fp8")
    secret = replace(base, mem_eff=base.mem_eff * 0.8, gemm_eff=base.gemm_eff * 0.85,
                     ar_latency_us=base.ar_latency_us * 1.6,
                     iter_overhead_ms=base.iter_overhead_ms * 1.5)
    return scen, base, secret


@pytest.fixture(scope="module")
def study(node, tmp_path_factory):
    scen, _, secret = node
    url = f"sqlite:///{tmp_path_factory.mktemp('cal') / 'c.db'}"
    tuner = Tuner(scen, SearchSpace.from_dict(SPACE), SimRunner(scen, calibration=secret),
                  open_storage(url), "real", seed=3)
    tuner.open()
    tuner.optimize(14)
    return url


def unseen(study_url) -> list[EngineConfig]:
    measured = {m.config for m in open_storage(study_url, create=False).store.measurements("real")}
    candidates = [EngineConfig(tp=tp, pp=pp, dp=8 // (tp * pp), max_batch_size=b,
                               max_num_tokens=4096, precision="fp8")
                  for tp, pp in ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (1, 4))
                  for b in (32, 128)]
    return [c for c in candidates if c not in measured]


@pytest.fixture(scope="module")
def calibrated(study):
    r = runner.invoke(app, ["calibrate", "--study", "real", "--storage", study, "--name", "n7",
                            "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_calibrate_recovers_the_node_and_predicts_unseen_configs_within_5_percent(
        node, study, calibrated):
    scen, base, secret = node
    out = calibrated
    assert out["profile"] == "n7" and out["held_out"] is not None
    # Better after than before, on the fit and on the held-out configurations.
    assert out["fit"]["after"]["mape"] < out["fit"]["before"]["mape"] / 3
    assert out["held_out"]["after"]["mape"] < 0.05 < out["held_out"]["before"]["mape"]

    fitted = load_profile(open_storage(study, create=False).store, "n7").calibration
    assert isinstance(fitted, Calibration) and fitted != base
    configs = unseen(study)
    assert len(configs) >= 6
    real, model = SimRunner(scen, calibration=secret), SimRunner(scen, calibration=fitted)
    default = SimRunner(scen, calibration=base)
    for config in configs:
        loads = [1, 16]
        truth = real.measure(config, scen.workload, loads).load_points
        got = model.measure(config, scen.workload, loads).load_points
        naive = default.measure(config, scen.workload, loads).load_points
        for t, g, n in zip(truth, got, naive):
            assert g.output_throughput == pytest.approx(t.output_throughput, rel=0.05)
            assert g.latency("tpot", "mean") == pytest.approx(t.latency("tpot", "mean"), rel=0.05)
            # ...which the uncalibrated model does not.
            assert abs(n.latency("tpot", "mean") / t.latency("tpot", "mean") - 1) > 0.05


def test_the_calibrated_profile_steers_estimate(node, study, calibrated):
    scen, _, secret = node
    est = ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "512", "--osl", "64",
           "--tp", "2", "--dp", "4", "--num-gpus", "8", "--concurrency", "16", "--json",
           "--storage", study]
    r = runner.invoke(app, [*est, "--profile", "n7"])
    assert r.exit_code == 0, r.stderr
    truth = SimRunner(scen, calibration=secret).measure(
        EngineConfig(tp=2, dp=4, precision="fp8"), scen.workload, [16]).load_points[0]
    assert json.loads(r.stdout)["output_throughput"] == pytest.approx(truth.output_throughput,
                                                                      rel=0.05)


def test_calibrate_refuses_a_missing_study_and_a_missing_scipy(study, monkeypatch):
    r = runner.invoke(app, ["calibrate", "--study", "nope", "--storage", study])
    assert r.exit_code == 2 and "no study named 'nope'" in r.stderr and "real" in r.stderr
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    r = runner.invoke(app, ["calibrate", "--study", "real", "--storage", study])
    assert r.exit_code == 2 and "autotune-llm[calibrate]" in r.stderr
