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

import shlex
from collections.abc import Sequence

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


def _shell(argv: Sequence[str], model: str) -> str:
    """One command line with host placeholders as ``${NODES[i]}`` and the model as ``"$MODEL"``."""
    words = []
    for arg in argv:
        if arg == model:
            words.append('"$MODEL"')
            continue
        word = shlex.quote(arg)
        for i in range(64):
            word = word.replace(_NODE.format(i), f"${{NODES[{i}]}}")
        words.append(word)
    return " ".join(words)


def node_commands(engine: str, config: EngineConfig, serve: Sequence[str], where: ReplicaPlace,
                  launcher: str = "srun") -> list[tuple[str | None, list[str]]]:
    """Each command that starts replica ``where`` (its ``serve`` argv, on its nodes), with the
    ``CUDA_VISIBLE_DEVICES`` it needs (None: the node's own)."""
    share = where.shares[0]
    visible = None if share.whole else share.visible_devices
    if engine == "trtllm":
        prefix = trtllm_cmd.launch_prefix(launcher, config.gpus_per_replica, hosts=where.hosts,
                                          ranks_per_node=where.ranks_per_node,
                                          env_names=["CUDA_VISIBLE_DEVICES"] if visible else ())
        return [(visible, [*prefix, *serve])]
    out = []
    nodes = len(where.shares)
    for rank, share in enumerate(where.shares):
        argv = [*launch_prefix(launcher, hosts=[share.host], tasks=1, mpi=False), *serve]
        if nodes > 1:
            argv += vllm_cmd.node_flags(nodes, rank, where.leader, MASTER_PORT)
        out.append((visible, argv))
    return out


def sbatch_script(engine: str, config: EngineConfig, gpus_per_node: int,
                  commands: Sequence[Sequence[str]], ports: Sequence[int], model: str,
                  header: list[str]) -> str:
    """``slurm.sbatch``: the job's nodes in order, every replica started on its own with srun
    (``commands``: each replica's serve argv), the job alive while they run."""
    nodes = node_count(config, gpus_per_node)
    lines = ["#!/usr/bin/env bash", *("# " + " ".join(h.split()) for h in header),
             "#SBATCH --job-name=autotune-serve", f"#SBATCH --nodes={nodes}",
             f"#SBATCH --gpus-per-node={gpus_per_node}", "#SBATCH --exclusive",
             "# Submit from this folder on a shared filesystem (sbatch slurm.sbatch): every node",
             "# reads its files and the checkpoint from the same paths.",
             "set -euo pipefail", 'cd "${SLURM_SUBMIT_DIR:-.}"',
             f"MODEL=${{MODEL:-{shlex.quote(model)}}}",
             'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
             f'[ "${{#NODES[@]}}" -ge {nodes} ] || {{ echo "slurm.sbatch: needs {nodes} nodes" '
             '>&2; exit 1; }']
    for where, serve, port in zip(_places(config, gpus_per_node), commands, ports):
        lines.append(f"# replica {where.replica}: port {port} on "
                     + _shell([where.leader], model))
        for visible, argv in node_commands(engine, config, serve, where):
            env = f"CUDA_VISIBLE_DEVICES={visible} " if visible else ""
            lines.append(f"{env}{_shell(argv, model)} &")
    lines += ["wait -n  # one replica's end (a failure) ends the job", "exit 1"]
    return "\n".join(lines) + "\n"


#: Where a pod finds the engine's options file (the manifest's ConfigMap, mounted).
MOUNT = "/etc/autotune"


def lws_manifest(engine: str, config: EngineConfig, gpus_per_node: int, serve: Sequence[str],
                 port: int, options_file: str, options_yaml: str, name: str = "autotune",
                 image: str | None = None) -> str:
    """``lws.yaml``: a ConfigMap with the engine's options file, a LeaderWorkerSet of ``dp``
    groups (one pod per node of a replica, the replica's GPUs in it, the leader serving on
    ``port``) and a Service in front of the leaders. ``serve`` is one replica's serve argv,
    reading ``options_file`` (mounted from the ConfigMap)."""
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
        hosts = (f'HOSTS="$LWS_LEADER_ADDRESS:{gpus}"; first="${{LWS_LEADER_ADDRESS%%.*}}"; '
                 'rest="${LWS_LEADER_ADDRESS#*.}"; for i in $(seq 1 $((LWS_GROUP_SIZE-1))); '
                 f'do HOSTS="$HOSTS,$first-$i.$rest:{gpus}"; done; ')
        mpirun = ["mpirun", "--allow-run-as-root", "-n", str(config.gpus_per_replica)]
        line = (shlex.join(mpirun) + ' -H "$HOSTS" '
                + shlex.join([trtllm_cmd.LAUNCH_WRAPPER, *serve]))
        leader_cmd = ["sh", "-c", hosts + "exec " + line]
        worker_cmd = ["/usr/sbin/sshd", "-D"]

    def pod(command: list[str], role: str) -> dict:
        return {"metadata": {"labels": {"role": role}},
                "spec": {"containers": [{
                    "name": f"{engine}-{role}", "image": image, "command": command,
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    "volumeMounts": [{"name": "options", "mountPath": MOUNT}],
                    **({"ports": [{"containerPort": port}]} if role == "leader" else {}),
                }], "volumes": [{"name": "options", "configMap": {"name": f"{name}-options"}}]}}

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
           "sbatch_script", "spans_nodes"]
