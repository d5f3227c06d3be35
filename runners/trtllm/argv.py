"""THE builder of TensorRT-LLM command lines: ``trtllm-bench`` (prepare-dataset, build,
throughput), ``trtllm-serve``, the ``mpirun``/``srun`` prefix, and the LLM-API YAML they take.

The runner measures with these argv lists and the deploy folder writes them into its scripts, so
"re-measure the recommendation" runs exactly what the study ran. Every function returns an argv
list (never a shell string; nothing here is run through a shell). Flags and field names follow
TensorRT-LLM 1.x (``tensorrt_llm/bench/benchmark/throughput.py``,
``tensorrt_llm/commands/serve.py``, ``tensorrt_llm/llmapi/llm_args.py``); see
shared/docs/trtllm.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from autotune.config import EngineConfig
from autotune.runners import _launch
from autotune.runners.trtllm.releases import Release
from autotune.specs import Workload

#: autotune precision -> ``trtllm-bench build --quantization`` (bf16: none, the checkpoint's).
QUANTIZATION = {"fp8": "FP8", "fp4": "NVFP4", "bf16": None}
#: The wrapper TensorRT-LLM documents for runs under an external MPI or Slurm.
LAUNCH_WRAPPER = "trtllm-llmapi-launch"
#: The file name of the LLM-API options YAML beside a run or a deployment.
OPTIONS_FILE = "extra_llm_api_options.yaml"
#: First port of a deployment; replica i listens on BASE_PORT + i.
BASE_PORT = 8000


#: The release assumed where none is known (the newest behaviour).
NEWEST = Release(None)


def llm_api_options(config: EngineConfig, backend: str = "pytorch",
                    release: Release = NEWEST) -> dict:
    """The ``--extra_llm_api_options`` YAML content for ``config`` (LLM API field names, as
    ``release`` names them: its LLM arguments are strict, an unknown field fails the run).

    It overrides the command's own flags and replaces whole fields
    (``update_llm_args_with_extra_dict``), so it carries the same KV share and the rest of the
    ``kv_cache_config`` trtllm-bench sets itself: block reuse off, as stock trtllm-bench measures
    (on, warm-up requests drawn from the same data would be served from the prefix cache).
    """
    opts: dict = {
        "enable_chunked_prefill": config.chunked_prefill,
        "kv_cache_config": {"free_gpu_memory_fraction": config.kv_fraction,
                            "enable_block_reuse": False},
    }
    if config.attention_dp:
        # Attention data-parallel over the tp GPUs (a field of the LLM arguments; the expert
        # parallelism itself is the command's --ep / --ep_size).
        opts["enable_attention_dp"] = True
    padding = release.cuda_graph_padding
    if backend == "pytorch" and padding is not None:
        # CUDA graphs up to the batch limit, padded, as NVIDIA's throughput recipes configure
        # (a field of the PyTorch back end's LLM arguments only, from 1.0 on).
        opts["cuda_graph_config"] = {padding: True,
                                     "max_batch_size": min(config.max_batch_size, 1024)}
    return opts


def launch_prefix(launcher: str, world: int, *, launcher_path: str | None = None,
                  wrapper: str = LAUNCH_WRAPPER, env_names: Sequence[str] = (),
                  hosts: Sequence[str] = (), ranks_per_node: int | None = None,
                  nodes: int | None = None, gpus: int | None = None,
                  cpus: int | str | None = None) -> list[str]:
    """``mpirun``/``srun`` + ``trtllm-llmapi-launch`` for ``world`` ranks (empty when local):
    one rank per GPU, ``ranks_per_node`` on each of ``hosts`` (or of ``nodes`` nodes the
    launcher picks) when given (a replica over several nodes is one MPI world, as TensorRT-LLM's
    multi-node runs are), else placed by the launcher; ``gpus`` per node and ``cpus`` per rank
    for a Slurm step that shares its node. The prefix itself is
    ``autotune.runners._launch``'s."""
    if launcher == "local":
        return []
    return [*_launch.launch_prefix(launcher, hosts=hosts, tasks=world,
                                   tasks_per_node=ranks_per_node, nodes=nodes, gpus=gpus,
                                   cpus=cpus, exe=launcher_path, env_names=env_names), wrapper]


def bench_global_args(bench: str, model: str, *, model_path: str | None = None,
                      workspace: str | None = None) -> list[str]:
    """``trtllm-bench --model M [--model_path P] [--workspace W]`` (options before the command)."""
    argv = [bench, "--model", model]
    if model_path:
        argv += ["--model_path", model_path]
    if workspace:
        argv += ["--workspace", workspace]
    return argv


def prepare_dataset_argv(model: str, workload: Workload, num_requests: int, output: str, *,
                         bench: str = "trtllm-bench") -> list[str]:
    """``trtllm-bench prepare-dataset``: synthetic requests with the workload's lengths."""
    return [
        *bench_global_args(bench, model), "prepare-dataset", "--output", output,
        "token-norm-dist", "--num-requests", str(num_requests),
        "--input-mean", str(workload.isl), "--output-mean", str(workload.osl),
        # click declares both as integers: "12.5" would be a usage error.
        "--input-stdev", str(round(workload.isl_std)),
        "--output-stdev", str(round(workload.osl_std)),
    ]


def build_argv(config: EngineConfig, max_seq_len: int, *, bench: str, model: str,
               model_path: str | None = None, workspace: str | None = None) -> list[str]:
    """``trtllm-bench build`` of one replica's engine (sized by its batch and token limits)."""
    argv = bench_global_args(bench, model, model_path=model_path, workspace=workspace)
    argv += ["build", "--tp_size", str(config.tp), "--pp_size", str(config.pp)]
    quant = QUANTIZATION.get(config.precision)
    if quant:
        argv += ["--quantization", quant]
    return argv + ["--max_seq_len", str(max_seq_len),
                   "--max_batch_size", str(config.max_batch_size),
                   "--max_num_tokens", str(config.max_num_tokens)]


def throughput_argv(config: EngineConfig, *, bench: str, model: str, concurrency: int,
                    num_requests: int, dataset: str, options_file: str, report: str,
                    requests: str | None = None, warmup: int = 2, backend: str = "pytorch",
                    model_path: str | None = None, workspace: str | None = None,
                    engine: dict | None = None, release: Release = NEWEST) -> list[str]:
    """``trtllm-bench throughput`` for ONE replica of ``config`` at ``concurrency`` requests in
    flight (``MAX_CONCURRENCY`` = -1, trtllm-bench's own "no limit").

    Streaming is what makes TTFT and TPOT measurable; ``--eos_id -1`` generates the whole output
    length (0.20 and later; before it the option does not exist). ``engine`` is a built
    engine's info for the tensorrt back end (its folder and the limits it was built with: a
    runtime limit may be lower than the engine's, never higher).
    """
    argv = bench_global_args(bench, model, model_path=model_path, workspace=workspace)
    argv += ["throughput", "--backend", backend]
    if backend == "tensorrt":
        if engine is None:
            raise ValueError("the tensorrt back end needs a built engine")
        built = engine.get("limits", {})
        mbs = min(config.max_batch_size, built.get("max_batch_size", config.max_batch_size))
        mnt = min(config.max_num_tokens, built.get("max_num_tokens", config.max_num_tokens))
        argv += ["--engine_dir", engine["engine_dir"]]
    else:
        mbs, mnt = config.max_batch_size, config.max_num_tokens
        argv += ["--tp", str(config.tp), "--pp", str(config.pp)]
        if config.ep > 1:
            # trtllm-bench throughput's "World Configuration" group (bench/benchmark/
            # throughput.py, 1.0-1.2): MoE TP = tp / ep, as tensorrt_llm/mapping.py derives it.
            argv += ["--ep", str(config.ep)]
    argv += [
        "--max_batch_size", str(mbs), "--max_num_tokens", str(mnt),
        "--kv_cache_free_gpu_mem_fraction", f"{config.kv_fraction:g}",
        "--extra_llm_api_options", options_file,
        "--dataset", dataset, "--num_requests", str(num_requests),
        "--warmup", str(warmup), "--concurrency", str(concurrency), "--streaming",
    ]
    if release.eos_id:
        argv += ["--eos_id", "-1"]
    argv += ["--report_json", report]
    if requests is not None:
        argv += ["--request_json", requests]
    return argv


def serve_argv(config: EngineConfig, model: str, *, port: int = BASE_PORT,
               options_file: str = OPTIONS_FILE) -> list[str]:
    """``trtllm-serve`` for one replica of ``config``."""
    return [
        "trtllm-serve", model, "--backend", "pytorch",
        "--tp_size", str(config.tp), "--pp_size", str(config.pp),
        *(["--ep_size", str(config.ep)] if config.ep > 1 else []),
        "--max_batch_size", str(config.max_batch_size),
        "--max_num_tokens", str(config.max_num_tokens),
        "--kv_cache_free_gpu_memory_fraction", f"{config.kv_fraction:g}",
        "--host", "0.0.0.0", "--port", str(port),
        "--extra_llm_api_options", options_file,
    ]


__all__ = [
    "BASE_PORT", "NEWEST", "LAUNCH_WRAPPER", "OPTIONS_FILE", "QUANTIZATION", "bench_global_args",
    "build_argv", "launch_prefix", "llm_api_options", "prepare_dataset_argv", "serve_argv",
    "throughput_argv",
]
