"""Stand-in ``srun`` (Slurm) and ``mpirun`` (Open MPI), chosen by the name it is run as: strict
about the options autotune uses, failing where the real ones fail, recording each node's task
(host, argv, environment) and running the command HERE in place of node 0's first task (the
other tasks are recorded, not run: an MPI world cannot be faked, and rank 0 is the one that
writes the report or serves the API).

- ``srun [--nodes=N --nodelist=h1,h2] --ntasks=T [--ntasks-per-node=K] [--gres=gpu:G]
  [--cpus-per-task=C] [--mpi=pmix] CMD...``:
  every task gets the environment (srun exports all) plus ``SLURM_PROCID``, ``SLURM_NODEID``,
  ``SLURM_LOCALID``, ``SLURMD_NODENAME``, ``SLURM_NTASKS``; nodes outside the job
  (``SLURM_JOB_NODELIST``, when set) are refused as Slurm refuses them; with
  ``AUTOTUNE_STANDIN_SLURM_STATE``, steps claim GPUs as Slurm's steps do (``claim_gpus``).
- ``mpirun -n T [-H h1:k,h2:k] [--bind-to none] [-x NAME]... CMD...``: ranks on another host
  than this one get only ``PATH``, ``HOME``, the ``-x`` variables and ``OMPI_COMM_WORLD_*``
  (Open MPI forwards nothing else to remote nodes); more ranks than slots is refused.

``AUTOTUNE_STANDIN_LAUNCH_LOG``: a JSONL file, one line per launch: ``{"launcher", "argv",
"tasks": [{"host", "rank", "env"}]}``. ``AUTOTUNE_STANDIN_NODE_ENV``: JSON mapping a host to
variables its node sets itself (its own environment), applied to the task run here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

LOCAL_HOSTS = {"localhost", "127.0.0.1", socket.gethostname()}


def die(launcher: str, msg: str, code: int = 1):
    print(f"{launcher}: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def expand(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``gpu[01-02,05],login1``) as host names."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def claim_gpus(hosts: list[str], gpus: int | None) -> None:
    """Slurm's step rule, where ``AUTOTUNE_STANDIN_SLURM_STATE`` names a folder for the job's
    running steps: a step that asks for no GPUs takes all of the job's on its nodes
    (``SLURM_GPUS_ON_NODE``, 8), so it cannot start beside another step on one of them; steps
    that ask (``--gres=gpu:N``) share a node while their GPUs fit. (Real srun waits, "Job step
    creation temporarily disabled"; this one fails at once so that a test sees it.)"""
    state = os.environ.get("AUTOTUNE_STANDIN_SLURM_STATE")
    if not state:
        return
    per_node = int(os.environ.get("SLURM_GPUS_ON_NODE", "8"))
    want = per_node if gpus is None else gpus
    folder = Path(state)
    folder.mkdir(parents=True, exist_ok=True)
    used: dict[str, int] = {}
    for entry in folder.glob("*.json"):
        pid = int(entry.stem)
        try:
            os.kill(pid, 0)
        except OSError:  # that step has ended
            entry.unlink(missing_ok=True)
            continue
        step = json.loads(entry.read_text())
        for host in step["hosts"]:
            used[host] = used.get(host, 0) + step["gpus"]
    for host in hosts:
        if used.get(host, 0) + want > per_node:
            die("srun", f"Job step creation temporarily disabled: {host} has "
                        f"{per_node - used.get(host, 0)} of the {want} GPUs the step takes free")
    # The step keeps this process's id: the command replaces it (exec).
    (folder / f"{os.getpid()}.json").write_text(json.dumps({"hosts": hosts, "gpus": want}))


def parse_srun(args: list[str]) -> tuple[dict, list[str]]:
    opts: dict = {}
    known = {"--nodes": int, "--nodelist": str, "--ntasks": int, "--ntasks-per-node": int,
             "--mpi": str, "--gres": str, "--cpus-per-task": int}
    while args and args[0].startswith("-"):
        flag, _, value = args.pop(0).partition("=")
        if flag not in known or not value:
            print(f"srun: unrecognized option '{flag}'\nTry \"srun --help\" for more "
                  "information", file=sys.stderr)
            sys.exit(1)
        opts[flag] = known[flag](value)
    if not args:
        die("srun", "no command given")
    if opts.get("--mpi", "pmix") != "pmix":
        die("srun", f"MPI type '{opts['--mpi']}' is not known")
    hosts = opts.get("--nodelist", "localhost").split(",")
    nodes = opts.get("--nodes", len(hosts))
    if len(hosts) != nodes:
        die("srun", f"Required nodelist includes {len(hosts)} nodes, --nodes={nodes}")
    allocated = os.environ.get("SLURM_JOB_NODELIST")
    if allocated and "--nodelist" in opts:
        outside = [h for h in hosts if h not in expand(allocated)]
        if outside:
            die("srun", f"Requested node configuration is not available ({outside[0]})")
    gres = opts.get("--gres")
    if gres is not None and not re.fullmatch(r"gpu:\d+", gres):
        die("srun", f"Invalid generic resource (gres) specification: {gres}")
    claim_gpus(hosts, int(gres.split(":")[1]) if gres else None)
    tasks = opts.get("--ntasks", nodes)
    per = opts.get("--ntasks-per-node", -(-tasks // nodes))
    if per * nodes < tasks or tasks < nodes:
        die("srun", f"--ntasks={tasks} does not fit {nodes} node(s) of {per} task(s)")
    out = []
    for rank in range(tasks):
        node = rank // per
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(node),
               "SLURM_LOCALID": str(rank % per), "SLURMD_NODENAME": hosts[node],
               "SLURM_NTASKS": str(tasks)}
        out.append({"host": hosts[node], "rank": rank, "env": env})
    return {"tasks": out}, args


def parse_mpirun(args: list[str]) -> tuple[dict, list[str]]:
    tasks, slots, forward = None, [], []
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("-n", "-np", "-H", "--host", "-x") and not args:
            die("mpirun", f"option {flag} needs a value")
        if flag in ("-n", "-np"):
            tasks = int(args.pop(0))
        elif flag in ("-H", "--host"):
            for item in args.pop(0).split(","):
                host, _, count = item.partition(":")
                slots.append((host, int(count or 1)))
        elif flag == "-x":
            forward.append(args.pop(0))
        elif flag == "--bind-to":
            if not args or args[0] not in ("none", "core", "socket", "numa", "hwthread"):
                die("mpirun", "--bind-to needs none, core, socket, numa or hwthread")
            args.pop(0)
        else:
            die("mpirun", f'unknown option "{flag}"')
    if not args:
        die("mpirun", "no executable given")
    slots = slots or [("localhost", tasks or 1)]
    tasks = tasks or sum(n for _, n in slots)
    if tasks > sum(n for _, n in slots):
        die("mpirun", f"There are not enough slots available in the system to satisfy the "
                      f"{tasks} slots that were requested by the application")
    out, rank = [], 0
    for host, count in slots:
        for _ in range(count):
            if rank == tasks:
                break
            if host in LOCAL_HOSTS:
                env = dict(os.environ)
            else:  # a remote node gets only what -x names
                env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
                for item in forward:
                    name, eq, value = item.partition("=")
                    if eq:
                        env[name] = value
                    elif name in os.environ:
                        env[name] = os.environ[name]
            env.update({"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(tasks)})
            out.append({"host": host, "rank": rank, "env": env})
            rank += 1
    return {"tasks": out}, args


def install(folder, names=("srun", "mpirun")) -> Path:
    """Write executable ``srun`` and ``mpirun`` stand-ins (this interpreter, this file) into
    ``folder``; returns it, for the front of PATH."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parent)
    for name in names:
        exe = folder / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {here!r})\n"
                       f"import launch\nlaunch.main({name!r})\n")
        exe.chmod(0o755)
    return folder


def main(launcher: str | None = None) -> None:
    launcher = launcher or os.path.basename(sys.argv[0])
    argv = sys.argv[1:]
    parse = {"srun": parse_srun, "mpirun": parse_mpirun}.get(launcher)
    if parse is None:
        die(launcher, "the stand-in launcher runs as srun or mpirun")
    record, command = parse(list(argv))
    first = record["tasks"][0]
    node_env = json.loads(os.environ.get("AUTOTUNE_STANDIN_NODE_ENV") or "{}")
    env = {**first["env"], **node_env.get(first["host"], {})}
    log = os.environ.get("AUTOTUNE_STANDIN_LAUNCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"launcher": launcher, "argv": [launcher, *argv],
                                "command": command, **record}) + "\n")
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
