"""Everything a user can get wrong: one clear line on stderr, exit code 2, nothing written."""

import json
import os

import pytest
from typer.testing import CliRunner

from autotune.cli import app

runner = CliRunner()
BASE = ["--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "512",
        "--osl", "64", "--trials", "2"]


def with_opt(flag, value):
    """BASE with ``flag`` set to ``value`` (replaced if BASE has it)."""
    args = list(BASE)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_a_model.json").write_text(json.dumps({"architectures": ["Foo"], "x": 1}))
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "unknown_key.yaml").write_text(
        "tp: [1]\npp: [1]\nmax_batch_size: [8]\nmax_num_tokens: [4096]\nkv_fraction: [0.9]\n"
        "chunked_prefill: [true]\nconcurrency: [1]\nbatch: [3]\n")
    (tmp_path / "bad_value.yaml").write_text(
        "tp: [1]\npp: [1]\nmax_batch_size: [-8]\nmax_num_tokens: [4096]\nkv_fraction: [0.9]\n"
        "chunked_prefill: [true]\nconcurrency: [1]\n")
    (tmp_path / "tp3.yaml").write_text(
        "tp: [3]\npp: [1]\nmax_batch_size: [8]\nmax_num_tokens: [4096]\nkv_fraction: [0.9]\n"
        "chunked_prefill: [true]\nconcurrency: [1]\n")
    (tmp_path / "corrupt.db").write_bytes(b"this is not a database at all" * 10)
    return tmp_path


CASES = [
    ("malformed-slo", ["search", *with_opt("--slo", "tpot<50ms")], "bad SLO term"),
    ("unknown-slo-metric", ["search", *with_opt("--slo", "foo:p99<=5ms")], "unknown metric"),
    ("contradictory-slo", ["search", *with_opt("--slo", "ttft:p99<=2s,e2e:p99<=1s")],
     "contradictory"),
    ("unknown-model", ["search", *with_opt("--model", "llama-9-1t")], "unknown model"),
    ("unknown-gpu", ["search", *with_opt("--gpu", "h900")], "unknown GPU"),
    ("config-json-not-a-model", ["search", *with_opt("--model", "not_a_model.json")],
     "not_a_model.json"),
    ("config-json-garbage", ["search", *with_opt("--model", "garbage.json")], "garbage.json"),
    ("space-unknown-key", ["search", *with_opt("--space", "unknown_key.yaml")], "unknown key"),
    ("space-bad-value", ["search", *with_opt("--space", "bad_value.yaml")], "max_batch_size"),
    ("space-missing", ["search", *with_opt("--space", "nope.yaml")], "nope.yaml"),
    ("tp-not-dividing-heads", ["search", *with_opt("--space", "tp3.yaml")],
     "no valid parallel layout"),
    ("estimate-tp-not-dividing-heads",
     ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "8", "--osl", "8",
      "--tp", "3"], "not divisible"),
    ("estimate-more-gpus-than-node",
     ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "8", "--osl", "8",
      "--tp", "8", "--num-gpus", "4"], "--num-gpus"),
    ("isl-zero", ["search", *with_opt("--isl", "0")], "--isl"),
    ("osl-negative", ["search", *with_opt("--osl", "-5")], "--osl"),
    ("isl-absurd", ["search", *with_opt("--isl", "1000000000")], "--isl"),
    ("num-gpus-zero", ["search", *with_opt("--num-gpus", "0")], "--num-gpus"),
    ("unknown-runner", ["search", *with_opt("--runner", "vllm")], "unknown runner"),
    ("trtllm-flag-with-sim", ["search", *with_opt("--backend", "tensorrt")],
     "runner 'sim' does not take --backend"),
    ("trtllm-flag-with-plugin", ["search", *with_opt("--runner", "plugins.slow_sim:SlowSim"),
                                 "--backend", "tensorrt"], "does not take --backend"),
    ("concurrency-word", ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "8",
                          "--osl", "8", "--concurrency", "lots"], "--concurrency"),
    ("storage-not-a-url", ["search", *with_opt("--storage", "autotune.db")], "not a database URL"),
    ("storage-folder-missing", ["search", *with_opt("--storage", "sqlite:///no/such/dir/a.db")],
     "does not exist"),
    ("storage-corrupt", ["search", *with_opt("--storage", "sqlite:///corrupt.db")],
     "not a SQLite database"),
    ("storage-unreachable",
     ["search", *with_opt("--storage", "postgresql+psycopg://tuner:s3cret@127.0.0.1:1/test")],
     "cannot use database"),
    ("best-without-database", ["best"], "no database"),
    ("studies-without-database", ["studies"], "no database"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(files, argv, message):
    before = sorted(p.name for p in files.iterdir())
    corrupt = (files / "corrupt.db").read_bytes()
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or "Usage:" in r.stderr, r.stderr
    assert message.lower() in " ".join(r.stderr.split()).lower()
    assert "Traceback" not in r.stderr and "s3cret" not in r.stderr + r.stdout
    assert sorted(p.name for p in files.iterdir()) == before  # no database file created
    assert (files / "corrupt.db").read_bytes() == corrupt


def test_typer_usage_errors_also_exit_2(files):
    r = runner.invoke(app, ["search", "--model", "x"])
    assert r.exit_code == 2 and "Missing option" in r.stderr


def test_read_only_database_is_refused_and_left_unchanged(files):
    ok = runner.invoke(app, ["search", *BASE, "--storage", "sqlite:///a.db"])
    assert ok.exit_code == 0, ok.stderr
    before = (files / "a.db").read_bytes()
    ro = f"sqlite:///file:{files / 'a.db'}?mode=ro&uri=true"
    r = runner.invoke(app, ["search", *with_opt("--trials", "4"), "--storage", ro])
    assert r.exit_code == 2 and "readonly" in r.stderr.replace("-", "").replace(" ", "")
    assert (files / "a.db").read_bytes() == before
    if os.geteuid() != 0:  # root ignores file permissions
        os.chmod(files / "a.db", 0o444)
        r = runner.invoke(app, ["search", *BASE, "--storage", "sqlite:///a.db"])
        assert r.exit_code == 2 and "read-only" in r.stderr


def test_study_name_taken_by_another_scenario_is_refused_and_nothing_added(files):
    first = runner.invoke(app, ["search", *BASE, "--study", "mine"])
    assert first.exit_code == 0, first.stderr
    r = runner.invoke(app, ["search", *with_opt("--isl", "1024"), "--study", "mine",
                            "--trials", "4"])
    assert r.exit_code == 2
    assert "study 'mine' exists with another scenario" in " ".join(r.stderr.split())
    assert "workload" in r.stderr
    data = json.loads(runner.invoke(app, ["studies", "--json"]).stdout)
    assert [s["trials"] for s in data] == [2]
