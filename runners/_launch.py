"""Where a configuration's ranks run and what starts them there, for every runner of a real
engine and for the deploy folder: the study's nodes (``--hosts``, or the Slurm allocation the
worker runs in), each replica's share of them, and the ``srun`` / ``mpirun`` prefix that starts
a command on given nodes.

Placement follows the whole-node rule of ``autotune.model.check_placement``: a replica
(``tp x pp`` GPUs, its ranks in order) sits inside one node, a whole number of replicas to a
node, or spans whole nodes, ``gpus_per_node`` ranks on each. Everything here is argv lists;
nothing is run through a shell.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: How a runner starts ranks: on this node itself, or through Open MPI's ``mpirun`` or Slurm's
#: ``srun`` (which also reach other nodes).
LAUNCHERS = ("local", "mpirun", "srun")
#: Slurm's name for the nodes of the job a process runs in (a compressed host list).
SLURM_NODELIST = "SLURM_JOB_NODELIST"
#: Variables of our environment a launch names for the ranks (``mpirun -x``: Open MPI gives
#: remote ranks only what it is told; srun exports everything): NCCL's, UCX's, TensorRT-LLM's,
#: vLLM's and Hugging Face's (a token, a cache).
FORWARD_PREFIXES = ("NCCL_", "UCX_", "TLLM_", "TRTLLM_", "VLLM_", "HF_")
_HOST = re.compile(r"^[A-Za-z0-9_.:\-]+$")


@dataclass(frozen=True)
class NodeShare:
    """One node's part of a replica: its host and the GPU indices the replica owns there."""

    host: str
    devices: tuple[int, ...]
    whole: bool  # the replica owns every GPU of the node

    @property
    def visible_devices(self) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` for the replica's ranks on this node (None: the whole node,
        the environment left as it is)."""
        return None if self.whole else ",".join(map(str, self.devices))


@dataclass(frozen=True)
class ReplicaPlace:
    """Where one replica runs: its node shares in rank order (node 0 holds ranks 0..k-1)."""

    replica: int
    shares: tuple[NodeShare, ...]

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(s.host for s in self.shares)

    @property
    def leader(self) -> str:
        """The host of rank 0 (the API server, the benchmark's report)."""
        return self.shares[0].host

    @property
    def ranks_per_node(self) -> int:
        return len(self.shares[0].devices)

    @property
    def ranks(self) -> int:
        return sum(len(s.devices) for s in self.shares)


def forwarded(names: Sequence[str] = ()) -> list[str]:
    """The variables a launch passes on: ours of ``FORWARD_PREFIXES`` and ``names`` (the
    user's extra ones, a replica's own)."""
    return sorted({*(k for k in os.environ if k.startswith(FORWARD_PREFIXES)), *names})


def check_launcher(launcher: str) -> tuple[str, str | None]:
    """``--launcher`` as a known name and its executable (None for local); UserError when it is
    unknown or not on PATH."""
    from autotune.errors import UserError
    from autotune.runners._tools import find_executable

    name = str(launcher).strip().lower()
    if name not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r} is unknown: use {', '.join(LAUNCHERS)}")
    if name == "local":
        return name, None
    exe = find_executable(name)
    if exe is None:
        raise UserError(f"--launcher {name}: {name!r} is not on PATH")
    return name, exe


def step_cpus(gpus: int, gpus_per_node: int, env: Mapping[str, str] | None = None
              ) -> int | None:
    """CPUs for a Slurm step that takes ``gpus`` of a node's ``gpus_per_node``: its share of the
    job's CPUs on the node (``SLURM_CPUS_ON_NODE``); None outside a job. (Since Slurm 22.05 a
    step gets one CPU per task unless it asks: a whole vLLM server on one core.)"""
    cpus = (os.environ if env is None else env).get("SLURM_CPUS_ON_NODE", "")
    return max(1, int(cpus) * gpus // gpus_per_node) if cpus.isdigit() else None


def place_replicas(config, gpus_per_node: int, hosts: Sequence[str] | None
                   ) -> list[ReplicaPlace | None]:
    """``place`` on ``hosts``, or None per replica when the runs are not pinned to hosts."""
    if not hosts:
        return [None] * config.dp
    return list(place(config, gpus_per_node, hosts))


def place(config, gpus_per_node: int, hosts: Sequence[str]) -> tuple[ReplicaPlace, ...]:
    """Each of ``config``'s ``dp`` replicas on ``hosts`` (nodes of ``gpus_per_node`` GPUs):
    consecutive GPUs of one node while a replica fits in one, else consecutive whole nodes.
    InvalidConfig when the layout breaks the whole-node rule or needs more nodes than given."""
    from autotune.errors import InvalidConfig

    size = config.tp * config.pp
    if size <= gpus_per_node:
        if gpus_per_node % size:
            raise InvalidConfig(f"a replica of tp*pp={size} GPUs does not tile nodes of "
                                f"{gpus_per_node} GPUs")
        per_node = gpus_per_node // size
        needed = -(-config.dp // per_node)
    else:
        if size % gpus_per_node:
            raise InvalidConfig(f"a replica of tp*pp={size} GPUs spans nodes of {gpus_per_node} "
                                "GPUs but not whole ones")
        needed = size // gpus_per_node * config.dp
    if needed > len(hosts):
        raise InvalidConfig(f"{config.label()} needs {needed} node(s) of {gpus_per_node} GPUs; "
                            f"{len(hosts)} are given")
    places = []
    for r in range(config.dp):
        if size <= gpus_per_node:
            first = (r % per_node) * size
            shares = (NodeShare(hosts[r // per_node], tuple(range(first, first + size)),
                                whole=size == gpus_per_node),)
        else:
            span = size // gpus_per_node
            shares = tuple(NodeShare(hosts[r * span + k], tuple(range(gpus_per_node)), True)
                           for k in range(span))
        places.append(ReplicaPlace(r, shares))
    return tuple(places)


def expand_nodelist(nodelist: str, scontrol: str | None = None) -> tuple[str, ...]:
    """Hosts of a Slurm node list: a plain comma-separated one as it is, a compressed one
    (``gpu[01-04]``) through ``scontrol show hostnames``, the way Slurm documents. UserError when
    it needs scontrol and there is none."""
    from autotune.errors import UserError

    if "[" not in nodelist:
        return tuple(h for h in (p.strip() for p in nodelist.split(",")) if h)
    from autotune.runners._tools import find_executable

    exe = scontrol or find_executable("scontrol")
    if exe is None:
        raise UserError(f"{SLURM_NODELIST}={nodelist!r} needs Slurm's scontrol to expand; pass "
                        "--hosts h1,h2,... instead")
    try:
        out = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"scontrol show hostnames {nodelist!r} failed: {exc}") from None
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def resolve_hosts(hosts: str | Sequence[str] | None, nodes: int,
                  env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The study's ``nodes`` hosts, node 0 first: ``hosts`` (``--hosts``, comma-separated), else
    the Slurm job's nodes. UserError (one line) when neither names enough of them."""
    from autotune.errors import UserError

    env = os.environ if env is None else env
    if hosts is None:
        nodelist = env.get(SLURM_NODELIST)
        if not nodelist:
            raise UserError(f"{nodes} nodes need their host names: pass --hosts h1,h2,... or run "
                            "inside a Slurm allocation of them")
        found, source = expand_nodelist(nodelist), f"the Slurm job's nodes ({SLURM_NODELIST})"
    else:
        found = tuple(h.strip() for h in (hosts.split(",") if isinstance(hosts, str) else hosts))
        source = "--hosts"
    bad = [h for h in found if not _HOST.match(h)]
    if bad:
        raise UserError(f"{source}: {bad[0]!r} is not a host name")
    if len(set(found)) != len(found):
        raise UserError(f"{source} names a host twice: {','.join(found)}")
    if len(found) < nodes:
        raise UserError(f"{nodes} nodes are needed; {source} name {len(found)}: "
                        f"{','.join(found) or 'none'}")
    return found[:nodes]


def study_hosts(scenario, engine: str, launcher: str, hosts: str | Sequence[str] | None,
                env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The hosts the ``engine`` runner pins its runs to (None: this node, or wherever the
    launcher puts them): a study over several nodes needs an mpirun or srun launch and the
    nodes' names (``--hosts``, else the Slurm job's; UserError, one line)."""
    from autotune.errors import UserError

    if scenario.nodes == 1 and hosts is None:
        return None
    if launcher == "local":
        why = (f"the study spans {scenario.nodes} nodes" if scenario.nodes > 1
               else "--hosts names the nodes to run on")
        raise UserError(f"{why}: the {engine} runner reaches them with --launcher srun or "
                        "mpirun")
    return resolve_hosts(hosts, scenario.nodes, {**os.environ, **env})


def launch_prefix(launcher: str, *, hosts: Sequence[str] = (), tasks: int,
                  tasks_per_node: int | None = None, nodes: int | None = None,
                  gpus: int | None = None, cpus: int | str | None = None,
                  exe: str | None = None, env_names: Sequence[str] = (),
                  mpi: bool = True) -> list[str]:
    """``mpirun`` / ``srun`` starting ``tasks`` copies of the command that follows (empty for
    ``local``). ``hosts`` pins them to those nodes, ``tasks_per_node`` on each; without hosts
    the launcher places them itself (on ``nodes`` nodes of its allocation when given, srun
    only). ``mpi``: the command is an MPI program (srun's PMIx plug-in; mpirun binds its ranks);
    a plain one gets neither.

    srun: a step that asks for no GPUs gets all of the job's on its nodes (Slurm's rule), so a
    step that shares a node with others asks for its ``gpus`` per node (``--gres``; Slurm then
    binds them) and ``cpus`` per task. mpirun: Open MPI passes the ranks no variables unless
    named with ``-x`` (a replica's ``CUDA_VISIBLE_DEVICES`` among them).
    """
    if launcher == "local":
        if len(set(hosts)) > 1:
            raise ValueError("a local launch cannot reach other nodes")
        return []
    path = exe or launcher
    if launcher == "mpirun":
        argv = [path, "-n", str(tasks)]
        if hosts:
            per = tasks_per_node or -(-tasks // len(hosts))
            argv += ["-H", ",".join(f"{h}:{per}" for h in hosts)]
        if not mpi:  # one process that starts its own: not pinned to one core
            argv += ["--bind-to", "none"]
        for name in env_names:
            argv += ["-x", name]
        return argv
    if launcher == "srun":
        argv = [path]
        count = len(hosts) if hosts else nodes
        if count:
            argv.append(f"--nodes={count}")
        if hosts:
            argv.append(f"--nodelist={','.join(hosts)}")
        argv.append(f"--ntasks={tasks}")
        if count and tasks_per_node:
            argv.append(f"--ntasks-per-node={tasks_per_node}")
        if gpus:
            argv.append(f"--gres=gpu:{gpus}")
        if cpus:
            argv.append(f"--cpus-per-task={cpus}")
        return argv + (["--mpi=pmix"] if mpi else [])
    raise ValueError(f"unknown launcher {launcher!r}")


__all__ = ["FORWARD_PREFIXES", "LAUNCHERS", "SLURM_NODELIST", "NodeShare", "ReplicaPlace",
           "check_launcher", "expand_nodelist", "forwarded", "launch_prefix", "place",
           "place_replicas", "resolve_hosts", "step_cpus", "study_hosts"]
