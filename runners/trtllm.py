"""The ``trtllm`` runner: measures configurations on the node with TensorRT-LLM's ``trtllm-bench``.

Per trial (shared/docs/trtllm.md has the tool's facts):

1. The requests: a JSONL dataset written once per workload from seeded random token ids (or the
   user's own file), reused by every run.
2. PyTorch back end (default): no build; one ``trtllm-bench throughput`` per load point. TensorRT
   engine back end: ``trtllm-bench build`` first, the engine cached on disk (and in the database
   when the study shares it) under a hash of the settings that change the engine; runtime limits
   never exceed the built ones.
3. ``dp`` replicas run side by side, each on its own ``tp * pp`` GPUs (``CUDA_VISIBLE_DEVICES``),
   with the load split between them; their reports are combined (``merge_replicas``).
4. Failures are classified from the exit status and the log (``_trtllm_process.classify``); a
   runtime out-of-memory is retried once with a lower KV-cache share, a sequence limit of a built
   engine once with a rebuilt one.

TensorRT-LLM itself is never imported: it runs in its own processes, started from argv lists.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml
from autotune.runners._base import EngineBuilder, Runner
from autotune.runners._trtllm_dataset import Dataset, synthetic_dataset, user_dataset
from autotune.runners._trtllm_process import (
    Job,
    JobResult,
    ProcessGroups,
    classify,
    log_tail,
    needed_sequence,
    oom_in_log,
    read_log,
)
from autotune.runners._trtllm_report import ReplicaResult, merge_replicas, parse_report

from autotune.config import EngineConfig, stable_hash
from autotune.errors import (
    BadReport,
    BuildFailed,
    BuildOutOfMemory,
    Interrupted,
    InvalidConfig,
    OutOfMemory,
    SequenceLimit,
    UserError,
)
from autotune.launch import llm_api_options
from autotune.measurement import MAX_CONCURRENCY, LoadPoint, Measurement
from autotune.scenario import Scenario
from autotune.specs import Workload

BACKENDS = ("pytorch", "tensorrt")
LAUNCHERS = ("local", "mpirun", "srun")
#: autotune precision -> ``trtllm-bench build --quantization`` (bf16: none, the checkpoint's).
QUANTIZATION = {"fp8": "FP8", "fp4": "NVFP4", "bf16": None}
#: The wrapper TensorRT-LLM documents for runs under an external MPI or Slurm.
LAUNCH_WRAPPER = "trtllm-llmapi-launch"
DEFAULT_WORKSPACE = "autotune-workspace"
DEFAULT_RUN_TIMEOUT_S = 1800.0  # one load point, model load included
DEFAULT_BUILD_TIMEOUT_S = 5400.0  # engine builds take 10-60 minutes
#: A runtime out-of-memory is retried once with the KV-cache share lowered by this much
#: (NVIDIA's own fallback goes from 0.95 to 0.90).
KV_RETRY_STEP = 0.05
#: Requests per replica and load point when --num-requests is not given: a few waves of the
#: concurrency, within these bounds ("max" concurrency gets the upper bound).
AUTO_MIN_REQUESTS, AUTO_WAVES, AUTO_MAX_REQUESTS = 64, 4, 1024
ENGINE_INFO = "autotune-engine.json"
#: Variables of our environment that ``--launcher mpirun`` names with ``-x``: Open MPI gives remote
#: ranks only the variables it is told to (srun exports everything by default).
FORWARD_PREFIXES = ("NCCL_", "TLLM_", "TRTLLM_", "HF_", "UCX_")
_SECRET = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)
_KV_TOKENS = re.compile(r"for max tokens in paged KV cache \((\d+)\)")
_BLOCK_TOKENS = re.compile(r"Number of tokens per block: (\d+)")
_ENGINE_SAVED = re.compile(r"ENGINE SAVED: (.+?)\s*$", re.MULTILINE)


@dataclass
class TrtllmSettings:
    """How the trtllm runner drives ``trtllm-bench`` (the options of ``search --runner trtllm``).

    Timeouts are seconds of wall-clock time; ``num_requests`` is requests per load point over all
    replicas (None: a few waves of the concurrency); ``env`` holds extra environment variables
    for the runs (passed through ``mpirun -x`` too); ``dataset`` is a user's JSONL file instead
    of the synthetic one.
    """

    backend: str = "pytorch"
    model_path: str | None = None
    hf_name: str | None = None
    workspace: str = DEFAULT_WORKSPACE
    trtllm_bench: str = "trtllm-bench"
    launcher: str = "local"
    num_requests: int | None = None
    warmup: int = 2
    run_timeout: float = DEFAULT_RUN_TIMEOUT_S
    build_timeout: float = DEFAULT_BUILD_TIMEOUT_S
    dataset: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    drain_timeout: float = 60.0  # seconds to wait for a killed run's processes to be gone

    @classmethod
    def from_options(cls, **options) -> TrtllmSettings:
        """Settings from keyword options (None means the default; unknown names: UserError)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(f"unknown trtllm runner option(s) {', '.join(unknown)} "
                            f"(known: {', '.join(known)})")
        return cls(**{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class Tools:
    """The executables a run needs, as absolute paths."""

    bench: str
    launcher: str | None = None  # mpirun / srun
    wrapper: str | None = None  # trtllm-llmapi-launch


def find_executable(name: str) -> str | None:
    """An executable by path (when ``name`` holds a slash) or on PATH, as an absolute path."""
    if os.sep in name:
        p = Path(name).expanduser()
        return str(p.resolve()) if p.is_file() and os.access(p, os.X_OK) else None
    found = shutil.which(name)
    return str(Path(found).resolve()) if found else None


def resolve_settings(scenario: Scenario, options: dict) -> tuple[TrtllmSettings, Tools]:
    """Check the options and resolve paths and executables; UserError (one line), no side
    effects (nothing is created or written)."""
    s = TrtllmSettings.from_options(**options)
    backend, launcher = str(s.backend).strip().lower(), str(s.launcher).strip().lower()
    if backend not in BACKENDS:
        raise UserError(f"--backend {s.backend!r} is not a trtllm back end: use "
                        f"{' or '.join(BACKENDS)}")
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {s.launcher!r} is unknown: use {', '.join(LAUNCHERS)}")
    bench = find_executable(str(s.trtllm_bench))
    if bench is None:
        raise UserError(f"trtllm-bench not found ({s.trtllm_bench!r}): install TensorRT-LLM on "
                        "this node or pass --trtllm-bench PATH")
    tools = Tools(bench=bench)
    if launcher != "local":
        runner = find_executable(launcher)
        if runner is None:
            raise UserError(f"--launcher {launcher}: {launcher!r} is not on PATH")
        sibling = Path(bench).parent / LAUNCH_WRAPPER
        wrapper = find_executable(str(sibling)) or find_executable(LAUNCH_WRAPPER)
        if wrapper is None:
            raise UserError(f"--launcher {launcher} needs {LAUNCH_WRAPPER} (next to trtllm-bench "
                            "or on PATH); it ships with TensorRT-LLM")
        tools = Tools(bench=bench, launcher=runner, wrapper=wrapper)
    if s.num_requests is not None and (not isinstance(s.num_requests, int)
                                       or isinstance(s.num_requests, bool) or s.num_requests < 1):
        raise UserError(f"--num-requests must be a positive integer, got {s.num_requests!r}")
    if not isinstance(s.warmup, int) or s.warmup < 0:
        raise UserError(f"warmup must be a non-negative integer, got {s.warmup!r}")
    for name in ("run_timeout", "build_timeout", "drain_timeout"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number of seconds, "
                            f"got {value!r}")
    if not isinstance(s.env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in s.env.items()):
        raise UserError("env must map variable names to string values")
    model_path = None
    if s.model_path is not None:
        p = Path(s.model_path).expanduser()
        if not p.is_dir():
            raise UserError(f"--model-path {str(s.model_path)!r} is not a folder")
        if not os.access(p, os.R_OK | os.X_OK):
            raise UserError(f"--model-path {str(s.model_path)!r} is not readable")
        model_path = str(p.resolve())
    # trtllm-bench names the model with --model (a Hugging Face name); with a local checkpoint
    # the name only labels the run and the engine folder.
    hf_name = s.hf_name or scenario.model.hf_name or (Path(model_path).name if model_path else "")
    if not hf_name:
        raise UserError(f"model {scenario.model.name!r} has no Hugging Face name: pass --hf-name "
                        "or --model-path")
    if backend == "tensorrt" and scenario.precision not in QUANTIZATION:
        raise UserError(f"--backend tensorrt cannot build {scenario.precision!r} engines "
                        f"(use one of {', '.join(QUANTIZATION)})")
    if s.dataset is not None and not Path(s.dataset).expanduser().is_file():
        raise UserError(f"dataset {str(s.dataset)!r} is not a file")
    workspace = Path(s.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise UserError(f"--workspace {str(s.workspace)!r} is not a folder")
    resolved = replace(s, backend=backend, launcher=launcher, trtllm_bench=bench,
                       model_path=model_path, hf_name=hf_name,
                       workspace=str(workspace.resolve()), env=dict(s.env))
    return resolved, tools


def trtllm_version(executable: str, env: dict[str, str] | None = None,
                   timeout_s: float = 30.0) -> str | None:
    """TensorRT-LLM's version beside ``executable``: the package metadata of the Python its
    ``#!`` line names (read without importing tensorrt_llm, which takes seconds); None if
    unknown. ``trtllm-bench`` has no ``--version`` option."""
    try:
        with open(executable, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    interpreter = first[2:].decode("utf-8", errors="replace").split()
    if not interpreter or not any("python" in Path(part).name for part in interpreter):
        return None
    code = ("import importlib.metadata as m\n"
            "for d in ('tensorrt_llm', 'tensorrt-llm'):\n"
            "    try:\n        print(m.version(d)); break\n"
            "    except m.PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([*interpreter, "-c", code], capture_output=True, text=True,
                             timeout=timeout_s, env=env, stdin=subprocess.DEVNULL, shell=False)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip().splitlines()
    return version[0].strip() if out.returncode == 0 and version else None


def _public_env(env: dict[str, str]) -> dict[str, str]:
    """Environment for the settings key and the database: secrets named, never stored."""
    return {k: ("<redacted>" if _SECRET.search(k) else v) for k, v in sorted(env.items())}


def _safe_label(config: EngineConfig) -> str:
    chunk = "chunked" if config.chunked_prefill else "nochunk"
    return (f"tp{config.tp}-pp{config.pp}-dp{config.dp}-b{config.max_batch_size}-"
            f"t{config.max_num_tokens}-kv{config.kv_fraction:.2f}-{chunk}")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data) -> None:
    """Write atomically (temporary file + rename): other workers read whole files only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class TrtllmRunner(Runner, EngineBuilder):
    """Measures configurations with ``trtllm-bench`` on this node (see the module docstring).

    Options are those of ``TrtllmSettings``; a bad one is a UserError raised here, before
    anything runs. ``store`` (an ``autotune.db.Store``) records built engines for other workers.
    """

    name = "trtllm"

    def __init__(self, scenario: Scenario, *, store=None, **options):
        super().__init__(scenario)
        self.options, self.tools = resolve_settings(scenario, options)
        self.workspace = Path(self.options.workspace)
        try:
            self.workspace.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --workspace {str(self.workspace)!r}: "
                            f"{exc.strerror or exc}") from None
        self._user_dataset = user_dataset(self.options.dataset) if self.options.dataset else None
        self.version = trtllm_version(self.tools.bench, self._env())
        self._procs = ProcessGroups(drain_s=self.options.drain_timeout)
        self._datasets: dict[str, Dataset] = {}
        self._kv_lowered: dict[str, float] = {}  # config hash -> KV share after an OOM retry
        self._session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        if store is not None:
            self.use_store(store)

    @classmethod
    def check_options(cls, scenario: Scenario, **options) -> None:
        resolve_settings(scenario, options)

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
            "warmup": o.warmup, "dataset": dataset, "streaming": True, "eos_id": -1,
            "env": _public_env(o.env),
        }

    def engine_key(self, config: EngineConfig, max_seq_len: int | None = None) -> str:
        """Hash of what a TensorRT engine bakes in: model, version, tp, pp, quantization, the
        batch/token limits and the longest sequence (the scenario's workload by default)."""
        return stable_hash({
            "runner": self.name, "model": self.options.hf_name,
            "model_path": self.options.model_path, "trtllm_version": self.version or "unknown",
            **config.engine_settings(), "quantization": QUANTIZATION.get(config.precision),
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
        """TensorRT-LLM's validity rules, checked before anything runs (InvalidConfig)."""
        model = self.scenario.model
        if min(config.tp, config.pp, config.dp, config.max_batch_size, config.max_num_tokens) < 1:
            raise InvalidConfig("tp, pp, dp, max_batch_size and max_num_tokens must be >= 1")
        if model.heads % config.tp:
            raise InvalidConfig(f"{model.heads} attention heads are not divisible by "
                                f"tp={config.tp}")
        if config.pp > model.layers:
            raise InvalidConfig(f"pp={config.pp} exceeds the model's {model.layers} layers")
        if not 0 < config.kv_fraction < 1:
            raise InvalidConfig(f"kv_fraction must be in (0, 1), got {config.kv_fraction}")
        if self.options.launcher == "local" and config.gpus > self.scenario.num_gpus:
            raise InvalidConfig(f"{config.label()} needs {config.gpus} GPUs; the node has "
                                f"{self.scenario.num_gpus} (use --launcher mpirun|srun across "
                                "nodes)")

    def _dataset_for(self, workload: Workload) -> Dataset:
        if self._user_dataset is not None:
            return self._user_dataset
        key = json.dumps(workload.to_dict(), sort_keys=True)
        if key not in self._datasets:
            count = self.options.num_requests or AUTO_MAX_REQUESTS
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
        elif per_replica_load == MAX_CONCURRENCY:
            n = AUTO_MAX_REQUESTS
        else:
            n = min(AUTO_MAX_REQUESTS, max(AUTO_MIN_REQUESTS, AUTO_WAVES * per_replica_load))
        return max(1, min(n, dataset.requests))

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The runs' environment: ours, the user's extra variables, then per-replica ones."""
        return {**os.environ, **self.options.env, **(extra or {})}

    def _replica_gpus(self, config: EngineConfig) -> list[str | None]:
        """``CUDA_VISIBLE_DEVICES`` for each replica (None: left as it is, for one replica and
        under an external launcher, which places the ranks itself)."""
        if config.dp == 1 or self.options.launcher != "local":
            return [None] * config.dp
        visible = self._env().get("CUDA_VISIBLE_DEVICES")
        devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible
                   else [str(i) for i in range(self.scenario.num_gpus)])
        per = config.gpus_per_replica
        if len(devices) < per * config.dp:
            raise InvalidConfig(f"{config.label()} needs {per * config.dp} GPUs; "
                                f"{len(devices)} are visible")
        return [",".join(devices[r * per:(r + 1) * per]) for r in range(config.dp)]

    # ---- argv ---------------------------------------------------------------------------------
    def _launch_prefix(self, world: int, env_names: Sequence[str]) -> list[str]:
        """``mpirun``/``srun`` + ``trtllm-llmapi-launch`` for external MPI (empty when local)."""
        o, t = self.options, self.tools
        if o.launcher == "local":
            return []
        if o.launcher == "mpirun":
            argv = [t.launcher, "-n", str(world)]
            for name in env_names:  # Open MPI passes no variables to the ranks unless named
                argv += ["-x", name]
            return [*argv, t.wrapper]
        return [t.launcher, f"--ntasks={world}", "--mpi=pmix", t.wrapper]  # srun exports all

    def _global_args(self, workspace: Path) -> list[str]:
        o = self.options
        argv = [self.tools.bench, "--model", o.hf_name]
        if o.model_path:
            argv += ["--model_path", o.model_path]
        return [*argv, "--workspace", str(workspace)]

    def build_argv(self, config: EngineConfig, workspace: Path, max_seq_len: int) -> list[str]:
        """``trtllm-bench build`` for ``config`` (sized by --max_batch_size/--max_num_tokens)."""
        argv = self._launch_prefix(config.gpus_per_replica, self._forwarded())
        argv += self._global_args(workspace)
        argv += ["build", "--tp_size", str(config.tp), "--pp_size", str(config.pp)]
        quant = QUANTIZATION.get(config.precision)
        if quant:
            argv += ["--quantization", quant]
        argv += ["--max_seq_len", str(max_seq_len), "--max_batch_size", str(config.max_batch_size),
                 "--max_num_tokens", str(config.max_num_tokens)]
        return argv

    def _forwarded(self, extra: Sequence[str] = ()) -> list[str]:
        """Names of the variables an external MPI launcher must pass to the ranks."""
        ours = {k for k in os.environ if k.startswith(FORWARD_PREFIXES)}
        return sorted({*ours, *self.options.env, *extra})

    def throughput_argv(self, config: EngineConfig, *, concurrency: int, num_requests: int,
                        dataset: Path, options_file: Path, report: Path, requests: Path,
                        engine: dict | None = None, replica_env: Sequence[str] = ()) -> list[str]:
        """``trtllm-bench throughput`` for one replica of ``config`` at one concurrency
        (``MAX_CONCURRENCY``: every request at once). ``engine`` is the built engine's info for
        the tensorrt back end; ``replica_env`` names the variables set for this replica."""
        argv = self._launch_prefix(config.gpus_per_replica, self._forwarded(replica_env))
        argv += self._global_args(self.workspace / "bench")
        argv += ["throughput", "--backend", self.options.backend]
        if self.options.backend == "tensorrt":
            if engine is None:
                raise ValueError("the tensorrt back end needs a built engine")
            built = engine.get("limits", {})
            # A runtime limit may be lower than the engine's, never higher.
            mbs = min(config.max_batch_size, built.get("max_batch_size", config.max_batch_size))
            mnt = min(config.max_num_tokens, built.get("max_num_tokens", config.max_num_tokens))
            argv += ["--engine_dir", engine["engine_dir"]]
        else:
            mbs, mnt = config.max_batch_size, config.max_num_tokens
            argv += ["--tp", str(config.tp), "--pp", str(config.pp)]
        argv += [
            "--max_batch_size", str(mbs), "--max_num_tokens", str(mnt),
            "--kv_cache_free_gpu_mem_fraction", f"{config.kv_fraction:g}",
            "--extra_llm_api_options", str(options_file),
            "--dataset", str(dataset), "--num_requests", str(num_requests),
            "--warmup", str(self.options.warmup), "--concurrency", str(concurrency),
            # Streaming is what makes TTFT and TPOT measurable; eos -1 generates the full OSL.
            "--streaming", "--eos_id", "-1",
            "--report_json", str(report), "--request_json", str(requests),
        ]
        return argv

    def options_yaml(self, config: EngineConfig) -> dict:
        """``--extra_llm_api_options`` content: it overrides trtllm-bench's own flags, so it
        carries the same KV share."""
        opts = llm_api_options(config)
        if self.options.backend == "tensorrt":
            # CUDA-graph settings belong to the PyTorch back end's LLM arguments only.
            opts.pop("cuda_graph_config", None)
        return opts

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
        per_replica = load if load == MAX_CONCURRENCY else max(1, math.ceil(load / config.dp))
        n = self._requests_per_replica(per_replica, config.dp, dataset)
        run_cfg = replace(config, kv_fraction=kv)
        name = "max" if load == MAX_CONCURRENCY else str(load)
        base = f"load-{name}" + (f"-retry{attempt}" if attempt else "")
        folder, again = trial_dir / base, 2
        while folder.exists():  # the same load measured again: keep the earlier run's files
            folder, again = trial_dir / f"{base}-{again}", again + 1
        folder.mkdir(parents=True)
        options_file = folder / "extra_llm_api_options.yaml"
        options_file.write_text(yaml.safe_dump(self.options_yaml(run_cfg), sort_keys=False))
        jobs, paths = [], []
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
                                        replica_env=tuple(extra))
            _write_json(rdir / "argv.json", {"argv": argv, "env": _public_env(
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
                "derived": list(rep.derived), "trtllm_version": rep.version,
                "report": rep.report,
            } for job, rep, (report, requests) in zip(jobs, replicas, paths)],
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
            concurrency=load, num_requests=totals["num_requests"],
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
            fit = (min(tokens) // block) // max(1, need)
            per_replica.append(min(fit, config.max_batch_size * config.pp))
        return min(per_replica) * config.dp if per_replica else None

    # ---- engines ------------------------------------------------------------------------------
    def _engine_for(self, config: EngineConfig, workload: Workload,
                    max_seq_len: int | None = None) -> dict:
        """The built engine for ``config``: from the cache, else built now (one builder per key,
        the others wait for it)."""
        seq = max_seq_len or self._max_seq_len(workload)
        key = self.engine_key(config, seq)
        folder = self.workspace / "engines" / key
        cached = self._cached_engine(key, folder)
        if cached is not None:
            return {**cached, "reused": True}
        with self._lock(folder.parent / f"{key}.lock"):
            cached = self._cached_engine(key, folder)  # built by another worker while we waited
            if cached is not None:
                return {**cached, "reused": True}
            return {**self._build(config, key, folder, seq), "reused": False}

    @contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._procs.interrupted:
                        raise Interrupted("interrupted while waiting for another worker's "
                                          "engine build") from None
                    time.sleep(1.0)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _cached_engine(self, key: str, folder: Path) -> dict | None:
        info = _read_json(folder / ENGINE_INFO)
        if info is None and self.engine_store is not None:
            info = self.engine_store.engine_get(key)
        if info is None:
            return None
        failure = info.get("failure")
        if failure:
            # A build that ran out of memory or refused the layout will do so again.
            cls = {c.failure_class: c for c in (BuildOutOfMemory, InvalidConfig)}.get(
                failure.get("class"), BuildFailed)
            raise cls(f"{failure.get('message', 'engine build failed')} (an earlier build with "
                      "the same engine settings)", log_tail=failure.get("log_tail", ""),
                      log_path=failure.get("log_path"))
        engine_dir = info.get("engine_dir")
        return info if engine_dir and Path(engine_dir).is_dir() else None

    def _build(self, config: EngineConfig, key: str, folder: Path, max_seq_len: int) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "build.log"
        argv = self.build_argv(config, folder, max_seq_len)
        _write_json(folder / "argv.json", {"argv": argv, "env": _public_env(self.options.env)})
        (result,) = self._procs.run([Job(tuple(argv), log, self._env(), cwd=folder)],
                                    self.options.build_timeout, what="trtllm-bench build")
        settings = {**config.engine_settings(), "quantization": QUANTIZATION.get(config.precision),
                    "max_seq_len": max_seq_len}
        if not result.ok:
            failure = classify(result, phase="build")
            if isinstance(failure, (BuildOutOfMemory, InvalidConfig)):
                self._record_engine(key, folder, {"key": key, "settings": settings, "failure": {
                    "class": failure.failure_class, "message": str(failure),
                    "log_tail": failure.log_tail, "log_path": failure.log_path}})
            raise failure
        saved = _ENGINE_SAVED.findall(read_log(log))
        engine_dir = Path(saved[-1]) if saved else folder / self.options.hf_name / \
            f"tp_{config.tp}_pp_{config.pp}"
        if not engine_dir.is_dir():
            raise BuildFailed(f"trtllm-bench build ended without an engine at {engine_dir}",
                              log_tail=log_tail(log), log_path=str(log))
        # The limits the engine was really built with (its config.json), else the ones asked for.
        built = (_read_json(engine_dir / "config.json") or {}).get("build_config") or {}
        limits = {}
        for k in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            value = built.get(k)
            limits[k] = value if isinstance(value, int) and value > 0 else settings[k]
        info = {"key": key, "engine_dir": str(engine_dir), "settings": settings,
                "limits": limits, "host": socket.gethostname(),
                "build_s": round(result.elapsed_s, 1), "trtllm_version": self.version,
                "log_path": str(log), "argv": argv, "built_at": time.time()}
        self._record_engine(key, folder, info)
        return info

    def _record_engine(self, key: str, folder: Path, info: dict) -> None:
        _write_json(folder / ENGINE_INFO, info)
        if self.engine_store is not None:
            self.engine_store.engine_put(key, self.name, info)


__all__ = [
    "BACKENDS",
    "LAUNCHERS",
    "Tools",
    "TrtllmRunner",
    "TrtllmSettings",
    "find_executable",
    "resolve_settings",
    "trtllm_version",
]
