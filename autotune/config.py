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
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS
    kv_fraction: float = DEFAULT_KV_FRACTION
    chunked_prefill: bool = True
    precision: str = "fp8"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def label(self) -> str:
        """Short human name: ``tp4-pp2-dp1 b256 t8192 kv0.90 chunked``."""
        chunk = "chunked" if self.chunked_prefill else "no-chunk"
        return (
            f"tp{self.tp}-pp{self.pp}-dp{self.dp} b{self.max_batch_size} t{self.max_num_tokens} "
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
        }


def stable_hash(*parts: dict | str) -> str:
    """A short, stable hash of JSON-able parts (sorted keys), for cache and dedup keys."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = [
    "DEFAULT_KV_FRACTION",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_NUM_TOKENS",
    "EngineConfig",
    "stable_hash",
]
