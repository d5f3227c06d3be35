"""The trtllm runner's options (``TrtllmSettings``), their checks, and the tools they name."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from autotune.errors import UserError
from autotune.runners._launch import LAUNCHERS, check_launcher, study_hosts
from autotune.runners._tools import (
    check_run_options,
    checkpoint_folder,
    find_executable,
    package_version,
)
from autotune.runners.trtllm.argv import LAUNCH_WRAPPER, QUANTIZATION
from autotune.runners.trtllm.releases import Release
from autotune.scenario import Scenario

BACKENDS = ("pytorch", "tensorrt")
DEFAULT_WORKSPACE = "autotune-workspace"
DEFAULT_RUN_TIMEOUT_S = 1800.0  # one load point, model load included
DEFAULT_BUILD_TIMEOUT_S = 5400.0  # engine builds take 10-60 minutes


@dataclass
class TrtllmSettings:
    """How the trtllm runner drives ``trtllm-bench`` (the options of ``search --runner trtllm``).

    Timeouts are seconds of wall-clock time; ``num_requests`` is requests per load point over all
    replicas (None: a few waves of the concurrency); ``env`` holds extra environment variables
    for the runs (passed through ``mpirun -x`` too); ``dataset`` is a user's JSONL file instead
    of the synthetic one. ``hosts`` (comma-separated, node 0 first) are the nodes a study over
    several nodes runs on, under ``launcher`` mpirun or srun (default inside a Slurm job: its
    nodes); resolved, a tuple.
    """

    backend: str = "pytorch"
    model_path: str | None = None
    hf_name: str | None = None
    workspace: str = DEFAULT_WORKSPACE
    trtllm_bench: str = "trtllm-bench"
    launcher: str = "local"
    hosts: str | tuple[str, ...] | None = None
    num_requests: int | None = None
    warmup: int = 2
    run_timeout: float = DEFAULT_RUN_TIMEOUT_S
    build_timeout: float = DEFAULT_BUILD_TIMEOUT_S
    dataset: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    drain_timeout: float = 60.0  # seconds to wait for a killed run's processes to be gone

    @classmethod
    def from_options(cls, **options) -> TrtllmSettings:
        """Settings from keyword options (None means the default; names are checked by
        ``Runner.check_options``)."""
        return cls(**{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class Tools:
    """The executables a run needs, as absolute paths."""

    bench: str
    launcher: str | None = None  # mpirun / srun
    wrapper: str | None = None  # trtllm-llmapi-launch


def resolve_settings(scenario: Scenario, options: dict) -> tuple[TrtllmSettings, Tools]:
    """Check the options and resolve paths and executables; UserError (one line), no side
    effects (nothing is created or written)."""
    s = TrtllmSettings.from_options(**options)
    backend = str(s.backend).strip().lower()
    if backend not in BACKENDS:
        raise UserError(f"--backend {s.backend!r} is not a trtllm back end: use "
                        f"{' or '.join(BACKENDS)}")
    launcher, runner = check_launcher(s.launcher)
    bench = find_executable(str(s.trtllm_bench))
    if bench is None:
        raise UserError(f"trtllm-bench not found ({s.trtllm_bench!r}): install TensorRT-LLM on "
                        "this node or pass --trtllm-bench PATH")
    tools = Tools(bench=bench)
    if launcher != "local":
        sibling = Path(bench).parent / LAUNCH_WRAPPER
        wrapper = find_executable(str(sibling)) or find_executable(LAUNCH_WRAPPER)
        if wrapper is None:
            raise UserError(f"--launcher {launcher} needs {LAUNCH_WRAPPER} (next to trtllm-bench "
                            "or on PATH); it ships with TensorRT-LLM")
        tools = Tools(bench=bench, launcher=runner, wrapper=wrapper)
    check_run_options(s, ("run_timeout", "build_timeout", "drain_timeout"))
    hosts = study_hosts(scenario, "trtllm", launcher, s.hosts, s.env)
    model_path = checkpoint_folder(s.model_path)
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
                       model_path=model_path, hf_name=hf_name, hosts=hosts,
                       workspace=str(workspace.resolve()), env=dict(s.env))
    if launcher != "local":
        # trtllm-llmapi-launch runs its command line unquoted ($task_with_command): under
        # mpirun/srun an argument with a space would split into two.
        for flag, value in (("--trtllm-bench", bench), ("--model-path", model_path),
                            ("--workspace", resolved.workspace), ("dataset", s.dataset)):
            if value and any(ch.isspace() for ch in str(value)):
                raise UserError(f"{flag} {str(value)!r} has a space, which "
                                f"trtllm-llmapi-launch splits under --launcher {launcher}: "
                                "use a path without spaces (a symlink will do)")
    return resolved, tools


def check_release(settings: TrtllmSettings, release: Release) -> None:
    """Refuse what the TensorRT-LLM release on this node cannot do (UserError naming it)."""
    if settings.backend == "tensorrt" and not release.tensorrt_backend:
        raise UserError(f"--backend tensorrt: TensorRT-LLM {release.label} has no TensorRT "
                        "engine back end (removed in 1.3); use --backend pytorch")


def trtllm_version(executable: str, env: dict[str, str] | None = None,
                   timeout_s: float = 30.0) -> str | None:
    """TensorRT-LLM's version beside ``executable``: the package metadata of the Python its
    ``#!`` line names (read without importing tensorrt_llm, which takes seconds); None if
    unknown. ``trtllm-bench`` has no ``--version`` option."""
    return package_version(executable, ("tensorrt_llm", "tensorrt-llm"), env, timeout_s)


__all__ = ["BACKENDS", "LAUNCHERS", "Tools", "TrtllmSettings", "check_release",
           "resolve_settings", "trtllm_version"]
