"""A study's measurements as one table (pandas): one row per load point, with the config,
workload, trial outcome and every metric. ``autotune export`` writes it; the report plots it.

A measurement without load points of its own (infeasible, failed, interrupted, lost, or
``reused`` — it points at the original through ``reused_from``) is one row whose load-point
columns are empty, so every trial appears and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UserError, install_hint
from autotune.measurement import LATENCY_METRICS, STATISTICS

if TYPE_CHECKING:
    import pandas as pd

    from autotune.db import StoredMeasurement
    from autotune.recommend import Results

#: Formats ``autotune export`` writes.
FORMATS = ("csv", "parquet", "json")
#: Latency columns, ``{metric}_{stat}_ms`` (e.g. ``tpot_p99_ms``).
LATENCY_COLUMNS = tuple(f"{m}_{s}_ms" for m in LATENCY_METRICS for s in STATISTICS)
CONFIG_COLUMNS = ("label", "tp", "pp", "dp", "gpus", "max_batch_size", "max_num_tokens",
                  "kv_fraction", "chunked_prefill", "precision")
WORKLOAD_COLUMNS = ("isl", "osl", "isl_std", "osl_std")
POINT_COLUMNS = ("point", "concurrency", "operating_point", "slo_met", "num_requests",
                 "duration_s", "request_throughput", "output_tok_s", "output_tok_s_per_gpu",
                 "output_tok_s_per_user")
#: Every column, in order.
COLUMNS = (("study", "measurement_id", "trial", "status", "feasible", "objective", "runner")
           + CONFIG_COLUMNS + WORKLOAD_COLUMNS
           + ("reused_from", "failure_class", "message")
           + POINT_COLUMNS + LATENCY_COLUMNS + ("host", "started_at", "finished_at"))
_INTS = ("measurement_id", "trial", "tp", "pp", "dp", "gpus", "max_batch_size", "max_num_tokens",
         "isl", "osl", "reused_from", "point", "concurrency", "num_requests")
_BOOLS = ("feasible", "chunked_prefill", "operating_point", "slo_met")
_TEXT = ("study", "status", "runner", "label", "precision", "failure_class", "message", "host")


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes that were stored as UTC; PostgreSQL aware ones."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def measurement_rows(m: StoredMeasurement, slo) -> list[dict]:
    """The rows of one measurement: one per load point (or one without a load point)."""
    c = m.config
    base = {
        "study": m.study_name, "measurement_id": m.id, "trial": m.trial_number,
        "status": str(m.status), "feasible": bool(m.feasible), "objective": m.objective,
        "runner": m.runner, "label": c.label(), "tp": c.tp, "pp": c.pp, "dp": c.dp,
        "gpus": c.gpus, "max_batch_size": c.max_batch_size, "max_num_tokens": c.max_num_tokens,
        "kv_fraction": c.kv_fraction, "chunked_prefill": c.chunked_prefill,
        "precision": c.precision, **{k: getattr(m.workload, k) for k in WORKLOAD_COLUMNS},
        "reused_from": m.reused_from, "failure_class": m.failure_class, "message": m.message,
        "host": m.host, "started_at": _utc(m.started_at), "finished_at": _utc(m.finished_at),
    }
    if not m.load_points:
        return [base]
    rows = []
    for i, p in enumerate(m.load_points):
        row = dict(base)
        row.update({
            "point": i, "concurrency": p.concurrency,
            "operating_point": p.concurrency == m.operating_concurrency,
            "slo_met": slo.met(p), "num_requests": p.num_requests, "duration_s": p.duration_s,
            "request_throughput": p.request_throughput, "output_tok_s": p.output_throughput,
            "output_tok_s_per_gpu": p.output_throughput_per_gpu,
            "output_tok_s_per_user": p.output_throughput_per_user,
        })
        for metric in LATENCY_METRICS:
            for stat in STATISTICS:
                row[f"{metric}_{stat}_ms"] = p.latency_ms.get(metric, {}).get(stat)
        rows.append(row)
    return rows


def load_point_frame(results: Results) -> pd.DataFrame:
    """Every measurement of the study, one row per load point, columns as ``COLUMNS``.

    Column types are the same whatever the database (nullable integers and booleans, UTC
    timestamps), so a frame read from SQLite equals one read from PostgreSQL.
    """
    import pandas as pd

    rows = [r for m in results.measurements for r in measurement_rows(m, results.slo)]
    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    for col in _INTS:
        frame[col] = pd.array(frame[col].astype(object).where(frame[col].notna(), None),
                              dtype="Int64")
    for col in _BOOLS:
        frame[col] = pd.array(frame[col].astype(object).where(frame[col].notna(), None),
                              dtype="boolean")
    for col in _TEXT:
        frame[col] = frame[col].astype("string")
    for col in ("objective", "kv_fraction", "isl_std", "osl_std", "duration_s",
                "request_throughput", "output_tok_s", "output_tok_s_per_gpu",
                "output_tok_s_per_user", *LATENCY_COLUMNS):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    for col in ("started_at", "finished_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    return frame


def check_format(fmt: str) -> str:
    """The format, lower-cased; UserError for an unknown one or parquet without pyarrow."""
    name = fmt.strip().lower()
    if name not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}: use {', '.join(FORMATS)}")
    if name == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError(f"--format parquet needs pyarrow: {install_hint('export')}"
                            ) from None
    return name


def writer(frame: pd.DataFrame, fmt: str) -> Callable[[Path], None]:
    """A function that writes ``frame`` in ``fmt`` to the path it is given."""
    if fmt == "csv":
        return lambda path: frame.to_csv(path, index=False)
    if fmt == "parquet":
        return lambda path: frame.to_parquet(path, index=False, engine="pyarrow")
    if fmt == "json":
        # One array of records; timestamps as ISO 8601 UTC, missing values as null.
        return lambda path: path.write_text(
            frame.to_json(orient="records", date_format="iso", date_unit="s", indent=1) + "\n")
    raise UserError(f"unknown format {fmt!r}")  # check_format() refuses it first


def format_from_suffix(path: str) -> str | None:
    """``csv``/``parquet``/``json`` from a file name's suffix, else None."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"pq": "parquet"}.get(suffix, suffix) if suffix in (*FORMATS, "pq") else None


__all__ = ["COLUMNS", "FORMATS", "LATENCY_COLUMNS", "check_format", "format_from_suffix",
           "load_point_frame", "measurement_rows", "writer"]
