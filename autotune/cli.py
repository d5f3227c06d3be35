"""The ``autotune`` command line.

Heavy modules (optuna, pandas, the runners) are imported inside the commands so that
``autotune --help`` starts fast. Every ``UserError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated

import typer

from autotune.errors import DatabaseUnavailable, UserError

app = typer.Typer(
    name="autotune", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Find the LLM serving configuration with the most throughput that meets a latency SLO.",
)

DEFAULT_STORAGE = "sqlite:///autotune.db"
#: The type column of a flag in --help: nothing (typer would print "<bool>", which reads as if
#: the flag took a value).
FLAG = ""

# Shared option declarations (one-line help each; defaults show in --help).
Model = Annotated[str, typer.Option("--model", help="Catalog name (e.g. llama-3.1-70b) or path "
                                    "to a Hugging Face config.json.")]
Gpu = Annotated[str, typer.Option("--gpu", help="h100, h200, a100, b200, or a GPU YAML file.")]
Precision = Annotated[str | None, typer.Option(
    "--precision", help="fp8 (default where the GPU has it, else bf16), bf16 or fp4.")]
Isl = Annotated[int, typer.Option("--isl", help="Input (prompt) length, tokens.")]
Osl = Annotated[int, typer.Option("--osl", help="Output length, tokens.")]
Slo = Annotated[str | None, typer.Option(
    "--slo", help="Latency SLO, e.g. 'tpot:p99<=25ms,ttft:p99<=2s'. None: max throughput.")]
Storage = Annotated[str, typer.Option(
    "--storage", envvar="AUTOTUNE_STORAGE",
    help="SQLAlchemy URL of the study database (sqlite:///… or postgresql://…); from "
    "AUTOTUNE_STORAGE when not given, which keeps a password out of `ps`.")]
StudyName = Annotated[str | None, typer.Option(
    "--study", help="Study name (default: derived from model, GPUs, workload and SLO).")]
NewestStudy = Annotated[str | None, typer.Option(
    "--study", help="Study name (default: the study searched last in --storage).")]
Json = Annotated[bool, typer.Option("--json", metavar=FLAG,
                                    help="Print machine-readable JSON on stdout.")]
ProfileName = Annotated[str | None, typer.Option(
    "--profile", help="Model with a profile from `probe`/`calibrate` stored in --storage.")]


Nodes = Annotated[int | None, typer.Option(
    "--nodes", min=1, help="Nodes of --gpu's system (all their GPUs; instead of --num-gpus).")]
GpusPerNode = Annotated[int | None, typer.Option(
    "--gpus-per-node", min=1, help="GPUs per node (default: the GPU spec's, 8 for HGX).")]
Fabric = Annotated[str | None, typer.Option(
    "--fabric", help="Fabric between nodes: ndr-ib (default), hdr-ib, xdr-ib, roce-400g, efa.")]
Force = Annotated[bool, typer.Option("--force", metavar=FLAG,
                                     help="Replace files that exist (never a database).")]


def handles_errors(fn):
    """Map UserError to one line + exit 2 (inside the command, so CliRunner sees it too)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from autotune import console

        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.error(str(exc))
            raise typer.Exit(2) from None
        except DatabaseUnavailable as exc:
            from autotune.workers import EXIT_DATABASE

            console.error(f"{exc}; stopped")
            raise typer.Exit(EXIT_DATABASE) from None
        except Exception as exc:
            # A database that breaks while it is read (a truncated or corrupt file, a server
            # gone): one line naming it, never a traceback.
            why = _database_error(exc)
            if why is None:
                raise
            console.error(why)
            raise typer.Exit(2) from None

    return wrapper


def _database_error(exc: Exception) -> str | None:
    """The line to print for a database failure (None when ``exc`` is not one)."""
    import sys

    if "sqlalchemy" not in sys.modules:  # nothing opened a database
        return None
    from sqlalchemy.exc import SQLAlchemyError

    from autotune.db import first_line

    optuna = sys.modules.get("optuna")
    kinds: tuple = (SQLAlchemyError,)
    if optuna is not None:
        kinds += (optuna.exceptions.StorageInternalError,)
    if not isinstance(exc, kinds):
        return None
    return f"cannot read the database: {first_line(exc)}"


def _concurrency(value: str) -> int:
    from autotune.measurement import MAX_CONCURRENCY

    if value.strip().lower() == "max":
        return MAX_CONCURRENCY
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--concurrency must be a positive integer or 'max', got {value!r}"
                        ) from None
    if n < 1:
        raise UserError(f"--concurrency must be a positive integer or 'max', got {value!r}")
    return n


def _runner_options(**given) -> dict:
    """The runner options the user set (the runner refuses those it does not take)."""
    return {k: v for k, v in given.items() if v is not None}


@app.command()
@handles_errors
def search(
    model: Model,
    gpu: Gpu,
    isl: Isl,
    osl: Osl,
    num_gpus: Annotated[int | None, typer.Option(
        "--num-gpus", help="GPUs in all (default: one node's).")] = None,
    nodes: Nodes = None,
    gpus_per_node: GpusPerNode = None,
    fabric: Fabric = None,
    precision: Precision = None,
    slo: Slo = None,
    runner: Annotated[str, typer.Option(
        "--runner", help="sim (built-in model), trtllm, vllm, or a plug-in module:Class.")] = "sim",
    trials: Annotated[int, typer.Option("--trials", min=1,
                                        help="Total trials of the study (all workers).")] = 60,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Stop after this many "
                                                  "seconds.")] = None,
    storage: Storage = DEFAULT_STORAGE,
    study: StudyName = None,
    space: Annotated[str | None, typer.Option("--space", help="Search space: a YAML file or a "
                                              "shipped name (default).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampler seed.")] = None,
    profile: ProfileName = None,
    prior: Annotated[str | None, typer.Option(
        "--prior", help="Warm start: 'sim' scores the whole space with the built-in model and "
        "runs its best configs first.")] = None,
    json_out: Json = False,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, help="Worker processes on this machine sharing the study.")] = 1,
    heartbeat: Annotated[int, typer.Option(
        "--heartbeat", help="Seconds between a running trial's heartbeats.")] = 30,
    grace: Annotated[int, typer.Option(
        "--grace", help="Seconds without a heartbeat before a trial counts as lost and is "
        "re-queued.")] = 120,
    db_retry: Annotated[float, typer.Option(
        "--db-retry", help="Seconds a worker retries a failing database (a dropped connection, "
        "a restart, a lock, a full disk) before it stops with exit code 3.")] = 120.0,
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="\\[trtllm, vllm] Local checkpoint folder.")] = None,
    hf_name: Annotated[str | None, typer.Option(
        "--hf-name", help="\\[trtllm, vllm] Hugging Face model name.")] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="\\[trtllm] pytorch (default) or tensorrt.")] = None,
    workspace: Annotated[str | None, typer.Option(
        "--workspace", help="\\[trtllm, vllm] Folder for datasets, engines, reports, logs.")
    ] = None,
    trtllm_bench: Annotated[str | None, typer.Option(
        "--trtllm-bench", help="\\[trtllm] Path to the trtllm-bench executable.")] = None,
    launcher: Annotated[str | None, typer.Option(
        "--launcher", help="\\[trtllm, vllm] local (default), mpirun or srun: how runs reach "
        "other nodes.")] = None,
    hosts: Annotated[str | None, typer.Option(
        "--hosts", help="\\[trtllm, vllm] The study's nodes, node 0 first (h1,h2,...; default "
        "in a Slurm job: its nodes).")] = None,
    num_requests: Annotated[int | None, typer.Option(
        "--num-requests", help="\\[trtllm, vllm] Requests per load point.")] = None,
    run_timeout: Annotated[float | None, typer.Option(
        "--run-timeout", help="\\[trtllm, vllm] Seconds before a run counts as hung.")] = None,
    build_timeout: Annotated[float | None, typer.Option(
        "--build-timeout",
        help="\\[trtllm] Seconds before an engine build counts as hung.")] = None,
    vllm: Annotated[str | None, typer.Option(
        "--vllm", help="\\[vllm] Path to the vllm executable (of any environment).")] = None,
    startup_timeout: Annotated[float | None, typer.Option(
        "--startup-timeout",
        help="\\[vllm] Seconds before a server that is not ready counts as hung.")] = None,
    eager: Annotated[bool | None, typer.Option(
        "--eager/--no-eager", metavar=FLAG,
        help="\\[vllm] --enforce-eager: no CUDA graphs or compilation (faster starts).")] = None,
):
    """Search for the best configuration and record every trial in the database."""
    from autotune import console
    from autotune.measurement import load_label
    from autotune.recommend import Results
    from autotune.workers import EXIT_DATABASE, SearchJob, run_here, run_workers

    job = SearchJob(
        model=model, gpu=gpu, num_gpus=num_gpus, nodes=nodes, gpus_per_node=gpus_per_node,
        fabric=fabric, isl=isl, osl=osl, precision=precision, slo=slo,
        runner=runner, space=space, storage=storage, study=study, seed=seed, trials=trials,
        timeout=timeout, heartbeat_s=heartbeat, grace_s=grace, retry_s=db_retry, profile=profile,
        prior=prior,
        runner_options=_runner_options(
            model_path=model_path, hf_name=hf_name, backend=backend, workspace=workspace,
            trtllm_bench=trtllm_bench, launcher=launcher, hosts=hosts, num_requests=num_requests,
            run_timeout=run_timeout, build_timeout=build_timeout, vllm=vllm,
            startup_timeout=startup_timeout, eager=eager),
    )
    scen, runner_cls, _ = job.check()  # all the user typed, checked before the database
    if not runner_cls.token_gaps and any(b.metric == "itl" for b in scen.slo.bounds):
        console.note(f"runner {runner!r} measures no token gaps: each request's ITL is its "
                     "TPOT, so the itl bound is judged on per-request means")
    started = time.perf_counter()  # the prior's scoring counts: it is part of the search
    prior = job.prior_size()
    with console.steps(prior, "prior: the model scores the space",
                       enabled=bool(prior) and not json_out) as advance:
        # Opens the database and joins (or creates) the study; the creator scores the space.
        tuner = job.tuner(progress=lambda n: advance(""))
    db = tuner.storage
    resume = (f"resume with the same command (study {tuner.study_name!r} in {db.safe_url}); "
              "finished trials are kept")
    with console.search_progress(trials, tuner.finished(), enabled=not json_out) as progress:
        try:
            if workers == 1:
                run_here(job, tuner, on_trial=progress.trial)
            else:
                tuner.runner.close()  # the workers bring their own
                codes = run_workers(job, workers, poll=lambda: progress.poll(
                    db.store, tuner.study_name))
                if any(codes):
                    raise UserError(f"{sum(1 for c in codes if c)} of {workers} workers failed "
                                    f"(exit codes {codes}); {resume}")
        except KeyboardInterrupt:
            console.error(f"interrupted: the running trial is recorded as interrupted; {resume}")
            raise typer.Exit(130) from None
        except DatabaseUnavailable as exc:
            # Its trial is re-run by the other workers once it looks dead (the grace period),
            # or by the resume.
            console.error(f"{exc}; this worker stopped: {resume}")
            raise typer.Exit(EXIT_DATABASE) from None
    elapsed = time.perf_counter() - started

    results = Results(db.store, tuner.study_name)
    best = results.best(1)
    summary = {
        "study": tuner.study_name, "storage": db.safe_url, "trials": tuner.finished(),
        "statuses": results.counts(), "elapsed_s": round(elapsed, 3),
        "best": _with_launch(best[0], results.scenario) if best else None,
    }
    if json_out:
        console.print_json(summary)
        return
    console.out.print(f"{summary['trials']} trials in {elapsed:.1f} s — study "
                      f"[bold]{tuner.study_name}[/] in {db.safe_url}")
    if best:
        rec = best[0]
        console.out.print(f"best: [bold]{rec.config.label()}[/] at concurrency "
                          f"{load_label(rec.point.concurrency, rec.config.dp)}: "
                          f"{rec.point.output_throughput_per_gpu:,.1f} tok/s/GPU, "
                          f"{rec.point.output_throughput_per_user:,.1f} tok/s/user")
        console.out.print("run `autotune best` for its metrics and launch command")
    else:
        console.out.print("no configuration met the SLO yet; `autotune best` shows the closest")


@app.command()
@handles_errors
def best(
    storage: Storage = DEFAULT_STORAGE,
    study: NewestStudy = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many configs to show.")] = 1,
    pareto: Annotated[bool, typer.Option(
        "--pareto", metavar=FLAG, help="Also show the Pareto front.")] = False,
    json_out: Json = False,
):
    """The best feasible configuration of a study, its metrics and how to launch it.

    Exits 1 when no trial meets the SLO (it then names the closest config)."""
    from autotune import console
    from autotune.recommend import SCHEMA

    _, results = _results(storage, study)
    name = results.study_name
    recs = results.best(top)
    closest = None if recs else results.closest()
    if json_out:
        console.print_json({
            "schema": SCHEMA, "study": name, "scenario": results.scenario,
            "statuses": results.counts(), "feasible": bool(recs),
            "best": [_with_launch(r, results.scenario) for r in recs],
            "closest": _with_launch(closest, results.scenario) if closest else None,
            "pareto": [fp.to_dict() for fp in results.pareto()] if pareto else None,
        })
    else:
        from autotune.deploy import checkpoint_note, plan_for

        first = recs[0] if recs else None
        plan = plan_for(first, results.scenario) if first else None
        console.print_best(results, recs, closest, plan)
        note = checkpoint_note(results.scenario, first.runner_settings) if first else None
        if recs and note:
            console.note(note)
        if pareto:
            console.print_pareto(results.pareto(), has_slo=bool(results.slo))
    if not recs:
        raise typer.Exit(1)


def _with_launch(rec, scenario: dict) -> dict:
    """A recommendation as ``best --json`` prints it: with the commands that deploy it."""
    from autotune.deploy import engine_of, plan_for

    return {**rec.to_dict(), "engine": engine_of(rec),
            "launch": plan_for(rec, scenario).to_dict()}


def _results(storage: str, study: str | None, *, write: bool = False):
    """The study's Results (UserError: no database, no studies, no such study); the database
    is opened read-only unless the command ``write``s to it."""
    from autotune.recommend import Results
    from autotune.study import open_storage

    db = open_storage(storage, create=False, write=write)
    return db, Results(db.store, _pick_study(db, study))


def _pick_study(db, study: str | None) -> str:
    """The named study, or the one searched last when no name is given."""
    if study:
        return study
    names = db.store.study_names()
    if not names:
        raise UserError(f"no studies in {db.safe_url} (run `autotune search` first)")
    last = db.store.last_used_study()
    if last is None:
        raise UserError(f"no study in {db.safe_url} has a trial yet ({', '.join(names)}); "
                        "run `autotune search`, or name one with --study")
    return last


@app.command()
@handles_errors
def estimate(
    model: Model,
    gpu: Gpu,
    isl: Isl,
    osl: Osl,
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel GPUs per replica.")] = 1,
    pp: Annotated[int, typer.Option("--pp", min=1, help="Pipeline stages per replica.")] = 1,
    dp: Annotated[int, typer.Option("--dp", min=1, help="Replicas.")] = 1,
    ep: Annotated[int, typer.Option(
        "--ep", min=1, help="MoE models: expert-parallel GPUs of each stage's tp (MoE TP = "
        "tp / ep).")] = 1,
    attention_dp: Annotated[bool, typer.Option(
        "--attention-dp/--no-attention-dp", metavar=FLAG,
        help="MoE models: attention data-parallel over the tp GPUs.")] = False,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size")] = 2048,
    max_num_tokens: Annotated[int, typer.Option("--max-num-tokens")] = 8192,
    kv_fraction: Annotated[float, typer.Option(
        "--kv-fraction", help="Share of free GPU memory for the KV cache.")] = 0.90,
    chunked_prefill: Annotated[bool, typer.Option(
        "--chunked-prefill/--no-chunked-prefill", metavar=FLAG)] = True,
    concurrency: Annotated[str, typer.Option(
        "--concurrency", help="Requests in flight, or 'max' (all at once).")] = "1",
    num_gpus: Annotated[int | None, typer.Option(
        "--num-gpus", help="GPUs in all (default tp*pp*dp).")] = None,
    nodes: Nodes = None,
    gpus_per_node: GpusPerNode = None,
    fabric: Fabric = None,
    precision: Precision = None,
    slo: Slo = None,
    engine: Annotated[str, typer.Option(
        "--engine", help="Serving engine whose fitted constants apply: trtllm, vllm, sglang.")
    ] = "trtllm",
    profile: ProfileName = None,
    storage: Storage = DEFAULT_STORAGE,
    json_out: Json = False,
):
    """Estimate one configuration at one load with the built-in model (no search)."""
    from autotune import console
    from autotune.config import EngineConfig
    from autotune.errors import OutOfMemory, TrialFailure
    from autotune.model import ENGINES, Simulator
    from autotune.recommend import slo_terms
    from autotune.scenario import Scenario

    if engine not in ENGINES:
        raise UserError(f"unknown --engine {engine!r}: use one of {', '.join(ENGINES)}")
    load = _concurrency(concurrency)
    gpus = num_gpus if num_gpus is not None or nodes is not None else tp * pp * dp
    prof = None
    if profile:
        from autotune.profile import load_profile
        from autotune.study import open_storage

        prof = load_profile(open_storage(storage, create=False).store, profile)
    scen = Scenario.build(model=model, gpu=gpu, num_gpus=gpus, nodes=nodes,
                          gpus_per_node=gpus_per_node, fabric=fabric, precision=precision,
                          isl=isl, osl=osl, slo=slo, profile=prof)
    if tp * pp * dp > scen.num_gpus:
        raise UserError(f"tp*pp*dp = {tp * pp * dp} GPUs but --num-gpus is {scen.num_gpus}")
    config = EngineConfig(tp=tp, pp=pp, dp=dp, max_batch_size=max_batch_size,
                          max_num_tokens=max_num_tokens, kv_fraction=kv_fraction,
                          chunked_prefill=chunked_prefill, precision=scen.precision, ep=ep,
                          attention_dp=attention_dp)
    try:
        m = Simulator(scen.model, scen.gpu, scen.calibration, engine=engine).measure(
            config, scen.workload, [load])
    except OutOfMemory as exc:
        if json_out:
            console.print_json({"config": config.to_dict(), "feasible": False,
                                 "failure_class": exc.failure_class, "reason": str(exc)})
        else:
            console.error(f"{config.label()} does not fit: {exc}")
        raise typer.Exit(1) from None
    except TrialFailure as exc:  # invalid layout: the user asked for something impossible
        raise UserError(f"{config.label()}: {exc}") from None
    (point,) = m.load_points
    terms = slo_terms(scen.slo, point)
    if json_out:
        console.print_json({
            "config": config.to_dict(), "feasible": True, "model": scen.model.name,
            "gpu": scen.gpu.name, "workload": scen.workload.to_dict(),
            "max_requests_in_flight": m.max_requests_in_flight, **point.to_dict(),
            "slo": [t.to_dict() for t in terms],
        })
        return
    console.print_estimate(config, point, m.max_requests_in_flight, terms)


@app.command()
@handles_errors
def studies(storage: Storage = DEFAULT_STORAGE, json_out: Json = False):
    """The studies in the database, with trial counts and best value."""
    from autotune import console
    from autotune.study import open_storage

    db = open_storage(storage, create=False)
    summaries = db.store.studies()
    if json_out:
        console.print_json([{
            "study": s.name, "scenario": s.scenario, "created_at": s.created_at.isoformat(),
            "trials": s.trials, "feasible": s.feasible, "failed": s.failed,
            "best_output_tok_s_per_gpu": s.best_objective} for s in summaries])
        return
    console.print_studies(summaries, db.safe_url)


@app.command()
@handles_errors
def probe(
    name: Annotated[str, typer.Option("--name", help="Name to store the profile under.")],
    storage: Storage = DEFAULT_STORAGE,
    gpu: Annotated[str | None, typer.Option(
        "--gpu", help="Catalog GPU this node has (recorded with the profile).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", metavar=FLAG, help="Fewer sizes and repeats.")] = False,
    hosts: Annotated[str | None, typer.Option(
        "--hosts", help="Also measure the fabric between the first two of these nodes "
        "(h1,h2,...; 'slurm': the Slurm job's nodes), one process on each.")] = None,
    launcher: Annotated[str, typer.Option(
        "--launcher", help="How the fabric probe reaches the nodes: srun or mpirun.")] = "srun",
    json_out: Json = False,
):
    """Measure this machine with PyTorch (matmul, memory, all-reduce) and store a profile;
    with --hosts, the fabric between two nodes too."""
    from autotune import console
    from autotune.probe import probe as run_probe
    from autotune.probe import require_torch
    from autotune.profile import Profile
    from autotune.specs import load_gpu
    from autotune.study import open_storage

    require_torch()
    if gpu:
        load_gpu(gpu)  # a typo is a user error before anything runs
    nodes: tuple[str, ...] = ()
    if hosts is not None:
        from autotune.runners._launch import check_launcher, resolve_hosts

        if check_launcher(launcher)[1] is None:
            raise UserError("the fabric probe reaches other nodes with --launcher srun or mpirun")
        nodes = resolve_hosts(None if hosts == "slurm" else hosts, 2)
    db = open_storage(storage, create=True)
    with console.err.status("probing…") as status:
        hw = run_probe(name, quick=quick, progress=lambda msg: status.update(f"probing: {msg}"),
                       hosts=nodes, launcher=launcher)
    prof = Profile(name=name, gpu=gpu, hardware=hw, source="probe")
    db.store.save_profile(name, prof.to_dict())
    if json_out:
        console.print_json(prof.to_dict())
    else:
        console.print_probe(hw, db.safe_url)


@app.command()
@handles_errors
def report(
    out: Annotated[str, typer.Option("--out", help="HTML file to write (self-contained: opens "
                                     "offline).")] = "report.html",
    png: Annotated[str | None, typer.Option(
        "--png", help="Also write each figure as DIR/<figure>.png.")] = None,
    storage: Storage = DEFAULT_STORAGE,
    study: NewestStudy = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Configs in the best-configs "
                                     "table.")] = 5,
    force: Force = False,
    json_out: Json = False,
):
    """Write a report page: Pareto front, load curves, TP x PP grid, progress, failures."""
    from autotune import console
    from autotune.atomic import check_folder, check_out_file
    from autotune.report import FIGURES, require_matplotlib, write_report

    target = check_out_file(out, force=force)
    png_dir = check_folder(png, "--png") if png else None
    require_matplotlib()
    db, results = _results(storage, study)
    with console.steps(len(FIGURES) + 2, "report", enabled=not json_out) as advance:
        figures = write_report(results, target, png_dir=png_dir, top=top, storage=db.safe_url,
                               advance=advance)
    pngs = [str(png_dir / f"{f.name}.png") for f in figures] if png_dir else []
    if json_out:
        console.print_json({"study": results.study_name, "report": str(target), "png": pngs,
                            "figures": [{"name": f.name, "title": f.title,
                                         "caption": f.caption} for f in figures]})
        return
    console.wrote("report", target, f"study {results.study_name}, {len(figures)} figures")
    if png_dir:
        console.wrote("figures", png_dir, ", ".join(p.rsplit("/", 1)[-1] for p in pngs))


@app.command()
@handles_errors
def export(
    out: Annotated[str, typer.Option("--out", help="File to write.")],
    fmt: Annotated[str | None, typer.Option(
        "--format", help="csv, parquet or json (default: from --out's suffix, else csv).")] = None,
    storage: Storage = DEFAULT_STORAGE,
    study: NewestStudy = None,
    force: Force = False,
    json_out: Json = False,
):
    """Write every measurement as a table: one row per load point with config and metrics."""
    from autotune import console
    from autotune.atomic import check_out_file, write_file
    from autotune.export import check_format, format_from_suffix, load_point_frame, writer

    name = check_format(fmt if fmt is not None else (format_from_suffix(out) or "csv"))
    target = check_out_file(out, force=force)
    _, results = _results(storage, study)
    with console.steps(2, "export", enabled=not json_out) as advance:
        advance("reading the study")
        frame = load_point_frame(results)
        advance(f"writing {target}")
        write_file(target, writer(frame, name))
    summary = {"study": results.study_name, "out": str(target), "format": name,
               "rows": len(frame), "measurements": int(frame["measurement_id"].nunique()),
               "columns": list(frame.columns)}
    if json_out:
        console.print_json(summary)
        return
    console.wrote(name, target, f"{summary['rows']} rows ({summary['measurements']} "
                  f"measurements) from study {results.study_name}")


@app.command()
@handles_errors
def deploy(
    out: Annotated[str, typer.Option("--out", help="Folder to write the files into.")] = "deploy",
    storage: Storage = DEFAULT_STORAGE,
    study: NewestStudy = None,
    trial: Annotated[int | None, typer.Option(
        "--trial", help="Deploy this trial's config instead of the recommendation.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", metavar=FLAG,
        help="Replace autotune's files in an existing, non-empty --out.")] = False,
    engine: Annotated[str | None, typer.Option(
        "--engine", help="trtllm or vllm (default: the engine the study measured on; "
        "trtllm for the built-in model).")] = None,
    json_out: Json = False,
):
    """Write the recommended config as files to deploy and re-measure it.

    For TensorRT-LLM: serve.sh (trtllm-serve), its extra_llm_api_options.yaml, bench.sh
    (trtllm-bench re-measures it); for vLLM: serve.sh (vllm serve), vllm-config.yaml, bench.sh
    (vllm bench serve); and config.json and README.txt; over several nodes also slurm.sbatch
    and lws.yaml (a Kubernetes LeaderWorkerSet).

    Exits 1 when no config meets the SLO (it names the closest; --trial deploys one anyway)."""
    from autotune import console
    from autotune.atomic import check_out_dir
    from autotune.deploy import DEPLOY_FILES, ENGINES, write_deploy

    if engine is not None and engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is unknown: use {' or '.join(ENGINES)}")
    target = check_out_dir(out, names=DEPLOY_FILES, force=force)
    _, results = _results(storage, study)
    if trial is not None:
        rec = results.trial(trial)
    else:
        recs = results.best(1)
        if not recs:
            closest = results.closest()
            hint = (f"; the closest is trial {closest.trial_number} ({closest.config.label()}): "
                    f"--trial {closest.trial_number} deploys it anyway" if closest else "")
            console.error(f"no configuration of study {results.study_name!r} meets the SLO "
                          f"{results.slo}{hint}")
            raise typer.Exit(1)
        rec = recs[0]
    files = write_deploy(target, rec, results.scenario, results.study_name, force=force,
                         recommended=trial is None, engine=engine)
    if json_out:
        console.print_json({"study": results.study_name, "out": str(target),
                            "files": sorted(files),
                            "recommendation": _with_launch(rec, results.scenario)})
        return
    console.wrote("deploy folder", target, f"{rec.config.label()} (trial {rec.trial_number})")
    console.out.print(f"serve it:     {target / 'serve.sh'}", markup=False, soft_wrap=True)
    console.out.print(f"re-measure:   {target / 'bench.sh'}", markup=False, soft_wrap=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handles_errors
def workers(
    ctx: typer.Context,
    out: Annotated[str, typer.Option("--out", help="Folder to write the files into.")
                   ] = "workers",
    count: Annotated[int, typer.Option("--workers", min=1, help="Workers (array tasks, pods).")
                     ] = 4,
    gpus_per_worker: Annotated[int, typer.Option(
        "--gpus-per-worker", min=1, help="GPUs each worker measures on (one node's).")] = 8,
    image: Annotated[str, typer.Option(
        "--image", help="Kubernetes: the container image with autotune and the engine.")
    ] = "autotune:latest",
    secret: Annotated[str, typer.Option(
        "--secret", help="Kubernetes: the Secret whose key 'url' is the database URL.")
    ] = "autotune-db",
    force: Annotated[bool, typer.Option(
        "--force", metavar=FLAG,
        help="Replace autotune's files in an existing, non-empty --out.")] = False,
):
    """Write a Slurm job array and a Kubernetes Job that run workers of one study on a cluster.

    Everything after the options is the workers' `autotune search` options, e.g.
    `autotune workers --workers 8 -- --model llama-3.1-70b --gpu h100 --isl 1024 --osl 256
    --trials 200 --study llama70b --runner trtllm --model-path /models/70b`. The database
    comes from AUTOTUNE_STORAGE (PostgreSQL), never from the files."""
    from autotune import console
    from autotune.atomic import check_out_dir, write_folder
    from autotune.cluster import CLUSTER_FILES, k8s_job, readme, slurm_array

    args = [a for a in ctx.args if a != "--"]
    if not args:
        raise UserError("give the workers' search options after --, e.g. -- --model "
                        "llama-3.1-70b --gpu h100 --isl 1024 --osl 256 --trials 200")
    search_cmd = typer.main.get_command(app).commands["search"]
    try:
        parsed = search_cmd.make_context("search", list(args), resilient_parsing=False).params
    except typer.TyperException as exc:  # click's errors, as typer ships it
        raise UserError(f"the workers' search options: {exc.format_message()}") from None
    if "--storage" in args or any(a.startswith("--storage=") for a in args):
        raise UserError("the workers read the database from AUTOTUNE_STORAGE (a Slurm "
                        "environment variable, a Kubernetes Secret): leave --storage out, so "
                        "no password is written into the files")
    if parsed.get("seed") is not None:
        raise UserError("--seed in the search options would give every worker the same "
                        "sampler: leave it out (the study's plan is shared all the same)")
    if parsed.get("workers", 1) != 1:
        raise UserError("--workers in the search options: each array task or pod is one "
                        "worker; set their number with this command's --workers")
    target = check_out_dir(out, names=CLUSTER_FILES, force=force)
    files = {
        "workers.sbatch": (slurm_array(args, count, gpus_per_worker).encode(), 0o755),
        "workers-job.yaml": (k8s_job(args, count, gpus_per_worker, image, secret).encode(),
                             0o644),
        "README.txt": (readme(args, count, secret).encode(), 0o644),
    }
    write_folder(target, files)
    console.wrote("cluster workers", target, f"{count} workers: workers.sbatch, "
                  "workers-job.yaml")


@app.command()
@handles_errors
def doctor(
    runner: Annotated[str, typer.Option(
        "--runner", help="The runner to check the node for: trtllm or vllm.")] = "trtllm",
    trtllm_bench: Annotated[str | None, typer.Option(
        "--trtllm-bench", help="Path to the trtllm-bench executable (default: on PATH).")] = None,
    vllm: Annotated[str | None, typer.Option(
        "--vllm", help="Path to the vllm executable (default: on PATH).")] = None,
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="Local checkpoint folder to check.")] = None,
    workspace: Annotated[str, typer.Option(
        "--workspace", help="Folder for datasets, engines, reports, logs.")] = "autotune-workspace",
    storage: Storage = DEFAULT_STORAGE,
    min_free_gb: Annotated[float, typer.Option(
        "--min-free-gb", help="Free GiB the workspace needs.")] = 50.0,
    json_out: Json = False,
):
    """Check that this node is ready for `search --runner trtllm|vllm` (exit 0) or not (exit 1).

    One line each: trtllm-bench or vllm and its version, GPUs, the model, workspace disk, the
    database."""
    from autotune import console
    from autotune.doctor import print_checks, ready, run_checks, verdict

    checks = run_checks(runner=runner, trtllm_bench=trtllm_bench, vllm=vllm,
                        model_path=model_path, workspace=workspace, storage=storage,
                        min_free_gib=min_free_gb)
    if json_out:
        console.print_json({"ready": ready(checks), "verdict": verdict(checks),
                            "checks": [c.to_dict() for c in checks]})
    else:
        print_checks(checks)
    if not ready(checks):
        raise typer.Exit(1)


@app.command()
@handles_errors
def calibrate(
    study: NewestStudy = None,
    storage: Storage = DEFAULT_STORAGE,
    name: Annotated[str | None, typer.Option(
        "--name", help="Profile to save the fitted constants as (default: <study>-calibrated).")
    ] = None,
    json_out: Json = False,
):
    """Fit the built-in model's constants to a study's measurements and save them as a profile."""
    from autotune import console
    from autotune.calibrate import fit, observations_of, require_scipy
    from autotune.model import load_calibration
    from autotune.profile import Profile, load_profile
    from autotune.scenario import Scenario

    require_scipy()
    db, results = _results(storage, study, write=True)  # it stores the fitted profile
    study = results.study_name
    scen = Scenario.from_identity(results.scenario)
    used = results.scenario.get("profile")  # the study's model already had a profile
    start = (load_profile(db.store, used).apply(scen.gpu, scen.precision)[1] if used
             else load_calibration(scen.gpu.name, scen.precision))
    observations = observations_of(results.measurements)
    if not observations:
        raise UserError(f"study {study!r} has no measured configurations to calibrate on")
    with console.err.status("fitting…") as status:
        result = fit(scen, observations, start,
                     progress=lambda n: status.update(f"fitting: {n} model evaluations"))
    profile_name = name or f"{study}-calibrated"
    db.store.save_profile(profile_name, Profile(
        name=profile_name, gpu=scen.gpu.name, calibration=result.after,
        source=f"calibrate --study {study}").to_dict())
    if json_out:
        console.print_json({"study": study, "profile": profile_name, **result.to_dict()})
    else:
        console.print_calibration(result, profile_name, db.safe_url)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
