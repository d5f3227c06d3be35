"""What is being tuned: the model, the GPU, the precision and the workload.

Plain frozen dataclasses, loaded from the catalogs shipped in ``autotune/data`` or from user
files (a Hugging Face ``config.json`` for a model, a YAML file for a GPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from autotune.errors import UserError

#: Bytes per weight element and per KV-cache element for each precision.
#: FP8 checkpoints use an FP8 KV cache in TensorRT-LLM's published runs; FP4 keeps an FP8 cache.
PRECISIONS: dict[str, tuple[float, float]] = {
    "bf16": (2.0, 2.0),
    "fp8": (1.0, 1.0),
    "fp4": (0.5625, 1.0),  # NVFP4: 4-bit values plus one FP8 scale per 16 elements
}

#: Largest sequence lengths accepted before they are called absurd (tokens).
MAX_SEQUENCE = 1_048_576


#: Bytes per weight element of the expert formats a checkpoint can fix whatever the deployment's
#: precision (``ModelSpec.expert_format``): MXFP4 is 4-bit values plus one 8-bit (E8M0) scale
#: per 32 elements (OCP Microscaling spec), as gpt-oss ships its experts.
EXPERT_FORMATS: dict[str, float] = {"mxfp4": 0.53125, "fp4": 0.5625, "fp8": 1.0, "bf16": 2.0}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer: dense (Llama-style) or mixture-of-experts.

    Dense: every layer has one gated MLP of width ``ffn``. MoE (``experts`` > 1): each MoE layer
    routes a token to ``experts_per_token`` of ``experts`` routed experts of width ``ffn`` each,
    plus ``shared_experts`` always-active ones (``shared_ffn`` wide in all, 0: ``shared_experts
    * ffn``); the first ``dense_layers`` layers keep a dense MLP of width ``dense_ffn``
    (DeepSeek's ``first_k_dense_replace``). Attention is grouped-query (``kv_heads``) unless
    ``kv_lora_rank`` > 0: multi-head latent attention (MLA, DeepSeek-V2/V3), whose KV cache
    holds one compressed latent of ``kv_lora_rank + rope_head_dim`` per token and layer, shared
    by all heads; ``head_dim`` is then the query/key width (nope + rope) and ``v_head_dim`` the
    value width. ``sliding_layers`` of the layers attend only to the last ``sliding_window``
    tokens (gpt-oss alternates them with full ones). ``expert_format``: the routed experts'
    number format when the checkpoint fixes it (gpt-oss: ``mxfp4``), else the deployment's.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # per routed expert for MoE
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    experts: int = 1
    experts_per_token: int = 1
    shared_experts: int = 0
    shared_ffn: int = 0
    dense_layers: int = 0
    dense_ffn: int = 0
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    rope_head_dim: int = 0
    v_head_dim: int = 0  # 0: head_dim
    sliding_window: int = 0
    sliding_layers: int = 0
    expert_format: str = ""
    gated_mlp: bool = True
    tied_embeddings: bool = False
    hf_name: str = ""
    max_context: int = 0  # longest sequence, prompt + output (tokens); 0: unknown
    fp8_hf_name: str = ""  # a pre-quantized FP8 checkpoint of the model, where one is published

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.v_head_dim == 0:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        if self.shared_experts and not self.shared_ffn:
            object.__setattr__(self, "shared_ffn", self.shared_experts * self.ffn)
        if self.dense_layers and not self.dense_ffn:
            object.__setattr__(self, "dense_ffn", self.ffn)
        if self.expert_format and self.expert_format not in EXPERT_FORMATS:
            raise UserError(f"model {self.name!r}: unknown expert_format "
                            f"{self.expert_format!r} (use one of {', '.join(EXPERT_FORMATS)})")

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        """Layers with routed experts (0 for a dense model)."""
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def kv_width(self) -> int:
        """KV-cache elements per token and layer: K and V of every KV head, or MLA's latent."""
        if self.is_mla:
            return self.kv_lora_rank + self.rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    @property
    def attn_params_per_layer(self) -> int:
        """Attention projection weights of one layer (elements): Q, K, V and O, or MLA's
        down- and up-projections."""
        h, n, d = self.hidden, self.heads, self.head_dim
        if self.is_mla:
            q = (h * self.q_lora_rank + self.q_lora_rank * n * d if self.q_lora_rank
                 else h * n * d)
            kv_down = h * (self.kv_lora_rank + self.rope_head_dim)
            kv_up = self.kv_lora_rank * n * (d - self.rope_head_dim + self.v_head_dim)
            return q + kv_down + kv_up + n * self.v_head_dim * h
        return h * n * d + 2 * h * self.kv_heads * d + n * d * h

    def mlp_params(self, width: int) -> int:
        """Weights of one MLP of intermediate ``width`` (elements)."""
        return (3 if self.gated_mlp else 2) * self.hidden * width

    @property
    def mlp_params_per_expert(self) -> int:
        """MLP weights of one routed expert (or the dense MLP) of one layer (elements)."""
        return self.mlp_params(self.ffn)

    @property
    def params_per_layer(self) -> int:
        """Weights of one MoE layer (of any layer for a dense model; elements)."""
        router = self.hidden * self.experts if self.is_moe else 0
        return (self.attn_params_per_layer + self.experts * self.mlp_params_per_expert
                + self.mlp_params(self.shared_ffn) + router)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        dense = self.dense_layers * (self.attn_params_per_layer + self.mlp_params(self.dense_ffn))
        return ((self.layers - self.dense_layers) * self.params_per_layer + dense
                + heads * self.embedding_params)

    @property
    def active_params_per_token(self) -> int:
        """Weights one token multiplies per MoE layer (elements): attention, top-k experts
        and the shared ones."""
        return (self.attn_params_per_layer + self.experts_per_token * self.mlp_params_per_expert
                + self.mlp_params(self.shared_ffn))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's datasheet figures."""

    name: str
    memory_gib: float
    mem_bw_tb_s: float
    tflops: dict[str, float] = field(hash=False)
    nvlink_gb_s: float  # per direction per GPU
    gpus_per_node: int = 8
    description: str = ""
    nvls: bool = False  # NVSwitch reduces all-reduces in the switch (NVLink SHARP, Hopper on)
    # Between nodes (see FABRICS): the fabric's name, its bandwidth per GPU and direction (GB/s;
    # one NIC per GPU, as HGX systems are cabled) and the latency of one message across it
    # (microseconds: NIC, switch and the collective library's protocol).
    fabric: str = "ndr-ib"
    fabric_gb_s: float = 50.0
    fabric_latency_us: float = 10.0

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def supports(self, precision: str) -> bool:
        return precision in self.tflops

    def peak_flops(self, precision: str) -> float:
        """Dense peak of the tensor cores for this precision (FLOP/s)."""
        return self.tflops[precision] * 1e12

    def default_precision(self) -> str:
        return "fp8" if "fp8" in self.tflops else "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """Requests' lengths: input (prompt) and output tokens, fixed or normally distributed.

    ``isl_std``/``osl_std`` of 0 give fixed lengths, as in NVIDIA's published runs.
    """

    isl: int
    osl: int
    isl_std: float = 0.0
    osl_std: float = 0.0

    def __post_init__(self):
        for name in ("isl", "osl"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"--{name} must be a positive number of tokens, got {value!r}")
            if value > MAX_SEQUENCE:
                raise UserError(f"--{name} {value} is larger than {MAX_SEQUENCE} tokens")
        if self.isl_std < 0 or self.osl_std < 0:
            raise UserError("length standard deviations must be >= 0")

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a request can reach (tokens), covering 3 sigma of the distributions."""
        return int(self.isl + 3 * self.isl_std) + int(self.osl + 3 * self.osl_std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Workload:
        return cls(**data)

    def label(self) -> str:
        return f"isl{self.isl}-osl{self.osl}"


def _data_text(relative: str) -> str:
    return resources.files("autotune").joinpath("data", relative).read_text()


@cache
def model_catalog() -> dict[str, dict]:
    return yaml.safe_load(_data_text("models.yaml"))


@cache
def gpu_catalog() -> dict[str, dict]:
    out = {}
    for entry in resources.files("autotune").joinpath("data", "gpus").iterdir():
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text())
            out[data["name"]] = data
    return out


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog name (``llama-3.1-70b``) or a path to a Hugging Face ``config.json``."""
    key = name_or_path.strip().lower()
    catalog = model_catalog()
    if key in catalog:
        return ModelSpec(name=key, **catalog[key])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return model_from_hf_config(path)
    known = ", ".join(sorted(catalog))
    raise UserError(f"unknown model {name_or_path!r}: use one of {known} "
                    "or a path to a config.json")


#: Integer fields of a Hugging Face config that must be positive when present.
_HF_POSITIVE = ("num_key_value_heads", "head_dim", "num_local_experts", "num_experts",
                "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                "max_position_embeddings", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                "qk_nope_head_dim", "v_head_dim", "shared_expert_intermediate_size",
                "sliding_window")


def model_from_hf_config(path: Path) -> ModelSpec:
    """Read a Hugging Face ``config.json``: Llama-, Mistral- and Qwen-style dense models, and
    mixture-of-experts ones (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3 with MLA, gpt-oss)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read model config {str(path)!r}: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{str(path)!r} is not a model config (expected a JSON object)")
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM under text_config
    needed = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not isinstance(cfg.get(k), int) or cfg.get(k) <= 0]
    dense_ffn = cfg.get("intermediate_size") or cfg.get("ffn_hidden_size")
    # A routed expert's width: moe_intermediate_size (DeepSeek, Qwen-MoE); Mixtral and gpt-oss
    # give it as intermediate_size.
    ffn = cfg.get("moe_intermediate_size") or dense_ffn
    if missing or not isinstance(ffn, int) or ffn <= 0:
        what = ", ".join(
            missing + ([] if isinstance(ffn, int) and ffn > 0 else ["intermediate_size"]))
        raise UserError(f"{str(path)!r} is not a decoder model config: missing or invalid {what}")
    for key in _HF_POSITIVE:
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            raise UserError(f"{str(path)!r}: {key} must be a positive integer, got {value!r}")
    heads = cfg["num_attention_heads"]
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_local_experts")
                  or cfg.get("num_experts") or 1)
    moe = experts > 1
    mla = bool(cfg.get("kv_lora_rank"))
    rope = int(cfg.get("qk_rope_head_dim") or 0) if mla else 0
    head_dim = (int(cfg.get("qk_nope_head_dim") or 0) + rope if mla
                else cfg.get("head_dim") or 0)
    # Only the layers the config marks as sliding (gpt-oss's layer_types); a bare
    # sliding_window is often switched off (Qwen's use_sliding_window: false).
    types = cfg.get("layer_types") if isinstance(cfg.get("layer_types"), list) else []
    # (MoE models only for now: gpt-oss. Dense ones with sliding layers, Gemma-2/3, keep the
    # full-attention model they always had.)
    sliding = sum(1 for t in types if t == "sliding_attention") if experts > 1 else 0
    quant = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"),
                                                        dict) else {}
    dense_layers = int(cfg.get("first_k_dense_replace") or 0) if moe else 0
    shared = int(cfg.get("n_shared_experts") or 0) if moe else 0
    shared_ffn = int(cfg.get("shared_expert_intermediate_size") or 0) if moe else 0
    return ModelSpec(
        name=_config_name(Path(path), cfg),
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn=ffn,
        vocab=cfg["vocab_size"],
        head_dim=head_dim,
        experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 1) if moe else 1,
        shared_experts=max(shared, 1 if shared_ffn else 0),
        shared_ffn=shared_ffn,
        dense_layers=dense_layers,
        dense_ffn=int(dense_ffn) if dense_layers and isinstance(dense_ffn, int) else 0,
        kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0) if mla else 0,
        rope_head_dim=rope,
        v_head_dim=int(cfg.get("v_head_dim") or 0) if mla else 0,
        sliding_window=int(cfg.get("sliding_window") or 0) if sliding else 0,
        sliding_layers=sliding,
        expert_format="mxfp4" if moe and quant.get("quant_method") == "mxfp4" else "",
        gated_mlp=True,  # Llama, Mistral, Mixtral, Qwen, DeepSeek and gpt-oss: gated MLPs
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hf_name=str(cfg.get("_name_or_path", "")),
        max_context=_context_length(cfg),
    )


def _config_name(path: Path, cfg: dict) -> str:
    """A local config's model name: the Hugging Face name it records, else the file's name
    (``qwen25-7b.json`` -> ``qwen25-7b``), or its folder's for a checkpoint's ``config.json``."""
    recorded = cfg.get("_name_or_path")
    if isinstance(recorded, str) and recorded.strip():
        return recorded.strip()
    if path.name == "config.json":
        return path.resolve().parent.name
    return path.stem


def _context_length(cfg: dict) -> int:
    """The longest sequence the model takes (tokens; 0 when the config does not say):
    ``max_position_embeddings``, stretched by a RoPE scaling factor when the config scales
    beyond it (YaRN, linear, dynamic; Llama 3's own scaling is already counted in it)."""
    context = cfg.get("max_position_embeddings") or 0
    scaling = cfg.get("rope_scaling")
    if context and isinstance(scaling, dict):
        kind = scaling.get("rope_type") or scaling.get("type")
        factor = scaling.get("factor")
        if kind in ("yarn", "linear", "dynamic") and isinstance(factor, (int, float)) \
                and factor > 1 and "original_max_position_embeddings" not in scaling:
            context = int(context * factor)
    return int(context)


#: Inter-node fabrics: (bandwidth per GPU and direction in GB/s, latency of one message in us).
#: One NIC per GPU. NDR InfiniBand (ConnectX-7, 400 Gb/s) is the HGX H100/H200/B200 reference;
#: the latencies are of a small NCCL message across one switch, not the NIC's wire latency.
FABRICS: dict[str, tuple[float, float]] = {
    "ndr-ib": (50.0, 10.0),  # 400 Gb/s InfiniBand NDR
    "hdr-ib": (25.0, 10.0),  # 200 Gb/s InfiniBand HDR (A100 systems)
    "xdr-ib": (100.0, 10.0),  # 800 Gb/s InfiniBand XDR (ConnectX-8)
    "roce-400g": (50.0, 15.0),  # 400 Gb/s RoCE v2 Ethernet
    "efa": (50.0, 30.0),  # AWS EFA on p5 (3,200 Gb/s per 8 GPUs); SRD's higher latency
}


def with_nodes(spec: GpuSpec, *, fabric: str | None = None,
               gpus_per_node: int | None = None) -> GpuSpec:
    """``spec`` on another fabric (a FABRICS name) or with another GPU count per node
    (UserError for an unknown fabric or a count below 1)."""
    changes: dict = {}
    if fabric is not None:
        key = fabric.strip().lower()
        if key not in FABRICS:
            raise UserError(f"unknown --fabric {fabric!r}: use one of {', '.join(FABRICS)}")
        changes.update(fabric=key, fabric_gb_s=FABRICS[key][0],
                       fabric_latency_us=FABRICS[key][1])
    if gpus_per_node is not None:
        if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
            raise UserError(f"--gpus-per-node must be >= 1, got {gpus_per_node!r}")
        changes["gpus_per_node"] = gpus_per_node
    return replace(spec, **changes) if changes else spec


def load_gpu(name_or_path: str) -> GpuSpec:
    """A catalog name (``h100``, ``h200``, ``a100``, ``b200``) or a path to a GPU YAML file."""
    key = name_or_path.strip().lower()
    catalog = gpu_catalog()
    if key in catalog:
        return GpuSpec(**catalog[key])
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
            spec = GpuSpec(**data)
        except (yaml.YAMLError, TypeError) as exc:
            raise UserError(f"{str(path)!r} is not a GPU spec: {exc}") from None
        _check_gpu(spec, str(path))
        return spec
    known = ", ".join(sorted(catalog))
    raise UserError(f"unknown GPU {name_or_path!r}: use one of {known} "
                    "or a path to a GPU YAML file")


def _positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 < value < float("inf"))


def _check_gpu(spec: GpuSpec, where: str) -> None:
    """Every figure of a GPU YAML is a positive number (UserError naming the first that is
    not): a zero bandwidth or a bare ``tflops: 500`` would only fail deep inside the model."""
    for name in ("memory_gib", "mem_bw_tb_s", "nvlink_gb_s", "fabric_gb_s",
                 "fabric_latency_us"):
        if not _positive(getattr(spec, name)):
            raise UserError(f"{where!r}: {name} must be a positive number, got "
                            f"{getattr(spec, name)!r}")
    if not isinstance(spec.tflops, dict) or not spec.tflops:
        raise UserError(f"{where!r}: tflops must map precisions to dense peak TFLOP/s, e.g. "
                        f"{{bf16: 989, fp8: 1979}}; got {spec.tflops!r}")
    for precision, value in spec.tflops.items():
        if precision not in PRECISIONS:
            raise UserError(f"{where!r}: tflops names unknown precision {precision!r} "
                            f"(use {', '.join(PRECISIONS)})")
        if not _positive(value):
            raise UserError(f"{where!r}: tflops.{precision} must be a positive number, "
                            f"got {value!r}")
    if not isinstance(spec.gpus_per_node, int) or spec.gpus_per_node < 1:
        raise UserError(f"{where!r}: gpus_per_node must be a positive integer")


def resolve_precision(gpu: GpuSpec, precision: str | None) -> str:
    """The precision to run: the user's choice checked against the GPU, or its default."""
    if precision is None:
        return gpu.default_precision()
    p = precision.strip().lower()
    if p not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not gpu.supports(p):
        raise UserError(f"{gpu.name} has no {p} tensor cores: use one of {', '.join(gpu.tflops)}")
    return p


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def layer_split(layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, as TensorRT-LLM splits them (earlier stages take the extra)."""
    base, extra = divmod(layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


__all__ = [
    "EXPERT_FORMATS",
    "FABRICS",
    "GpuSpec",
    "MAX_SEQUENCE",
    "ModelSpec",
    "PRECISIONS",
    "Workload",
    "ceil_div",
    "gpu_catalog",
    "layer_split",
    "load_gpu",
    "load_model",
    "model_catalog",
    "model_from_hf_config",
    "resolve_precision",
    "with_nodes",
]
