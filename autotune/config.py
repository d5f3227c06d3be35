"""One serving configuration: the settings a trial proposes and a runner honours."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

#: TensorRT-LLM's defaults (PyTorch back end, 1.x) for the settings autotune tunes.
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_KV_FRACTION = 0.90


@dataclass(frozen=True)
class EngineConfig:
    """A configuration of one deployment on ``tp * pp * dp`` GPUs.

    ``tp``/``pp`` are per replica; ``dp`` replicas serve independent requests. ``max_batch_size``
    (requests) and ``max_num_tokens`` (tokens per iteration) are the scheduler's limits;
    ``kv_fraction`` is the share of free GPU memory given to the KV cache.

    For a mixture-of-experts model the ``tp`` GPUs of a pipeline stage also split the experts,
    as TensorRT-LLM counts them: ``ep`` of them hold disjoint sets of experts (expert
    parallelism) and each expert is split over the other ``tp / ep`` (MoE tensor parallelism),
    so that MoE TP x EP = tp. ``attention_dp``: attention runs data-parallel over the ``tp``
    GPUs (each its own requests, whole heads, its own KV cache) instead of tensor-parallel;
    attention TP x attention DP = tp either way. Dense models keep ``ep`` 1 and no attention DP.
    With ``max_batch_size`` and ``max_num_tokens`` per attention-DP rank, as the engines apply
    them.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS
    kv_fraction: float = DEFAULT_KV_FRACTION
    chunked_prefill: bool = True
    precision: str = "fp8"
    ep: int = 1
    attention_dp: bool = False

    @property
    def moe_tp(self) -> int:
        """GPUs each expert is split over (tp / ep)."""
        return max(1, self.tp // self.ep)

    @property
    def attention_tp(self) -> int:
        """GPUs each request's attention is split over (1 under attention DP)."""
        return 1 if self.attention_dp else self.tp

    @property
    def attention_ranks(self) -> int:
        """Attention-DP ranks of a stage, each with its own requests, KV cache and batch
        limits (1 without attention DP)."""
        return self.tp if self.attention_dp else 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    def to_dict(self) -> dict:
        """The settings (the MoE ones only where they differ from a dense model's, so that a
        dense configuration keeps the identity, hashes and stored form it always had)."""
        out = asdict(self)
        for name in _MOE_FIELDS:
            if out[name] == _MOE_DEFAULTS[name]:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def layout_label(self) -> str:
        """The parallel layout's name (``layout_label``)."""
        return layout_label(self.tp, self.pp, self.dp, self.ep, self.attention_dp)

    def label(self) -> str:
        """Short human name: ``tp4-pp2-dp1 b256 t8192 kv0.90 chunked``."""
        chunk = "chunked" if self.chunked_prefill else "no-chunk"
        return (
            f"{self.layout_label()} b{self.max_batch_size} t{self.max_num_tokens} "
            f"kv{self.kv_fraction:.2f} {chunk}"
        )

    def engine_settings(self) -> dict:
        """The settings baked into a TensorRT engine: changing any of them needs a rebuild."""
        return {
            "tp": self.tp,
            "pp": self.pp,
            "precision": self.precision,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            **{name: getattr(self, name) for name in _MOE_FIELDS
               if getattr(self, name) != _MOE_DEFAULTS[name]},
        }


#: The MoE settings of a configuration and their dense-model values.
_MOE_FIELDS = ("ep", "attention_dp")
_MOE_DEFAULTS = {"ep": 1, "attention_dp": False}


def layout_label(tp: int, pp: int, dp: int, ep: int = 1, attention_dp: bool = False) -> str:
    """A parallel layout's name: ``tp8-pp1-dp1``; a MoE layout adds its expert parallelism and
    attention DP, ``tp8-pp1-dp1-ep8-adp`` (TensorRT-LLM's "DEP8"; without ``-adp`` "TEP8")."""
    return (f"tp{tp}-pp{pp}-dp{dp}" + (f"-ep{ep}" if ep > 1 else "")
            + ("-adp" if attention_dp else ""))


def parse_layout(label: str) -> tuple[int, int, int, int, bool]:
    """``(tp, pp, dp, ep, attention_dp)`` of a ``layout_label`` (ValueError if it is none)."""
    parts = label.split("-")
    attention_dp = parts[-1] == "adp"
    if attention_dp:
        parts = parts[:-1]
    values = {part[:2]: int(part[2:]) for part in parts}
    if set(values) - {"tp", "pp", "dp", "ep"} or not {"tp", "pp", "dp"} <= set(values):
        raise ValueError(f"not a layout label: {label!r}")
    return values["tp"], values["pp"], values["dp"], values.get("ep", 1), attention_dp


def stable_hash(*parts: dict | str) -> str:
    """A short, stable hash of JSON-able parts (sorted keys), for cache and dedup keys."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = [
    "DEFAULT_KV_FRACTION",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_NUM_TOKENS",
    "EngineConfig",
    "layout_label",
    "parse_layout",
    "stable_hash",
]
