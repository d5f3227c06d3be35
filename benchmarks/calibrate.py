"""Fit the performance model's constants to NVIDIA's published TensorRT-LLM throughput.

For each GPU, fits the constants of ``autotune/data/calibration/<gpu>-<precision>.yaml`` on the
*fit* rows of ``../shared/data/published_perf.csv`` (``accuracy.py`` decides which rows are
comparable and which are held out: one (model, ISL/OSL) combination in four never takes part).
The same constants serve every model and workload on that GPU; there are no per-model or
per-scenario factors. What is fitted:

- per GPU (shared by its precisions): prefill-attention efficiency, the latencies of the custom
  all-reduce, of NCCL's and of a stage-to-stage send, all-reduce bandwidth efficiency, the
  per-request and per-sequence overheads;
- per GPU and precision: the large-GEMM efficiency, the tokens at which GEMMs reach half of
  it, and the share of HBM bandwidth a small batch's weight-streaming GEMMs reach (an NVFP4
  kernel unpacks 4-bit values and applies a scale per 16; on B200 the measured NVFP4 decode is
  only 1.2x faster than FP8's for 0.56x the bytes, which one shared share cannot give);
- per GPU and TensorRT-LLM generation (``trt`` engines of 0.12-0.17, the ``pytorch`` back end,
  0.20's PyTorch back end without CUDA graphs): the fixed cost of one scheduler iteration and
  of one layer. Both are the runtime's, not the GPU's: a TensorRT engine fuses a layer into a
  few kernels, the PyTorch back end launches a dozen, and without CUDA graphs each launch is
  paid on the host. Shared between generations, the per-layer cost was pinned near zero by the
  TensorRT engines' max-throughput rows, where it hardly shows, and the all-reduce latency
  took up what the PyTorch back end's batch-1 steps need (issue 17).

Besides the max-throughput rows, the fit takes the mean TTFT and ITL of the fit half of the 0.14
online-serving sweep (H100/H200, Poisson arrivals): the only low-load measurements, they pin
the fixed latencies (all-reduce, per iteration) that throughput alone trades off freely.

The search is deterministic: Levenberg-Marquardt steps on log(model / measured) over the
constants in log space (finite-difference Jacobian), reweighted each step so that it minimises
the absolute log error (close to the mean absolute percentage error it reports). Each row runs
with the engine limits trtllm-bench chose for it (``accuracy.bench_limits``). It starts from
``autotune.model.Calibration``'s defaults and runs a fixed number of steps, so running it again
writes the same files (``--warm-start``: continue from the shipped files instead; a constant
that sits on a bound has no gradient in log space, so ``--start NAME=VALUE`` moves it off first).
Usage, on two cores (``--warm-start --iterations 6``: B200 110 s, H100 465 s, H200 100 s; the
engine overlays, ``--engine vllm --engine sglang --warm-start``, a minute; from the defaults
H100 takes about 2.5 minutes an iteration):

    python benchmarks/calibrate.py [--gpu h100 ...] [--warm-start] [--dry-run]
    python benchmarks/calibrate.py --engine vllm --engine sglang [--warm-start]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import accuracy  # benchmarks/accuracy.py, next to this script
import numpy as np
import yaml

from autotune.model import (
    BACKEND_CONSTANTS,
    BACKENDS,
    BOUNDS,
    DEFAULT_BACKEND,
    ENGINE_CONSTANTS,
    Calibration,
    load_calibration,
)
from autotune.specs import PRECISIONS

CALIBRATION_DIR = accuracy.ROOT / "autotune" / "data" / "calibration"
SHARED = ("attn_eff", "ar_latency_us", "ar_nccl_latency_us", "ar_bw_eff",
          "seq_overhead_us", "p2p_latency_us", "request_overhead_ms")
PER_PRECISION = ("gemm_eff", "gemm_half_tokens", "mem_eff")
PER_BACKEND = BACKEND_CONSTANTS
#: Each measured serving point's TTFT and TPOT count as this many throughput rows each.
SERVING_WEIGHT = 1.0
START = Calibration()  # the defaults in autotune/model/calibration.py
FD_STEP = 0.05  # finite-difference step in log space (5 %)
#: Each online-serving latency counts as this many throughput rows: the 15 online loads of a
#: GPU (30 latencies) then weigh a quarter to a third as much as its 400-700 throughput rows.
#: The only low-load measurements, they pin the fixed latencies (all-reduce, per iteration)
#: that decide latency SLOs; more weight trades throughput error for latency error
#: (3: H100+H200 8.6% / TTFT+ITL 12%; 10: 9.1% / 10%).
ONLINE_WEIGHT = 5


class Params:
    """The free constants of one GPU: name -> value, names like ``gemm_eff@fp8``."""

    def __init__(self, precisions: list[str], backends: list[str], start: dict[str, float]):
        self.names = [*SHARED, *(f"{p}@{q}" for q in precisions for p in PER_PRECISION),
                      *(f"{p}@{b}" for b in backends for p in PER_BACKEND)]
        self.values = {n: start.get(n, getattr(START, n.split("@")[0])) for n in self.names}

    def cals(self, cases) -> dict:
        keys = {(c.precision, case_backend(c)) for c in cases}
        return {k: self.calibration(*k) for k in keys}

    def calibration(self, precision: str, backend: str) -> Calibration:
        v = {n: self.values[n] for n in SHARED}
        v.update({p: self.values[f"{p}@{precision}"] for p in PER_PRECISION})
        v.update({p: self.values[f"{p}@{backend}"] for p in PER_BACKEND})
        return Calibration(**v)


# ---- parallel evaluation of the cases ----------------------------------------------------
_CASES: list = []


def _init(cases):
    global _CASES
    _CASES = cases


def _eval(args):
    """Throughput of cases ``idx`` under ``cal_by_key`` with each case's limits (or the best)."""
    idx, cals, limits = args
    out = []
    for i, lim in zip(idx, limits):
        row = _CASES[i]
        if isinstance(row, accuracy.ServingRow):
            cal = cals.get((row.gpu, row.precision)) or cals[(row.precision, "pytorch")]
            out.append((accuracy.predict_serving(row, cal), None))
            continue
        if isinstance(row, accuracy.OnlineRow):
            ttft, itl, _ = accuracy.predict_online(row, cals[(row.precision, "trt")])
            out.append(((ttft, itl), None))
            continue
        cal = cals[(row.precision, row.backend)]
        if lim is None:
            out.append(accuracy.predict(row, cal))
        else:
            out.append((accuracy.throughput(row, cal, lim), lim))
    return out


class Evaluator:
    def __init__(self, cases: list, jobs: int):
        self.cases = cases
        self.pool = ProcessPoolExecutor(jobs, initializer=_init, initargs=(cases,)) \
            if jobs > 1 else None
        self.jobs = jobs
        _init(cases)

    def run(self, params: Params, limits: list | None) -> list[tuple[float, tuple | None]]:
        cals = params.cals(self.cases)
        n = len(self.cases)
        lims = limits or [None] * n
        if not self.pool:
            return _eval((range(n), cals, lims))
        # Interleaved chunks balance slow and fast cases between the workers.
        parts = [list(range(j, n, self.jobs * 4)) for j in range(self.jobs * 4)]
        results = self.pool.map(_eval, [(p, cals, [lims[i] for i in p]) for p in parts])
        out: list = [None] * n
        for p, res in zip(parts, results):
            for i, r in zip(p, res):
                out[i] = r
        return out

    def close(self):
        if self.pool:
            self.pool.shutdown()


def case_backend(case) -> str:
    """The TensorRT-LLM generation whose constants a case runs under."""
    if isinstance(case, accuracy.ServingRow):
        return "pytorch"  # the serving points ran TensorRT-LLM 1.x (PyTorch back end)
    return getattr(case, "backend", "trt")


def _log_ratio(pred: float, measured: float) -> float:
    """log(model / measured), a configuration the model cannot run counted as 20x off."""
    if not pred > 0 or math.isnan(pred):
        return 3.0
    return math.log(pred / measured)


def residuals(preds, cases, measured) -> np.ndarray:
    """log(model / measured) for every fit row (a case stands for all the rows of its run),
    then for the mean TTFT and ITL of every online-serving load, then for the mean TTFT and
    TPOT of every measured serving point."""
    out, online, serving = [], [], []
    for (p, _), case in zip(preds, cases):
        if isinstance(case, accuracy.ServingRow):
            serving += [_log_ratio(p[0], case.ttft_ms), _log_ratio(p[1], case.tpot_ms)]
            continue
        if isinstance(case, accuracy.OnlineRow):
            online += [_log_ratio(p[0], case.ttft_ms), _log_ratio(p[1], case.itl_ms)]
            continue
        for m in measured[accuracy.case_key(case)]:
            out.append(_log_ratio(p, m))
    return np.asarray(out + online * ONLINE_WEIGHT + serving * int(SERVING_WEIGHT))


def mape_of(res: np.ndarray, n: int | None = None) -> float:
    """MAPE of the first ``n`` residuals (the throughput rows)."""
    return float(np.mean(np.abs(np.expm1(res[:n])))) * 100


#: Largest move of one constant in one step, in log space (e ** 1: a factor 2.7). The IRLS
#: quadratic model is poor far from the start (a fixed latency the TTFT residuals want 100x
#: larger); without a cap the step lands where every try is worse and the fit stops.
MAX_LOG_STEP = 1.0


def lm_fit(theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, at, iterations: int,
           report=None) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt on the residuals ``at(theta)`` within the box ``[lo, hi]``,
    reweighted each step (IRLS) so that it minimises the absolute log error; returns the best
    ``theta`` and its residuals (``at`` is left evaluated there).

    A constant on a bound that the gradient pushes further out is left out of the step
    (the active set of a projected method): solving for it and then clipping it back would
    spend the step on a move that never happens, and leave the other constants a step that
    was meant to go with it (before the per-layer cost became the back end's, H100 sat with
    ``ar_latency_us`` on its top bound and ``layer_overhead_us`` on its bottom one, both
    pushed outwards).
    """
    theta = np.clip(theta, lo, hi)
    res = at(theta)
    if report:
        report(res, "  start")
    lam = 1e-2
    for it in range(iterations):
        w = 1.0 / np.maximum(np.abs(res), 0.02)  # IRLS weights: least absolute error
        cost = float(np.sum(w * res**2))
        jac = np.empty((res.size, theta.size))
        for j in range(theta.size):
            h = FD_STEP if theta[j] + FD_STEP <= hi[j] else -FD_STEP
            t2 = theta.copy()
            t2[j] += h
            jac[:, j] = (at(t2) - res) / h
        g = jac.T @ (w * res)
        a = jac.T @ (w[:, None] * jac)
        at_lo, at_hi = theta <= lo + 1e-9, theta >= hi - 1e-9
        free = ~((at_lo & (g > 0)) | (at_hi & (g < 0)))
        free &= np.any(jac != 0, axis=0)  # a constant nothing depends on stays put
        idx = np.flatnonzero(free)
        moved = False
        for _ in range(6):
            sub = a[np.ix_(idx, idx)]
            step = np.zeros_like(theta)
            step[idx] = -np.linalg.solve(sub + lam * np.diag(np.diag(sub) + 1e-9), g[idx])
            biggest = float(np.max(np.abs(step))) if idx.size else 0.0
            if biggest > MAX_LOG_STEP:
                step *= MAX_LOG_STEP / biggest
            cand = np.clip(theta + step, lo, hi)
            r2 = at(cand)
            if np.all(np.isfinite(r2)) and float(np.sum(w * r2**2)) < cost:
                theta, res, lam, moved = cand, r2, max(lam / 3, 1e-4), True
                break
            lam *= 4
        at(theta)  # leave the evaluator's constants at theta
        if report:
            report(res, f"    iteration {it + 1} (damping {lam:.2g}, {idx.size} free)"
                   + ("" if moved else " (no better step)"))
        if not moved:
            break
    return theta, res


def fit_gpu(gpu: str, rows: list, jobs: int, log=None, rounds: int = 1, iterations: int = 10,
            start: dict | None = None, csv: Path = accuracy.DEFAULT_CSV,
            fixed: dict | None = None, serving: list | None = None,
            hold: tuple[str, ...] = ()) -> tuple[Params, float]:
    """Levenberg-Marquardt on log(model / measured) over log-scaled constants, reweighted so
    that it minimises the absolute (not squared) log error, close to the MAPE it reports."""
    log = log or (lambda *a: print(*a, flush=True))
    fit_rows = [r for r in rows if r.gpu == gpu and not r.held_out]
    measured: dict[tuple, list[float]] = defaultdict(list)
    cases = []
    for r in fit_rows:
        key = accuracy.case_key(r)
        if key not in measured:
            cases.append(r)
        measured[key].append(r.measured)
    online = [o for o in accuracy.load_online(csv)
              if o.gpu == gpu and not o.held_out]
    points = [s for s in serving or [] if s.engine == "trtllm" and s.gpu == gpu
              and not s.held_out]
    n_tput = len(fit_rows)
    precisions = sorted({r.precision for r in fit_rows} | {o.precision for o in online}
                        | {s.precision for s in points})
    backends = sorted({r.backend for r in fit_rows} | ({"trt"} if online else set())
                      | ({"pytorch"} if points else set()))
    params = Params(precisions, backends, start or {})
    for name, value in (fixed or {}).items():
        for n in params.names:
            if n == name or n.split("@")[0] == name:
                params.values[n] = value
    cases += online + points
    held = set(fixed or {}) | set(hold)
    names = [n for n in params.names if n not in held and n.split("@")[0] not in held]
    lo = np.log([BOUNDS[n.split("@")[0]][0] for n in names])
    hi = np.log([BOUNDS[n.split("@")[0]][1] for n in names])
    ev = Evaluator(cases, jobs)
    log(f"{gpu}: {len(fit_rows)} fit rows, {len(cases) - len(online) - len(points)} distinct "
        f"runs, {len(online)} online-serving loads, {len(points)} serving points, "
        f"{len(names)} constants")

    def report(res, what):
        lat = np.abs(np.expm1(res[n_tput:n_tput + 2 * len(online)]))
        extra = f", online TTFT/ITL {lat.mean() * 100:.1f}%" if online else ""
        if points:
            sv = np.abs(np.expm1(res[res.size - 2 * len(points):]))
            extra += (f", serving TTFT {sv[0::2].mean() * 100:.1f}% "
                      f"TPOT {sv[1::2].mean() * 100:.1f}%")
        log(f"{what}: MAPE {mape_of(res, n_tput):.2f}%{extra}")

    def at(theta, limits):
        for n, v in zip(names, np.exp(theta)):
            params.values[n] = float(v)
        return residuals(ev.run(params, limits), cases, measured)

    theta = np.log([params.values[n] for n in names])
    try:
        for rnd in range(rounds):
            preds = ev.run(params, None)  # choose each case's limits again
            limits = [lim for _, lim in preds]
            report(residuals(preds, cases, measured), f"  round {rnd + 1} (trtllm-bench limits)")
            theta, _ = lm_fit(theta, lo, hi, lambda t, lim=limits: at(t, lim), iterations,
                              report)
        preds = ev.run(params, None)
        res = residuals(preds, cases, measured)
        best = mape_of(res, n_tput)
        report(res, "  final (trtllm-bench limits)")
    finally:
        ev.close()
    return params, best


class EngineParams:
    """The constants of one serving engine (``ENGINE_CONSTANTS``), shared by every GPU, laid
    over each GPU's TensorRT-LLM constants."""

    def __init__(self, start: dict[str, float]):
        self.names = list(ENGINE_CONSTANTS)
        self.values = {n: start.get(n, getattr(START, n)) for n in self.names}

    def cals(self, cases) -> dict:
        return {(c.gpu, c.precision): replace(load_calibration(c.gpu, c.precision),
                                              **self.values) for c in cases}


def engine_values(engine: str) -> dict[str, float]:
    """The constants ``engines/<engine>.yaml`` holds now (a warm start), within their bounds."""
    path = CALIBRATION_DIR / "engines" / f"{engine}.yaml"
    data = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return {n: float(v) for n, v in data.items()
            if n in ENGINE_CONSTANTS and BOUNDS[n][0] <= float(v) <= BOUNDS[n][1]}


def fit_engine(engine: str, serving: list, jobs: int, iterations: int = 10,
               log=None, start: dict | None = None) -> tuple[EngineParams, float, int]:
    """Levenberg-Marquardt (as ``fit_gpu``) of ``engine``'s constants on the fit share of its
    measured serving points (mean TTFT and TPOT); returns the constants, their MAPE (TTFT and
    TPOT together) and the number of points."""
    log = log or (lambda *a: print(*a, flush=True))
    cases = [s for s in serving if s.engine == engine and not s.held_out]
    params = EngineParams(start or {})
    names = params.names
    lo = np.log([BOUNDS[n][0] for n in names])
    hi = np.log([BOUNDS[n][1] for n in names])
    ev = Evaluator(cases, jobs)
    log(f"{engine}: {len(cases)} serving points, {len(names)} constants")

    def at(theta):
        for n, v in zip(names, np.exp(theta)):
            params.values[n] = float(v)
        return residuals(ev.run(params, None), cases, {})

    def report(res, what):
        a = np.abs(np.expm1(res))
        log(f"{what}: TTFT {a[0::2].mean() * 100:.1f}% TPOT {a[1::2].mean() * 100:.1f}%")

    theta = np.log([params.values[n] for n in names])
    try:
        _, res = lm_fit(theta, lo, hi, at, iterations, report)
    finally:
        ev.close()
    return params, float(np.mean(np.abs(np.expm1(res)))) * 100, len(cases)


def write_engine_file(engine: str, params: EngineParams, mape_fit: float, n: int) -> Path:
    lines = [
        f"# Constants of the performance model that belong to {engine}, not to the GPU, fitted",
        "# by benchmarks/calibrate.py --engine on the fit share of measured_serving.csv",
        f"# ({n} dense aggregated points, TTFT and TPOT together {mape_fit:.1f}% on them; the",
        "# held-out deployments are scored by benchmarks/accuracy.py). Laid over each GPU's",
        "# TensorRT-LLM constants (load_calibration(..., engine=...)).",
    ]
    lines += [f"{n_}: {params.values[n_]:.4g}" for n_ in params.names]
    path = CALIBRATION_DIR / "engines" / f"{engine}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def existing_values(gpu: str) -> dict[str, float]:
    """The constants the shipped files hold now, as a starting point (name@precision/backend);
    one outside its physical range (``BOUNDS``, a file from before the range) starts from the
    default instead."""
    out: dict[str, float] = {}
    for path in sorted(CALIBRATION_DIR.glob(f"{gpu}-*.yaml")):
        precision = path.stem.split("-", 1)[1]
        data = yaml.safe_load(path.read_text()) or {}
        backends = data.pop("backends", None) or {}
        data.pop("fit", None)
        for name in SHARED:
            if name in data:
                out[name] = float(data[name])
        for name in PER_PRECISION:
            if name in data:
                out[f"{name}@{precision}"] = float(data[name])
        for name in PER_BACKEND:
            if name in data:
                out[f"{name}@{DEFAULT_BACKEND}"] = float(data[name])
            for b, over in backends.items():
                if name in (over or {}):
                    out[f"{name}@{b}"] = float(over[name])
    return {n: v for n, v in out.items()
            if BOUNDS[n.split("@")[0]][0] <= v <= BOUNDS[n.split("@")[0]][1]}


def write_files(gpu: str, params: Params, mape_fit: float, n_rows: int,
                n_online: int) -> list[Path]:
    precisions = sorted({n.split("@")[1] for n in params.names if n.startswith("gemm_eff@")})
    backends = sorted({n.split("@")[1] for n in params.names if n.startswith("iter_overhead_ms@")})
    default = DEFAULT_BACKEND if DEFAULT_BACKEND in backends else backends[0]
    written = []
    for precision in precisions:
        cal = params.calibration(precision, default)
        lines = [
            f"# Constants of the performance model for {gpu} / {precision}, fitted by",
            "# benchmarks/calibrate.py on the fit rows of shared/data/published_perf.csv:",
            f"# {n_rows} max-throughput rows of this GPU (MAPE {mape_fit:.1f}% on them) and "
            f"{n_online} online-",
            "# serving loads; benchmarks/accuracy.py reports the held-out rows. Top-level values",
            "# describe TensorRT-LLM's PyTorch back end (1.x); `backends` overrides them for the",
            "# TensorRT engines of 0.12-0.17 (trt) and 0.20's PyTorch back end without CUDA "
            "graphs.",
        ]
        fitted = {n.split("@")[0] for n in params.names}
        for name, value in cal.to_dict().items():
            if name in fitted:  # the others (moe_overhead_us) stay default.yaml's
                lines.append(f"{name}: {value:.4g}")
        others = [b for b in backends if b != DEFAULT_BACKEND]
        if default != DEFAULT_BACKEND:
            lines.append(f"# no {DEFAULT_BACKEND} rows for this GPU: "
                         f"overheads are the {default} ones")
        if others:
            lines.append("backends:")
            for b in others:
                over = ", ".join(f"{p}: {params.values[f'{p}@{b}']:.4g}" for p in PER_BACKEND)
                lines.append(f"  {b}: {{{over}}}")
        path = CALIBRATION_DIR / f"{gpu}-{precision}.yaml"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written


def parse_starts(items: list[str], engine: bool = False) -> dict[str, float]:
    """``--start`` values as name -> value. A plain name stands for all its variants
    (``mem_eff`` for ``mem_eff@fp8``, ``mem_eff@bf16``, ...; the fit takes those it has);
    ``NAME@VARIANT`` names one. For an ``engine`` fit only plain names of the constants an
    engine owns. Anything else is a ValueError."""
    out: dict[str, float] = {}
    variants = {n: ([f"{n}@{p}" for p in PRECISIONS] if n in PER_PRECISION
                    else [f"{n}@{b}" for b in BACKENDS] if n in PER_BACKEND else [n])
                for n in (*SHARED, *PER_PRECISION, *PER_BACKEND)}
    for item in items:
        name, sep, value = item.partition("=")
        base = name.split("@")[0]
        known = ENGINE_CONSTANTS if engine else variants
        if (not sep or base not in known
                or ("@" in name and (engine or name not in variants.get(base, ())))):
            raise ValueError(f"--start {item!r}: use NAME=VALUE with NAME one of "
                             f"{', '.join(known)}" + ("" if engine else " (or NAME@VARIANT)"))
        for n in [name] if engine or "@" in name else variants[base]:
            out[n] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=accuracy.DEFAULT_CSV)
    ap.add_argument("--gpu", action="append", help="GPUs to fit (default: h100 h200 b200)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warm-start", action="store_true",
                    help="start from the shipped files, not the Calibration defaults")
    ap.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                    help="hold a constant (e.g. ar_latency_us=15) instead of fitting it")
    ap.add_argument("--hold", action="append", default=[], metavar="NAME",
                    help="hold a constant (all its @precision/@backend variants) at its start")
    ap.add_argument("--start", action="append", default=[], metavar="NAME=VALUE",
                    help="start a constant here and fit it: a plain NAME all its "
                         "variants, NAME@VARIANT one (layer_overhead_us@pytorch=30); over "
                         "--warm-start's values")
    ap.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    ap.add_argument("--engine", action="append", choices=("vllm", "sglang"),
                    help="fit these engines' constants on their serving points instead")
    ap.add_argument("--no-serving", action="store_true",
                    help="fit TensorRT-LLM on the published rows only (as before issue 17)")
    args = ap.parse_args(argv)
    try:
        starts = parse_starts(args.start, engine=bool(args.engine))
    except ValueError as exc:
        ap.error(str(exc))
    serving = [] if args.no_serving else accuracy.load_serving()[0]
    for engine in args.engine or []:
        t0 = time.perf_counter()
        start = engine_values(engine) if args.warm_start else {}
        start.update(starts)
        eparams, value, n = fit_engine(engine, serving, args.jobs, args.iterations,
                                       start=start)
        for name in eparams.names:
            print(f"  {name:24} {eparams.values[name]:.4g}")
        if not args.dry_run:
            print(f"  wrote {write_engine_file(engine, eparams, value, n)}")
        print(f"  {time.perf_counter() - t0:.0f} s")
    if args.engine:
        return 0
    rows, _ = accuracy.load_rows(args.csv)
    for gpu in args.gpu or ["h100", "h200", "b200"]:
        t0 = time.perf_counter()
        start = existing_values(gpu) if args.warm_start else {}
        start.update(starts)
        params, value = fit_gpu(gpu, rows, args.jobs, rounds=args.rounds,
                               iterations=args.iterations, start=start, csv=args.csv,
                               fixed={k: float(v) for k, v in (f.split('=') for f in args.fix)},
                               serving=serving, hold=tuple(args.hold))
        n = sum(1 for r in rows if r.gpu == gpu and not r.held_out)
        n_online = sum(1 for o in accuracy.load_online(args.csv) if o.gpu == gpu and not o.held_out)
        for name in params.names:
            print(f"  {name:24} {params.values[name]:.4g}")
        if not args.dry_run:
            for path in write_files(gpu, params, value, n, n_online):
                print(f"  wrote {path.relative_to(accuracy.ROOT)}")
        print(f"  {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
