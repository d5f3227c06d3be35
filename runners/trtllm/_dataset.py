"""The requests ``trtllm-bench`` replays: a JSONL dataset, one request a line.

Each line is ``{"task_id": i, "input_ids": [...], "output_tokens": osl}`` (the layout
``prepare_dataset.py`` writes). A synthetic dataset is made once per workload from seeded random
token ids and reused by every trial; a user's own dataset file is used as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotune.config import stable_hash
from autotune.errors import UserError
from autotune.specs import Workload

#: Token ids are drawn from [LOW_ID, vocab - HIGH_MARGIN): tokenizers keep their special tokens
#: at both ends of the vocabulary, and a special token in a prompt can end or derail a request.
LOW_ID, HIGH_MARGIN = 100, 1000


@dataclass(frozen=True)
class Dataset:
    """A dataset file: its path, request count, longest request (tokens) and content digest."""

    path: Path
    requests: int
    max_seq_len: int | None  # input + output tokens of the longest request (None: unknown)
    digest: str  # identifies the content (part of the runner settings)
    synthetic: bool


def _lengths(workload: Workload, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fixed lengths, or normal ones clipped to [1, mean + 3 sigma] (as the sim draws them)."""
    if workload.isl_std == 0:
        isl = np.full(n, workload.isl)
    else:
        isl = np.clip(np.rint(rng.normal(workload.isl, workload.isl_std, n)), 1,
                      workload.isl + 3 * workload.isl_std)
    if workload.osl_std == 0:
        osl = np.full(n, workload.osl)
    else:
        osl = np.clip(np.rint(rng.normal(workload.osl, workload.osl_std, n)), 1,
                      workload.osl + 3 * workload.osl_std)
    return isl.astype(np.int64), osl.astype(np.int64)


def synthetic_dataset(folder: Path, workload: Workload, vocab: int, requests: int,
                      seed: int = 0) -> Dataset:
    """The synthetic dataset for ``workload`` (written on first use, then reused)."""
    key = stable_hash(workload.to_dict(), {"vocab": vocab, "requests": requests, "seed": seed,
                                           "layout": 1})
    path = Path(folder) / f"{workload.label()}-n{requests}-{key}.jsonl"
    rng = np.random.default_rng(int(key, 16) % 2**32)
    isl, osl = _lengths(workload, requests, rng)
    max_seq = int((isl + osl).max())
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        high = max(LOW_ID + 1, vocab - HIGH_MARGIN)
        # Written under a temporary name and renamed: a worker never reads a half-written file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            for i in range(requests):
                ids = rng.integers(LOW_ID, high, size=int(isl[i]))
                fh.write(f'{{"task_id": {i}, "input_ids": [{",".join(map(str, ids.tolist()))}], '
                         f'"output_tokens": {int(osl[i])}}}\n')
        os.replace(tmp, path)
    return Dataset(path=path, requests=requests, max_seq_len=max_seq, digest=key, synthetic=True)


def user_dataset(path: str | Path, *, task_id_required: bool = True) -> Dataset:
    """A dataset file the user provides (UserError when it is not in trtllm-bench's layout;
    ``task_id_required``: the release reads every line's ``task_id``, as 1.0 and earlier do)."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise UserError(f"dataset {str(path)!r} is not a file")
    digest = hashlib.sha256()
    count, longest, known = 0, 0, True
    try:
        with open(p, "rb") as fh:
            for number, line in enumerate(fh, 1):
                digest.update(line)
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or "output_tokens" not in row or not (
                        "input_ids" in row or "prompt" in row or "logits" in row):
                    raise ValueError(f"line {number} lacks input_ids/prompt or output_tokens")
                if task_id_required and "task_id" not in row:
                    raise ValueError(f"line {number} lacks task_id, which this TensorRT-LLM "
                                     "release requires")
                ids = row.get("input_ids", row.get("logits"))
                if isinstance(ids, list):
                    longest = max(longest, len(ids) + int(row["output_tokens"]))
                else:
                    known = False  # a text prompt: its token count depends on the tokenizer
                count += 1
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"dataset {str(path)!r} is not a trtllm-bench JSONL dataset: {exc}") \
            from None
    if count == 0:
        raise UserError(f"dataset {str(path)!r} holds no requests")
    return Dataset(path=p, requests=count, max_seq_len=longest if known else None,
                   digest=digest.hexdigest()[:16], synthetic=False)


__all__ = ["Dataset", "synthetic_dataset", "user_dataset"]
