"""THE builder of vLLM command lines: ``vllm serve`` for one replica of a configuration, its
``--config`` YAML, and ``vllm bench serve`` for one load point. The runner and the deploy folder
both use these, so what is deployed is what was measured.

Flags are vLLM's (checked against vLLM 0.32's ``vllm/engine/arg_utils.py`` and
``vllm/benchmarks/serve.py``); autotune never imports vllm.
"""

from __future__ import annotations

import json
import math

from autotune.config import EngineConfig
from autotune.measurement import MAX_CONCURRENCY
from autotune.specs import Workload

#: vLLM's own default port; replica r of a deployment listens on BASE_PORT + r.
BASE_PORT = 8000
#: The served model name of every server autotune starts (requests name the model by it).
SERVED_NAME = "autotune"
#: Percentiles every load point reports (autotune's statistics: mean is always reported).
PERCENTILES = (50, 90, 95, 99)
CONFIG_FILE = "vllm-config.yaml"


def engine_args(config: EngineConfig, *, max_model_len: int, quantization: str | None = None,
                kv_cache_dtype: str | None = None, eager: bool = False,
                prefix_caching: bool = False) -> dict:
    """The engine arguments of one replica of ``config`` as ``vllm serve --config`` YAML keys
    (vLLM's flag names without dashes; ``dp`` replicas are separate servers).

    ``max_model_len`` is the longest request (prompt + output, tokens). Prefix caching is off
    for measurements: ``vllm bench serve`` with one seed sends the same random prompts at every
    load point, so a cache would turn the second load point's prefills into hits.
    """
    args = {
        # Attention DP: vLLM's data-parallel ranks inside one server, each its own requests
        # (tp GPUs of a stage as 1 x tp); its MoE layers span all tp x dp GPUs either way.
        "tensor-parallel-size": config.attention_tp,
        **({"data-parallel-size": config.tp} if config.attention_dp else {}),
        "pipeline-parallel-size": config.pp,
        "max-num-seqs": config.max_batch_size,
        "max-num-batched-tokens": config.max_num_tokens,
        # vLLM's share of the whole device memory (weights, activations and KV cache).
        "gpu-memory-utilization": round(config.kv_fraction, 4),
        "enable-chunked-prefill": config.chunked_prefill,
        "enable-prefix-caching": prefix_caching,
        "max-model-len": max_model_len,
    }
    if config.ep > 1:
        # Experts split over the whole tp x dp group (vLLM's EP size is all of it: runner
        # checks ep == tp) instead of each expert tensor-parallel over it.
        args["enable-expert-parallel"] = True
    if quantization:
        args["quantization"] = quantization
    if kv_cache_dtype:
        args["kv-cache-dtype"] = kv_cache_dtype
    if eager:
        args["enforce-eager"] = True
    return args


def flags(args: dict) -> list[str]:
    """Engine arguments as command-line flags (booleans as ``--x`` / ``--no-x``)."""
    out: list[str] = []
    for key, value in args.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", str(value)]
    return out


def serve_argv(model: str, args: dict, *, vllm: str = "vllm", host: str = "127.0.0.1",
               port: int = BASE_PORT, served_name: str = SERVED_NAME,
               config_file: str | None = None) -> list[str]:
    """``vllm serve MODEL`` with the engine arguments on the command line, or in ``config_file``
    (``--config``) when given."""
    argv = [vllm, "serve", model, "--host", host, "--port", str(port),
            "--served-model-name", served_name, "--seed", "0"]
    return argv + (["--config", config_file] if config_file else flags(args))


def node_flags(nodes: int, rank: int | str, master_addr: str, master_port: int | str) -> list[str]:
    """What one node of a replica over ``nodes`` nodes adds to ``vllm serve``: vLLM's native
    multi-node launch (no Ray; vLLM 0.32 ``vllm/engine/arg_utils.py``: ``--nnodes``,
    ``--node-rank``, ``--master-addr``, ``--master-port``, and ``--headless`` on every node but
    rank 0, which alone serves the API). ``rank`` and the address may be placeholders a script
    or a manifest fills in (``$(LWS_WORKER_INDEX)``); tp and pp stay the replica's totals."""
    argv = ["--nnodes", str(nodes), "--node-rank", str(rank), "--master-addr", master_addr,
            "--master-port", str(master_port)]
    return argv + (["--headless"] if str(rank) != "0" else [])


def range_ratio(mean: int, std: float) -> float:
    """``--random-range-ratio`` for lengths with standard deviation ``std``: vLLM draws
    uniformly from ``[mean*(1-r), mean*(1+r)]``, whose standard deviation is ``mean*r/sqrt(3)``
    (capped below 1, vLLM's limit)."""
    if std <= 0 or mean <= 0:
        return 0.0
    return round(min(0.99, math.sqrt(3) * std / mean), 4)


def bench_argv(workload: Workload, *, base_url: str, tokenizer: str, concurrency: int,
               num_prompts: int, warmups: int, result_dir: str, result_file: str,
               vllm: str = "vllm", served_name: str = SERVED_NAME, seed: int = 0) -> list[str]:
    """``vllm bench serve`` for one load point: random prompts with the workload's lengths,
    every output generated to its length (``--ignore-eos``), ``concurrency`` requests in flight
    (``MAX_CONCURRENCY``: all at once), per-request detail saved for merging replicas."""
    argv = [
        vllm, "bench", "serve", "--backend", "vllm", "--base-url", base_url,
        "--model", served_name, "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(workload.isl), "--random-output-len", str(workload.osl),
    ]
    ratios = {"input": range_ratio(workload.isl, workload.isl_std),
              "output": range_ratio(workload.osl, workload.osl_std)}
    if any(ratios.values()):
        argv += ["--random-range-ratio", json.dumps(ratios)]
    argv += ["--ignore-eos", "--num-prompts", str(num_prompts)]
    if concurrency != MAX_CONCURRENCY:
        argv += ["--max-concurrency", str(concurrency)]
    argv += [
        "--num-warmups", str(warmups), "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--save-result", "--save-detailed", "--result-dir", result_dir,
        "--result-filename", result_file, "--disable-tqdm",
    ]
    return argv


__all__ = ["BASE_PORT", "CONFIG_FILE", "PERCENTILES", "SERVED_NAME", "bench_argv", "engine_args",
           "flags", "node_flags", "range_ratio", "serve_argv"]
