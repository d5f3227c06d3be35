"""Reading ``trtllm-bench``'s report (``--report_json``) and per-request file (``--request_json``).

Layouts differ between TensorRT-LLM versions (shared/docs/trtllm.md): ``machine``,
``streaming_metrics``, ``p90`` and ``system_total_throughput_tok_s`` may be missing. What the
measurement needs and the report lacks is computed from the per-request file with the tool's own
definitions; what neither has makes the report unusable (``BadReport``), never a zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autotune.errors import BadReport
from autotune.measurement import STATISTICS

#: The report's percentile keys -> autotune's statistics (``average`` is the mean).
_REPORT_KEYS = {"mean": "average", "p50": "p50", "p90": "p90", "p95": "p95", "p99": "p99"}


@dataclass(frozen=True)
class Records:
    """Per-request timestamps (seconds) and output tokens, from ``--request_json``."""

    start_s: np.ndarray
    first_token_s: np.ndarray
    end_s: np.ndarray
    output_tokens: np.ndarray

    @property
    def ttft_ms(self) -> np.ndarray:
        return (self.first_token_s - self.start_s) * 1e3

    @property
    def tpot_ms(self) -> np.ndarray:
        # trtllm-bench's per-request "intertoken latency": (end - first) / (tokens - 1).
        return (self.end_s - self.first_token_s) * 1e3 / np.maximum(self.output_tokens - 1, 1)

    @property
    def e2e_ms(self) -> np.ndarray:
        return (self.end_s - self.start_s) * 1e3


@dataclass(frozen=True)
class ReplicaResult:
    """One ``trtllm-bench throughput`` run (one replica at one load), in autotune's units.

    Throughputs in tok/s and requests/s; ``latency_ms`` maps metric -> statistic -> ms.
    ``derived`` names the values the report lacked and that were computed from the per-request
    file (or bounded, see ``parse_report``).
    """

    num_requests: int
    request_throughput: float
    output_throughput: float
    output_throughput_per_user: float
    duration_s: float
    latency_ms: dict[str, dict[str, float]]
    world_size: int | None
    version: str | None
    derived: tuple[str, ...] = ()
    report: dict = field(default_factory=dict, hash=False)


def trtllm_percentile(values: np.ndarray, q: float) -> float:
    """A percentile as trtllm-bench computes it: ``sorted(values)[int(n * q)]``."""
    ordered = np.sort(np.asarray(values, dtype=float))
    return float(ordered[min(int(ordered.size * q), ordered.size - 1)])


def stats_of(values: np.ndarray) -> dict[str, float]:
    """mean/p50/p90/p95/p99 of per-request values (trtllm-bench's percentile rule)."""
    out = {"mean": float(np.mean(values))}
    for stat, q in (("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99)):
        out[stat] = trtllm_percentile(values, q)
    return out


def _number(value, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadReport(f"report field {where} is not a number: {value!r}")
    if value < 0 or (positive and value == 0):
        raise BadReport(f"report field {where} is {value!r}")
    return float(value)


def _section(data: dict, name: str, *, required: bool) -> dict | None:
    section = data.get(name)
    if section is None and not required:
        return None
    if not isinstance(section, dict):
        raise BadReport(f"report has no {name!r} section" if section is None
                        else f"report section {name!r} is not an object")
    return section


def read_records(path: Path | None) -> Records | None:
    """The per-request file's records, or None when it is missing or not in the known layout."""
    if path is None:
        return None
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rows, list) or not rows:
        return None
    try:
        # Nanosecond clock readings near 1e18 lose precision as floats: subtract the first
        # start while they are still integers.
        stamps = np.array([[r["start_timestamp"], r["first_token_timestamp"], r["end_timestamp"]]
                           for r in rows], dtype=np.int64)
        tokens = np.array([r.get("output_tokens", r.get("num_output_tokens")) for r in rows],
                          dtype=float)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    start, first, end = stamps.T
    if not (np.isfinite(tokens).all() and (tokens >= 1).all() and (first > 0).all()
            and (end >= first).all() and (first >= start).all()):
        return None  # e.g. first_token_timestamp -1: the run did not stream
    base = start.min()
    ns = 1e-9  # trtllm-bench's timestamps are nanoseconds
    return Records((start - base) * ns, (first - base) * ns, (end - base) * ns, tokens)


def _percentiles(section: dict, key: str, where: str, fallback: np.ndarray | None,
                 derived: list[str], label: str) -> dict[str, float]:
    raw = section.get(key)
    if not isinstance(raw, dict):
        if fallback is None:
            raise BadReport(f"report has no {where}.{key}")
        derived.append(label)
        return stats_of(fallback)
    out = {}
    for stat, name in _REPORT_KEYS.items():
        if name in raw:
            out[stat] = _number(raw[name], f"{where}.{key}.{name}")
        elif stat == "p90":
            continue  # older versions report no p90; filled below
        else:
            raise BadReport(f"report has no {where}.{key}.{name}")
    if "p90" not in out:
        if fallback is not None:
            # Same rule and same requests as the report's own percentiles; the clamp only guards
            # against rounding in the report's values.
            out["p90"] = min(max(trtllm_percentile(fallback, 0.90), out["p50"]), out["p95"])
            derived.append(f"{label}.p90")
        else:
            # No per-request data: p95 is an upper bound of p90, so an SLO on p90 is never
            # judged met on a value lower than the truth.
            out["p90"] = out["p95"]
            derived.append(f"{label}.p90<=p95")
    return {s: out[s] for s in STATISTICS}


def parse_report(report_path: Path, requests_path: Path | None = None) -> ReplicaResult:
    """One run's report as a ReplicaResult (BadReport when it is missing or unusable)."""
    try:
        text = Path(report_path).read_text()
    except FileNotFoundError:
        raise BadReport(f"trtllm-bench wrote no report at {report_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadReport(f"cannot read report {report_path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadReport(f"report {report_path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadReport(f"report {report_path} is not a JSON object")

    perf = _section(data, "performance", required=True)
    streaming = _section(data, "streaming_metrics", required=False)
    world = _section(data, "world_info", required=False) or {}
    engine = _section(data, "engine", required=False) or {}
    records = read_records(requests_path)
    derived: list[str] = []

    output_tps = _number(perf.get("system_output_throughput_tok_s"),
                         "performance.system_output_throughput_tok_s", positive=True)
    request_tps = _number(perf.get("request_throughput_req_s"),
                          "performance.request_throughput_req_s", positive=True)
    duration_s = _number(perf.get("total_latency_ms"), "performance.total_latency_ms",
                         positive=True) / 1e3
    num_requests = (data.get("request_info") or {}).get("num_requests")
    if not isinstance(num_requests, int) or num_requests <= 0:
        num_requests = max(1, round(request_tps * duration_s))

    e2e = _percentiles(perf, "request_latency_percentiles_ms", "performance",
                       records.e2e_ms if records else None, derived, "e2e")
    if streaming is not None:
        ttft = _percentiles(streaming, "ttft_percentiles", "streaming_metrics",
                            records.ttft_ms if records else None, derived, "ttft")
        tpot = _percentiles(streaming, "tpot_percentiles", "streaming_metrics",
                            records.tpot_ms if records else None, derived, "tpot")
        per_user = _number(streaming.get("token_output_speed_tok_s"),
                           "streaming_metrics.token_output_speed_tok_s", positive=True)
    elif records is not None:
        # No streaming section (an older version, or a run without --streaming that still
        # recorded first-token times): the per-request file has everything.
        ttft, tpot = stats_of(records.ttft_ms), stats_of(records.tpot_ms)
        per_user = float(np.mean(1e3 / np.maximum(records.tpot_ms, 1e-9)))
        derived += ["ttft", "tpot", "per_user"]
    else:
        raise BadReport(f"report {report_path} has no streaming_metrics (TTFT/TPOT) and there "
                        "is no usable per-request file")
    world_size = world.get("world_size")
    version = engine.get("version")
    return ReplicaResult(
        num_requests=num_requests, request_throughput=request_tps, output_throughput=output_tps,
        output_throughput_per_user=per_user, duration_s=duration_s,
        # trtllm-bench reports no separate inter-token latency: each request's ITL is its TPOT.
        # trtllm-bench records no token times, only each request's first and last: its "ITL"
        # can only be the per-request TPOT (a mean over the request's gaps). The runner says so
        # (Runner.token_gaps) wherever an ITL bound is given.
        latency_ms={"ttft": ttft, "tpot": tpot, "itl": dict(tpot), "e2e": e2e},
        world_size=world_size if isinstance(world_size, int) else None,
        version=str(version) if version not in (None, "") else None,
        derived=tuple(derived), report=data,
    )


def merge_replicas(results: Sequence[ReplicaResult]) -> tuple[dict, dict[str, dict[str, float]]]:
    """Combine replicas measured side by side: throughputs add up; each latency percentile is
    the worst replica's (an upper bound of the combined percentile), means are request-weighted.

    Returns (totals, latency_ms) with totals ``num_requests, request_throughput,
    output_throughput, output_throughput_per_user, duration_s``.
    """
    weights = np.array([r.num_requests for r in results], dtype=float)
    totals = {
        "num_requests": int(weights.sum()),
        "request_throughput": float(sum(r.request_throughput for r in results)),
        "output_throughput": float(sum(r.output_throughput for r in results)),
        "output_throughput_per_user": float(np.average(
            [r.output_throughput_per_user for r in results], weights=weights)),
        "duration_s": float(max(r.duration_s for r in results)),
    }
    latency: dict[str, dict[str, float]] = {}
    for metric in results[0].latency_ms:
        stats = {}
        for stat in results[0].latency_ms[metric]:
            values = [r.latency_ms[metric][stat] for r in results]
            stats[stat] = (float(np.average(values, weights=weights)) if stat == "mean"
                           else float(max(values)))
        latency[metric] = stats
    return totals, latency


__all__ = ["Records", "ReplicaResult", "merge_replicas", "parse_report", "read_records",
           "stats_of", "trtllm_percentile"]
