"""`autotune deploy`: serve.sh / bench.sh run exactly the trtllm-serve and trtllm-bench argv
autotune builds (checked with stand-in executables), the YAML and config.json match the
recommendation, and the folder is written whole or not at all."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from autotune.cli import app
from autotune.config import EngineConfig
from autotune.deploy import bench_argvs, launch_plan
from autotune.measurement import BENCH_REQUESTS, MAX_CONCURRENCY, replica_load
from autotune.runners.trtllm.argv import (
    llm_api_options,
    prepare_dataset_argv,
    serve_argv,
    throughput_argv,
)
from autotune.specs import Workload

from sample_study import STUDY, sample_copy

runner = CliRunner()

#: A TensorRT-LLM deploy folder (a study of the built-in model deploys on TensorRT-LLM).
TRTLLM_FILES = ["serve.sh", "extra_llm_api_options.yaml", "bench.sh", "config.json", "README.txt"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return sample_copy(tmp_path_factory, tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def best(study):
    r = cli("best", "--storage", study, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["best"][0]


@pytest.fixture
def stand_ins(tmp_path):
    """trtllm-serve and trtllm-bench stand-ins that log their argv and environment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    script = textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        args = sys.argv[1:]
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps({{"argv": [os.path.basename(sys.argv[0])] + args,
                                 "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                 "cwd": os.getcwd()}}) + "\\n")
        if "prepare-dataset" in args and "--output" in args:
            open(args[args.index("--output") + 1], "w").write('{{"task_id": 0}}\\n')
        """)
    for name in ("trtllm-serve", "trtllm-bench"):
        path = bin_dir / name
        path.write_text(script)
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("CUDA_VISIBLE_DEVICES", None)

    def calls():
        """What ran, but for bench.sh's check that prepare-dataset exists (``--help``)."""
        ran = [json.loads(line) for line in log.read_text().splitlines()]
        return [c for c in ran if "--help" not in c["argv"]]

    return env, calls


def test_deploy_folder_holds_the_recommendation(study, best, tmp_path):
    out = tmp_path / "deploy"
    r = cli("deploy", "--storage", study, "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == sorted(TRTLLM_FILES)
    for name in ("serve.sh", "bench.sh"):
        assert os.stat(out / name).st_mode & stat.S_IXUSR, name
        assert subprocess.run(["bash", "-n", out / name], check=False).returncode == 0, name
    config = EngineConfig.from_dict(best["config"])
    assert yaml.safe_load((out / "extra_llm_api_options.yaml").read_text()) == \
        llm_api_options(config)
    data = json.loads((out / "config.json").read_text())
    assert data["schema"] == "autotune.deploy/1" and data["study"] == STUDY
    assert data["config"] == best["config"] and data["trial"] == best["trial"]
    assert data["expected"]["output_tok_s_per_gpu"] == best["throughput"]["output_tok_s_per_gpu"]
    assert data["launch"] == best["launch"]
    readme = (out / "README.txt").read_text()
    assert best["label"] in readme and "./serve.sh" in readme and "./bench.sh" in readme


@pytest.mark.parametrize("pick", ["best", "replicas"], ids=["recommended", "dp-replicas"])
def test_serve_sh_runs_each_replica_exactly_as_planned(study, best, tmp_path, stand_ins, pick):
    env, calls = stand_ins
    out = tmp_path / "deploy"
    extra = []
    if pick == "replicas":  # a config with data-parallel replicas, started in the background
        recs = json.loads(cli("best", "--storage", study, "--json", "--top", 20).stdout)["best"]
        best = next(r for r in recs if r["config"]["dp"] > 1)
        extra = ["--trial", best["trial"]]
    assert cli("deploy", "--storage", study, "--out", out, *extra).exit_code == 0
    model = "/models/my llama's checkpoint"  # spaces and quotes survive the script
    r = subprocess.run([out / "serve.sh"], env=dict(env, MODEL=model), capture_output=True,
                       text=True, timeout=60, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    config = EngineConfig.from_dict(best["config"])
    got = sorted(calls(), key=lambda c: c["argv"])
    want = sorted(({"argv": list(serve_argv(config, model, port=port)),
                    "gpus": ",".join(map(str, gpus)) if config.dp > 1 else None,
                    "cwd": str(out)}
                   for port, gpus in zip(best["launch"]["ports"], best["launch"]["gpus"])),
                  key=lambda c: c["argv"])
    assert got == want


def test_bench_sh_prepares_a_dataset_then_measures_one_replica(study, best, tmp_path,
                                                               stand_ins):
    env, calls = stand_ins
    out = tmp_path / "deploy"
    assert cli("deploy", "--storage", study, "--out", out).exit_code == 0
    r = subprocess.run([out / "bench.sh"], env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    config = EngineConfig.from_dict(best["config"])
    model = best["launch"]["commands"][0][1]
    load = replica_load(best["concurrency"], config.dp)
    n = BENCH_REQUESTS.requests(load)
    prepare, bench = calls()
    assert prepare["argv"] == prepare_dataset_argv(model, Workload(1024, 256), n, "dataset.jsonl")
    assert bench["argv"] == throughput_argv(
        config, bench="trtllm-bench", model=model, concurrency=load, num_requests=n,
        dataset="dataset.jsonl", options_file="extra_llm_api_options.yaml",
        report="bench_report.json", requests="bench_requests.json")
    # Streaming (TTFT and TPOT in the report), the full output length and warm-up, as the runner.
    assert {"--streaming", "--eos_id", "--warmup"} <= set(bench["argv"])
    assert bench["gpus"] == ",".join(map(str, range(config.tp * config.pp)))
    assert (out / "dataset.jsonl").exists()
    # A second run reuses the dataset.
    subprocess.run([out / "bench.sh"], env=env, check=True, timeout=60)
    assert [c["argv"][3] for c in calls()[2:]] == ["throughput"]


@pytest.mark.parametrize("dp, load, per_replica", [
    (1, 64, 64), (2, 64, 32), (4, 1, 1), (8, 100, 13), (2, MAX_CONCURRENCY, MAX_CONCURRENCY),
], ids=["dp1", "dp2", "dp4-load1", "dp8-rounds-up", "max-stays-max"])
def test_replica_load(dp, load, per_replica):
    assert replica_load(load, dp) == per_replica


def test_a_non_empty_folder_needs_force(study, tmp_path):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("deploy", "--storage", study, "--out", out)
    assert r.exit_code == 2 and "not empty" in r.stderr and "--force" in r.stderr
    assert os.listdir(out) == ["notes.txt"]
    r = cli("deploy", "--storage", study, "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == sorted([*TRTLLM_FILES, "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"
    assert [p for p in os.listdir(tmp_path) if p != "deploy"] == []  # no staging left behind


def test_trial_deploys_a_chosen_config(study, tmp_path):
    rows = json.loads(cli("best", "--storage", study, "--json", "--top", 3).stdout)["best"]
    third = rows[-1]
    r = cli("deploy", "--storage", study, "--out", tmp_path / "d", "--trial", third["trial"],
            "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["recommendation"]["config"] == third["config"]
    assert "picked from an autotune study" in (tmp_path / "d" / "serve.sh").read_text()


@pytest.mark.parametrize("trial, message", [(999, "has no trial 999"),
                                            (1, "has no measured load points")],
                         ids=["unknown-trial", "infeasible-trial"])
def test_a_trial_without_a_measurement_is_a_user_error(study, tmp_path, trial, message):
    r = cli("deploy", "--storage", study, "--out", tmp_path / "d", "--trial", trial)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert not (tmp_path / "d").exists()


def test_nothing_feasible_exits_1_names_the_closest_and_writes_nothing(tmp_path_factory,
                                                                       tmp_path):
    url = sample_copy(tmp_path_factory, tmp_path, "hopeless")
    r = cli("deploy", "--storage", url, "--out", tmp_path / "d")
    assert r.exit_code == 1 and "meets the SLO" in r.stderr and "--trial" in r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args, message", [
    (["--out", "missing/d"], "does not exist"),
    (["--out", "f.txt"], "is a file"),
    (["--out", "d", "--study", "nope"], "no study named 'nope'"),
], ids=["parent-missing", "out-is-a-file", "unknown-study"])
def test_bad_input_is_one_line_exit_2(study, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    r = cli("deploy", "--storage", study, *args)
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_bench_sh_says_what_to_do_where_prepare_dataset_is_missing(study, tmp_path, stand_ins):
    env, calls = stand_ins
    out = tmp_path / "deploy"
    assert cli("deploy", "--storage", study, "--out", out).exit_code == 0
    old = tmp_path / "old-bin"  # a TensorRT-LLM before 1.3: no prepare-dataset command
    old.mkdir()
    (old / "trtllm-bench").write_text(
        "#!/bin/sh\ncase \"$*\" in *prepare-dataset*) echo \"Error: No such command "
        "'prepare-dataset'.\" >&2; exit 2;; esac\n")
    (old / "trtllm-bench").chmod(0o755)
    r = subprocess.run([out / "bench.sh"], env=dict(env, PATH=f"{old}{os.pathsep}{env['PATH']}"),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "prepare_dataset.py" in r.stderr
    assert not (out / "dataset.jsonl").exists()


def test_the_deploy_folder_speaks_the_release_it_was_measured_on():
    from autotune.deploy import measured_release
    from autotune.runners.trtllm.argv import llm_api_options as options

    cfg = EngineConfig(tp=2, max_batch_size=64)
    old = measured_release({"trtllm_version": "1.0.0rc3"})
    plan = launch_plan(cfg, "m", old)
    assert yaml.safe_load(plan.options_yaml) == options(cfg, release=old)
    assert "padding_enabled" in plan.options_yaml  # that release's strict name for the field
    _, bench = bench_argvs(cfg, "m", Workload(128, 16), 4, measured_release(
        {"trtllm_version": "0.19.0"}), warmup=5)
    assert "--eos_id" not in bench and bench[bench.index("--warmup") + 1] == "5"
    assert "enable_padding" in launch_plan(cfg, "m", measured_release({})).options_yaml


def test_a_sim_study_deploys_on_vllm_when_asked(study, best, tmp_path):
    out = tmp_path / "vllm"
    r = cli("deploy", "--storage", study, "--out", out, "--engine", "vllm", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["README.txt", "bench.sh", "config.json", "serve.sh",
                                       "vllm-config.yaml"]
    cfg = best["config"]
    args = yaml.safe_load((out / "vllm-config.yaml").read_text())
    assert args["tensor-parallel-size"] == cfg["tp"]
    assert args["pipeline-parallel-size"] == cfg["pp"]
    assert args["max-num-seqs"] == cfg["max_batch_size"]
    assert args["max-num-batched-tokens"] == cfg["max_num_tokens"]
    assert args["enable-chunked-prefill"] is cfg["chunked_prefill"]
    serve = (out / "serve.sh").read_text()
    assert serve.count("vllm serve") == cfg["dp"]
    assert subprocess.run(["bash", "-n", out / "serve.sh"], check=False).returncode == 0
    assert subprocess.run(["bash", "-n", out / "bench.sh"], check=False).returncode == 0
    assert json.loads((out / "config.json").read_text())["engine"] == "vllm"
    bad = cli("deploy", "--storage", study, "--out", tmp_path / "x", "--engine", "sglang")
    assert bad.exit_code == 2 and "--engine 'sglang' is unknown" in bad.output
