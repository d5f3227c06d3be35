"""Workers of one study across a cluster: a Slurm job array and a Kubernetes Job that each run
N ``autotune search`` workers on one PostgreSQL study (the shared-study guarantees hold as on
one machine: see README "Several workers and nodes").

The database URL never appears in the files: every worker reads it from ``AUTOTUNE_STORAGE``
(Slurm: the environment ``sbatch`` passes on; Kubernetes: a Secret), so a password stays out of
scripts, manifests and process lists.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

import yaml

#: The files ``autotune workers`` writes.
CLUSTER_FILES = ("workers.sbatch", "workers-job.yaml", "README.txt")


def worker_argv(search_args: Sequence[str]) -> list[str]:
    """One worker's command: ``autotune search`` with the user's search options."""
    return ["autotune", "search", *search_args]


def slurm_array(search_args: Sequence[str], workers: int, gpus_per_worker: int,
                job_name: str = "autotune") -> str:
    """An sbatch script: a job array of ``workers`` tasks, each one worker on its own node's
    ``gpus_per_worker`` GPUs."""
    command = shlex.join(worker_argv(search_args))
    return f"""#!/bin/bash
# {workers} autotune workers on one study, one per array task (written by `autotune workers`).
# Submit with the database in the environment, which sbatch passes on to every task:
#   AUTOTUNE_STORAGE=postgresql://USER@HOST:5432/DB sbatch workers.sbatch
# (a password: PGPASSWORD or ~/.pgpass on the nodes, never in this file).
#SBATCH --job-name={job_name}
#SBATCH --array=0-{workers - 1}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node={gpus_per_worker}
#SBATCH --exclusive
#SBATCH --output={job_name}-%A_%a.out
set -euo pipefail
: "${{AUTOTUNE_STORAGE:?set AUTOTUNE_STORAGE to the PostgreSQL URL of the study}}"
# Each worker samples with its own random seed; the study's slots keep --trials the total.
exec {command}
"""


def k8s_job(search_args: Sequence[str], workers: int, gpus_per_worker: int, image: str,
            secret: str, job_name: str = "autotune") -> str:
    """A Kubernetes Job of ``workers`` pods in parallel, each one worker with
    ``gpus_per_worker`` GPUs, the database URL from the Secret ``secret`` (key ``url``)."""
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name, "labels": {"app": "autotune"}},
        "spec": {
            "completions": workers,
            "parallelism": workers,
            "completionMode": "Indexed",
            # A worker that stops (a node lost, a database down past --db-retry) is started
            # again, up to this many times in all, and rejoins the study; the others have taken
            # its trial back by then.
            "backoffLimit": workers,
            "template": {
                "metadata": {"labels": {"app": "autotune"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "worker",
                        "image": image,
                        "command": worker_argv(search_args),
                        "env": [{"name": "AUTOTUNE_STORAGE", "valueFrom": {
                            "secretKeyRef": {"name": secret, "key": "url"}}}],
                        "resources": {"limits": {"nvidia.com/gpu": gpus_per_worker}},
                    }],
                },
            },
        },
    }
    head = (f"# {workers} autotune workers on one study (written by `autotune workers`).\n"
            f"# The database URL is the Secret's: kubectl create secret generic {secret} "
            "--from-literal=url=postgresql://USER:PASSWORD@HOST:5432/DB\n")
    return head + yaml.safe_dump(manifest, sort_keys=False)


def readme(search_args: Sequence[str], workers: int, secret: str) -> str:
    return f"""{workers} autotune workers on one study

  Slurm:       AUTOTUNE_STORAGE=postgresql://USER@HOST:5432/DB sbatch workers.sbatch
  Kubernetes:  kubectl create secret generic {secret} --from-literal=url=postgresql://...
               kubectl apply -f workers-job.yaml

Each worker runs: {shlex.join(worker_argv(search_args))}
They share the study's --trials in all; run the same job again to resume. Then, anywhere:
  AUTOTUNE_STORAGE=... autotune best
"""


__all__ = ["CLUSTER_FILES", "k8s_job", "readme", "slurm_array", "worker_argv"]
