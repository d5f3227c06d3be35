"""The ``vllm`` runner: measures configurations on the node with ``vllm serve`` and
``vllm bench serve``.

Per configuration (shared/docs/vllm-cpu.md has a real engine's facts):

1. ``dp`` replicas are separate ``vllm serve`` processes, each on its own ``tp * pp`` GPUs
   (``CUDA_VISIBLE_DEVICES``) and a free port on 127.0.0.1, behind no balancer: each gets its
   share of the load. (vLLM's ``--data-parallel-size`` is for MoE models' attention data
   parallelism, where the ranks must share the expert layers; a dense model's replicas share
   nothing, and separate servers are what users deploy behind a load balancer.)
2. The servers start once per configuration and serve its whole load sweep, also across
   ``measure`` calls for the same configuration (the study bisects a trial's load ladder one
   point at a time); they stop when another configuration is measured, or on ``close``.
3. Each load point is one ``vllm bench serve`` per replica, side by side, with the study's
   lengths (random prompts, ``--ignore-eos``), warm-ups, and per-request detail saved; the
   replicas' requests are merged into one load point (``_result.py``).
4. Failures are classified from the exit status and the log (``_server.py``): start-up out of
   memory, a refused layout, a start-up timeout, a crash, a bad or incomplete result.

Command lines come from ``argv.py`` (the one builder, shared with the deploy folder). vLLM
itself is never imported: it runs in its own processes, started from argv lists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from autotune.config import EngineConfig, stable_hash
from autotune.errors import BadReport, InvalidConfig, TrialFailure, UserError
from autotune.measurement import (
    BENCH_REQUESTS,
    MAX_CONCURRENCY,
    LoadPoint,
    Measurement,
    in_flight,
    replica_load,
)
from autotune.model import check_layout
from autotune.runners._base import Runner
from autotune.runners._launch import (
    ReplicaPlace,
    forwarded,
    launch_prefix,
    place_replicas,
    step_cpus,
)
from autotune.runners._process import Job, ProcessGroups
from autotune.runners._tools import find_executable, public_env, replica_devices, write_json
from autotune.runners.vllm import argv as cmd
from autotune.runners.vllm._result import BenchResult, load_point, parse_result
from autotune.runners.vllm._server import (
    Server,
    classify_run,
    engine_death,
    free_port,
    launch_server,
    port_taken,
    stop_server,
    wait_ready,
)
from autotune.runners.vllm.settings import (
    VllmSettings,
    quantization_for,
    resolve_settings,
    vllm_version,
)
from autotune.scenario import Scenario
from autotune.specs import Workload

#: A start that lost its port to another process is retried this many times on a new port.
PORT_RETRIES = 2


def _label(config: EngineConfig) -> str:
    chunk = "chunked" if config.chunked_prefill else "nochunk"
    return (f"{config.layout_label()}-s{config.max_batch_size}-"
            f"t{config.max_num_tokens}-m{config.kv_fraction:.2f}-{chunk}")


class VllmRunner(Runner):
    """Measures configurations with ``vllm serve`` + ``vllm bench serve`` on this node (see the
    module docstring). Options are those of ``VllmSettings``; a bad one is a UserError raised
    here, before anything runs."""

    name = "vllm"
    settings_class: ClassVar[type] = VllmSettings
    default_space: ClassVar[str] = "vllm"
    token_gaps = True  # vllm bench serve times every streamed token

    def __init__(self, scenario: Scenario, *, store=None, **options):
        super().__init__(scenario)
        self.check_option_names(options)
        self.options = resolve_settings(scenario, options)
        self.workspace = Path(self.options.workspace)
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --workspace {str(self.workspace)!r}: "
                            f"{exc.strerror or exc}") from None
        self.version = vllm_version(self.options.vllm, self._env())
        self.quantization, self.kv_cache_dtype = quantization_for(scenario.precision,
                                                                  self.options.model_path)
        self._procs = ProcessGroups(drain_s=self.options.drain_timeout)
        self._live: tuple[str, list[Server], Path] | None = None  # (key, servers, their dir)
        self._session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self._starts = 0

    @classmethod
    def check_options(cls, scenario: Scenario, **options) -> None:
        cls.check_option_names(options)
        resolve_settings(scenario, options)

    # ---- identity ---------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """What ``vllm serve`` loads: the local checkpoint, else the Hugging Face name."""
        return self.options.model_path or self.options.hf_name

    def settings(self) -> dict:
        """What changes results: model, vLLM version, requests, warm-up, eager mode, env."""
        o = self.options
        return {
            "runner": self.name, "model": o.hf_name, "model_path": o.model_path,
            "vllm_version": self.version or "unknown", "num_requests": o.num_requests or "auto",
            "warmup": o.warmup, "eager": o.eager, "dataset": "random/1",
            "quantization": self.quantization, "kv_cache_dtype": self.kv_cache_dtype,
            "env": public_env(o.env),
        }

    def engine_args(self, config: EngineConfig, workload: Workload) -> dict:
        """``vllm serve`` engine arguments for one replica of ``config`` under ``workload``."""
        return cmd.engine_args(config, max_model_len=workload.max_seq_len,
                               quantization=self.quantization,
                               kv_cache_dtype=self.kv_cache_dtype, eager=self.options.eager)

    # ---- the runner interface ---------------------------------------------------------------
    def interrupt(self) -> None:
        self._procs.interrupt()

    def close(self) -> None:
        self._stop_servers()
        self._procs.interrupt()

    def measure(self, config: EngineConfig, workload: Workload,
                loads: Sequence[int]) -> Measurement:
        """One ``vllm bench serve`` per replica per load (see the class contract). ``raw`` keeps
        the servers' argv and logs, and per load point the benchmark argv, result paths and
        vLLM's own summary."""
        self._procs.interrupted = False
        self._check(config, workload)
        servers, server_dir = self._servers_for(config, workload)
        trial_dir = server_dir.parent
        points: list[LoadPoint] = []
        raws: list[dict] = []
        try:
            for load in loads:
                point, raw = self._run_load(config, workload, load, servers, trial_dir)
                points.append(point)
                raws.append(raw)
        except BaseException:
            # A server a load point failed on (hung, engine dead, half shut down) never serves
            # the next one: the next measurement starts afresh.
            self._stop_servers()
            raise
        fits = [s.fit for s in servers]
        # Under attention DP each of a server's tp data-parallel ranks has its own cache and
        # batch (the figure vLLM logs is one rank's).
        capacity = (min(min(f, config.max_batch_size) for f in fits) * config.attention_ranks
                    * config.dp if all(fits) else 0)
        return Measurement(
            runner=self.name, config=config, workload=workload, load_points=tuple(points),
            max_requests_in_flight=capacity,
            raw={"settings": self.settings(), "runs_dir": str(trial_dir),
                 "servers": [{"argv": list(s.job.argv), "log_path": str(s.log_path),
                              "port": s.port, "host": s.host,
                              "cuda_visible_devices": s.job.env.get("CUDA_VISIBLE_DEVICES"),
                              "nodes": [{"argv": list(j.argv), "log_path": str(j.log_path)}
                                        for _, j in s.followers]}
                             for s in servers],
                 "load_points": raws},
        )

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, config: EngineConfig, workload: Workload) -> None:
        """The layout rules, this node's GPU count and vLLM's scheduler rules, checked before a
        server starts (InvalidConfig, as vLLM would refuse them)."""
        check_layout(self.scenario.model, config)
        if 1 < config.ep < config.tp:
            # vLLM's expert parallelism spans every GPU of the MoE layers' group (EP size =
            # TP x DP, vllm/model_executor/layers/fused_moe/config.py): all or none.
            raise InvalidConfig(f"{config.label()}: vLLM's expert parallelism takes all tp "
                                f"GPUs of a stage (ep 1 or {config.tp})")
        if config.gpus > self.scenario.num_gpus:
            raise InvalidConfig(f"{config.label()} needs {config.gpus} GPUs; the study has "
                                f"{self.scenario.num_gpus}")
        self._places(config)  # on the study's nodes, by the whole-node rule
        # vllm/config/scheduler.py (0.32): both refused at start-up with a ValueError.
        if config.max_num_tokens < config.max_batch_size:
            raise InvalidConfig(f"max_num_batched_tokens ({config.max_num_tokens}) must be >= "
                                f"max_num_seqs ({config.max_batch_size})")
        if not config.chunked_prefill and config.max_num_tokens < workload.max_seq_len:
            raise InvalidConfig(f"without chunked prefill, max_num_batched_tokens "
                                f"({config.max_num_tokens}) must be >= max_model_len "
                                f"({workload.max_seq_len})")

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The processes' environment: ours, the user's extra variables, then per-replica."""
        return {**os.environ, **self.options.env, **(extra or {})}

    # ---- servers ------------------------------------------------------------------------------
    def _servers_for(self, config: EngineConfig, workload: Workload) -> tuple[list[Server], Path]:
        """The running servers of ``config`` (started now unless they already serve it)."""
        args = self.engine_args(config, workload)
        key = stable_hash(config.to_dict(), args)
        if self._live is not None:
            live_key, servers, folder = self._live
            if live_key == key and all(s.alive() for s in servers):
                return servers, folder
            self._stop_servers()
        self._starts += 1
        folder = (self.workspace / "runs" / self._session / _label(config)
                  / f"servers-{self._starts}")
        folder.mkdir(parents=True, exist_ok=True)
        places = self._places(config)
        devices = ([None] * config.dp if self.options.hosts else
                   replica_devices(config, self.scenario.num_gpus,
                                   self._env().get("CUDA_VISIBLE_DEVICES")))
        # All replicas start together (a start takes tens of seconds to minutes), then each is
        # waited for; a start that lost its port to another process is tried on a new one.
        servers: list[Server] = []
        try:
            for r, (where, visible) in enumerate(zip(places, devices)):
                servers.append(self._launch(args, r, where, visible, folder, attempt=0))
            for r, (where, visible) in enumerate(zip(places, devices)):
                for attempt in range(1, PORT_RETRIES + 2):
                    try:
                        wait_ready(self._procs, servers[r], self.options.startup_timeout)
                        break
                    except TrialFailure as exc:
                        if not port_taken(exc) or attempt > PORT_RETRIES:
                            raise
                        servers[r] = self._launch(args, r, where, visible, folder,
                                                  attempt=attempt)
        except BaseException:
            for s in servers:
                stop_server(self._procs, s)
            raise
        self._live = (key, servers, folder)
        return servers, folder

    def _places(self, config: EngineConfig) -> list[ReplicaPlace | None]:
        """Each replica's nodes and GPUs when the study's runs are pinned to hosts (a study over
        several nodes); None per replica on this node."""
        return place_replicas(config, self.scenario.gpu.gpus_per_node, self.options.hosts)

    def _launch(self, args: dict, replica: int, where: ReplicaPlace | None,
                visible: str | None, folder: Path, attempt: int) -> Server:
        """Start replica ``replica``'s servers without waiting for them: on this node
        (``visible``: its ``CUDA_VISIBLE_DEVICES``), or one per node of ``where`` through the
        launcher, the API server on node 0; on a free port (a port free here, for a server on
        another node: one taken there fails the start as a taken port, tried again on another)."""
        o = self.options
        port = free_port()
        name = f"server-{replica}" + (f"-retry{attempt}" if attempt else "")
        if where is None:
            extra = {"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}
            argv = cmd.serve_argv(self.model, args, vllm=o.vllm, port=port)
            return launch_server(self._procs, self._job(folder, name, argv, extra), port)
        # Listening on every interface: the benchmarks reach it from this node.
        base = cmd.serve_argv(self.model, args, vllm=o.vllm, host="0.0.0.0", port=port)
        nodes, per_node = len(where.shares), self.scenario.gpu.gpus_per_node
        master_port = free_port()
        srun = o.launcher == "srun"
        jobs = []
        for rank, share in enumerate(where.shares):
            # A share of a node: srun binds the step's GPUs itself (--gres); mpirun passes the
            # replica's CUDA_VISIBLE_DEVICES on.
            extra = ({"CUDA_VISIBLE_DEVICES": share.visible_devices}
                     if not share.whole and not srun else {})
            argv = [*launch_prefix(o.launcher, hosts=[share.host], tasks=1, mpi=False,
                                   exe=find_executable(o.launcher),
                                   gpus=None if share.whole else len(share.devices),
                                   cpus=step_cpus(len(share.devices), per_node, self._env()),
                                   env_names=forwarded([*o.env, *extra])), *base]
            if nodes > 1:
                argv += cmd.node_flags(nodes, rank, where.leader, master_port)
            label = name if rank == 0 else f"{name}-node{rank}"
            jobs.append(self._job(folder, label, argv, extra, host=share.host))
        return launch_server(self._procs, jobs[0], port, host=where.leader,
                             followers=tuple(jobs[1:]))

    def _job(self, folder: Path, name: str, argv: list[str], extra: dict[str, str],
             host: str | None = None) -> Job:
        """A server's job, its argv and environment also kept beside its log."""
        record = {"argv": argv, "env": public_env({**self.options.env, **extra})}
        write_json(folder / f"{name}.argv.json", record | ({"host": host} if host else {}))
        return Job(tuple(argv), folder / f"{name}.log", self._env(extra), cwd=folder)

    def _stop_servers(self) -> None:
        if self._live is None:
            return
        _, servers, _ = self._live
        self._live = None
        for s in servers:
            stop_server(self._procs, s)

    # ---- one load point -----------------------------------------------------------------------
    def _requests_per_replica(self, per_replica_load: int, dp: int, fit: int | None) -> int:
        if self.options.num_requests is not None:
            return max(1, -(-self.options.num_requests // dp))
        return BENCH_REQUESTS.requests(per_replica_load, fit)

    def _run_load(self, config: EngineConfig, workload: Workload, load: int,
                  servers: list[Server], trial_dir: Path) -> tuple[LoadPoint, dict]:
        per_replica = replica_load(load, config.dp)
        fits = [s.fit for s in servers]
        n = self._requests_per_replica(per_replica, config.dp, min(fits) if all(fits) else None)
        name = "max" if load == MAX_CONCURRENCY else str(load)
        folder, again = trial_dir / f"load-{name}", 2
        while folder.exists():  # the same load measured again: keep the earlier run's files
            folder, again = trial_dir / f"load-{name}-{again}", again + 1
        folder.mkdir(parents=True)
        jobs, paths = [], []
        for r, server in enumerate(servers):
            rdir = folder / f"replica-{r}" if config.dp > 1 else folder
            rdir.mkdir(parents=True, exist_ok=True)
            result = rdir / "result.json"
            argv = cmd.bench_argv(workload, base_url=server.base_url, tokenizer=self.model,
                                  concurrency=per_replica, num_prompts=n,
                                  warmups=self.options.warmup, result_dir=str(rdir),
                                  result_file=result.name, vllm=self.options.vllm)
            write_json(rdir / "argv.json", {"argv": argv, "env": public_env(self.options.env)})
            jobs.append(Job(tuple(argv), rdir / "bench.log", self._env(), cwd=rdir))
            paths.append(result)
        results = self._procs.run(jobs, self.options.run_timeout,
                                  what=f"vllm bench serve at concurrency {name}")
        for res, server in zip(results, servers):
            if res.returncode not in (0, None):
                raise classify_run(res.returncode, res.job.log_path, server)
        parsed = [self._parse(path, server) for path, server in zip(paths, servers)]
        point = load_point(parsed, concurrency=in_flight(load, config.dp), gpus=config.gpus)
        raw = {
            "load": load, "concurrency_per_replica": per_replica, "requests_per_replica": n,
            "folder": str(folder), "elapsed_s": round(results[0].elapsed_s, 3),
            "replicas": [{"argv": list(job.argv), "log_path": str(job.log_path),
                          "result_path": str(path), "vllm_version": self.version or "unknown",
                          "summary": bench.summary}
                         for job, path, bench in zip(jobs, paths, parsed)],
        }
        return point, raw

    @staticmethod
    def _parse(path: Path, server: Server) -> BenchResult:
        try:
            return parse_result(path)
        except BadReport as exc:
            # A server or an engine that died under the benchmark: its log says why.
            if not server.alive() or engine_death(server) is not None:
                raise classify_run(0, path, server) from None
            raise BadReport(str(exc), log_tail="", log_path=str(path)) from None


__all__ = ["VllmRunner"]

