"""Everything autotune prints for people (rich). Machine output (``--json``) goes to stdout
plain; progress and errors go to stderr so a script can pipe the JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autotune.config import EngineConfig
from autotune.measurement import LATENCY_METRICS, LoadPoint, Status, load_label

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    """One line on stderr: what went wrong and, where it helps, what to do."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    """One line on stderr that the user should read, though nothing failed."""
    err.print(f"[bold yellow]note:[/] {escape(message)}", soft_wrap=True)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


# ---- search -------------------------------------------------------------------------------
class SearchProgress:
    """The search's progress bar (stderr): trials done, feasible, failed, best so far."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task
        self.feasible = self.failed = 0
        self.best: tuple[float, str] | None = None

    def _show(self, **fields) -> None:
        best = f"{self.best[0]:,.0f} tok/s/GPU {self.best[1]}" if self.best else "-"
        self.progress.update(self.task, feasible=self.feasible, failed=self.failed, best=best,
                             **fields)

    def trial(self, report) -> None:
        """After one trial of this process."""
        if report.feasible and (self.best is None or report.objective > self.best[0]):
            self.best = (report.objective, report.config.label().split()[0])
        self.feasible += bool(report.feasible)
        self.failed += report.status in (Status.FAILED, Status.INTERRUPTED)
        self._show(advance=1)

    def poll(self, store, study_name: str) -> None:
        """From the database, when other processes run the trials."""
        done, _ = store.slot_counts(study_name)
        rows = store.measurements(study_name)
        self.feasible = sum(1 for r in rows if r.feasible)
        self.failed = sum(1 for r in rows if r.status == Status.FAILED)
        good = [r for r in rows if r.feasible and r.objective is not None]
        if good:
            top = max(good, key=lambda r: r.objective)
            self.best = (top.objective, top.config.label().split()[0])
        self._show(completed=done)


@contextmanager
def search_progress(total: int, already: int, enabled: bool = True) -> Iterator[SearchProgress]:
    """A progress bar on stderr for a search of ``total`` trials, ``already`` of them done."""
    progress = Progress(
        TextColumn("[bold]trials"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("feasible {task.fields[feasible]} failed {task.fields[failed]} "
                   "best {task.fields[best]}"),
        TimeElapsedColumn(), console=err, disable=not enabled,
    )
    with progress:
        task = progress.add_task("search", total=total, completed=already, feasible=0, failed=0,
                                 best="-")
        yield SearchProgress(progress, task)


# ---- best ---------------------------------------------------------------------------------
def config_table(config: EngineConfig) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [("layout", f"TP{config.tp} x PP{config.pp} x DP{config.dp} ({config.gpus} GPUs)"),
            ("max_batch_size", str(config.max_batch_size)),
            ("max_num_tokens", str(config.max_num_tokens)),
            ("kv_cache_free_gpu_memory_fraction", f"{config.kv_fraction:g}"),
            ("chunked prefill", "on" if config.chunked_prefill else "off"),
            ("precision", config.precision)]
    for k, v in rows:
        t.add_row(k, v)
    return t


def point_table(point: LoadPoint, dp: int = 1) -> Table:
    t = Table(title=f"at concurrency {load_label(point.concurrency, dp)}", title_justify="left")
    t.add_column("throughput")
    t.add_column("value", justify="right")
    t.add_row("output tok/s (system)", f"{point.output_throughput:,.1f}")
    t.add_row("output tok/s per GPU", f"{point.output_throughput_per_gpu:,.1f}")
    t.add_row("output tok/s per user", f"{point.output_throughput_per_user:,.1f}")
    t.add_row("requests/s", f"{point.request_throughput:,.2f}")
    lat = Table()
    lat.add_column("latency (ms)")
    for stat in ("mean", "p50", "p90", "p95", "p99"):
        lat.add_column(stat, justify="right")
    for metric in LATENCY_METRICS:
        s = point.latency_ms[metric]
        lat.add_row(metric, *(f"{s[k]:,.1f}" for k in ("mean", "p50", "p90", "p95", "p99")))
    grid = Table.grid()
    grid.add_row(t)
    grid.add_row(lat)
    return grid


def slo_table(terms) -> Table:
    t = Table(title="SLO", title_justify="left")
    for col in ("term", "measured", "margin", ""):
        t.add_column(col, justify="right" if col in ("measured", "margin") else "left")
    for term in terms:
        t.add_row(term.term, f"{term.measured_ms:,.1f} ms", f"{term.margin:+.1%}",
                  "[green]met[/]" if term.met else "[red]missed[/]")
    return t


def print_recommendation(rec, *, heading: str) -> None:
    out.print(f"[bold]{heading}[/]  (trial {rec.trial_number}, runner {rec.runner})")
    out.print(config_table(rec.config))
    out.print(point_table(rec.point, rec.config.dp))
    if rec.terms:
        out.print(slo_table(rec.terms))


def print_launch(plan) -> None:
    out.print(f"[bold]Deploy it[/] — save as {plan.options_file}:")
    out.print(plan.options_yaml.rstrip(), markup=False)
    out.print("then run:")
    for line in plan.shell_lines():
        out.print(f"  {line}", markup=False, soft_wrap=True)
    if len(plan.commands) > 1:
        out.print(f"  ({len(plan.commands)} replicas on ports "
                  f"{', '.join(map(str, plan.ports))}: put a load balancer in front)")


def print_best(results, recs: Sequence, closest, launch=None) -> None:
    """The study's best configurations (and ``launch``, the plan that deploys the first), or
    the closest miss."""
    counts = results.counts()
    slo = str(results.slo) or "none (maximum throughput)"
    out.print(f"study [bold]{results.study_name}[/]  SLO {slo}  "
              + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if recs:
        for i, rec in enumerate(recs):
            heading = "Best configuration" if i == 0 else f"#{i + 1}"
            print_recommendation(rec, heading=heading)
            out.print()
        if launch is not None:
            print_launch(launch)
        return
    out.print("[bold red]No configuration meets the SLO.[/]")
    if closest is not None:
        missed = ", ".join(f"{t.term} (measured {t.measured_ms:,.1f} ms)" for t in closest.failing)
        out.print(f"Closest: {closest.config.label()} — misses {missed}")
        print_recommendation(closest, heading="Closest configuration")


def print_pareto(front, has_slo: bool = True) -> None:
    """The front of all measured load points; the SLO column says which meet the SLO."""
    t = Table(title="Pareto front of all measured load points (tok/s per GPU vs tok/s per user)",
              title_justify="left")
    cols = ("config", "trial", "concurrency", "tok/s/GPU", "tok/s/user") + (
        ("SLO",) if has_slo else ())
    for col in cols:
        t.add_column(col, justify="left" if col in ("config", "SLO") else "right")
    for fp in front:
        p = fp.point
        row = [fp.config.label(), str(fp.trial_number), load_label(p.concurrency, fp.config.dp),
               f"{p.output_throughput_per_gpu:,.1f}", f"{p.output_throughput_per_user:,.1f}"]
        if has_slo:
            row.append("[green]met[/]" if fp.slo_met else "[red]missed[/]")
        t.add_row(*row)
    out.print(t)


# ---- report / export / deploy ----------------------------------------------------------------
@contextmanager
def steps(total: int, label: str, enabled: bool = True) -> Iterator:
    """A progress bar on stderr for ``total`` named steps; yields ``advance(description)``, to
    call before each step."""
    progress = Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(bar_width=24),
                        MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=err, transient=True,
                        disable=not enabled)
    with progress:
        task = progress.add_task("", total=total)
        started = [False]

        def advance(description: str) -> None:
            progress.update(task, description=escape(description),
                            advance=1 if started[0] else 0)
            started[0] = True

        yield advance
        progress.update(task, completed=total)


def wrote(kind: str, path, detail: str = "") -> None:
    """One line on stderr naming a file or folder autotune wrote (stdout stays for --json)."""
    err.print(f"wrote {kind} [bold]{escape(str(path))}[/]" + (f" — {escape(detail)}"
                                                                   if detail else ""),
              soft_wrap=True)


# ---- estimate / studies -------------------------------------------------------------------
def print_estimate(config: EngineConfig, point: LoadPoint, max_in_flight: int, terms) -> None:
    out.print(config_table(config))
    out.print(f"requests that fit in flight: {max_in_flight:,}")
    out.print(point_table(point, config.dp))
    if terms:
        out.print(slo_table(terms))


def print_studies(summaries, safe_url: str) -> None:
    if not summaries:
        out.print(f"no studies in {safe_url}")
        return
    t = Table(title=f"studies in {safe_url}", title_justify="left")
    # The study name already spells out model, GPUs, workload and SLO (see --json for all).
    t.add_column("study", overflow="fold")
    for col in ("trials", "feasible", "failed", "best tok/s/GPU"):
        t.add_column(col, justify="right", no_wrap=True)
    for s in summaries:
        t.add_row(s.name, str(s.trials), str(s.feasible), str(s.failed),
                  f"{s.best_objective:,.1f}" if s.best_objective else "-")
    out.print(t)


def print_probe(hw, safe_url: str) -> None:
    out.print(f"profile [bold]{hw.name}[/] — {hw.device_count}x {hw.device_name} ({hw.device}, "
              f"{hw.memory_gib:,.0f} GiB), torch {hw.torch_version}, {hw.seconds:.1f} s")
    t = Table(title="matmul", title_justify="left")
    for col in ("dtype", "size", "TFLOP/s"):
        t.add_column(col, justify="right")
    for m in hw.matmul:
        t.add_row(m.dtype, str(m.size), f"{m.tflops:,.3f}")
    out.print(t)
    out.print(f"memory copy bandwidth: {hw.memory_tb_s * 1e3:,.1f} GB/s")
    if hw.comms:
        c = Table(title=f"collectives ({hw.backend})", title_justify="left")
        for col in ("op", "bytes", "latency µs", "bus GB/s"):
            c.add_column(col, justify="right")
        for r in hw.comms:
            c.add_row(r.op, f"{r.bytes:,}", f"{r.latency_us:,.1f}", f"{r.bus_gb_s:,.3f}")
        out.print(c)
    if hw.fabric:
        f = Table(title=f"between nodes ({' -> '.join(hw.fabric_hosts)}, one way)",
                  title_justify="left")
        for col in ("bytes", "latency µs", "GB/s"):
            f.add_column(col, justify="right")
        for r in hw.fabric:
            f.add_row(f"{r.bytes:,}", f"{r.latency_us:,.1f}", f"{r.bus_gb_s:,.3f}")
        out.print(f)
    for note in hw.notes:
        out.print(f"note: {note}")
    out.print(f"stored in {safe_url}; use it with --profile {hw.name}")


def print_calibration(result, profile: str, url: str) -> None:
    """Errors before and after ``autotune calibrate``, the constants, and how to use them."""
    table = Table(title="model error (mean absolute % error per load point)", title_justify="left")
    table.add_column("configs")
    for name in ("output tok/s", "TTFT mean", "TPOT mean", "all"):
        table.add_column(name, justify="right")

    def row(label, errors):
        by = errors.by_metric
        table.add_row(label, *(f"{by[k]:.1%}" for k in ("output_tok_s", "ttft_mean_ms",
                                                        "tpot_mean_ms")), f"{errors.overall:.1%}")

    row(f"fit ({result.fitted}), before", result.fit_before)
    row(f"fit ({result.fitted}), after", result.fit_after)
    if result.held_before is not None:
        row(f"held out ({result.held}), before", result.held_before)
        row(f"held out ({result.held}), after", result.held_after)
    out.print(table)
    consts = Table(title="constants", title_justify="left")
    for col in ("constant", "before", "after"):
        consts.add_column(col, justify="right" if col != "constant" else "left")
    before, after = result.before.to_dict(), result.after.to_dict()
    for k in before:
        consts.add_row(k, f"{before[k]:.4g}", f"{after[k]:.4g}")
    out.print(consts)
    for note in result.notes:
        out.print(f"note: {note}")
    out.print(f"saved as profile [bold]{profile}[/] in {url}; use it with "
              f"`--profile {profile}` on search and estimate")
