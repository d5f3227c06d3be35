"""The ``trtllm`` runner: measures configurations on the node with TensorRT-LLM's ``trtllm-bench``.

Per trial (shared/docs/trtllm.md has the tool's facts):

1. The requests: a JSONL dataset written once per workload from seeded random token ids (or the
   user's own file), reused by every run.
2. PyTorch back end (default): no build; one ``trtllm-bench throughput`` per load point. TensorRT
   engine back end: ``trtllm-bench build`` first, the engine cached on disk (and in the database
   when the study shares it) under a hash of the settings that change the engine; runtime limits
   never exceed the built ones (``_engines.py``).
3. ``dp`` replicas run side by side, each on its own ``tp * pp`` GPUs (``CUDA_VISIBLE_DEVICES``),
   with the load split between them; their reports are combined (``merge_replicas``).
4. Failures are classified from the exit status and the log (``_process.classify``); a runtime
   out-of-memory is retried once with a lower KV-cache share, a sequence limit of a built engine
   once with a rebuilt one.

Command lines come from ``argv.py`` (the one builder, shared with the deploy folder). TensorRT-LLM
itself is never imported: it runs in its own processes, started from argv lists.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import yaml

from autotune.config import EngineConfig, stable_hash
from autotune.errors import BadReport, InvalidConfig, OutOfMemory, SequenceLimit, UserError
from autotune.measurement import (
    BENCH_REQUESTS,
    MAX_CONCURRENCY,
    LoadPoint,
    Measurement,
    in_flight,
    replica_load,
)
from autotune.model import check_layout
from autotune.runners._base import EngineBuilder, Runner
from autotune.runners._launch import ReplicaPlace, forwarded, place_replicas, step_cpus
from autotune.runners._process import Job, JobResult, ProcessGroups, log_tail, read_log
from autotune.runners._tools import public_env, replica_devices
from autotune.runners._tools import write_json as _write_json
from autotune.runners.trtllm import argv as cmd
from autotune.runners.trtllm._dataset import Dataset, synthetic_dataset, user_dataset
from autotune.runners.trtllm._engines import EngineCache
from autotune.runners.trtllm._process import classify, needed_sequence, oom_in_log
from autotune.runners.trtllm._report import ReplicaResult, merge_replicas, parse_report
from autotune.runners.trtllm.releases import Release, Version
from autotune.runners.trtllm.settings import (
    TrtllmSettings,
    check_release,
    resolve_settings,
    trtllm_version,
)
from autotune.scenario import Scenario
from autotune.specs import Workload

#: A runtime out-of-memory is retried once with the KV-cache share lowered by this much
#: (NVIDIA's own fallback goes from 0.95 to 0.90).
KV_RETRY_STEP = 0.05
_KV_TOKENS = re.compile(r"for max tokens in paged KV cache \((\d+)\)")
_BLOCK_TOKENS = re.compile(r"Number of tokens per block: (\d+)")


def _safe_label(config: EngineConfig) -> str:
    chunk = "chunked" if config.chunked_prefill else "nochunk"
    return (f"{config.layout_label()}-b{config.max_batch_size}-"
            f"t{config.max_num_tokens}-kv{config.kv_fraction:.2f}-{chunk}")


class TrtllmRunner(EngineCache, Runner, EngineBuilder):
    """Measures configurations with ``trtllm-bench`` on this node (see the module docstring).

    Options are those of ``TrtllmSettings``; a bad one is a UserError raised here, before
    anything runs. ``store`` (an ``autotune.db.Store``) records built engines for other workers.
    """

    name = "trtllm"
    settings_class: ClassVar[type] = TrtllmSettings
    token_gaps = False  # trtllm-bench keeps no token times (see _report.py)

    def __init__(self, scenario: Scenario, *, store=None, **options):
        super().__init__(scenario)
        self.check_option_names(options)
        self.options, self.tools = resolve_settings(scenario, options)
        self.workspace = Path(self.options.workspace)
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --workspace {str(self.workspace)!r}: "
                            f"{exc.strerror or exc}") from None
        self.version = trtllm_version(self.tools.bench, self._env())
        #: What the installed release can do (from its package metadata, never the report's
        #: ``engine.version``: 1.2 and later always write "1.2").
        self.release = Release(Version.parse(self.version))
        check_release(self.options, self.release)
        self._user_dataset = user_dataset(
            self.options.dataset, task_id_required=self.release.task_id_required
        ) if self.options.dataset else None
        self._procs = ProcessGroups(drain_s=self.options.drain_timeout)
        self._datasets: dict[str, Dataset] = {}
        self._kv_lowered: dict[str, float] = {}  # config hash -> KV share after an OOM retry
        self._session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        if store is not None:
            self.use_store(store)

    @classmethod
    def check_options(cls, scenario: Scenario, **options) -> None:
        cls.check_option_names(options)
        settings, tools = resolve_settings(scenario, options)
        # The release decides what can run at all: asked of the install before anything is
        # written (reading its package metadata takes a fraction of a second).
        version = trtllm_version(tools.bench, {**os.environ, **settings.env})
        check_release(settings, Release(Version.parse(version)))

    # ---- identity ---------------------------------------------------------------------------
    def settings(self) -> dict:
        """What changes results: back end, model, TensorRT-LLM version, requests, launch, env."""
        o = self.options
        dataset = (f"user:{self._user_dataset.digest}" if self._user_dataset
                   else "synthetic/1")
        return {
            "runner": self.name, "backend": o.backend, "model": o.hf_name,
            "model_path": o.model_path, "trtllm_version": self.version or "unknown",
            "launcher": o.launcher, "num_requests": o.num_requests or "auto",
            "warmup": o.warmup, "dataset": dataset, "streaming": True,
            "eos_id": -1 if self.release.eos_id else None,
            "env": public_env(o.env),
        }

    def engine_key(self, config: EngineConfig, max_seq_len: int | None = None) -> str:
        """Hash of what a TensorRT engine bakes in: model, version, tp, pp, quantization, the
        batch/token limits and the longest sequence (the scenario's workload by default)."""
        return stable_hash({
            "runner": self.name, "model": self.options.hf_name,
            "model_path": self.options.model_path, "trtllm_version": self.version or "unknown",
            **config.engine_settings(), "quantization": cmd.QUANTIZATION.get(config.precision),
            "max_seq_len": max_seq_len or self._max_seq_len(self.scenario.workload),
        })

    # ---- the runner interface ---------------------------------------------------------------
    def interrupt(self) -> None:
        self._procs.interrupt()

    def close(self) -> None:
        self._procs.interrupt()

    def measure(self, config: EngineConfig, workload: Workload,
                loads: Sequence[int]) -> Measurement:
        """One run per load (see the class contract). ``raw`` keeps, per load point, the argv,
        report, per-request file and log paths, the raw report JSON and any retries."""
        self._procs.interrupted = False
        self._check_layout(config)
        dataset = self._dataset_for(workload)
        if not config.chunked_prefill and dataset.synthetic:
            # Unchunked, a whole prompt must fit one iteration's token budget; TensorRT-LLM
            # fails each such request ("RequestError: The sum of prompt length ... should not
            # exceed max_num_tokens"), so it cannot run at all.
            longest = int(workload.isl + 3 * workload.isl_std)
            if longest > config.max_num_tokens:
                raise InvalidConfig(f"prompts of up to {longest} tokens do not fit "
                                    f"max_num_tokens={config.max_num_tokens} without chunked "
                                    "prefill")
        engine = self._engine_for(config, workload) if self.options.backend == "tensorrt" else None
        trial_dir = self.workspace / "runs" / self._session / _safe_label(config)
        points: list[LoadPoint] = []
        raws: list[dict] = []
        capacities: list[int | None] = []
        for load in loads:
            point, raw, capacity, engine = self._measure_load(config, workload, load, dataset,
                                                              engine, trial_dir)
            points.append(point)
            raws.append(raw)
            capacities.append(capacity)
        known = [c for c in capacities if c]
        return Measurement(
            runner=self.name, config=config, workload=workload, load_points=tuple(points),
            max_requests_in_flight=min(known) if known else 0,
            raw={"settings": self.settings(), "backend": self.options.backend,
                 "engine": engine, "dataset": str(dataset.path), "runs_dir": str(trial_dir),
                 "load_points": raws},
        )

    # ---- checks and inputs ------------------------------------------------------------------
    def _check_layout(self, config: EngineConfig) -> None:
        """The layout rules (``autotune.model.check_layout``) and this node's GPU count, checked
        before anything runs (InvalidConfig)."""
        check_layout(self.scenario.model, config)
        if self.options.backend == "tensorrt" and (config.ep > 1 or config.attention_dp):
            # autotune builds TensorRT engines with trtllm-bench build, which takes tp and pp
            # only; expert parallelism and attention DP are the PyTorch back end's.
            raise InvalidConfig(f"{config.label()}: expert parallelism and attention DP need "
                                "--backend pytorch")
        if self.options.hosts and config.gpus > self.scenario.num_gpus:
            raise InvalidConfig(f"{config.label()} needs {config.gpus} GPUs; the study has "
                                f"{self.scenario.num_gpus}")
        if self.options.hosts:
            self._places(config)  # the replicas on the study's nodes (InvalidConfig if not)
        elif self.options.launcher == "local" and config.gpus > self.scenario.num_gpus:
            raise InvalidConfig(f"{config.label()} needs {config.gpus} GPUs; the node has "
                                f"{self.scenario.num_gpus} (use --launcher mpirun|srun across "
                                "nodes)")

    def _dataset_for(self, workload: Workload) -> Dataset:
        if self._user_dataset is not None:
            return self._user_dataset
        key = json.dumps(workload.to_dict(), sort_keys=True)
        if key not in self._datasets:
            count = self.options.num_requests or BENCH_REQUESTS.most
            self._datasets[key] = synthetic_dataset(self.workspace / "datasets", workload,
                                                    self.scenario.model.vocab, count)
        return self._datasets[key]

    def _max_seq_len(self, workload: Workload) -> int:
        """The longest request an engine must take (tokens): the user's dataset's when known,
        else the workload's bound (synthetic lengths never exceed it)."""
        if self._user_dataset is not None and self._user_dataset.max_seq_len:
            return self._user_dataset.max_seq_len
        return workload.max_seq_len

    def _requests_per_replica(self, per_replica_load: int, dp: int, dataset: Dataset) -> int:
        if self.options.num_requests is not None:
            n = math.ceil(self.options.num_requests / dp)
        else:
            n = BENCH_REQUESTS.requests(per_replica_load)
        return max(1, min(n, dataset.requests))

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The runs' environment: ours, the user's extra variables, then per-replica ones."""
        return {**os.environ, **self.options.env, **(extra or {})}

    def _places(self, config: EngineConfig) -> list[ReplicaPlace | None]:
        """Each replica's nodes and GPUs when the runs are pinned to hosts (a study over
        several nodes); None per replica otherwise."""
        return place_replicas(config, self.scenario.gpu.gpus_per_node, self.options.hosts)

    def _replica_gpus(self, config: EngineConfig) -> list[str | None]:
        """``CUDA_VISIBLE_DEVICES`` for each replica (None: left as it is, for one replica, for
        a replica owning whole nodes, under srun, which binds a step's GPUs itself, and under
        an external launcher without hosts, which places the ranks itself)."""
        if self.options.hosts:
            if self.options.launcher == "srun":
                return [None] * config.dp
            return [p.shares[0].visible_devices for p in self._places(config)]
        if self.options.launcher != "local":
            return [None] * config.dp
        return replica_devices(config, self.scenario.num_gpus,
                               self._env().get("CUDA_VISIBLE_DEVICES"))

    # ---- argv ---------------------------------------------------------------------------------
    def _launch_prefix(self, world: int, env_names: Sequence[str],
                       where: ReplicaPlace | None = None) -> list[str]:
        t = self.tools
        if where is None:
            return cmd.launch_prefix(self.options.launcher, world, launcher_path=t.launcher,
                                     wrapper=t.wrapper or cmd.LAUNCH_WRAPPER,
                                     env_names=env_names)
        share, per_node = where.shares[0], self.scenario.gpu.gpus_per_node
        return cmd.launch_prefix(self.options.launcher, world, launcher_path=t.launcher,
                                 wrapper=t.wrapper or cmd.LAUNCH_WRAPPER, env_names=env_names,
                                 hosts=where.hosts, ranks_per_node=where.ranks_per_node,
                                 gpus=None if share.whole else len(share.devices),
                                 cpus=step_cpus(1, per_node, self._env()))

    def build_argv(self, config: EngineConfig, workspace: Path, max_seq_len: int) -> list[str]:
        """``trtllm-bench build`` for ``config``, under the launcher (on the first replica's
        nodes when the runs are pinned to hosts)."""
        o = self.options
        return [*self._launch_prefix(config.gpus_per_replica, self._forwarded(),
                                     self._places(config)[0]),
                *cmd.build_argv(config, max_seq_len, bench=self.tools.bench, model=o.hf_name,
                                model_path=o.model_path, workspace=str(workspace))]

    def _forwarded(self, extra: Sequence[str] = ()) -> list[str]:
        """Names of the variables an external MPI launcher must pass to the ranks."""
        return forwarded([*self.options.env, *extra])

    def throughput_argv(self, config: EngineConfig, *, concurrency: int, num_requests: int,
                        dataset: Path, options_file: Path, report: Path, requests: Path,
                        engine: dict | None = None, replica_env: Sequence[str] = (),
                        where: ReplicaPlace | None = None) -> list[str]:
        """``trtllm-bench throughput`` for one replica of ``config`` at one concurrency, under
        the launcher (on ``where``'s nodes when given). ``engine`` is the built engine's info
        for the tensorrt back end; ``replica_env`` names the variables set for this replica."""
        o = self.options
        return [*self._launch_prefix(config.gpus_per_replica, self._forwarded(replica_env),
                                     where),
                *cmd.throughput_argv(
                    config, bench=self.tools.bench, model=o.hf_name, model_path=o.model_path,
                    workspace=str(self.workspace / "bench"), backend=o.backend,
                    concurrency=concurrency, num_requests=num_requests, dataset=str(dataset),
                    options_file=str(options_file), report=str(report), requests=str(requests),
                    warmup=o.warmup, engine=engine, release=self.release)]

    def options_yaml(self, config: EngineConfig) -> dict:
        """``--extra_llm_api_options`` content for a run of ``config``."""
        return cmd.llm_api_options(config, self.options.backend, self.release)

    # ---- one load point -------------------------------------------------------------------------
    def _measure_load(self, config: EngineConfig, workload: Workload, load: int,
                      dataset: Dataset, engine: dict | None, trial_dir: Path
                      ) -> tuple[LoadPoint, dict, int | None, dict | None]:
        """One load point, with one retry at a lower KV share after an out-of-memory and one
        rebuild after a built engine's sequence limit."""
        ckey = stable_hash(config.to_dict())
        retries: list[dict] = []
        rebuilt = False
        while True:
            kv = self._kv_lowered.get(ckey, config.kv_fraction)
            try:
                point, raw, capacity = self._run_load(config, load, dataset, engine, kv, trial_dir,
                                                      attempt=len(retries))
                raw["retries"] = retries
                return point, raw, capacity, engine
            except OutOfMemory as exc:
                lower = round(kv - KV_RETRY_STEP, 4)
                if ckey in self._kv_lowered or lower <= 0:
                    if ckey in self._kv_lowered:
                        exc.args = (f"{exc} (also with kv_fraction lowered to {kv:g})",)
                    raise
                retries.append({"failure": exc.failure_class, "message": str(exc),
                                "kv_fraction": kv, "log_path": exc.log_path})
                self._kv_lowered[ckey] = lower
            except SequenceLimit as exc:
                needed = needed_sequence(str(exc))
                if engine is None or rebuilt or not needed or needed <= engine["limits"].get(
                        "max_seq_len", 0):
                    raise
                retries.append({"failure": exc.failure_class, "message": str(exc),
                                "log_path": exc.log_path, "rebuild_max_seq_len": needed})
                engine = self._engine_for(config, workload, max_seq_len=needed)
                rebuilt = True

    def _run_load(self, config: EngineConfig, load: int, dataset: Dataset, engine: dict | None,
                  kv: float, trial_dir: Path, attempt: int) -> tuple[LoadPoint, dict, int | None]:
        per_replica = replica_load(load, config.dp)
        n = self._requests_per_replica(per_replica, config.dp, dataset)
        run_cfg = replace(config, kv_fraction=kv)
        name = "max" if load == MAX_CONCURRENCY else str(load)
        base = f"load-{name}" + (f"-retry{attempt}" if attempt else "")
        folder, again = trial_dir / base, 2
        while folder.exists():  # the same load measured again: keep the earlier run's files
            folder, again = trial_dir / f"{base}-{again}", again + 1
        folder.mkdir(parents=True)
        options_file = folder / cmd.OPTIONS_FILE
        options_file.write_text(yaml.safe_dump(self.options_yaml(run_cfg), sort_keys=False))
        jobs, paths = [], []
        places = self._places(config)
        for r, gpus in enumerate(self._replica_gpus(config)):
            rdir = folder / f"replica-{r}" if config.dp > 1 else folder
            rdir.mkdir(parents=True, exist_ok=True)
            report, requests = rdir / "report.json", rdir / "requests.json"
            for stale in (report, requests):  # never read a report an earlier run left
                stale.unlink(missing_ok=True)
            extra = {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}
            argv = self.throughput_argv(run_cfg, concurrency=per_replica, num_requests=n,
                                        dataset=dataset.path, options_file=options_file,
                                        report=report, requests=requests, engine=engine,
                                        replica_env=tuple(extra), where=places[r])
            _write_json(rdir / "argv.json", {"argv": argv, "env": public_env(
                {**self.options.env, **extra})})
            jobs.append(Job(tuple(argv), rdir / "trtllm-bench.log", self._env(extra), cwd=rdir))
            paths.append((report, requests))
        results = self._procs.run(jobs, self.options.run_timeout,
                                  what=f"trtllm-bench at concurrency {name}")
        failed = [res for res in results if res.returncode not in (0, None)]
        if failed:
            raise classify(failed[0], phase="run")
        replicas = [self._parse(res, report, requests)
                    for res, (report, requests) in zip(results, paths)]
        point = self._load_point(config, load, replicas)
        capacity = self._capacity(config, dataset, [job.log_path for job in jobs])
        raw = {
            "load": load, "concurrency_per_replica": per_replica,
            "requests_per_replica": n, "kv_fraction": kv, "folder": str(folder),
            "options_file": str(options_file), "dataset": str(dataset.path),
            "elapsed_s": round(results[0].elapsed_s, 3),
            "replicas": [{
                "argv": list(job.argv), "log_path": str(job.log_path),
                "report_path": str(report), "request_path": str(requests),
                "cuda_visible_devices": job.env.get("CUDA_VISIBLE_DEVICES"),
                "hosts": list(where.hosts) if where else None,
                # The installed release, not the report's engine.version (1.2 and later write
                # "1.2" whatever they are, TensorRT-LLM issue #11560); that one is kept apart.
                "derived": list(rep.derived), "trtllm_version": self.version or "unknown",
                "report_version": rep.version,
                "report": rep.report,
            } for job, rep, (report, requests), where in zip(jobs, replicas, paths, places)],
        }
        return point, raw, capacity

    @staticmethod
    def _parse(result: JobResult, report: Path, requests: Path) -> ReplicaResult:
        log = result.job.log_path
        try:
            return parse_report(report, requests)
        except BadReport as exc:
            if oom_in_log(log):  # trtllm-bench may exit 0 after an OOM, leaving no report
                raise OutOfMemory(f"run ran out of GPU memory and wrote no report: {exc}",
                                  log_tail=log_tail(log), log_path=str(log)) from None
            raise BadReport(str(exc), log_tail=log_tail(log), log_path=str(log)) from None

    @staticmethod
    def _load_point(config: EngineConfig, load: int, replicas: list[ReplicaResult]) -> LoadPoint:
        totals, latency = merge_replicas(replicas)
        return LoadPoint(
            concurrency=in_flight(load, config.dp), num_requests=totals["num_requests"],
            request_throughput=totals["request_throughput"],
            output_throughput=totals["output_throughput"],
            output_throughput_per_gpu=totals["output_throughput"] / config.gpus,
            output_throughput_per_user=totals["output_throughput_per_user"],
            duration_s=totals["duration_s"], latency_ms=latency,
        )

    def _capacity(self, config: EngineConfig, dataset: Dataset, logs: list[Path]) -> int | None:
        """Requests the replicas hold at once, from TensorRT-LLM's KV-cache allocation line
        (None when the log does not say)."""
        per_replica = []
        for log in logs:
            text = read_log(log)
            tokens = [int(t) for t in _KV_TOKENS.findall(text)]
            if not tokens:
                return None
            block = int((_BLOCK_TOKENS.findall(text) or ["32"])[-1])
            need = math.ceil((dataset.max_seq_len or self._max_seq_len(self.scenario.workload))
                             / block)
            # The PyTorch back end (1.x) first allocates a small KV cache only to size the real
            # one ("Initial KV cache (temporary for KV cache size estimation)",
            # py_executor_creator.py), then the real one: the last allocation is the capacity.
            # With a single allocation (TensorRT engines, older releases) it is that one.
            fit = (tokens[-1] // block) // max(1, need)
            # Under attention DP each of the tp ranks logs (and schedules) its own cache and
            # batch: the replica holds tp times one rank's.
            per_replica.append(min(fit, config.max_batch_size * config.pp)
                               * config.attention_ranks)
        return min(per_replica) * config.dp if per_replica else None


__all__ = ["TrtllmRunner"]
