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
    ("unknown-runner", ["search", *with_opt("--runner", "sglang")], "unknown runner"),
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
    ("storage-password-in-query",
     ["studies", "--storage", "postgresql://tuner@127.0.0.1:1/test?password=s3cret"],
     "cannot use database"),
    ("nodes-and-other-gpu-count", ["search", *with_opt("--nodes", "2")], "is not --nodes 2 x 8"),
    ("part-of-a-node", ["search", *with_opt("--num-gpus", "12")], "not whole ones"),
    ("nodes-zero", ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "8",
                    "--osl", "8", "--nodes", "0"], "--nodes"),
    ("unknown-fabric", ["search", *with_opt("--fabric", "carrier-pigeon")], "unknown --fabric"),
    ("gpus-per-node-zero", ["search", *with_opt("--gpus-per-node", "0")], "--gpus-per-node"),
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


# ---- against a database that holds a study: refused, and the database left as it was -------
STUDY_ARGS = ["--model", "llama-3.1-8b", "--gpu", "h100", "--num-gpus", "8", "--isl", "512",
              "--osl", "64", "--study", "s"]
DB = "sqlite:///study.db"


def study_opt(flag, value):
    args = ["search", *STUDY_ARGS, "--trials", "6", "--storage", DB]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.fixture(scope="module")
def study_template(tmp_path_factory):
    """A database with one 4-trial study ``s`` (built once for the module)."""
    folder = tmp_path_factory.mktemp("study")
    url = f"sqlite:///{folder / 'study.db'}"
    r = runner.invoke(app, ["search", *STUDY_ARGS, "--trials", "4", "--storage", url])
    assert r.exit_code == 0, r.stderr
    return (folder / "study.db").read_bytes()


@pytest.fixture
def with_study(files, study_template):
    (files / "study.db").write_bytes(study_template)
    (files / "empty.db").write_bytes(b"")
    (files / "truncated.db").write_bytes(study_template[:len(study_template) // 3])
    (files / "other_space.yaml").write_text(
        "tp: [1, 2]\npp: [1]\nmax_batch_size: [64]\nmax_num_tokens: [4096]\n"
        "kv_fraction: [0.9]\nchunked_prefill: [true]\nconcurrency: [1, 8]\n")
    (files / "gpu_tflops_scalar.yaml").write_text(
        "name: h100\nmemory_gib: 80\nmem_bw_tb_s: 3.35\ntflops: 500\nnvlink_gb_s: 450\n")
    (files / "gpu_no_nvlink.yaml").write_text(
        "name: h100\nmemory_gib: 80\nmem_bw_tb_s: 3.35\ntflops: {bf16: 989}\nnvlink_gb_s: 0\n")
    (files / "head_dim.json").write_text(json.dumps({
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_hidden_layers": 32, "vocab_size": 128256, "head_dim": "abc"}))
    return files


def _state(folder):
    """What a command could have changed: the files, and every row of the study database."""
    import sqlite3

    con = sqlite3.connect(folder / "study.db")
    try:
        rows = list(con.iterdump())
    finally:
        con.close()
    return sorted(p.name for p in folder.iterdir()), rows


STUDY_CASES = [
    ("search-other-space", study_opt("--space", "other_space.yaml"), "another search space"),
    ("search-other-workload", study_opt("--isl", "1024"), "another scenario"),
    ("search-slo-infinite", study_opt("--slo", "tpot:p99<=1e999ms"), "finite"),
    ("search-slo-zero", study_opt("--slo", "tpot:p99<=0ms"), "positive"),
    ("search-gpu-tflops-scalar", study_opt("--gpu", "gpu_tflops_scalar.yaml"), "tflops must map"),
    ("search-gpu-no-nvlink", study_opt("--gpu", "gpu_no_nvlink.yaml"), "nvlink_gb_s"),
    ("search-head-dim-text", study_opt("--model", "head_dim.json"), "head_dim"),
    ("search-longer-than-context", study_opt("--model", "llama-2-7b") + ["--isl", "8192"],
     "context of 4,096"),
    ("search-million-token-prompt", study_opt("--isl", "1000000"), "context of 131,072"),
    ("search-in-memory", study_opt("--storage", "sqlite://"), "in-memory"),
    ("search-no-driver", study_opt("--storage", "mysql://u@127.0.0.1/db"), "driver"),
    ("search-prior-unknown", study_opt("--prior", "oracle"), "--prior"),
    ("search-heartbeat-zero", study_opt("--heartbeat", "0"), "--heartbeat"),
    ("search-plugin-with-trtllm-flag", study_opt("--runner", "plugins.slow_sim:SlowSim")
     + ["--backend", "tensorrt"], "does not take --backend"),
    ("search-precision-not-on-gpu", study_opt("--precision", "fp4"), "no fp4"),
    ("best-no-such-study", ["best", "--storage", DB, "--study", "nope"], "no study named"),
    ("best-empty-file", ["best", "--storage", "sqlite:///empty.db"], "no autotune studies"),
    ("best-truncated", ["best", "--storage", "sqlite:///truncated.db"], "malformed"),
    ("best-in-memory", ["best", "--storage", "sqlite://"], "in-memory"),
    ("studies-empty-file", ["studies", "--storage", "sqlite:///empty.db"], "no autotune studies"),
    ("studies-truncated", ["studies", "--storage", "sqlite:///truncated.db"], "malformed"),
    ("export-truncated", ["export", "--storage", "sqlite:///truncated.db", "--out", "x.csv"],
     "malformed"),
    ("export-bad-format", ["export", "--storage", DB, "--out", "x.csv", "--format", "xml"],
     "xml"),
    ("export-missing-folder", ["export", "--storage", DB, "--out", "no/such/x.csv"],
     "does not exist"),
    ("export-over-the-study-database", ["export", "--storage", DB, "--out", "study.db",
                                        "--format", "csv"], "is a sqlite database"),
    ("report-over-the-study-database", ["report", "--storage", DB, "--out", "study.db"],
     "is a sqlite database"),
    ("report-empty-file", ["report", "--storage", "sqlite:///empty.db"], "no autotune studies"),
    ("report-missing-folder", ["report", "--storage", DB, "--out", "no/such/r.html"],
     "does not exist"),
    ("deploy-no-such-trial", ["deploy", "--storage", DB, "--trial", "999", "--out", "d"],
     "no trial 999"),
    ("deploy-truncated", ["deploy", "--storage", "sqlite:///truncated.db", "--out", "d"],
     "malformed"),
    ("calibrate-no-such-study", ["calibrate", "--storage", DB, "--study", "nope"],
     "no study named"),
    ("calibrate-empty-file", ["calibrate", "--storage", "sqlite:///empty.db"],
     "no autotune studies"),
    ("estimate-tp-zero", ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl", "8",
                          "--osl", "8", "--tp", "0"], "--tp"),
    ("estimate-kv-above-one", ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100", "--isl",
                               "8", "--osl", "8", "--kv-fraction", "1.5"], "kv_fraction"),
    ("estimate-unknown-profile", ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100",
                                  "--isl", "8", "--osl", "8", "--profile", "nope",
                                  "--storage", DB], "nope"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in STUDY_CASES],
                         ids=[c[0] for c in STUDY_CASES])
def test_bad_input_leaves_an_existing_study_unchanged(with_study, argv, message):
    before = _state(with_study)
    r = runner.invoke(app, argv)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or "Usage:" in r.stderr or "Invalid value" in r.stderr, r.stderr
    assert message.lower() in " ".join(r.stderr.split()).lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert _state(with_study) == before


def test_a_finished_study_on_a_read_only_archive_can_be_read(files, monkeypatch):
    ok = runner.invoke(app, ["search", *BASE, "--storage", "sqlite:///a.db", "--json"])
    assert ok.exit_code == 0, ok.stderr
    archive = files / "archive"
    archive.mkdir()
    (files / "a.db").rename(archive / "a.db")
    before = sorted(p.name for p in archive.iterdir()), (archive / "a.db").read_bytes()
    # Root ignores file permissions, so the archive is read-only the way os.access says.
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and str(archive) in os.fspath(path):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    url = f"sqlite:///{archive / 'a.db'}"
    for argv in (["best", "--json"], ["studies", "--json"], ["export", "--out", "x.csv"]):
        r = runner.invoke(app, [*argv, "--storage", url])
        assert r.exit_code == 0, (argv, r.stderr)
    # Writing to it is still refused, and nothing in the archive changed.
    r = runner.invoke(app, ["search", *with_opt("--trials", "4"), "--storage", url])
    assert r.exit_code == 2 and "read-only" in r.stderr
    assert (sorted(p.name for p in archive.iterdir()), (archive / "a.db").read_bytes()) == before
