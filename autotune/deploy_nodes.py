"""The deploy folder's files for a deployment over several nodes: ``slurm.sbatch`` (one batch
job holding every node, each replica started on its own with ``srun``) and ``lws.yaml`` (a
Kubernetes LeaderWorkerSet: one group of pods per replica, one pod per node, and a Service in
front of the leaders).

Each replica's nodes come from ``autotune.runners._launch.place`` (the runners' rule) and its
command lines from each engine's one builder: TensorRT-LLM's ranks over nodes are one MPI world
(``srun``/``mpirun`` + ``trtllm-llmapi-launch trtllm-serve``); vLLM runs one ``vllm serve`` per
node with ``--nnodes/--node-rank/--master-addr`` and ``--headless`` on all but node 0 (vLLM 0.32's
native multi-node launch, the one its LWS guide uses).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import yaml

from autotune.config import EngineConfig
from autotune.runners._launch import ReplicaPlace, launch_prefix, place
from autotune.runners.trtllm import argv as trtllm_cmd
from autotune.runners.vllm import argv as vllm_cmd

SBATCH, LWS = "slurm.sbatch", "lws.yaml"
#: vLLM's default ``--master-port`` (``ParallelConfig.master_port``), node 0's rendezvous.
MASTER_PORT = 29501
#: How a host appears in a command before the script names it (shell-safe: shlex leaves it bare).
_NODE = "@NODE{}@"


def spans_nodes(config: EngineConfig, gpus_per_node: int) -> bool:
    """True when the deployment needs more than one node (files for several are written)."""
    return config.gpus > gpus_per_node


def node_count(config: EngineConfig, gpus_per_node: int) -> int:
    hosts = [_NODE.format(i) for i in range(config.gpus)]
    return len({h for p in place(config, gpus_per_node, hosts) for h in p.hosts})


def _places(config: EngineConfig, gpus_per_node: int) -> tuple[ReplicaPlace, ...]:
    return place(config, gpus_per_node, [_NODE.format(i) for i in range(config.gpus)])


#: Placeholders a command line holds before a script names them: a host (``@NODE3@``) and a
#: step's CPUs for N GPUs (``@CPUS8@``); shlex leaves both bare.
_PLACEHOLDER = re.compile(r"@NODE(\d+)@|@CPUS(\d+)@")


def with_model_var(argv: Sequence[str], model: str) -> str:
    """``shlex.join(argv)`` with the model argument (``trtllm-serve MODEL``, ``vllm serve MODEL``,
    ``--model MODEL``, ``--tokenizer MODEL``, after any launcher prefix) written as ``"$MODEL"``,
    so a script's user can point it at a local checkpoint; host and CPU placeholders become
    ``${NODES[i]}`` and ``$((CPUS_PER_GPU * N))``."""
    start = next((i for i, a in enumerate(argv)
                  if Path(a).name in ("vllm", "trtllm-serve", "trtllm-bench")), 0)
    engine = Path(argv[start]).name if argv else ""

    def is_model(i: int, arg: str) -> bool:
        if arg != model or i <= start:
            return False
        if engine == "vllm":  # `vllm bench serve --model` is the served name, not the model
            return (i == start + 2 and argv[start + 1] == "serve") or argv[i - 1] == "--tokenizer"
        return (i == start + 1 and engine == "trtllm-serve") or argv[i - 1] == "--model"

    def named(match: re.Match) -> str:
        node, cpus = match.groups()
        return f"${{NODES[{node}]}}" if node else f"$((CPUS_PER_GPU * {cpus}))"

    return " ".join('"$MODEL"' if is_model(i, a) else _PLACEHOLDER.sub(named, shlex.quote(a))
                    for i, a in enumerate(argv))


def node_commands(engine: str, config: EngineConfig, serve: Sequence[str], where: ReplicaPlace,
                  gpus_per_node: int) -> list[list[str]]:
    """The srun lines that start replica ``where`` (its ``serve`` argv) on its nodes, as the
    runners start them: a step that shares its node asks for its GPUs (Slurm binds them), every
    step for its share of the node's CPUs."""
    share = where.shares[0]
    gpus = None if share.whole else len(share.devices)
    if engine == "trtllm":  # one MPI world, one rank (and one GPU's CPUs) per GPU
        prefix = trtllm_cmd.launch_prefix("srun", config.gpus_per_replica, hosts=where.hosts,
                                          ranks_per_node=where.ranks_per_node, gpus=gpus,
                                          cpus="@CPUS1@")
        return [[*prefix, *serve]]
    out = []
    nodes = len(where.shares)
    for rank, share in enumerate(where.shares):
        argv = [*launch_prefix("srun", hosts=[share.host], tasks=1, mpi=False, gpus=gpus,
                               cpus=f"@CPUS{len(share.devices)}@"), *serve]
        if nodes > 1:
            argv += vllm_cmd.node_flags(nodes, rank, where.leader, MASTER_PORT)
        out.append(argv)
    return out


def sbatch_script(engine: str, config: EngineConfig, gpus_per_node: int,
                  commands: Sequence[Sequence[str]], ports: Sequence[int], model: str,
                  header: list[str], *, batch: bool = True) -> str:
    """``slurm.sbatch`` (``batch``) or ``serve.sh`` for an allocation already held: the job's
    nodes in order, every replica started on its own with srun (``commands``: each replica's
    serve argv), the job alive while they all run."""
    nodes = node_count(config, gpus_per_node)
    where = ('cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"' if batch else 'cd "$(dirname "$0")"')
    lines = ["#!/usr/bin/env bash", *("# " + " ".join(h.split()) for h in header),
             "#SBATCH --job-name=autotune-serve", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --gpus-per-node={gpus_per_node}", "#SBATCH --exclusive",
             ("# Submit from this folder on a shared filesystem (sbatch slurm.sbatch): every node"
              if batch else "# Run inside an allocation of the nodes (salloc); this folder and"),
             ("# reads its files and the checkpoint from the same paths." if batch else
              "# the checkpoint on a shared filesystem (every node reads the same paths)."),
             "set -euo pipefail", where,
             f"MODEL=${{MODEL:-{shlex.quote(model)}}}",
             'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
             f'[ "${{#NODES[@]}}" -ge {nodes} ] || {{ echo "needs {nodes} nodes, the job has '
             '${#NODES[@]}" >&2; exit 1; }',
             # Since Slurm 22.05 a step gets one CPU per task unless it asks for more.
             f"CPUS_PER_GPU=$(( ${{SLURM_CPUS_ON_NODE:-{gpus_per_node}}} / {gpus_per_node} ))"]
    for place_, serve, port in zip(_places(config, gpus_per_node), commands, ports):
        lines.append(f"# replica {place_.replica}: port {port} on "
                     + with_model_var([place_.leader], model))
        for argv in node_commands(engine, config, serve, place_, gpus_per_node):
            lines.append(f"{with_model_var(argv, model)} &")
    lines += ["wait -n  # one replica's end (a failure) ends the job", "exit 1"]
    return "\n".join(lines) + "\n"


#: Where a pod finds the engine's options file (the manifest's ConfigMap, mounted).
MOUNT = "/etc/autotune"
#: The PersistentVolumeClaim a pod mounts a local checkpoint from (at the same path).
MODEL_CLAIM = "autotune-model"


def lws_manifest(engine: str, config: EngineConfig, gpus_per_node: int, serve: Sequence[str],
                 port: int, options_file: str, options_yaml: str, model: str,
                 name: str = "autotune", image: str | None = None) -> str:
    """``lws.yaml``: a ConfigMap with the engine's options file, a LeaderWorkerSet of ``dp``
    groups (one pod per node of a replica, the replica's GPUs in it, the leader serving on
    ``port``) and a Service in front of the leaders. ``serve`` is one replica's serve argv,
    reading ``options_file`` (mounted from the ConfigMap) and ``model`` (a local checkpoint
    from the ``MODEL_CLAIM`` volume claim, mounted at its path)."""
    where = _places(config, gpus_per_node)[0]
    size = len(where.shares)
    gpus = len(where.shares[0].devices)
    mounted = f"{MOUNT}/{options_file}"
    serve = [mounted if a == options_file else a for a in serve]
    if engine == "vllm":
        image = image or "vllm/vllm-openai:latest"
        leader_cmd, worker_cmd = list(serve), list(serve)
        if size > 1:  # LWS gives each pod its group's leader address and its own index
            leader_cmd += vllm_cmd.node_flags(size, 0, "$(LWS_LEADER_ADDRESS)", MASTER_PORT)
            worker_cmd += vllm_cmd.node_flags(size, "$(LWS_WORKER_INDEX)",
                                              "$(LWS_LEADER_ADDRESS)", MASTER_PORT)
    else:
        image = image or "nvcr.io/nvidia/tensorrt-llm/release:latest"
        # One MPI world over the group's pods: the leader lists them by LWS's pod names
        # (<group>-<i>.<service>: the leader's address with the index added) and mpirun starts
        # the workers' ranks over ssh; the image needs sshd and keys shared by the group.
        # mpirun starts as soon as every worker's sshd answers (the group's pods start together,
        # not in order).
        hosts = (f'HOSTS="$LWS_LEADER_ADDRESS:{gpus}"; first="${{LWS_LEADER_ADDRESS%%.*}}"; '
                 'rest="${LWS_LEADER_ADDRESS#*.}"; for i in $(seq 1 $((LWS_GROUP_SIZE-1))); '
                 'do w="$first-$i.$rest"; until ssh -o StrictHostKeyChecking=no "$w" true; '
                 f'do sleep 5; done; HOSTS="$HOSTS,$w:{gpus}"; done; ')
        mpirun = ["mpirun", "--allow-run-as-root", "-n", str(config.gpus_per_replica)]
        line = (shlex.join(mpirun) + ' -H "$HOSTS" '
                + shlex.join([trtllm_cmd.LAUNCH_WRAPPER, *serve]))
        leader_cmd = ["sh", "-c", hosts + "exec " + line]
        worker_cmd = ["/usr/sbin/sshd", "-D"]

    # The options file from the ConfigMap; shared memory for NCCL and the engine's worker
    # processes (a container's own /dev/shm is 64 MiB); a local checkpoint from a volume claim
    # of that name (a Hugging Face name downloads instead).
    mounts = [{"name": "options", "mountPath": MOUNT}, {"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "options", "configMap": {"name": f"{name}-options"}},
               {"name": "shm", "emptyDir": {"medium": "Memory"}}]
    if model.startswith("/"):
        mounts.append({"name": "model", "mountPath": model, "readOnly": True})
        volumes.append({"name": "model",
                        "persistentVolumeClaim": {"claimName": MODEL_CLAIM, "readOnly": True}})

    def pod(command: list[str], role: str) -> dict:
        return {"metadata": {"labels": {"role": role}},
                "spec": {"containers": [{
                    "name": f"{engine}-{role}", "image": image, "command": command,
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    "volumeMounts": mounts,
                    **({"ports": [{"containerPort": port}]} if role == "leader" else {}),
                }], "volumes": volumes}}

    # Size 1 (a replica inside one node): the worker template is the leader (LWS's rule).
    templates = ({"leaderTemplate": pod(leader_cmd, "leader"),
                  "workerTemplate": pod(worker_cmd, "worker")} if size > 1 else
                 {"workerTemplate": pod(leader_cmd, "leader")})
    options = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-options"},
               "data": {options_file: options_yaml}}
    lws = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
           "metadata": {"name": name},
           "spec": {"replicas": config.dp, "leaderWorkerTemplate": {
               "size": size, "restartPolicy": "RecreateGroupOnPodRestart", **templates}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{name}-leader"},
               "spec": {"ports": [{"name": "http", "port": port, "targetPort": port}],
                        "selector": {"leaderworkerset.sigs.k8s.io/name": name,
                                     "role": "leader"},
                        "type": "ClusterIP"}}
    return yaml.safe_dump_all([options, lws, service], sort_keys=False)


__all__ = ["LWS", "MASTER_PORT", "MOUNT", "SBATCH", "lws_manifest", "node_commands", "node_count",
           "sbatch_script", "spans_nodes", "with_model_var"]
