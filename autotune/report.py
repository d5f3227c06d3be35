"""``autotune report``: one self-contained HTML page (SVG figures inline, no scripts, no network)
and, on request, the same figures as PNG files.

Figures (``FIGURES``): the Pareto front of throughput per GPU against tokens/s per user with the
SLO's region shaded and the recommendation marked; each configuration's load curve; a TP x PP
grid coloured by the best feasible throughput; the search's progress over trials; the trials'
outcomes and failure classes. matplotlib is imported here, lazily, and drawn with the Agg
canvas (no GUI back end, no pyplot state).
"""

from __future__ import annotations

import html
import io
import math
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import DISTRIBUTION, UserError, install_hint
from autotune.measurement import MAX_CONCURRENCY, Status, load_label
from autotune.slo import SLO

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from autotune.recommend import Recommendation, Results

#: name -> title, in page order; PNG files are ``<name>.png``.
FIGURES = {
    "pareto": "Throughput per GPU vs tokens/s per user",
    "curves": "Load curves",
    "grid": "TP x PP: best feasible throughput",
    "progress": "Search progress",
    "outcomes": "Trial outcomes and failures",
}
MET, MISSED, REC, FRONT, INFEASIBLE, FAILED = (
    "#1b9e77", "#9aa0a6", "#d62728", "#333333", "#f28e2b", "#b2182b")
TOP_CURVES = 8  # configs drawn in colour (with a legend entry) in the load-curve figure
INSTALL_HINT = install_hint("report")


def require_matplotlib() -> None:
    """UserError (exit 2) with the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"autotune report needs matplotlib: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class Rendered:
    """One figure, drawn: inline SVG for the page, PNG bytes for ``--png``."""

    name: str
    title: str
    caption: str
    svg: str
    png: bytes | None = None


# ---- helpers ------------------------------------------------------------------------------
def per_user_floor(slo: SLO, osl: int) -> tuple[float, str] | None:
    """The tokens/s per user below which the SLO cannot hold, and the term that says so.

    A ``tpot``/``itl`` bound of L ms needs about 1000/L tok/s per user; an ``e2e`` bound needs
    at least (osl-1) tokens in L ms. ``ttft`` bounds say nothing about per-user speed.
    """
    floors = []
    for b in slo.bounds:
        if b.metric in ("tpot", "itl"):
            floors.append((1000.0 / b.limit_ms, str(b)))
        elif b.metric == "e2e" and osl > 1:
            floors.append((1000.0 * (osl - 1) / b.limit_ms, str(b)))
    return max(floors) if floors else None


def _measurements(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per measurement (the frame has one per load point)."""
    return frame.drop_duplicates("measurement_id").sort_values("trial", kind="stable")


def outcome_of(row) -> str:
    """A measurement's outcome for the figures."""
    status = row["status"]
    if status in (Status.OK, Status.REUSED):
        return "meets SLO" if bool(row["feasible"]) else "misses SLO"
    return "infeasible" if status in (Status.INFEASIBLE, Status.PREDICTED) else "failed"


def _ladder_x(concurrency: int, max_x: float) -> float:
    return max_x if concurrency == MAX_CONCURRENCY else float(concurrency)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # draw with Agg: no GUI back end, no pyplot
    axes = fig.subplots(1, ncols)
    return fig, axes


# ---- the figures --------------------------------------------------------------------------
def pareto_figure(results: Results, rec: Recommendation | None,
                  closest: Recommendation | None) -> tuple[Figure, str]:
    fig, ax = _new_figure(12, 5.8)
    points = results.points()
    slo = results.slo
    if not points:
        _empty(ax, "no measured load points")
        return fig, "No load point was measured."
    met = [fp for fp in points if fp.slo_met]
    missed = [fp for fp in points if not fp.slo_met]

    def xy(fps):
        return ([fp.point.output_throughput_per_user for fp in fps],
                [fp.point.output_throughput_per_gpu for fp in fps])

    if missed:
        ax.scatter(*xy(missed), s=26, facecolors="none", edgecolors=MISSED, linewidths=1.0,
                   label=f"misses the SLO ({len(missed)} points)", zorder=2)
    if met:
        ax.scatter(*xy(met), s=26, color=MET, alpha=0.85, linewidths=0,
                   label=("load point" if not slo else "meets the SLO")
                   + f" ({len(met)} points)", zorder=3)

    def step(front, **kw):
        xs, ys = xy(sorted(front, key=lambda fp: fp.point.output_throughput_per_user))
        ax.plot(xs, ys, drawstyle="steps-pre", **kw)

    front_all = results.pareto()
    if slo:
        step(front_all, color=FRONT, lw=1.2, ls="--", zorder=4,
             label=f"Pareto front, all points ({len(front_all)})")
        front_ok = results.pareto(slo_met_only=True)
        if front_ok:
            step(front_ok, color=MET, lw=2.0, zorder=4,
                 label=f"Pareto front, meets the SLO ({len(front_ok)})")
    else:
        step(front_all, color=MET, lw=2.0, zorder=4, label=f"Pareto front ({len(front_all)})")
    ax.margins(x=0.05, y=0.08)
    floor = per_user_floor(slo, int(results.scenario["workload"]["osl"])) if slo else None
    if floor is not None:
        lo, hi = ax.get_xlim()
        x0, term = floor
        # Only the per-user-speed terms have a place on these axes; the others (TTFT) decide
        # which dots are filled.
        elsewhere = [str(b) for b in slo.bounds if str(b) != term]
        ax.axvspan(x0, max(hi, x0 * 1.1), color=MET, alpha=0.09, lw=0, zorder=0,
                   label=f"SLO region: ≥ {x0:,.1f} tok/s/user ({term})"
                   + (f"\n(also {', '.join(elsewhere)}: not on these axes)" if elsewhere
                      else ""))
        ax.axvline(x0, color=MET, lw=1, ls=":", zorder=1)
        ax.set_xlim(min(lo, x0 * 0.95), max(hi, x0 * 1.1))
    star = rec or closest
    if star is not None:
        p = star.point
        ax.scatter([p.output_throughput_per_user], [p.output_throughput_per_gpu], marker="*",
                   s=380, color=REC, edgecolors="white", linewidths=1.0, zorder=6,
                   label="recommended" if rec else "closest (misses the SLO)")
        load = load_label(p.concurrency, star.config.dp)
        ax.annotate(f"{star.config.label()}\nconcurrency {load}: "
                    f"{p.output_throughput_per_gpu:,.0f} tok/s/GPU, "
                    f"{p.output_throughput_per_user:,.1f} tok/s/user",
                    (p.output_throughput_per_user, p.output_throughput_per_gpu),
                    xytext=(12, 12), textcoords="offset points", fontsize=8, color=REC,
                    bbox={"boxstyle": "round", "fc": "white", "ec": REC, "alpha": 0.9},
                    zorder=7)
    ax.set_xlabel("output tokens/s per user (interactivity)")
    ax.set_ylabel("output tokens/s per GPU (throughput)")
    ax.grid(alpha=0.25)
    # Outside the axes, so that it never hides a point or the star.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    shading = (f"The shaded band is where the SLO's {floor[1]} allows the per-user speed "
               f"(≥ {floor[0]:,.1f} tok/s/user); filled dots meet every SLO term. "
               if floor else "Filled dots meet every SLO term. " if slo else "")
    caption = (f"Every measured load point ({len(points)}) of every configuration: throughput "
               "per GPU against the speed one user sees. The lines are the Pareto fronts — no "
               "point beats them on both axes. " + shading
               + ("The star is the recommendation: the highest throughput per GPU that meets "
                  "the SLO." if rec else "No point meets the SLO; the star is the closest."
                  if closest else ""))
    return fig, caption


def _config_rank(results: Results) -> list:
    """Measured configs, best first: feasible by objective, then by peak tok/s per GPU."""
    from autotune.sweep import operating_point

    def score(m):
        point, feasible = operating_point(m.load_points, results.slo)
        peak = max(p.output_throughput_per_gpu for p in m.load_points)
        return (feasible, point.output_throughput_per_gpu if feasible else peak)

    return sorted(results.measured, key=score, reverse=True)


def curves_figure(results: Results) -> tuple[Figure, str]:
    import matplotlib

    fig, (left, right) = _new_figure(12.5, 5.8, 2)
    ranked = _config_rank(results)
    if not ranked:
        _empty(left, "no measured configurations")
        _empty(right, "no measured configurations")
        return fig, "No configuration was measured."
    slo = results.slo
    bound = slo.bounds[0] if slo else None
    metric, stat = (bound.metric, bound.stat) if bound else ("tpot", "p99")
    finite = [p.concurrency for m in ranked for p in m.load_points
              if p.concurrency != MAX_CONCURRENCY]
    max_x = 2.0 * max(finite) if finite else 1.0
    colours = matplotlib.colormaps["tab10"].colors
    for i, m in enumerate(reversed(ranked)):  # best drawn last, on top
        rank = len(ranked) - 1 - i
        pts = sorted(m.load_points, key=lambda p: _ladder_x(p.concurrency, max_x))
        top = rank < TOP_CURVES
        style = ({"color": colours[rank % 10], "lw": 1.8, "marker": "o", "ms": 4, "zorder": 3,
                  "label": f"#{rank + 1} {m.config.label()} (trial {m.trial_number})"}
                 if top else {"color": MISSED, "lw": 0.8, "marker": ".", "ms": 3, "alpha": 0.5,
                              "zorder": 2})
        left.plot([p.output_throughput_per_user for p in pts],
                  [p.output_throughput_per_gpu for p in pts], **style)
        right.plot([_ladder_x(p.concurrency, max_x) for p in pts],
                   [p.latency(metric, stat) for p in pts],
                   **{k: v for k, v in style.items() if k != "label"})
    left.set_xlabel("output tokens/s per user")
    left.set_ylabel("output tokens/s per GPU")
    left.set_title("throughput vs interactivity, one line per config", fontsize=10)
    right.set_xscale("log", base=2)
    # Label the ladder's rungs (powers of two), not every load a refinement measured between
    # them: those would print on top of each other.
    rungs = [t for t in sorted(set(finite)) if t & (t - 1) == 0] or sorted(set(finite))[:1]
    right.set_xticks([*rungs, max_x], [str(t) for t in rungs] + ["max"], fontsize=7)
    right.minorticks_off()
    right.set_xlabel("concurrency (requests in flight)")
    right.set_ylabel(f"{metric} {stat} (ms)")
    right.set_title(f"{metric} {stat} as the load grows", fontsize=10)
    if bound is not None:
        right.axhline(bound.limit_ms, color=REC, ls="--", lw=1.2, label=f"SLO {bound}")
        right.legend(loc="upper left", fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.25)
    handles, labels = left.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: int(labels[k][1:].split()[0]))
    fig.legend([handles[k] for k in order], [labels[k] for k in order],
               loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    others = len(ranked) - min(len(ranked), TOP_CURVES)
    caption = (f"Each configuration measured up its load ladder (concurrency 1, 2, 4, … and "
               f"max). Left: the curve it traces in the throughput–interactivity plane; right: "
               f"{metric} {stat} against the load"
               + (", with the SLO's limit dashed" if bound else "")
               + f". The {min(len(ranked), TOP_CURVES)} best configurations are coloured"
               + (f", {others} others grey" if others else "")
               + ". A ladder stops at the first load that misses the SLO.")
    return fig, caption


def grid_figure(results: Results, frame: pd.DataFrame) -> tuple[Figure, str]:
    import numpy as np
    from matplotlib import colormaps

    from autotune.space import Layout

    fig, ax = _new_figure(7.5, 5.8)
    layouts = []
    for label in results.space.get("layouts", []):
        try:
            layouts.append(Layout.parse(label))
        except ValueError:
            continue
    rows = _measurements(frame)
    tps = sorted({lay.tp for lay in layouts} | {int(v) for v in rows["tp"].dropna()})
    pps = sorted({lay.pp for lay in layouts} | {int(v) for v in rows["pp"].dropna()})
    if not tps or not pps:
        _empty(ax, "no layouts")
        return fig, "No layout was tried."
    best = np.full((len(pps), len(tps)), np.nan)
    count = np.zeros((len(pps), len(tps)), dtype=int)
    in_space = {(lay.tp, lay.pp): lay.dp for lay in layouts}
    for _, r in rows.iterrows():
        i, j = pps.index(int(r["pp"])), tps.index(int(r["tp"]))
        count[i, j] += 1
        in_space.setdefault((int(r["tp"]), int(r["pp"])), int(r["dp"]))
        if r["status"] in (Status.OK, Status.REUSED) and bool(r["feasible"]) and not math.isnan(
                r["objective"]):
            best[i, j] = np.nanmax([best[i, j], r["objective"]])
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")
    masked = np.ma.masked_invalid(best)
    im = ax.imshow(masked, cmap=cmap, origin="lower", aspect="auto")
    vmin, vmax = (np.nanmin(best), np.nanmax(best)) if np.isfinite(best).any() else (0, 1)
    for i, pp in enumerate(pps):
        for j, tp in enumerate(tps):
            trials = f"{count[i, j]} trial" + ("s" if count[i, j] != 1 else "")
            if np.isfinite(best[i, j]):
                share = (best[i, j] - vmin) / (vmax - vmin) if vmax > vmin else 1.0
                colour = "white" if share < 0.6 else "black"
                text = f"{best[i, j]:,.0f}\n{trials}"
            elif count[i, j]:
                colour, text = "#444444", f"none feasible\n{trials}"
            elif (tp, pp) in in_space:
                colour, text = "#888888", "not tried"
            else:
                colour, text = "#bbbbbb", "—"
            dp = in_space.get((tp, pp))
            if dp and dp > 1 and text != "—":
                text += f"\n(dp{dp})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(tps)), [f"TP{t}" for t in tps])
    ax.set_yticks(range(len(pps)), [f"PP{p}" for p in pps])
    ax.set_xlabel("tensor parallel (per replica)")
    ax.set_ylabel("pipeline parallel (per replica)")
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("best feasible output tok/s per GPU")
    caption = ("Each cell is one parallel layout (data-parallel replicas fill the remaining "
               "GPUs); its colour and number are the best throughput per GPU among the "
               "configurations of that layout that meet the SLO. Grey: tried but none met the "
               "SLO, not tried, or not a valid layout (—).")
    return fig, caption


def progress_figure(frame: pd.DataFrame, has_slo: bool) -> tuple[Figure, str]:
    fig, ax = _new_figure(10, 4.8)
    rows = _measurements(frame)
    if rows.empty:
        _empty(ax, "no trials")
        return fig, "No trial was recorded."
    outcome = rows.apply(outcome_of, axis=1)
    trial = rows["trial"].astype(int).to_numpy()
    objective = rows["objective"].astype(float).fillna(0.0).to_numpy()
    reused = (rows["status"] == Status.REUSED).to_numpy()
    met_name = "meets the SLO" if has_slo else "measured"
    styles = {
        "meets SLO": {"color": MET, "marker": "o", "s": 30, "label": met_name},
        "misses SLO": {"facecolors": "none", "edgecolors": MISSED, "marker": "o", "s": 30,
                       "label": "misses the SLO (its closest point)"},
        "infeasible": {"color": INFEASIBLE, "marker": "v", "s": 36,
                       "label": "infeasible (memory, layout; or predicted, not run)"},
        "failed": {"color": FAILED, "marker": "x", "s": 36,
                   "label": "failed / interrupted / lost"},
    }
    for name, style in styles.items():
        pick = (outcome == name).to_numpy()
        if not pick.any():
            continue
        n = int(pick.sum())
        style = dict(style, label=f"{style['label']} ({n})")
        ax.scatter(trial[pick], objective[pick], zorder=3, clip_on=False, **style)
    if reused.any():
        ax.scatter(trial[reused], objective[reused], marker="s", s=70, facecolors="none",
                   edgecolors="#555555", lw=0.8, zorder=2,
                   label=f"reused an earlier measurement ({int(reused.sum())})")
    good = (outcome == "meets SLO").to_numpy()
    best, running = [], float("nan")
    for ok, value in zip(good, objective):
        if ok and not (value <= running):
            running = value
        best.append(running)
    if good.any():
        ax.step(trial, best, where="post", color=FRONT, lw=1.6, zorder=4,
                label="best so far" + (" (meets the SLO)" if has_slo else ""))
    ax.set_xlabel("trial")
    ax.set_ylabel("output tok/s per GPU at the operating point")
    ax.set_ylim(0, max(1.0, float(objective.max())) * 1.08)
    ax.grid(alpha=0.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    caption = ("Each trial in the order it ran, at its operating point (the highest-throughput "
               "load that meets the SLO; for a config that misses it, its closest point). "
               "Infeasible and failed trials sit at zero. The line is the best throughput found "
               "so far.")
    return fig, caption


def outcomes_figure(frame: pd.DataFrame, has_slo: bool) -> tuple[Figure, str]:
    fig, (left, right) = _new_figure(11, 3.8, 2)
    rows = _measurements(frame)
    labels, counts, colours = [], [], []
    for name, colour, pick in (
        ("meets the SLO" if has_slo else "measured", MET,
         rows["status"].eq(Status.OK) & rows["feasible"].fillna(False)),
        ("misses the SLO", MISSED, rows["status"].eq(Status.OK) & ~rows["feasible"].fillna(False)),
        ("reused", "#555555", rows["status"].eq(Status.REUSED)),
        ("infeasible", INFEASIBLE, rows["status"].eq(Status.INFEASIBLE)),
        ("predicted infeasible (not run)", INFEASIBLE, rows["status"].eq(Status.PREDICTED)),
        ("failed", FAILED, rows["status"].eq(Status.FAILED)),
        ("interrupted", FAILED, rows["status"].eq(Status.INTERRUPTED)),
        ("lost", FAILED, rows["status"].eq(Status.LOST)),
    ):
        n = int(pick.fillna(False).sum())
        always = ("infeasible", "failed", "misses the SLO") if has_slo else ("infeasible", "failed")
        if n or name in always:
            labels.append(name)
            counts.append(n)
            colours.append(colour)
    if rows.empty:
        _empty(left, "no trials")
    else:
        bars = left.barh(labels[::-1], counts[::-1], color=colours[::-1])
        left.bar_label(bars, padding=3, fontsize=8)
        left.set_xlabel("trials")
        left.set_title(f"how the {len(rows)} trials ended", fontsize=10)
    failures = rows[rows["failure_class"].notna()]
    if failures.empty:
        _empty(right, "no failures")
        right.set_title("failure classes", fontsize=10)
    else:
        by_class = failures.groupby("failure_class", observed=True).size().sort_values()
        colours = [INFEASIBLE if failures.loc[failures["failure_class"] == c, "status"].isin(
            (Status.INFEASIBLE, Status.PREDICTED)).all() else FAILED for c in by_class.index]
        bars = right.barh([str(c) for c in by_class.index], by_class.to_numpy(), color=colours)
        right.bar_label(bars, padding=3, fontsize=8)
        right.set_xlabel("trials")
        right.set_title("failure classes (orange: infeasible, red: failed)", fontsize=10)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.25)
    caption = ("Left: every trial's outcome. Right: the classes of the trials that could not be "
               "measured (out of memory, invalid layout, crash, timeout…); the reasons are "
               "listed below.")
    return fig, caption


def render_figure(name: str, fig: Figure, caption: str, *, png: bool) -> Rendered:
    """Serialise a figure: SVG (text as paths, ids salted per figure so several can share a
    page) and, with ``png``, PNG bytes."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": f"autotune-{name}", "svg.fonttype": "path"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE for inline use
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.DOTALL)  # RDF noise
    data = None
    if png:
        raw = io.BytesIO()
        fig.savefig(raw, format="png", dpi=110, metadata={"Software": None})
        data = raw.getvalue()
    return Rendered(name=name, title=FIGURES[name], caption=caption, svg=svg, png=data)


def build_figures(results: Results, frame: pd.DataFrame, *, png: bool = False,
                  advance: Callable[[str], None] = lambda _: None) -> list[Rendered]:
    """Draw every figure of ``FIGURES`` (``advance`` is called before each one)."""
    recs = results.best(1)
    rec = recs[0] if recs else None
    closest = None if rec else results.closest()
    has_slo = bool(results.slo)
    makers = {
        "pareto": lambda: pareto_figure(results, rec, closest),
        "curves": lambda: curves_figure(results),
        "grid": lambda: grid_figure(results, frame),
        "progress": lambda: progress_figure(frame, has_slo),
        "outcomes": lambda: outcomes_figure(frame, has_slo),
    }
    out = []
    for name in FIGURES:
        advance(f"figure: {name}")
        fig, caption = makers[name]()
        out.append(render_figure(name, fig, caption, png=png))
    return out


# ---- the page -----------------------------------------------------------------------------
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1280px; margin: 24px auto; padding: 0 24px; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 36px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.muted { color: #666; } .met { color: #1b7f5f; font-weight: 600; }
.missed { color: #b2182b; font-weight: 600; }
.summary { background: #f4faf7; border-left: 4px solid #1b9e77; padding: 10px 14px; }
.summary.nothing { background: #fdf3f2; border-left-color: #b2182b; }
figure.plot { margin: 18px 0 28px; } figure.plot svg { max-width: 100%; height: auto; }
figcaption { margin-bottom: 6px; } figcaption b { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f6f6; } code, pre { font: 12px/1.4 ui-monospace, Menlo, monospace; }
pre { background: #f6f6f6; padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers or []))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            # Cells already holding markup are given as ("html", text).
            text = cell[1] if isinstance(cell, tuple) and cell[0] == "html" else _e(cell)
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    return f"<table>{thead}<tbody>{''.join(body)}</tbody></table>"


def _met(flag: bool) -> tuple[str, str]:
    return ("html", '<span class="met">met</span>' if flag else '<span class="missed">missed'
            '</span>')


def _summary(results: Results, rec, closest) -> str:
    slo = str(results.slo) or "none (maximum throughput)"
    if rec is not None:
        p = rec.point
        terms = "; ".join(f"{t.term} measured {t.measured_ms:,.1f} ms (margin {t.margin:+.1%})"
                          for t in rec.terms)
        load = load_label(p.concurrency, rec.config.dp)
        return (f'<p class="summary"><b>Recommended: {_e(rec.config.label())}</b> (trial '
                f"{rec.trial_number}) at concurrency {_e(load)}: "
                f"<b>{p.output_throughput_per_gpu:,.1f} tok/s per GPU</b>, "
                f"{p.output_throughput_per_user:,.1f} tok/s per user, "
                f"{p.output_throughput:,.1f} tok/s in all. SLO: "
                + (_e(terms) if terms else _e(slo)) + ".</p>")
    text = "<b>No configuration meets the SLO</b> " + _e(slo) + "."
    if closest is not None:
        missed = ", ".join(f"{t.term} (measured {t.measured_ms:,.1f} ms)" for t in closest.failing)
        text += f" Closest: {_e(closest.config.label())}, which misses {_e(missed)}."
    return f'<p class="summary nothing">{text}</p>'


def _top_table(results: Results, top: int) -> str:
    recs = results.best(top)
    if not recs:
        return '<p class="muted">No configuration meets the SLO.</p>'
    terms = [t.term for t in recs[0].terms]
    headers = ["#", "config", "trial", "concurrency", "tok/s/GPU", "tok/s/user", "tok/s"] + [
        f"{t} (margin)" for t in terms]
    rows = []
    for i, r in enumerate(recs, 1):
        p = r.point
        rows.append([i, r.config.label(), r.trial_number, load_label(p.concurrency, r.config.dp),
                     f"{p.output_throughput_per_gpu:,.1f}", f"{p.output_throughput_per_user:,.1f}",
                     f"{p.output_throughput:,.1f}",
                     *(f"{t.measured_ms:,.1f} ms ({t.margin:+.1%})" for t in r.terms)])
    return _table(headers, rows, numeric={0, 2, 4, 5, 6})


def _front_table(results: Results) -> str:
    front = results.pareto()
    if not front:
        return '<p class="muted">No measured load points.</p>'
    has_slo = bool(results.slo)
    headers = ["config", "trial", "concurrency", "tok/s/GPU", "tok/s/user"] + (
        ["SLO"] if has_slo else [])
    rows = [[fp.config.label(), fp.trial_number, load_label(fp.point.concurrency, fp.config.dp),
             f"{fp.point.output_throughput_per_gpu:,.1f}",
             f"{fp.point.output_throughput_per_user:,.1f}"] + ([_met(fp.slo_met)] if has_slo
                                                              else [])
            for fp in front]
    return _table(headers, rows, numeric={1, 3, 4})


def _failure_table(frame: pd.DataFrame) -> str:
    rows = _measurements(frame)
    failed = rows[rows["failure_class"].notna()]
    if failed.empty:
        return '<p class="muted">No trial failed or was infeasible.</p>'
    groups: dict[tuple, list[int]] = {}
    for _, r in failed.iterrows():
        message = (str(r["message"]) if r["message"] is not None and r["message"] == r["message"]
                   else "").strip().splitlines()
        key = (str(r["status"]), str(r["failure_class"]), (message[0] if message else "")[:300])
        groups.setdefault(key, []).append(int(r["trial"]))
    out = []
    for (status, cls, msg), trials in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(map(str, trials[:12])) + (", …" if len(trials) > 12 else "")
        out.append([status, cls, len(trials), msg, shown])
    return _table(["status", "class", "trials", "reason", "trial numbers"], out, numeric={2})


def _scenario_table(results: Results) -> str:
    s = results.scenario
    w = s.get("workload", {})
    spec = s.get("model_spec", {})
    space = results.space
    rows = [
        ["study", results.study_name],
        ["model", f"{s.get('model')}" + (f" ({spec['hf_name']})" if spec.get("hf_name") else "")],
        ["GPUs", f"{s.get('num_gpus')} x {s.get('gpu')}"],
        ["precision", s.get("precision")],
        ["workload", f"input {w.get('isl')} tokens, output {w.get('osl')} tokens"
         + (f" (std {w.get('isl_std'):g} / {w.get('osl_std'):g})"
            if w.get("isl_std") or w.get("osl_std") else "")],
        ["SLO", s.get("slo") or "none (maximum throughput)"],
        ["runner", s.get("runner")],
    ]
    if s.get("profile"):
        rows.append(["profile", s["profile"]])
    if space:
        rows.append(["search space", (f"{space.get('source', '?')}: {space.get('size', '?')} "
                     f"configurations, layouts {', '.join(space.get('layouts', []))}")])
    counts = results.counts()
    rows.append(["trials", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"])
    if results.created_at is not None:
        rows.append(["created", _when(results.created_at)])
    return _table(None, [[("html", f"<b>{_e(k)}</b>"), v] for k, v in rows])


def _when(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _versions_table(results: Results) -> str:
    seen: dict[str, set[str]] = {}
    for source in [results.versions] + [m.versions or {} for m in results.measurements]:
        for k, v in (source or {}).items():
            seen.setdefault(k, set()).add(str(v))
    rows = [[k, ", ".join(sorted(v))] for k, v in sorted(seen.items())]
    runners = sorted({m.runner for m in results.measurements})
    if runners:
        rows.append(["runners", ", ".join(runners)])
    here = {"python": platform.python_version()}
    for dist in (DISTRIBUTION, "matplotlib", "pandas"):
        try:
            here[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            here[dist] = "unknown"
    rows.append(["report made with", ", ".join(f"{k} {v}" for k, v in here.items())])
    return _table(["software", "version"], rows)


def render_html(results: Results, frame: pd.DataFrame, figures: list[Rendered], *,
                top: int = 5, storage: str | None = None) -> str:
    """The report page: self-contained (inline SVG and CSS, no scripts, no external links)."""
    recs = results.best(1)
    rec = recs[0] if recs else None
    closest = None if rec else results.closest()
    figs = {f.name: f for f in figures}

    def figure(name: str) -> str:
        f = figs[name]
        return (f'<figure class="plot" id="fig-{name}"><figcaption><b>{_e(f.title)}.</b> '
                f"{_e(f.caption)}</figcaption>{f.svg}</figure>")

    where = f" --storage {storage}" if storage else ""
    deploy = f"autotune deploy{where} --study {results.study_name} --out deploy/"
    now = _when(datetime.now(UTC))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>autotune report — {_e(results.study_name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>autotune report — {_e(results.study_name)}</h1>",
        (f'<p class="muted">{_e(results.scenario.get("model"))} on '
         f'{_e(results.scenario.get("num_gpus"))} x {_e(results.scenario.get("gpu"))}, '
         f"{_e(len(results.measurements))} trials; generated {now}</p>"),
        _summary(results, rec, closest),
        "<h2>Pareto front</h2>", figure("pareto"),
        "<h3>Points on the front</h3>", _front_table(results),
        "<h2>Best configurations</h2>", _top_table(results, top),
        f"<p>Deploy the recommendation: <code>{_e(deploy)}</code></p>",
        "<h2>Load curves</h2>", figure("curves"),
        "<h2>Parallel layouts</h2>", figure("grid"),
        "<h2>Search progress</h2>", figure("progress"),
        "<h2>Outcomes and failures</h2>", figure("outcomes"),
        "<h3>Failure reasons</h3>", _failure_table(frame),
        "<h2>Scenario</h2>", _scenario_table(results),
        "<h2>Software</h2>", _versions_table(results),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(results: Results, out: Path, *, png_dir: Path | None = None, top: int = 5,
                 storage: str | None = None, advance: Callable[[str], None] = lambda _: None
                 ) -> list[Rendered]:
    """Write the page to ``out`` and, with ``png_dir``, ``<figure>.png`` files there; each file
    appears complete or not at all. Returns the figures drawn."""
    from autotune.atomic import write_file, write_text
    from autotune.export import load_point_frame

    advance("reading the study")
    frame = load_point_frame(results)
    figures = build_figures(results, frame, png=png_dir is not None, advance=advance)
    advance("writing the page")
    page = render_html(results, frame, figures, top=top, storage=storage)
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for f in figures:
            write_file(png_dir / f"{f.name}.png", lambda tmp, data=f.png: tmp.write_bytes(data))
    write_text(out, page)
    return figures


__all__ = ["FIGURES", "Rendered", "build_figures", "per_user_floor", "render_html",
           "require_matplotlib", "write_report"]
