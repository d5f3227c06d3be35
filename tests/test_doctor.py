"""`autotune doctor`: one line per check, a verdict, exit 0 when ready and 1 when not."""

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autotune.cli import app
from autotune.doctor import check_database, check_gpus, check_model, check_workspace

STANDIN = Path(__file__).resolve().parent / "standin" / "trtllm-bench"
LLAMA_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
SMI = """import sys
assert sys.argv[1:] == ["--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
for i in range(8):
    print(f"{i}, NVIDIA H100 80GB HBM3, 81559")
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A GPU node as the stand-ins make it: trtllm-bench (TensorRT-LLM 1.2.0), nvidia-smi with
    8 H100s, a checkpoint folder; PATH holds nothing else."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _script(bin_ / "trtllm-bench",
            f"import runpy\nrunpy.run_path({str(STANDIN)!r}, run_name='__main__')\n")
    _script(bin_ / "nvidia-smi", SMI)
    dist = tmp_path / "site" / "tensorrt_llm-1.2.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_llm\nVersion: 1.2.0\n")
    model = tmp_path / "Llama 3.1 8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_8B))
    (model / "model-00001-of-00001.safetensors").write_bytes(b"\0")
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def doctor(*args):
    return CliRunner().invoke(app, ["doctor", *map(str, args)])


def test_ready_node_exits_0_with_one_line_per_check(node):
    r = doctor("--model-path", node / "Llama 3.1 8B", "--workspace", node / "ws",
               "--storage", f"sqlite:///{node / 'a.db'}", "--min-free-gb", 0.001)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("ok ") for line in lines[:5]), r.stdout
    assert "TensorRT-LLM 1.2.0" in lines[0] and str(node / "bin" / "trtllm-bench") in lines[0]
    # What the release implies: 1.2 still builds engines, and writes "1.2" in its reports.
    assert "--backend tensorrt available" in lines[0] and "reports say 1.2" in lines[0]
    assert "8 x NVIDIA H100 80GB HBM3, 79.6 GiB each" in lines[1]
    assert "32 layers, 32 heads (8 KV)" in lines[2] and "1 weight files" in lines[2]
    assert "GiB free" in lines[3] and "will be created" in lines[4]
    assert lines[5].startswith("ready")
    assert not (node / "a.db").exists() and not (node / "ws").exists()  # doctor writes nothing


def test_bare_machine_is_not_ready(node, monkeypatch):
    empty = node / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = doctor("--json", "--model-path", node / "missing", "--min-free-gb", 0.001)
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    status = {c["name"]: c["status"] for c in data["checks"]}
    assert status == {"trtllm-bench": "fail", "GPUs": "fail", "model": "fail",
                      "workspace": "ok", "database": "ok"}
    assert data["ready"] is False and "3 check(s) failed" in data["verdict"]
    gpus = next(c for c in data["checks"] if c["name"] == "GPUs")
    assert gpus["detail"] == "none visible (no nvidia-smi on PATH)"


def test_doctor_says_what_a_release_cannot_do(node):
    dist = node / "site" / "tensorrt_llm-1.2.0.dist-info"
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt_llm\n"
                                   "Version: 1.3.0rc2\n")
    first = doctor("--min-free-gb", 0.001).stdout.splitlines()[0]
    assert "TensorRT-LLM 1.3.0rc2" in first and "--backend tensorrt removed" in first


def test_explicit_trtllm_bench_path_and_skipped_model(node, monkeypatch):
    monkeypatch.delenv("PYTHONPATH")  # no package metadata: the version is unknown
    r = doctor("--trtllm-bench", node / "bin" / "trtllm-bench", "--min-free-gb", 0.001)
    assert r.exit_code == 0, r.output
    first, _, model = r.stdout.splitlines()[:3]
    assert first.startswith("warn") and "version unknown" in first
    assert model.startswith("skip")


@pytest.mark.parametrize("setup, status, message", [
    (lambda p: (p / "config.json").write_text("{}"), "fail", "not a decoder model config"),
    (lambda p: (p / "config.json").write_text("{oops"), "fail", "cannot read model config"),
    (lambda p: None, "fail", "has no config.json"),
    (lambda p: (p / "config.json").write_text(json.dumps(LLAMA_8B)), "warn", "no weight files"),
], ids=["not-decoder", "garbled", "no-config", "no-weights"])
def test_model_checks(tmp_path, setup, status, message):
    folder = tmp_path / "m"
    folder.mkdir()
    setup(folder)
    check = check_model(str(folder))
    assert check.status == status and message in check.detail


def test_workspace_below_the_free_space_floor_fails(tmp_path):
    check = check_workspace(str(tmp_path / "ws"), min_free_gib=1e12)
    assert check.status == "fail" and "--min-free-gb" in check.detail


@pytest.mark.parametrize("url, status, message", [
    ("sqlite:///:memory:", "ok", "in memory"),
    ("not a url", "fail", "is not a database URL"),
    ("sqlite:////nonexistent-dir/x.db", "fail", "does not exist"),
    ("postgresql://nobody:secret@127.0.0.1:1/none", "fail", "127.0.0.1"),
], ids=["memory", "garbage", "no-folder", "unreachable"])
def test_database_checks(url, status, message):
    check = check_database(url)
    assert check.status == status and message in check.detail
    assert "secret" not in check.detail


def test_nvidia_smi_failure_is_reported(tmp_path, monkeypatch):
    _script(tmp_path / "nvidia-smi", "import sys\nprint('NVIDIA-SMI has failed because it "
            "could not communicate with the NVIDIA driver.')\nsys.exit(9)\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    check = check_gpus()
    assert check.status == "fail" and "exit 9" in check.detail and "driver" in check.detail
