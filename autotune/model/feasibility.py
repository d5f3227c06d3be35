"""What can run at all: THE parallel-layout rules, and the memory gates of the model.

``check_layout`` holds the rules every engine shares (TensorRT-LLM's and vLLM's alike); the
search space, the simulator and the real runners all ask it. ``replica_capacity`` is the
simulator's own memory check (the KV cache must hold a request), and ``gate`` the only
prediction allowed in front of a real engine: weights that cannot fit at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.config import EngineConfig
from autotune.errors import InvalidConfig, OutOfMemory, PredictedOutOfMemory
from autotune.model.perf import KV_BLOCK_TOKENS, RUNTIME_RESERVE_BYTES, PerfModel
from autotune.model.scheduler import Limits
from autotune.specs import GpuSpec, ModelSpec


def check_layout(model: ModelSpec, config: EngineConfig) -> None:
    """The validity rules of a parallel layout and its limits (raises InvalidConfig)."""
    if min(config.tp, config.pp, config.dp, config.max_batch_size, config.max_num_tokens) < 1:
        raise InvalidConfig("tp, pp, dp, max_batch_size and max_num_tokens must be >= 1")
    if config.ep < 1:
        raise InvalidConfig("ep must be >= 1")
    if not model.is_moe and (config.ep > 1 or config.attention_dp):
        raise InvalidConfig(f"{model.name} is a dense model: ep and attention DP apply to "
                            "mixture-of-experts models only")
    if model.heads % config.attention_tp:
        raise InvalidConfig(f"{model.heads} attention heads are not divisible by tp={config.tp}")
    if config.tp % config.ep:
        raise InvalidConfig(f"ep={config.ep} does not divide tp={config.tp} (MoE TP x EP = tp)")
    if model.experts % config.ep:
        raise InvalidConfig(f"{model.experts} experts are not divisible by ep={config.ep}")
    if model.is_moe and model.ffn % config.moe_tp:
        raise InvalidConfig(f"the experts' width {model.ffn} is not divisible by MoE TP "
                            f"{config.moe_tp} (tp / ep)")
    if config.attention_dp and config.tp < 2:
        raise InvalidConfig("attention DP needs tp >= 2 (it spreads requests over the tp GPUs)")
    if config.pp > model.layers:
        raise InvalidConfig(f"pp={config.pp} exceeds the model's {model.layers} layers")
    if not 0 < config.kv_fraction < 1:
        raise InvalidConfig(f"kv_fraction must be in (0, 1), got {config.kv_fraction}")


def check_placement(gpu: GpuSpec, config: EngineConfig) -> None:
    """How a layout sits on nodes of ``gpu.gpus_per_node`` GPUs when it spans several (raises
    InvalidConfig): a TP group inside one node or over whole nodes, and a replica (``tp x pp``
    GPUs, its stages in order) inside one node, a whole number of them per node, or over whole
    nodes, so that no replica straddles a node boundary in two places."""
    per_node = gpu.gpus_per_node
    if config.tp > per_node and config.tp % per_node:
        raise InvalidConfig(f"tp={config.tp} spans {gpu.name} nodes of {per_node} GPUs but not "
                            "whole ones")
    size = config.tp * config.pp
    if (size > per_node and size % per_node) or (size < per_node and per_node % size):
        raise InvalidConfig(f"a replica of tp*pp={size} GPUs does not tile {gpu.name} nodes of "
                            f"{per_node} GPUs")


@dataclass(frozen=True)
class Capacity:
    """One replica's scheduler limits and how many requests of the workload fit at once."""

    limits: Limits
    fit: int  # requests the KV cache (and the batch limit) hold at once, per replica


def replica_capacity(perf: PerfModel, max_seq_len: int) -> Capacity:
    """The scheduler limits of ``perf``'s replica; OutOfMemory when the weights and activations
    leave no KV cache, or the KV cache cannot hold one request of ``max_seq_len`` tokens."""
    config, mem = perf.config, perf.memory()
    if not mem.fits:
        raise OutOfMemory(
            f"weights {mem.weights / 2**30:.1f} GiB + activations {mem.activations / 2**30:.1f} "
            f"GiB leave no KV cache on a {perf.gpu.memory_gib:g} GiB GPU"
        )
    # TensorRT-LLM keeps pp micro-batches in flight, each within the limits, and under attention
    # DP each rank schedules its own batch within them.
    micro = config.pp * mem.ranks
    limits = Limits(
        max_in_flight=config.max_batch_size * micro,
        token_budget=config.max_num_tokens * micro,
        kv_blocks=mem.kv_tokens // KV_BLOCK_TOKENS,
        block_tokens=KV_BLOCK_TOKENS,
        chunked_prefill=config.chunked_prefill,
    )
    fit = min(limits.max_in_flight, mem.requests_that_fit(max_seq_len))
    if fit < 1:
        raise OutOfMemory(
            f"the KV cache ({mem.kv_tokens} tokens) cannot hold one request of "
            f"{max_seq_len} tokens"
        )
    return Capacity(limits, fit)


def gate(perf: PerfModel) -> None:
    """Refuse, before a real engine starts, a config whose weights alone cannot fit on a GPU
    (raises PredictedOutOfMemory). Anything nearer the edge (activations, KV cache) is the
    engine's to decide: the model's memory plan is an estimate."""
    mem = perf.memory()
    room = perf.gpu.memory_bytes - RUNTIME_RESERVE_BYTES
    if mem.weights > room:
        raise PredictedOutOfMemory(
            f"the model predicts the weights alone ({mem.weights / 2**30:.1f} GiB per GPU) "
            f"cannot fit on a {perf.gpu.memory_gib:g} GiB GPU; not run"
        )


__all__ = ["Capacity", "check_layout", "gate", "replica_capacity"]
