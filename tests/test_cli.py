"""The CLI end to end (typer's CliRunner, a real SQLite file in a temp folder)."""

import json

import pytest
from typer.testing import CliRunner

from autotune.cli import app

runner = CliRunner()
W405 = ["--model", "llama-3.1-405b", "--gpu", "h200", "--num-gpus", "8", "--isl", "2048",
        "--osl", "128"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'a.db'}"


def search_json(storage, *extra, trials=40):
    r = cli("search", *W405, "--trials", trials, "--seed", 0, "--storage", storage, "--json",
            *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One database with two 40-trial studies of 405B on 8xH200, searched once for the module
    (the commands below only read it): ``demo`` under a tight TPOT SLO, ``one`` without SLO."""
    storage = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'a.db'}"
    tight = search_json(storage, "--slo", "tpot:p99<=25ms", "--study", "demo")
    loose = search_json(storage, "--study", "one")
    return storage, tight, loose


def test_tight_tpot_slo_recommends_tp_heavy_and_no_slo_recommends_pp(searched):
    _, tight, loose = searched
    t, lo = tight["best"]["config"], loose["best"]["config"]
    assert t["tp"] >= 4 and t["tp"] > t["pp"], tight["best"]["label"]
    assert lo["pp"] >= 2, loose["best"]["label"]  # PP-heavy or a TP x PP mix
    assert loose["best"]["throughput"]["output_tok_s_per_gpu"] > \
        tight["best"]["throughput"]["output_tok_s_per_gpu"]
    assert tight["best"]["slo"][0]["measured_ms"] <= 25.0
    assert tight["trials"] == 40 and sum(tight["statuses"].values()) == 40


def test_best_prints_config_slo_margin_and_launch_command(searched):
    storage, _, _ = searched
    r = cli("best", "--storage", storage, "--study", "demo")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Best configuration" in out and "tpot:p99<=25ms" in out and "met" in out
    # fp8 on H200: the deployment serves NVIDIA's FP8 checkpoint of the model.
    assert "trtllm-serve nvidia/Llama-3.1-405B-Instruct-FP8 --backend pytorch --tp_size" in out
    assert "free_gpu_memory_fraction" in out


def test_best_json_schema(searched):
    storage, _, _ = searched
    r = cli("best", "--storage", storage, "--study", "demo", "--json", "--top", 3, "--pareto")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["schema"] == "autotune.best/1" and data["study"] == "demo" and data["feasible"]
    assert 1 <= len(data["best"]) <= 3
    first = data["best"][0]
    assert set(first) >= {"config", "label", "concurrency", "throughput", "latency_ms", "slo",
                          "launch", "trial"}
    assert set(first["throughput"]) == {"output_tok_s", "output_tok_s_per_gpu",
                                        "output_tok_s_per_user", "requests_per_s"}
    values = [b["throughput"]["output_tok_s_per_gpu"] for b in data["best"]]
    assert values == sorted(values, reverse=True)
    assert first["launch"]["commands"][0][0] == "trtllm-serve"
    assert data["pareto"] and data["closest"] is None


def test_best_exits_1_and_names_the_closest_when_nothing_meets_the_slo(storage):
    search_json(storage, "--slo", "tpot:p99<=1ms", "--study", "hopeless", trials=8)
    r = cli("best", "--storage", storage, "--study", "hopeless")
    assert r.exit_code == 1
    assert "No configuration meets the SLO" in r.stdout and "Closest" in r.stdout
    assert "tpot:p99<=1ms" in r.stdout
    data = json.loads(cli("best", "--storage", storage, "--study", "hopeless", "--json").stdout)
    assert data["feasible"] is False and data["best"] == []
    assert data["closest"]["slo"][0]["met"] is False


def test_studies_lists_counts_and_best(searched):
    storage, _, _ = searched
    r = cli("studies", "--storage", storage, "--json")
    assert r.exit_code == 0
    by_name = {s["study"]: s for s in json.loads(r.stdout)}
    assert set(by_name) == {"demo", "one"}
    assert all(s["trials"] == 40 and s["best_output_tok_s_per_gpu"] > 0
               for s in by_name.values())
    assert "one" in cli("studies", "--storage", storage).stdout


def test_estimate_tp8_is_faster_per_user_than_pp8_at_concurrency_1():
    def est(tp, pp, conc):
        r = cli("estimate", *W405, "--tp", tp, "--pp", pp, "--concurrency", conc, "--json")
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    tp8, pp8 = est(8, 1, 1), est(1, 8, 1)
    assert tp8["output_throughput_per_user"] > 3 * pp8["output_throughput_per_user"]
    tp8_max, pp8_max = est(8, 1, "max"), est(1, 8, "max")
    assert tp8_max["concurrency"] == -1
    # At saturation the gap closes or flips.
    assert pp8_max["output_throughput"] / tp8_max["output_throughput"] > \
        pp8["output_throughput"] / tp8["output_throughput"]
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert set(tp8["latency_ms"][key]) == {"mean", "p50", "p90", "p95", "p99"}


def test_estimate_with_replicas_labels_the_load_in_flight():
    args = ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "512", "--osl", "64",
            "--dp", "2"]
    one = json.loads(cli(*args, "--concurrency", 1, "--json").stdout)
    two = json.loads(cli(*args, "--concurrency", 2, "--json").stdout)
    # One request asked of two replicas puts one on each: two in flight, as --concurrency 2.
    assert one["concurrency"] == two["concurrency"] == 2
    assert "2 (1 per replica)" in cli(*args, "--concurrency", 1).stdout


def test_estimate_of_a_config_that_does_not_fit_says_so():
    r = cli("estimate", "--model", "llama-3.1-405b", "--gpu", "h100", "--isl", 2048, "--osl",
            128, "--tp", 1, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["feasible"] is False and data["failure_class"] == "oom"


def test_help_lists_the_commands():
    r = cli("--help")
    assert r.exit_code == 0
    for command in ("search", "best", "estimate", "studies"):
        assert command in r.stdout
