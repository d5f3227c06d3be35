"""How to deploy a configuration: the ``trtllm-serve`` command lines and their LLM API YAML."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import yaml

from autotune.config import EngineConfig

#: First port; replica i listens on BASE_PORT + i.
BASE_PORT = 8000
OPTIONS_FILE = "extra_llm_api_options.yaml"


@dataclass(frozen=True)
class LaunchPlan:
    """One ``trtllm-serve`` per replica (argv + the GPUs it owns) and the YAML they share."""

    commands: tuple[tuple[str, ...], ...]
    gpus: tuple[tuple[int, ...], ...]  # CUDA device indices per replica
    ports: tuple[int, ...]
    options_yaml: str
    options_file: str = OPTIONS_FILE

    def shell_lines(self) -> list[str]:
        """Copy-pasteable lines (quoted with shlex; each replica in the background if dp>1)."""
        lines = []
        many = len(self.commands) > 1
        for argv, gpus in zip(self.commands, self.gpus):
            env = f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} " if many else ""
            lines.append(env + shlex.join(argv) + (" &" if many else ""))
        return lines

    def to_dict(self) -> dict:
        return {"commands": [list(c) for c in self.commands], "gpus": [list(g) for g in self.gpus],
                "ports": list(self.ports), "options_file": self.options_file,
                "options_yaml": self.options_yaml}


def llm_api_options(config: EngineConfig) -> dict:
    """The ``--extra_llm_api_options`` YAML content for ``config`` (LLM API field names)."""
    return {
        "enable_chunked_prefill": config.chunked_prefill,
        "kv_cache_config": {"free_gpu_memory_fraction": config.kv_fraction},
        # CUDA graphs up to the batch limit, padded, as NVIDIA's throughput recipes configure.
        "cuda_graph_config": {"enable_padding": True,
                              "max_batch_size": min(config.max_batch_size, 1024)},
    }


def serve_argv(config: EngineConfig, model: str, *, port: int = BASE_PORT,
               options_file: str = OPTIONS_FILE) -> tuple[str, ...]:
    """``trtllm-serve`` for one replica of ``config`` (an argv; never run through a shell)."""
    return (
        "trtllm-serve", model, "--backend", "pytorch",
        "--tp_size", str(config.tp), "--pp_size", str(config.pp),
        "--max_batch_size", str(config.max_batch_size),
        "--max_num_tokens", str(config.max_num_tokens),
        "--kv_cache_free_gpu_memory_fraction", f"{config.kv_fraction:g}",
        "--host", "0.0.0.0", "--port", str(port),
        "--extra_llm_api_options", options_file,
    )


def launch_plan(config: EngineConfig, model: str) -> LaunchPlan:
    """Commands that deploy ``config``: dp replicas of tp*pp GPUs each, on consecutive ports."""
    per = config.gpus_per_replica
    gpus = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(config.dp))
    ports = tuple(BASE_PORT + i for i in range(config.dp))
    return LaunchPlan(
        commands=tuple(serve_argv(config, model, port=p) for p in ports), gpus=gpus, ports=ports,
        options_yaml=yaml.safe_dump(llm_api_options(config), sort_keys=False),
    )


__all__ = ["LaunchPlan", "launch_plan", "llm_api_options", "serve_argv"]
