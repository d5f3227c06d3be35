"""Reading ``vllm bench serve``'s saved result (``--save-result --save-detailed``).

``vllm bench serve`` exits 0 even when every request failed, so a result counts only when every
prompt completed. The load point is computed from the per-request detail (``start_times``,
``ttfts``, ``latencies``, ``itls``, ``output_lens``; seconds) with vLLM's own definitions —
TPOT per request ``(latency - ttft) / (output_len - 1)``, ITL the real token gaps, percentiles
by ``np.percentile`` — so that replicas measured side by side merge into one exact set of
requests. vLLM's own summary is kept beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autotune.errors import BadReport
from autotune.measurement import LoadPoint, load_point_from_requests

_DETAIL = ("start_times", "ttfts", "latencies", "itls", "output_lens")


@dataclass(frozen=True)
class BenchResult:
    """One ``vllm bench serve`` run (one replica at one load): its requests, in seconds."""

    start_s: np.ndarray
    ttft_s: np.ndarray
    latency_s: np.ndarray
    itl_s: np.ndarray  # every token gap of every request
    output_tokens: np.ndarray
    summary: dict = field(default_factory=dict, hash=False)  # vLLM's own figures (ms, tok/s)


def parse_result(path: Path) -> BenchResult:
    """The requests of a saved result (BadReport when the file is missing, not JSON, lacks the
    detail, or any request failed or did not complete)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadReport(f"vllm bench serve wrote no result at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReport(f"vllm bench serve's result {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadReport(f"vllm bench serve's result {path} is not a JSON object")
    prompts, completed, failed = (data.get(k) for k in ("num_prompts", "completed", "failed"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (prompts, completed)):
        raise BadReport(f"vllm bench serve's result {path} has no num_prompts/completed counts")
    failed = failed if isinstance(failed, int) else prompts - completed
    if completed < prompts or failed > 0:
        errors = [e for e in data.get("errors") or [] if e]
        why = f": {str(errors[0]).strip().splitlines()[-1][:300]}" if errors else ""
        raise BadReport(f"{completed} of {prompts} requests completed ({failed} failed){why}")
    missing = [k for k in _DETAIL if not isinstance(data.get(k), list)]
    if missing:
        raise BadReport(f"vllm bench serve's result {path} lacks {', '.join(missing)} "
                        "(run with --save-detailed)")
    n = len(data["ttfts"])
    if n != completed or any(len(data[k]) != n for k in _DETAIL):
        raise BadReport(f"vllm bench serve's result {path} has per-request lists of unequal "
                        f"lengths (completed {completed})")
    try:
        itl = np.array([gap for gaps in data["itls"] for gap in gaps], dtype=float)
        arrays = [np.asarray(data[k], dtype=float) for k in _DETAIL if k != "itls"]
    except (TypeError, ValueError) as exc:
        raise BadReport(f"vllm bench serve's result {path} has non-numeric detail: {exc}"
                        ) from None
    start, ttft, latency, out = arrays
    if not (np.all(np.isfinite(ttft)) and np.all(ttft > 0) and np.all(latency >= ttft)
            and np.all(out >= 1)):
        raise BadReport(f"vllm bench serve's result {path} has impossible request timings")
    summary = {k: v for k, v in data.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return BenchResult(start_s=start, ttft_s=ttft, latency_s=latency, itl_s=itl,
                       output_tokens=out.astype(int), summary=summary)


def load_point(results: Sequence[BenchResult], *, concurrency: int, gpus: int) -> LoadPoint:
    """One load point from replicas measured side by side: latencies over their requests taken
    together; throughputs the sum of each replica's own (its tokens over its own span: the
    benchmarks start a few seconds apart, so one window over all would count their skew as idle
    time)."""
    cat = lambda name: np.concatenate([getattr(r, name) for r in results])  # noqa: E731
    start, ttft, latency = cat("start_s"), cat("ttft_s"), cat("latency_s")
    gaps = cat("itl_s") * 1e3
    point = load_point_from_requests(
        concurrency=concurrency, gpus=gpus, start_s=start, first_token_s=start + ttft,
        end_s=start + latency, output_tokens=cat("output_tokens"),
        itl_ms=(gaps, None) if gaps.size else None)
    if len(results) == 1:
        return point
    spans = [float((r.start_s + r.latency_s).max() - r.start_s.min()) for r in results]
    tokens = sum(float(r.output_tokens.sum() / s) for r, s in zip(results, spans) if s > 0)
    requests = sum(r.output_tokens.size / s for r, s in zip(results, spans) if s > 0)
    return replace(point, output_throughput=tokens, output_throughput_per_gpu=tokens / gpus,
                   request_throughput=requests, duration_s=max(spans))


__all__ = ["BenchResult", "load_point", "parse_result"]
