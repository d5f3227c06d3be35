"""The ``autotune`` command line.

Heavy modules (optuna, pandas, the runners) are imported inside the commands so that
``autotune --help`` starts fast. Every ``UserError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import time
from typing import Annotated

import typer

from autotune.errors import UserError

app = typer.Typer(
    name="autotune", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Find the LLM serving configuration with the most throughput that meets a latency SLO.",
)

DEFAULT_STORAGE = "sqlite:///autotune.db"

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
    "--storage", help="SQLAlchemy URL of the study database (sqlite:///… or postgresql://…).")]
StudyName = Annotated[str | None, typer.Option(
    "--study", help="Study name (default: derived from model, GPUs, workload and SLO).")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ProfileName = Annotated[str | None, typer.Option(
    "--profile", help="Model with a profile from `probe`/`calibrate` stored in --storage.")]


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

    return wrapper


def _concurrency(value: str) -> int:
    from autotune.measurement import MAX_CONCURRENCY

    if value.strip().lower() == "max":
        return MAX_CONCURRENCY
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--concurrency must be a positive integer or 'max', got {value!r}") from None
    if n < 1:
        raise UserError(f"--concurrency must be a positive integer or 'max', got {value!r}")
    return n


def _runner_options(runner: str, **given) -> dict:
    """Runner-specific options the user set (a sim run refuses trtllm-only options)."""
    chosen = {k: v for k, v in given.items() if v is not None}
    if runner == "sim" and chosen:
        flags = ", ".join("--" + k.replace("_", "-") for k in chosen)
        raise UserError(f"{flags} only apply to --runner trtllm")
    return chosen


@app.command()
@handles_errors
def search(
    model: Model,
    gpu: Gpu,
    isl: Isl,
    osl: Osl,
    num_gpus: Annotated[int, typer.Option("--num-gpus", help="GPUs in the node.")] = 8,
    precision: Precision = None,
    slo: Slo = None,
    runner: Annotated[str, typer.Option(
        "--runner", help="sim (built-in model), trtllm, or a plug-in module:Class.")] = "sim",
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
    json_out: Json = False,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, help="Worker processes on this machine sharing the study.")] = 1,
    heartbeat: Annotated[int, typer.Option(
        "--heartbeat", help="Seconds between a running trial's heartbeats.")] = 30,
    grace: Annotated[int, typer.Option(
        "--grace", help="Seconds without a heartbeat before a trial counts as lost and is "
        "re-queued.")] = 120,
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="[trtllm] Local checkpoint folder.")] = None,
    hf_name: Annotated[str | None, typer.Option(
        "--hf-name", help="[trtllm] Hugging Face model name.")] = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="[trtllm] pytorch (default) or tensorrt.")] = None,
    workspace: Annotated[str | None, typer.Option(
        "--workspace", help="[trtllm] Folder for datasets, engines, reports, logs.")] = None,
    trtllm_bench: Annotated[str | None, typer.Option(
        "--trtllm-bench", help="[trtllm] Path to the trtllm-bench executable.")] = None,
    launcher: Annotated[str | None, typer.Option(
        "--launcher", help="[trtllm] local (default), mpirun or srun.")] = None,
    num_requests: Annotated[int | None, typer.Option(
        "--num-requests", help="[trtllm] Requests per load point.")] = None,
    run_timeout: Annotated[float | None, typer.Option(
        "--run-timeout", help="[trtllm] Seconds before a run counts as hung.")] = None,
    build_timeout: Annotated[float | None, typer.Option(
        "--build-timeout", help="[trtllm] Seconds before an engine build counts as hung.")] = None,
):
    """Search for the best configuration and record every trial in the database."""
    from autotune import console
    from autotune.recommend import Results
    from autotune.workers import SearchJob, run_here, run_workers

    job = SearchJob(
        model=model, gpu=gpu, num_gpus=num_gpus, isl=isl, osl=osl, precision=precision, slo=slo,
        runner=runner, space=space, storage=storage, study=study, seed=seed, trials=trials,
        timeout=timeout, heartbeat_s=heartbeat, grace_s=grace, profile=profile,
        runner_options=_runner_options(
            runner, model_path=model_path, hf_name=hf_name, backend=backend, workspace=workspace,
            trtllm_bench=trtllm_bench, launcher=launcher, num_requests=num_requests,
            run_timeout=run_timeout, build_timeout=build_timeout),
    )
    job.check()  # everything the user typed is checked before the database is touched
    tuner = job.tuner()  # opens the database and joins (or creates) the study
    db = tuner.storage
    resume = (f"resume with the same command (study {tuner.study_name!r} in {db.safe_url}); "
              "finished trials are kept")
    started = time.perf_counter()
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
    elapsed = time.perf_counter() - started

    results = Results(db.store, tuner.study_name)
    best = results.best(1)
    summary = {
        "study": tuner.study_name, "storage": db.safe_url, "trials": tuner.finished(),
        "statuses": results.counts(), "elapsed_s": round(elapsed, 3),
        "best": best[0].to_dict() if best else None,
    }
    if json_out:
        console.print_json(summary)
        return
    console.out.print(f"{summary['trials']} trials in {elapsed:.1f} s — study "
                      f"[bold]{tuner.study_name}[/] in {db.safe_url}")
    if best:
        rec = best[0]
        console.out.print(f"best: [bold]{rec.config.label()}[/] at concurrency "
                          f"{console.load_label(rec.point.concurrency)}: "
                          f"{rec.point.output_throughput_per_gpu:,.1f} tok/s/GPU, "
                          f"{rec.point.output_throughput_per_user:,.1f} tok/s/user")
        console.out.print("run `autotune best` for its metrics and launch command")
    else:
        console.out.print("no configuration met the SLO yet; `autotune best` shows the closest")


@app.command()
@handles_errors
def best(
    storage: Storage = DEFAULT_STORAGE,
    study: StudyName = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many configs to show.")] = 1,
    pareto: Annotated[bool, typer.Option("--pareto", help="Also show the Pareto front.")] = False,
    json_out: Json = False,
):
    """The best feasible configuration of a study, its metrics and how to launch it.

    Exits 1 when no trial meets the SLO (it then names the closest config)."""
    from autotune import console
    from autotune.recommend import SCHEMA, Results
    from autotune.study import open_storage

    db = open_storage(storage, create=False)
    name = _pick_study(db, study)
    results = Results(db.store, name)
    recs = results.best(top)
    closest = None if recs else results.closest()
    if json_out:
        console.print_json({
            "schema": SCHEMA, "study": name, "scenario": results.scenario,
            "statuses": results.counts(), "feasible": bool(recs),
            "best": [r.to_dict() for r in recs],
            "closest": closest.to_dict() if closest else None,
            "pareto": [{"config": c.to_dict(), "concurrency": p.concurrency,
                        "output_tok_s_per_gpu": p.output_throughput_per_gpu,
                        "output_tok_s_per_user": p.output_throughput_per_user}
                       for c, p in results.pareto()] if pareto else None,
        })
    else:
        console.print_best(results, recs, closest)
        if pareto:
            console.print_pareto(results.pareto())
    if not recs:
        raise typer.Exit(1)


def _pick_study(db, study: str | None) -> str:
    """The named study, or the only/most recent one when no name is given."""
    if study:
        return study
    names = db.store.study_names()
    if not names:
        raise UserError(f"no studies in {db.safe_url} (run `autotune search` first)")
    return names[-1]


@app.command()
@handles_errors
def estimate(
    model: Model,
    gpu: Gpu,
    isl: Isl,
    osl: Osl,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel GPUs per replica.")] = 1,
    pp: Annotated[int, typer.Option("--pp", help="Pipeline stages per replica.")] = 1,
    dp: Annotated[int, typer.Option("--dp", help="Replicas.")] = 1,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size")] = 2048,
    max_num_tokens: Annotated[int, typer.Option("--max-num-tokens")] = 8192,
    kv_fraction: Annotated[float, typer.Option(
        "--kv-fraction", help="Share of free GPU memory for the KV cache.")] = 0.90,
    chunked_prefill: Annotated[bool, typer.Option("--chunked-prefill/--no-chunked-prefill")] = True,
    concurrency: Annotated[str, typer.Option(
        "--concurrency", help="Requests in flight, or 'max' (all at once).")] = "1",
    num_gpus: Annotated[int | None, typer.Option(
        "--num-gpus", help="GPUs in the node (default tp*pp*dp).")] = None,
    precision: Precision = None,
    slo: Slo = None,
    profile: ProfileName = None,
    storage: Storage = DEFAULT_STORAGE,
    json_out: Json = False,
):
    """Estimate one configuration at one load with the built-in model (no search)."""
    from autotune import console
    from autotune.config import EngineConfig
    from autotune.errors import OutOfMemory, TrialFailure
    from autotune.recommend import slo_terms
    from autotune.runners.sim import SimRunner
    from autotune.scenario import Scenario

    load = _concurrency(concurrency)
    gpus = num_gpus if num_gpus is not None else tp * pp * dp
    if tp * pp * dp > gpus:
        raise UserError(f"tp*pp*dp = {tp * pp * dp} GPUs but --num-gpus is {gpus}")
    prof = None
    if profile:
        from autotune.profile import load_profile
        from autotune.study import open_storage

        prof = load_profile(open_storage(storage, create=False).store, profile)
    scen = Scenario.build(model=model, gpu=gpu, num_gpus=gpus, precision=precision, isl=isl,
                          osl=osl, slo=slo, profile=prof)
    config = EngineConfig(tp=tp, pp=pp, dp=dp, max_batch_size=max_batch_size,
                          max_num_tokens=max_num_tokens, kv_fraction=kv_fraction,
                          chunked_prefill=chunked_prefill, precision=scen.precision)
    try:
        m = SimRunner(scen).measure(config, scen.workload, [load])
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
    quick: Annotated[bool, typer.Option("--quick", help="Fewer sizes and repeats.")] = False,
    json_out: Json = False,
):
    """Measure this machine with PyTorch (matmul, memory, all-reduce) and store a profile."""
    from autotune import console
    from autotune.probe import probe as run_probe
    from autotune.probe import require_torch
    from autotune.profile import Profile
    from autotune.specs import load_gpu
    from autotune.study import open_storage

    require_torch()
    if gpu:
        load_gpu(gpu)  # a typo is a user error before anything runs
    db = open_storage(storage, create=True)
    with console.err.status("probing…") as status:
        hw = run_probe(name, quick=quick, progress=lambda msg: status.update(f"probing: {msg}"))
    prof = Profile(name=name, gpu=gpu, hardware=hw, source="probe")
    db.store.save_profile(name, prof.to_dict())
    if json_out:
        console.print_json(prof.to_dict())
    else:
        console.print_probe(hw, db.safe_url)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
