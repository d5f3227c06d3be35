"""The physics of one configuration: memory footprint and the time of one scheduler iteration.

Everything here is a closed-form function of the model, the GPU, the precision, the layout and a
handful of fitted constants (``Calibration``); ``scheduler.py`` turns iteration times into
per-request latencies. Units: bytes, FLOPs, seconds.

One iteration of one pipeline stage is the sum of, per layer:

- the linear layers (QKV, O, MLP or the experts hit): a roofline, the larger of FLOPs at the
  GEMM efficiency for this many tokens and the bytes of weights plus activations at the achieved
  HBM bandwidth;
- attention: decoding requests read their KV cache (memory-bound), prefill chunks do
  ``4 * head_dim`` FLOPs per (query, key) pair and head (compute-bound);
- element-wise work that tensor parallelism does not split (norms, residual adds, the gated
  activation): memory traffic over the hidden state;
- two all-reduces under tensor parallelism (after attention and after the MLP): the launch and
  synchronisation latency of the engine's all-reduce kernel (``ar_latency_us`` for the custom
  NVLink kernel of decode-sized messages, ``ar_nccl_latency_us`` for NCCL above 8 MiB) plus
  the message over the all-reduce bus bandwidth (a ring's ``2 (tp - 1) / tp`` share
  of it, or a full node's when the NVSwitch reduces in the switch);
- a fixed cost per layer (``layer_overhead_us``): a layer is a dozen kernels, and each costs a
  few microseconds of launch gap and tail however little it does (what keeps a batch-1 step
  above its bandwidth floor on one GPU as well as on eight);

plus the LM head on the last stage and a fixed cost per iteration and per request. Pipeline
stages hand activations to the next one (``p2p_latency_us`` plus bytes over one NVLink
connection); the pipeline's round time is set by its slowest stage, a token's latency by the
sum of all of them.

The constants are fitted per GPU by ``benchmarks/calibrate.py`` on NVIDIA's published
TensorRT-LLM numbers; ``benchmarks/accuracy.py`` measures the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autotune.config import EngineConfig
from autotune.model.calibration import Calibration, load_calibration
from autotune.specs import EXPERT_FORMATS, PRECISIONS, GpuSpec, ModelSpec, ceil_div, layer_split

#: GPU memory a TensorRT-LLM rank keeps for itself: CUDA context, NCCL and cuBLAS workspaces,
#: CUDA graphs (bytes).
RUNTIME_RESERVE_BYTES = 3.0 * 2**30
#: KV-cache block size (tokens), TensorRT-LLM's default ``tokens_per_block``.
KV_BLOCK_TOKENS = 32
#: Activations are 16-bit whatever the weights' precision (bytes per element).
ACT_BYTES = 2
#: Embedding and LM head stay in 16-bit precision in FP8/FP4 checkpoints (bytes per element).
EMBED_BYTES = 2
#: Logits are gathered over the TP group and kept in FP32 (bytes per element).
LOGIT_BYTES = 4
#: Element-wise passes over the hidden state per layer and token (two RMSNorms and two residual
#: adds: each reads and writes it) and over the per-GPU MLP width (the gated activation reads
#: gate and up, writes their product).
ELEMENTWISE_HIDDEN_PASSES = 8
ELEMENTWISE_FFN_PASSES = 3
#: Largest all-reduce (bytes) the engines' custom NVLink kernels take (vLLM's and SGLang's
#: ``custom_all_reduce`` buffers are 8 MiB; TensorRT-LLM's AUTO strategy switches to NCCL
#: around the same size); larger ones go through NCCL (``ar_nccl_latency_us``).
CUSTOM_AR_MAX_BYTES = 8 * 2**20
#: Fraction of the inter-node fabric's rate per GPU that NCCL's transfers reach (nccl-tests on
#: NDR InfiniBand: ~40-45 GB/s bus bandwidth per 50 GB/s NIC). Not fitted: no published
#: multi-node run in the data.
FABRIC_EFF = 0.8
#: Fraction of one NVLink connection's rate a stage-to-stage copy reaches (copy engines; no
#: published pipeline-parallel run to fit it on).
P2P_EFF = 0.8


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
    ranks: int = 1  # attention-DP ranks, each caching its own requests (1: one shared cache)

    @property
    def fits(self) -> bool:
        return self.kv_cache > 0 and self.kv_tokens >= KV_BLOCK_TOKENS * self.ranks

    def requests_that_fit(self, tokens_per_request: int) -> int:
        blocks = self.kv_tokens // self.ranks // KV_BLOCK_TOKENS  # one rank's
        return int(blocks // ceil_div(tokens_per_request, KV_BLOCK_TOKENS)) * self.ranks


class PerfModel:
    """Memory and iteration time of one replica (``tp x pp`` GPUs) of ``config``.

    A mixture-of-experts layer on one GPU of a stage: its ``experts / ep`` routed experts, each
    ``1 / moe_tp`` of the width, run as a grouped GEMM over the tokens routed to them (top-k
    routing leaves some GPUs more than their share: the expected maximum over ``ep`` groups);
    the shared experts and any leading dense layers are split like attention. Without attention
    DP every GPU holds every token after attention's all-reduce (TEP), so the MoE block ends in
    the layer's second all-reduce; with it (DEP) each GPU runs attention for its own requests,
    whole heads and its own KV cache, and the MoE block gathers the tokens from all ranks and
    scatters the sums back (an all-gather and a reduce-scatter: an all-reduce's bytes, two
    latencies). MLA keeps one latent per token and layer, which every attention-TP rank reads
    whole: attention DP divides that read, TP does not.
    """

    def __init__(self, model: ModelSpec, gpu: GpuSpec, config: EngineConfig,
                 calibration: Calibration | None = None, engine: str | None = None):
        self.model, self.gpu, self.config = model, gpu, config
        # ``engine`` (None: TensorRT-LLM) picks the shipped constants when none are given.
        self.cal = c = calibration or load_calibration(gpu.name, config.precision,
                                                       engine=engine)
        self.w_bytes, self.kv_bytes = PRECISIONS[config.precision]
        self.expert_bytes = (EXPERT_FORMATS[model.expert_format] if model.expert_format
                             else self.w_bytes)
        self.stages = layer_split(model.layers, config.pp)
        m, tp = model, config.tp
        # Attention (and what is split like it: dense MLPs, shared experts, the LM head) is
        # tensor-parallel over ``atp`` GPUs; under attention DP each of the ``ranks`` GPUs of a
        # stage runs it for its own share of the requests.
        self.adp = config.attention_dp and tp > 1
        self.ranks = config.attention_ranks
        atp = config.attention_tp
        hd = m.head_dim
        self.kv_heads_per_gpu = ceil_div(m.kv_heads, atp)  # replicated when tp > KV heads
        self.heads_per_gpu = m.heads / atp
        q_width = m.heads * hd / atp
        v_width = m.heads * m.v_head_dim / atp
        kv_width = m.kv_width if m.is_mla else 2 * self.kv_heads_per_gpu * hd
        ffn_gpu = m.ffn / config.moe_tp  # one routed expert's (or the dense MLP's) slice
        mlp_mats = 3 if m.gated_mlp else 2

        # Achieved rates.
        peak = gpu.peak_flops(config.precision)
        peak16 = gpu.peak_flops("bf16") if "bf16" in gpu.tflops else peak
        self.gemm_rate = peak * c.gemm_eff  # FLOP/s of a large GEMM
        self.head_rate = peak16 * c.gemm_eff  # the LM head runs in 16-bit
        self.attn_rate = peak16 * c.attn_eff
        self.bw = gpu.mem_bw_tb_s * 1e12 * c.mem_eff
        self.link = gpu.nvlink_gb_s * 1e9 * c.ar_bw_eff
        self.p2p = gpu.nvlink_gb_s * 1e9 * P2P_EFF
        self.lat = c.ar_latency_us * 1e-6
        self.nccl_lat = c.ar_nccl_latency_us * 1e-6
        # Up to this many tokens an all-reduce fits the custom kernel (its latency), above: NCCL.
        self.custom_ar_tokens = CUSTOM_AR_MAX_BYTES / (m.hidden * ACT_BYTES)
        self.p2p_lat = c.p2p_latency_us * 1e-6
        self.layer_fixed = c.layer_overhead_us * 1e-6
        self.moe_fixed = c.moe_overhead_us * 1e-6
        self.half = c.gemm_half_tokens

        # Per layer and GPU: weights (elements) and the FLOPs of one token (attention GEMMs and
        # one expert's MLP).
        if m.is_mla:  # the down-projections are replicated, the per-head up-projections split
            q = (m.hidden * m.q_lora_rank + m.q_lora_rank * q_width if m.q_lora_rank
                 else m.hidden * q_width)
            kv_up = m.kv_lora_rank * (m.heads / atp) * (hd - m.rope_head_dim + m.v_head_dim)
            self.attn_params = q + m.hidden * m.kv_width + kv_up + v_width * m.hidden
        else:
            self.attn_params = m.hidden * (q_width + kv_width) + q_width * m.hidden
        self.expert_params = mlp_mats * m.hidden * ffn_gpu
        self.attn_w = self.attn_params * self.w_bytes
        self.expert_w = self.expert_params * (self.expert_bytes if m.is_moe else self.w_bytes)
        self.router_w = m.hidden * m.experts * EMBED_BYTES if m.is_moe else 0.0
        self.local_experts = m.experts / config.ep
        # Split like attention: the shared experts of a MoE layer, the MLP of a leading dense one.
        self.shared_params = m.mlp_params(m.shared_ffn) / atp
        self.lead_params = m.mlp_params(m.dense_ffn) / atp
        self.shared_w = self.shared_params * self.w_bytes
        self.lead_w = self.lead_params * self.w_bytes
        self.attn_flops_tok = 2 * self.attn_params
        self.expert_flops_tok = 2 * self.expert_params
        # Activation bytes in and out of the GEMMs per token (attention; one expert's MLP).
        self.attn_io_tok = (m.hidden + q_width + kv_width + v_width + m.hidden) * ACT_BYTES
        self.mlp_io_tok = (m.hidden + (mlp_mats - 1) * ffn_gpu + ffn_gpu + m.hidden) * ACT_BYTES
        # Element-wise work per token: the hidden-state passes, and the gated activation over
        # the MLP width this GPU computes for the token (its share of the routed experts' and
        # the shared experts' widths).
        routed_width = ffn_gpu * m.experts_per_token / config.ep + m.shared_ffn / atp
        self.elementwise_tok = (ELEMENTWISE_HIDDEN_PASSES * m.hidden
                                + ELEMENTWISE_FFN_PASSES * routed_width) * ACT_BYTES
        self.kv_per_token_layer = kv_width * self.kv_bytes
        # Prefill attention: a (query, key) pair costs a dot product over the query/key width
        # and a multiply-add over the value width, per head.
        self.prefill_flops_pair = 2 * self.heads_per_gpu * (hd + m.v_head_dim)
        # MLA's absorbed decode: every head scores and sums against the whole latent.
        self.decode_flops_pair = (self.heads_per_gpu * (4 * m.kv_lora_rank + 2 * m.rope_head_dim)
                                  if m.is_mla else 0.0)
        # All-reduce traffic per token, in "bus" bytes (nccl-tests' convention, so that
        # nvlink x ar_bw_eff is a bus bandwidth): a ring moves 2 (tp - 1) / tp of the message
        # per GPU; with in-switch reduction (NVLS) each GPU sends its partial sums once and
        # receives the sum once whatever the TP size, which nccl-tests reports on a full node as
        # a bus bandwidth 2 (n - 1) / n times the algorithm's.
        per_node = gpu.gpus_per_node
        n = per_node if gpu.nvls or tp > per_node else tp
        self.ar_bytes_tok = m.hidden * ACT_BYTES * 2 * (n - 1) / n
        # Across nodes (feasibility.check_placement: a TP group inside a node or over whole
        # nodes, the stages in order). A TP group over k nodes reduces hierarchically: inside
        # each node as above, then a ring over the k nodes in which each GPU carries its
        # 1/per_node share of the message over its own NIC (2 (k - 1) / k of it, 2 (k - 1)
        # steps of the fabric's latency), then back inside the node.
        self.tp_nodes = tp // per_node if tp > per_node else 1
        k = self.tp_nodes
        self.fabric = gpu.fabric_gb_s * 1e9 * FABRIC_EFF
        self.fabric_lat = gpu.fabric_latency_us * 1e-6
        self.ar_fabric_bytes_tok = m.hidden * ACT_BYTES / per_node * 2 * (k - 1) / k
        # Which stage-to-stage hand-offs cross a node boundary: the next stage starts a node.
        self.crossings = tuple(tp * config.pp > per_node and (s * tp) % per_node == 0
                               for s in range(1, config.pp))
        self.lm_head_w = m.vocab * m.hidden / atp * EMBED_BYTES
        self.lm_head_flops = 2 * m.vocab * m.hidden / atp
        self.xfer_tok = m.hidden * ACT_BYTES  # stage-to-stage activation per token
        self.overhead = c.iter_overhead_ms * 1e-3
        self.seq_overhead = c.seq_overhead_us * 1e-6
        # Leading dense layers of a MoE model per stage (they are the first ones: stage 0's).
        lead, self.stage_leads = m.dense_layers if m.is_moe else 0, []
        for layers in self.stages:
            self.stage_leads.append(min(lead, layers))
            lead -= self.stage_leads[-1]

    # ---- memory -------------------------------------------------------------------------
    def memory(self) -> MemoryPlan:
        m, cfg = self.model, self.config
        layer_w = (self.attn_w + self.local_experts * self.expert_w + self.router_w
                   + self.shared_w) if m.is_moe else self.attn_w + self.expert_w
        lead_w = self.attn_w + self.lead_w
        embed = self.lm_head_w  # vocab-parallel over the attention TP group, 16-bit
        worst_weights = 0.0
        worst_kv_per_token = 0.0
        last = len(self.stages) - 1
        for i, n in enumerate(self.stages):
            leads = self.stage_leads[i]
            w = (n - leads) * layer_w + leads * lead_w
            if i == 0:
                w += embed
            if i == last and not (m.tied_embeddings and last == 0):
                w += self.lm_head_w
            worst_weights = max(worst_weights, w)
            worst_kv_per_token = max(worst_kv_per_token, n * self.kv_per_token_layer)
        # Activations and workspace sized for a full iteration of max_num_tokens (per
        # attention-DP rank; the MoE block's for the tokens routed here from all ranks), plus
        # the gathered FP32 logits of one token per request in the batch.
        moe_tokens = cfg.max_num_tokens * self.ranks * m.experts_per_token / cfg.ep
        act = (cfg.max_num_tokens * 8 * m.hidden
               + moe_tokens * 3 * m.ffn / cfg.moe_tp) * ACT_BYTES
        act += min(cfg.max_batch_size, cfg.max_num_tokens) * m.vocab * LOGIT_BYTES
        free = self.gpu.memory_bytes - worst_weights - act - RUNTIME_RESERVE_BYTES
        kv = max(0.0, free) * cfg.kv_fraction
        # Under attention DP each rank caches its own requests: the replica holds ranks times
        # one GPU's tokens.
        per_gpu = int(kv // worst_kv_per_token) if worst_kv_per_token else 0
        return MemoryPlan(
            weights=worst_weights, activations=act, reserve=RUNTIME_RESERVE_BYTES,
            kv_cache=kv, kv_bytes_per_token=worst_kv_per_token, kv_tokens=per_gpu * self.ranks,
            total=self.gpu.memory_bytes, ranks=self.ranks,
        )

    # ---- time ---------------------------------------------------------------------------
    def _gemm(self, flops: float, nbytes: float, tokens: float, rate: float) -> float:
        """A roofline: FLOPs at the efficiency ``tokens`` rows reach, or bytes at HBM speed."""
        compute = flops * (tokens + self.half) / (tokens * rate)
        memory = nbytes / self.bw
        return compute if compute > memory else memory

    def layer_time(self, tokens: float, ctx_sum: float, prefill_attn: float,
                   lead: bool = False, share: float | None = None) -> float:
        """One transformer layer on one GPU for one (micro-)batch (seconds).

        ``tokens``: tokens in the batch; ``ctx_sum``: KV-cache tokens read by decoding requests;
        ``prefill_attn``: sum over prefill chunks of chunk * (prefix + chunk / 2) (token pairs);
        all three over the whole stage (under attention DP each rank takes its share).
        ``lead``: one of a MoE model's leading dense layers. ``share``: the part of the
        attention-side work on the busiest attention-DP rank (default an even split).
        """
        if tokens <= 0:
            return 0.0
        m = self.model
        # Attention's side, on the busiest attention-DP rank (the slowest sets the pace at the
        # MoE block's collectives).
        share = 1.0 / self.ranks if share is None else share
        own, ctx, pairs = tokens * share, ctx_sum * share, prefill_attn * share
        t = self._gemm(self.attn_flops_tok * own, self.attn_w + self.attn_io_tok * own,
                       own, self.gemm_rate)
        if lead:
            t += self._gemm(2 * self.lead_params * own, self.lead_w + self.mlp_io_tok * own,
                            own, self.gemm_rate)
        elif m.is_moe:
            # Only the experts some token is routed to are read; each sees its share of tokens.
            # All the stage's tokens reach the MoE block (gathered from the ranks under
            # attention DP); this GPU holds experts / ep of them, and with ep groups the
            # busiest one gets more than its mean share of the routed tokens (top-k routing as
            # independent draws: the expected maximum of ep near-Poisson counts).
            k, e, ep = m.experts_per_token, m.experts, self.config.ep
            routed = tokens * k / ep
            if ep > 1:
                routed += (2.0 * routed * math.log(ep)) ** 0.5
            mean = tokens * k / ep
            # Distinct experts hit on the busiest GPU: the mean, scaled by its excess tokens.
            active = min(self.local_experts, self.local_experts
                         * (1.0 - (1.0 - k / e) ** tokens) * routed / mean)
            t += self.moe_fixed + self._gemm(self.expert_flops_tok * routed,
                            active * self.expert_w + self.router_w + self.mlp_io_tok * routed,
                            routed / active, self.gemm_rate)
            if self.shared_w:
                t += self._gemm(2 * self.shared_params * own,
                                self.shared_w + self.mlp_io_tok * own, own, self.gemm_rate)
        else:
            t += self._gemm(self.expert_flops_tok * tokens,
                            self.expert_w + self.mlp_io_tok * tokens,
                            tokens, self.gemm_rate)
        # Attention: decode reads the KV cache (MLA's latent can make it compute-bound);
        # prefill is compute-bound.
        t += (ctx * self.kv_per_token_layer + own * self.elementwise_tok) / self.bw
        if self.decode_flops_pair:
            t += max(0.0, ctx * self.decode_flops_pair / self.attn_rate
                     - ctx * self.kv_per_token_layer / self.bw)
        t += pairs * self.prefill_flops_pair / self.attn_rate
        if self.config.tp > 1:
            if not self.adp:
                t += 2 * self.allreduce_time(tokens)
            elif not lead:  # all-gather before the experts, reduce-scatter after
                t += self.allreduce_time(tokens) + self.lat
        return t + self.layer_fixed

    def allreduce_time(self, tokens: float) -> float:
        """One all-reduce of ``tokens`` hidden states over the TP group (seconds): the latency of
        the kernel that message size gets (the engine's custom one-shot/two-shot kernel up to
        ``CUSTOM_AR_MAX_BYTES``, NCCL above) plus bytes over the bus bandwidth; 0 without
        tensor parallelism."""
        if self.config.tp <= 1:
            return 0.0
        if self.tp_nodes > 1:
            # The custom kernels work inside one NVLink domain only: NCCL there, then the ring
            # over the nodes' fabric.
            k = self.tp_nodes
            return (self.nccl_lat + tokens * self.ar_bytes_tok / self.link
                    + 2 * (k - 1) * self.fabric_lat
                    + tokens * self.ar_fabric_bytes_tok / self.fabric)
        lat = self.lat if tokens <= self.custom_ar_tokens else self.nccl_lat
        return lat + tokens * self.ar_bytes_tok / self.link

    def handoff_time(self, tokens: float, crosses_nodes: bool) -> float:
        """One stage-to-stage send of ``tokens`` activations (seconds): over NVLink inside a
        node, over the GPU's own NIC when the next stage is on the next node."""
        if crosses_nodes:
            return self.fabric_lat + tokens * self.xfer_tok / self.fabric
        return self.p2p_lat + tokens * self.xfer_tok / self.p2p

    def lm_head_time(self, seqs: float) -> float:
        """LM head on the last stage for ``seqs`` sequences producing a token (seconds)."""
        if seqs <= 0:
            return 0.0
        return self._gemm(self.lm_head_flops * seqs, self.lm_head_w, seqs, self.head_rate)

    def iteration_time(self, tokens: float, seqs: int, ctx_sum: float,
                       prefill_attn: float) -> float:
        """Wall time of one scheduler iteration of the replica (seconds).

        The batch is split into up to ``pp`` micro-batches that follow each other through the
        stages; the round ends when every micro-batch has been through every stage: ``mb``
        passes of the slowest stage, and never less than one micro-batch's trip through all
        stages and the transfers between them.
        """
        if seqs <= 0:
            return 0.0
        overhead = self.overhead + self.seq_overhead * seqs
        m = self.model
        if m.sliding_layers:
            # A sliding-window layer reads at most the window of each request's cache.
            window = min(ctx_sum, seqs * m.sliding_window)
            ctx_sum = (ctx_sum * (m.layers - m.sliding_layers)
                       + window * m.sliding_layers) / m.layers
        pp = self.config.pp
        leads = self.stage_leads[0]
        mb = 1 if pp == 1 else min(pp, seqs)
        # Under attention DP the requests are dealt out to the ranks: with fewer requests than
        # ranks some idle while the busiest does a whole request's attention.
        share = math.ceil(seqs / mb / self.ranks) * mb / seqs if self.ranks > 1 else None
        if pp == 1:
            t = m.layers * self.layer_time(tokens, ctx_sum, prefill_attn, share=share)
            if leads:
                t = ((m.layers - leads) * self.layer_time(tokens, ctx_sum, prefill_attn,
                                                          share=share)
                     + leads * self.layer_time(tokens, ctx_sum, prefill_attn, lead=True,
                                               share=share))
            return t + self.lm_head_time(seqs * (share or 1.0)) + overhead
        t = tokens / mb
        per_layer = self.layer_time(t, ctx_sum / mb, prefill_attn / mb, share=share)
        lead_layer = (self.layer_time(t, ctx_sum / mb, prefill_attn / mb, lead=True,
                                      share=share) if leads else per_layer)
        head = self.lm_head_time(seqs / mb * (share or 1.0))
        stage_times = [(n - ld) * per_layer + ld * lead_layer
                       for n, ld in zip(self.stages, self.stage_leads, strict=True)]
        slowest = stage_times[0]  # earlier stages take the extra layers
        last = stage_times[-1] + head
        if last > slowest:
            slowest = last
        xfers = [self.handoff_time(t, cross) for cross in self.crossings]
        # (layers x one layer when all are alike: the sum rounds differently in the last bit)
        layers_time = sum(stage_times) if leads else self.model.layers * per_layer
        trip = layers_time + head + sum(xfers)
        through = mb * (slowest + max(xfers))
        return (through if through > trip else trip) + overhead


__all__ = [
    "ACT_BYTES",
    "KV_BLOCK_TOKENS",
    "RUNTIME_RESERVE_BYTES",
    "MemoryPlan",
    "PerfModel",
]
