"""The physics of one configuration: memory footprint and the time of one scheduler iteration.

Everything here is a closed-form function of the model, the GPU, the precision, the layout and a
handful of fitted constants (``Calibration``); ``scheduler.py`` turns iteration times into
per-request latencies. Units: bytes, FLOPs, seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from importlib import resources

import yaml

from autotune.config import EngineConfig
from autotune.specs import PRECISIONS, GpuSpec, ModelSpec, ceil_div, layer_split

#: GPU memory a TensorRT-LLM rank keeps for itself: CUDA context, NCCL buffers, CUDA graphs (bytes).
RUNTIME_RESERVE_BYTES = 3.0 * 2**30
#: KV-cache block size (tokens), TensorRT-LLM's default ``tokens_per_block``.
KV_BLOCK_TOKENS = 32
#: Activations travel between GPUs in 16-bit precision whatever the weights' precision (bytes).
ACT_BYTES = 2
#: Embedding and LM head stay in 16-bit precision in FP8/FP4 checkpoints (bytes per element).
EMBED_BYTES = 2


@dataclass(frozen=True)
class Calibration:
    """The fitted constants of the model for one GPU and precision (see data/calibration/)."""

    gemm_eff: float = 0.70
    gemm_half_tokens: float = 64.0
    mem_eff: float = 0.80
    attn_eff: float = 0.45
    ar_latency_us: float = 8.0
    ar_bw_eff: float = 0.80
    iter_overhead_ms: float = 0.8
    seq_overhead_us: float = 3.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown calibration constants: {', '.join(sorted(unknown))}")
        return cls(**{k: float(v) for k, v in data.items()})


@cache
def load_calibration(gpu: str, precision: str) -> Calibration:
    """Constants for ``gpu``/``precision``: ``<gpu>-<precision>.yaml`` over ``default.yaml``."""
    folder = resources.files("autotune").joinpath("data", "calibration")
    merged = yaml.safe_load(folder.joinpath("default.yaml").read_text())
    specific = folder.joinpath(f"{gpu}-{precision}.yaml")
    if specific.is_file():
        merged.update(yaml.safe_load(specific.read_text()) or {})
    return Calibration.from_dict(merged)


@dataclass(frozen=True)
class MemoryPlan:
    """Memory of the fullest GPU of one replica (bytes) and what the KV cache can hold."""

    weights: float
    activations: float
    reserve: float
    kv_cache: float
    kv_bytes_per_token: float  # on the GPU whose stage holds the most KV per token
    kv_tokens: int  # tokens of KV cache the replica holds
    total: float

    @property
    def fits(self) -> bool:
        return self.kv_cache > 0 and self.kv_tokens >= KV_BLOCK_TOKENS

    def requests_that_fit(self, tokens_per_request: int) -> int:
        blocks = self.kv_tokens // KV_BLOCK_TOKENS
        return int(blocks // ceil_div(tokens_per_request, KV_BLOCK_TOKENS))


class PerfModel:
    """Memory and iteration time of one replica (``tp x pp`` GPUs) of ``config``."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, config: EngineConfig,
                 calibration: Calibration | None = None):
        self.model, self.gpu, self.config = model, gpu, config
        self.cal = calibration or load_calibration(gpu.name, config.precision)
        self.w_bytes, self.kv_bytes = PRECISIONS[config.precision]
        self.stages = layer_split(model.layers, config.pp)
        tp = config.tp
        self.kv_heads_per_gpu = ceil_div(model.kv_heads, tp)  # replicated when tp > kv heads
        self.heads_per_gpu = model.heads / tp
        c = self.cal
        self.peak = gpu.peak_flops(config.precision) * c.gemm_eff
        self.bw = gpu.mem_bw_tb_s * 1e12 * c.mem_eff
        self.attn_flops_s = gpu.peak_flops(config.precision) * c.attn_eff
        self.link = gpu.nvlink_gb_s * 1e9 * c.ar_bw_eff
        self.lat = c.ar_latency_us * 1e-6
        # Per-layer constants, per GPU.
        m = model
        self.attn_w = m.attn_params_per_layer / tp * self.w_bytes
        self.expert_w = m.mlp_params_per_expert / tp * self.w_bytes
        self.router_w = (m.hidden * m.experts * EMBED_BYTES) if m.is_moe else 0.0
        self.flops_per_token_layer = 2 * m.active_params_per_token / tp
        self.kv_per_token_layer = 2 * self.kv_heads_per_gpu * m.head_dim * self.kv_bytes
        self.lm_head_w = m.vocab * m.hidden / tp * EMBED_BYTES
        self.lm_head_flops = 2 * m.vocab * m.hidden / tp

    # ---- memory -------------------------------------------------------------------------
    def memory(self) -> MemoryPlan:
        m, cfg = self.model, self.config
        layer_w = self.attn_w + m.experts * self.expert_w + self.router_w
        embed = m.vocab * m.hidden / cfg.tp * EMBED_BYTES
        worst_weights = 0.0
        worst_kv_per_token = 0.0
        for i, n in enumerate(self.stages):
            w = n * layer_w
            if i == 0:
                w += embed
            if i == len(self.stages) - 1 and not (m.tied_embeddings and len(self.stages) == 1):
                w += self.lm_head_w
            worst_weights = max(worst_weights, w)
            worst_kv_per_token = max(worst_kv_per_token, n * self.kv_per_token_layer)
        # Activations and workspace sized for a full iteration of max_num_tokens, plus fp32
        # logits for one token per request in the batch.
        ffn_per_gpu = m.ffn * (m.experts_per_token if m.is_moe else 1) / cfg.tp
        act = cfg.max_num_tokens * (8 * m.hidden + 3 * ffn_per_gpu) * ACT_BYTES
        act += min(cfg.max_batch_size, cfg.max_num_tokens) * m.vocab / cfg.tp * 4
        free = self.gpu.memory_bytes - worst_weights - act - RUNTIME_RESERVE_BYTES
        kv = max(0.0, free) * cfg.kv_fraction
        kv_tokens = int(kv // worst_kv_per_token) if worst_kv_per_token else 0
        return MemoryPlan(
            weights=worst_weights, activations=act, reserve=RUNTIME_RESERVE_BYTES,
            kv_cache=kv, kv_bytes_per_token=worst_kv_per_token, kv_tokens=kv_tokens,
            total=self.gpu.memory_bytes,
        )

    # ---- time ---------------------------------------------------------------------------
    def _gemm_eff(self, tokens: float) -> float:
        return tokens / (tokens + self.cal.gemm_half_tokens)

    def layer_time(self, tokens: float, ctx_sum: float, prefill_attn: float) -> float:
        """One transformer layer on one GPU for one (micro-)batch (seconds).

        ``tokens``: tokens in the batch; ``ctx_sum``: KV-cache tokens read by decoding requests;
        ``prefill_attn``: sum over prefill chunks of chunk * (prefix + chunk / 2) (token pairs).
        """
        m = self.model
        if tokens <= 0:
            return 0.0
        # GEMMs: a roofline of FLOPs vs weight bytes; MoE reads only the experts some token hits.
        if m.is_moe:
            k, e = m.experts_per_token, m.experts
            active = e * (1.0 - (1.0 - k / e) ** tokens)
            weight_bytes = self.attn_w + active * self.expert_w + self.router_w
        else:
            weight_bytes = self.attn_w + self.expert_w
        flops = self.flops_per_token_layer * tokens
        gemm = max(flops / (self.peak * self._gemm_eff(tokens)), weight_bytes / self.bw)
        # Attention: decode reads its KV cache (memory-bound); prefill is compute-bound.
        attn = ctx_sum * self.kv_per_token_layer / self.bw
        attn += 4 * prefill_attn * self.heads_per_gpu * m.head_dim / self.attn_flops_s
        # Two all-reduces per layer (after attention and after the MLP) under TP.
        comm = 0.0
        if self.config.tp > 1:
            tp = self.config.tp
            size = tokens * m.hidden * ACT_BYTES
            comm = 2 * (self.lat + size * 2 * (tp - 1) / tp / self.link)
        return gemm + attn + comm

    def lm_head_time(self, seqs: float) -> float:
        """LM head on the last stage for ``seqs`` sequences producing a token (seconds)."""
        if seqs <= 0:
            return 0.0
        flops = self.lm_head_flops * seqs
        return max(flops / (self.peak * self._gemm_eff(seqs)), self.lm_head_w / self.bw)

    def iteration_time(self, tokens: float, seqs: int, ctx_sum: float, prefill_attn: float) -> float:
        """Wall time of one scheduler iteration of the replica (seconds).

        The batch is split into up to ``pp`` micro-batches; the pipeline's throughput is set by
        its slowest stage, a token's latency by the sum of all stages and transfers.
        """
        if seqs <= 0:
            return 0.0
        pp = self.config.pp
        mb = min(pp, seqs)
        t, c, a, s = tokens / mb, ctx_sum / mb, prefill_attn / mb, seqs / mb
        per_layer = self.layer_time(t, c, a)
        stage_times = [n * per_layer for n in self.stages]
        stage_times[-1] += self.lm_head_time(s)
        c = self.cal
        overhead = c.iter_overhead_ms * 1e-3 + c.seq_overhead_us * 1e-6 * seqs
        if pp == 1:
            return stage_times[0] + overhead
        xfer = self.lat + t * self.model.hidden * ACT_BYTES / (self.link / c.ar_bw_eff)
        through = mb * max(stage_times)
        latency = sum(stage_times) + (pp - 1) * xfer
        return max(through, latency) + overhead


def with_constants(cal: Calibration, **changes: float) -> Calibration:
    """A copy of ``cal`` with some constants changed (used by calibration and tests)."""
    return replace(cal, **changes)


__all__ = [
    "Calibration",
    "KV_BLOCK_TOKENS",
    "MemoryPlan",
    "PerfModel",
    "RUNTIME_RESERVE_BYTES",
    "load_calibration",
    "with_constants",
]
