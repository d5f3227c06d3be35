"""`autotune workers`: a Slurm job array and a Kubernetes Job of workers on one study."""

import shlex
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from autotune.cli import app

runner = CliRunner()
SEARCH = ["--model", "llama-3.1-70b", "--gpu", "h100", "--isl", "1024", "--osl", "256",
          "--trials", "200", "--study", "llama70b", "--slo", "tpot:p99<=30ms"]


def test_the_files_run_the_same_search_in_every_worker_without_the_database_url(tmp_path):
    out = tmp_path / "w"
    r = runner.invoke(app, ["workers", "--out", str(out), "--workers", "6", "--image", "reg/at:1",
                            "--", *SEARCH])
    assert r.exit_code == 0, r.stderr
    sbatch = (out / "workers.sbatch").read_text()
    subprocess.run(["bash", "-n", str(out / "workers.sbatch")], check=True)
    assert "#SBATCH --array=0-5" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    (command,) = [line for line in sbatch.splitlines() if line.startswith("exec ")]
    assert shlex.split(command)[1:] == ["autotune", "search", *SEARCH]
    job = yaml.safe_load((out / "workers-job.yaml").read_text())
    spec = job["spec"]
    assert spec["completions"] == spec["parallelism"] == 6
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"] == ["autotune", "search", *SEARCH]
    assert container["image"] == "reg/at:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["env"] == [{"name": "AUTOTUNE_STORAGE", "valueFrom": {
        "secretKeyRef": {"name": "autotune-db", "key": "url"}}}]
    assert "postgresql://" not in yaml.safe_dump(spec)


@pytest.mark.parametrize("extra, message", [
    (["--storage", "postgresql://u:pw@h/db"], "AUTOTUNE_STORAGE"),
    (["--workers", "4"], "each array task or pod is one worker"),
    (["--seed", "1"], "same sampler"),
    (["--no-such-option", "1"], "No such option"),
])
def test_search_options_the_workers_cannot_take_are_refused(tmp_path, extra, message):
    out = tmp_path / "w"
    r = runner.invoke(app, ["workers", "--out", str(out), "--", *SEARCH, *extra])
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert "pw" not in r.stderr and not out.exists()
