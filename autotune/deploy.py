"""The deploy folder of a recommendation, for the engine it was measured on: ``serve.sh`` (one
server per replica: ``trtllm-serve`` with its LLM-API YAML, or ``vllm serve`` with its
``--config`` YAML), ``bench.sh`` (re-measures it with the benchmark command line the runner
uses), ``config.json`` and a README. The command lines come from each runner's one builder
(``autotune.runners.trtllm.argv``, ``autotune.runners.vllm.argv``); a study of the built-in
model deploys on TensorRT-LLM unless asked for vLLM."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

import yaml

from autotune import deploy_nodes
from autotune.config import EngineConfig
from autotune.deploy_nodes import with_model_var
from autotune.measurement import BENCH_REQUESTS, MAX_CONCURRENCY, load_label, replica_load
from autotune.recommend import Recommendation
from autotune.runners.trtllm.argv import (
    BASE_PORT,
    NEWEST,
    OPTIONS_FILE,
    launch_prefix,
    llm_api_options,
    prepare_dataset_argv,
    serve_argv,
    throughput_argv,
)
from autotune.runners.trtllm.releases import Release, Version
from autotune.runners.vllm import argv as vllm_cmd
from autotune.specs import Workload

#: The engines a deploy folder can be written for.
ENGINES = ("trtllm", "vllm")


@dataclass(frozen=True)
class LaunchPlan:
    """One server per replica (argv + the GPUs it owns) and the YAML they share."""

    commands: tuple[tuple[str, ...], ...]
    gpus: tuple[tuple[int, ...], ...]  # CUDA device indices per replica
    ports: tuple[int, ...]
    options_yaml: str
    options_file: str = OPTIONS_FILE

    def shell_lines(self) -> list[str]:
        """Copy-pasteable lines (quoted with shlex; each replica in the background if dp>1)."""
        lines = []
        many = len(self.commands) > 1
        for argv, gpus in zip(self.commands, self.gpus):
            env = f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} " if many else ""
            lines.append(env + shlex.join(argv) + (" &" if many else ""))
        return lines

    def to_dict(self) -> dict:
        return {"commands": [list(c) for c in self.commands], "gpus": [list(g) for g in self.gpus],
                "ports": list(self.ports), "options_file": self.options_file,
                "options_yaml": self.options_yaml}


def measured_release(runner_settings: dict | None) -> Release:
    """The TensorRT-LLM release a recommendation was measured on (its runner settings' version;
    the newest behaviour when unknown, as for the sim)."""
    return Release(Version.parse((runner_settings or {}).get("trtllm_version")))


def launch_plan(config: EngineConfig, model: str, release: Release = NEWEST) -> LaunchPlan:
    """Commands that deploy ``config``: dp replicas of tp*pp GPUs each, on consecutive ports."""
    per = config.gpus_per_replica
    gpus = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(config.dp))
    ports = tuple(BASE_PORT + i for i in range(config.dp))
    return LaunchPlan(
        commands=tuple(tuple(serve_argv(config, model, port=p)) for p in ports), gpus=gpus,
        ports=ports,
        options_yaml=yaml.safe_dump(llm_api_options(config, release=release), sort_keys=False),
    )


def engine_of(rec: Recommendation, engine: str | None = None) -> str:
    """The engine to deploy ``rec`` on: ``engine`` when given, else the one it was measured on
    (TensorRT-LLM for the built-in model's predictions)."""
    if engine is not None:
        if engine not in ENGINES:
            from autotune.errors import UserError

            raise UserError(f"--engine {engine!r} is unknown: use {' or '.join(ENGINES)}")
        return engine
    return "vllm" if rec.runner == "vllm" else "trtllm"


def vllm_engine_args(config: EngineConfig, scenario: dict, measured: dict | None) -> dict:
    """``vllm serve`` engine arguments of one replica: as the vllm runner measured them (its
    settings' quantization and eager mode) or, for a study measured otherwise, the study's
    precision as vLLM makes it from the served checkpoint."""
    measured = measured or {}
    workload = Workload.from_dict(scenario["workload"])
    if measured.get("runner") == "vllm":
        quant, kv = measured.get("quantization"), measured.get("kv_cache_dtype")
    elif config.precision == "fp8":
        # A published FP8 checkpoint carries its quantization; a BF16 one is quantized on load.
        fp8_ckpt = bool(scenario.get("model_spec", {}).get("fp8_hf_name"))
        quant, kv = (None if fp8_ckpt else "fp8"), "fp8"
    else:
        quant, kv = None, None
    return vllm_cmd.engine_args(config, max_model_len=workload.max_seq_len, quantization=quant,
                                kv_cache_dtype=kv, eager=bool(measured.get("eager")))


def served_name(scenario: dict, model: str) -> str:
    """The name clients ask a deployed vLLM for: the catalog name of the study's model (e.g.
    ``llama-3.1-70b``), else the checkpoint's folder or Hugging Face name's last part."""
    name = str(scenario.get("model") or "")
    if name and "/" not in name and not name.endswith(".json"):
        return name
    return model.rstrip("/").rsplit("/", 1)[-1] or "model"


def vllm_launch_plan(config: EngineConfig, model: str, scenario: dict,
                     measured: dict | None = None) -> LaunchPlan:
    """``vllm serve`` per replica (separate servers, as the vllm runner measured them), each
    reading the engine arguments from one ``--config`` YAML."""
    per = config.gpus_per_replica
    gpus = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(config.dp))
    ports = tuple(vllm_cmd.BASE_PORT + i for i in range(config.dp))
    args = vllm_engine_args(config, scenario, measured)
    served = served_name(scenario, model)
    return LaunchPlan(
        commands=tuple(tuple(vllm_cmd.serve_argv(model, args, vllm="vllm", host="0.0.0.0",
                                                 port=p, served_name=served,
                                                 config_file=vllm_cmd.CONFIG_FILE))
                       for p in ports),
        gpus=gpus, ports=ports, options_yaml=yaml.safe_dump(args, sort_keys=False),
        options_file=vllm_cmd.CONFIG_FILE,
    )


def plan_for(rec: Recommendation, scenario: dict, engine: str | None = None) -> LaunchPlan:
    """The commands that deploy ``rec`` on ``engine`` (default: the one it was measured on)."""
    model = model_ref(scenario, rec.runner_settings)
    if engine_of(rec, engine) == "vllm":
        return vllm_launch_plan(rec.config, model, scenario, rec.runner_settings)
    return launch_plan(rec.config, model, measured_release(rec.runner_settings))


# ---- re-measuring ----------------------------------------------------------------------------
#: Files of the deploy folder (``autotune deploy``); one options file per engine.
SERVE_SCRIPT, BENCH_SCRIPT, CONFIG_JSON, README_TXT = "serve.sh", "bench.sh", "config.json", \
    "README.txt"
DEPLOY_FILES = (SERVE_SCRIPT, OPTIONS_FILE, vllm_cmd.CONFIG_FILE, BENCH_SCRIPT, CONFIG_JSON,
                README_TXT, deploy_nodes.SBATCH, deploy_nodes.LWS)
VLLM_RESULT_FILE = "bench_result.json"
DATASET_FILE, REPORT_FILE, REQUESTS_FILE = "dataset.jsonl", "bench_report.json", \
    "bench_requests.json"


def bench_argvs(config: EngineConfig, model: str, workload: Workload, concurrency: int,
                release: Release = NEWEST, warmup: int = 2,
                gpus_per_node: int | None = None) -> tuple[list[str], list[str]]:
    """``bench.sh``'s two commands: ``trtllm-bench prepare-dataset`` with the study's lengths,
    then ``trtllm-bench throughput`` on ONE replica at ``concurrency`` (over all replicas)
    spread over ``config.dp``: replicas serve independent requests, so one replica at
    concurrency/dp measures the per-GPU throughput and the latencies of the whole deployment.
    The same command line and request count as the trtllm runner's, streaming included, so
    the report has TTFT and TPOT. A replica over several nodes of ``gpus_per_node`` GPUs runs
    as one MPI world under srun (inside the job's allocation), as the runner runs it."""
    per_replica = replica_load(concurrency, config.dp)
    n = BENCH_REQUESTS.requests(per_replica)
    prepare = prepare_dataset_argv(model, workload, n, DATASET_FILE)
    bench = throughput_argv(config, bench="trtllm-bench", model=model, concurrency=per_replica,
                            num_requests=n, dataset=DATASET_FILE, options_file=OPTIONS_FILE,
                            report=REPORT_FILE, requests=REQUESTS_FILE, release=release,
                            warmup=warmup)
    world = config.gpus_per_replica
    if gpus_per_node and world > gpus_per_node:
        bench = [*launch_prefix("srun", world, nodes=world // gpus_per_node,
                                ranks_per_node=gpus_per_node), *bench]
    return prepare, bench


def _comments(lines: list[str]) -> list[str]:
    return ["# " + " ".join(line.split()) for line in lines]  # one line each, whatever they hold


def serve_script(plan: LaunchPlan, model: str, header: list[str]) -> str:
    """``serve.sh``: every replica of the plan; MODEL may be overridden from the environment."""
    many = len(plan.commands) > 1
    lines = ["#!/usr/bin/env bash", *_comments(header),
             "set -euo pipefail", 'cd "$(dirname "$0")"',
             f"MODEL=${{MODEL:-{shlex.quote(model)}}}"]
    if many:  # Ctrl-C stops every replica
        lines.append("trap 'kill 0' INT TERM")
    for argv, gpus in zip(plan.commands, plan.gpus):
        cmd = with_model_var(argv, model)
        if many:
            lines.append(f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} {cmd} &")
        else:
            lines.append(f"exec {cmd}")
    if many:
        lines += [(f"# {len(plan.commands)} replicas on ports "
                   f"{', '.join(map(str, plan.ports))}: put a load balancer in front."), "wait"]
    return "\n".join(lines) + "\n"


def bench_script(config: EngineConfig, model: str, workload: Workload, concurrency: int,
                 header: list[str], release: Release = NEWEST, warmup: int = 2,
                 gpus_per_node: int | None = None) -> str:
    """``bench.sh``: prepare a dataset with the study's lengths, then re-measure one replica at
    the recommended load with ``trtllm-bench`` (see ``bench_argvs``)."""
    prepare, bench = bench_argvs(config, model, workload, concurrency, release, warmup,
                                 gpus_per_node)
    gpus = ",".join(map(str, range(config.gpus_per_replica)))
    # Over several nodes srun runs it (bench_argvs) and Slurm gives each rank its GPUs.
    spans = bool(gpus_per_node) and config.gpus_per_replica > gpus_per_node
    devices = [] if spans else [f"export CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-{gpus}}}"]
    probe = with_model_var(prepare[:prepare.index("prepare-dataset") + 1] + ["--help"], model)
    # `trtllm-bench prepare-dataset` came with TensorRT-LLM 1.3 (PR #9250); before it, the
    # repository's benchmarks/cpp/prepare_dataset.py makes the same file.
    missing = (f"bench.sh: this TensorRT-LLM has no 'trtllm-bench prepare-dataset' (1.3 on): "
               f"write {DATASET_FILE} with TensorRT-LLM's benchmarks/cpp/prepare_dataset.py "
               f"token-norm-dist (input mean {workload.isl}, output mean {workload.osl}), then "
               "run bench.sh again")
    return "\n".join([
        "#!/usr/bin/env bash", *_comments(header),
        "set -euo pipefail", 'cd "$(dirname "$0")"',
        f"MODEL=${{MODEL:-{shlex.quote(model)}}}",
        *devices,
        f"if [ ! -s {DATASET_FILE} ]; then",
        f"  {probe} >/dev/null 2>&1 || {{ echo {shlex.quote(missing)} >&2; exit 1; }}",
        f"  {with_model_var(prepare, model)}",
        "fi",
        with_model_var(bench, model), "",
    ])


def vllm_bench_script(config: EngineConfig, model: str, served: str, workload: Workload,
                      concurrency: int, header: list[str], warmup: int = 4) -> str:
    """``bench.sh`` for vLLM: waits for replica 0 of ``serve.sh`` to be healthy, then
    re-measures it with ``vllm bench serve`` (see ``vllm_bench_argv``)."""
    per_replica = replica_load(concurrency, config.dp)
    bench = vllm_cmd.bench_argv(
        workload, base_url=f"http://127.0.0.1:{vllm_cmd.BASE_PORT}", tokenizer=model,
        concurrency=per_replica, num_prompts=BENCH_REQUESTS.requests(per_replica),
        warmups=warmup, result_dir=".", result_file=VLLM_RESULT_FILE, served_name=served,
        vllm="vllm")
    url = f"http://127.0.0.1:{vllm_cmd.BASE_PORT}/health"
    return "\n".join([
        "#!/usr/bin/env bash", *_comments(header),
        "# Start ./serve.sh first: this measures its replica 0 on port "
        f"{vllm_cmd.BASE_PORT}.",
        "set -euo pipefail", 'cd "$(dirname "$0")"',
        f"MODEL=${{MODEL:-{shlex.quote(model)}}}",
        # Up to 30 minutes for the server to load (large checkpoints), then give up loudly.
        f"for _ in $(seq 360); do curl -sf {url} >/dev/null && break; sleep 5; done",
        f"curl -sf {url} >/dev/null || {{ echo 'bench.sh: no healthy vllm serve at {url} "
        "(start ./serve.sh first)' >&2; exit 1; }",
        with_model_var(bench, model), "",
    ])


def model_ref(scenario: dict, measured: dict | None = None) -> str:
    """The checkpoint a deployment serves a study's model from: the one the runner measured
    (``measured``: its settings: a local ``model_path``, else its ``model``), else the published
    checkpoint of the study's precision (an FP8 one for fp8, where the catalog knows it), else
    the model's Hugging Face name, else the study's model name."""
    measured = measured or {}
    if measured.get("model_path") or measured.get("model"):
        return measured.get("model_path") or measured["model"]
    spec = scenario.get("model_spec", {})
    if scenario.get("precision") == "fp8" and spec.get("fp8_hf_name"):
        return spec["fp8_hf_name"]
    return spec.get("hf_name") or scenario["model"]


def checkpoint_note(scenario: dict, measured: dict | None = None) -> str | None:
    """A warning when the served checkpoint may not match the study's precision (None: it
    does, or it is the one the runner measured): an fp8/fp4 config needs a checkpoint
    quantized to that precision."""
    precision = scenario.get("precision")
    spec = scenario.get("model_spec", {})
    if measured and (measured.get("model_path") or measured.get("model")):
        return None
    if precision not in ("fp8", "fp4") or (precision == "fp8" and spec.get("fp8_hf_name")):
        return None
    return (f"the config runs {precision}: serve a checkpoint quantized to {precision} (set "
            f"MODEL, or pass its path); {model_ref(scenario)} is the model's own checkpoint")


def deploy_files(rec: Recommendation, scenario: dict, study: str, *,
                 recommended: bool = True, engine: str | None = None) -> dict[str, str]:
    """The deploy folder's files (name -> text) for ``rec`` of ``study`` on ``engine`` (default:
    the one it was measured on; ``recommended``: it is the study's recommendation, not a trial
    the user picked)."""
    config, p = rec.config, rec.point
    engine = engine_of(rec, engine)
    model = model_ref(scenario, rec.runner_settings)
    release = measured_release(rec.runner_settings)
    launch = plan_for(rec, scenario, engine)
    workload = Workload.from_dict(scenario["workload"])
    conc = load_label(p.concurrency, config.dp)
    per_replica = replica_load(p.concurrency, config.dp)
    per_rep = "max" if per_replica == MAX_CONCURRENCY else str(per_replica)
    slo = scenario.get("slo") or "none (maximum throughput)"
    header = [f"{config.label()} for {scenario.get('model')} on {config.gpus}x "
              f"{scenario.get('gpu')} ({config.precision}), "
              + ("recommended by autotune" if recommended else "picked from an autotune study"),
              (f"study {study}, trial {rec.trial_number}; SLO {slo}; measured at concurrency "
               f"{conc}: {p.output_throughput_per_gpu:,.1f} tok/s/GPU, "
               f"{p.output_throughput_per_user:,.1f} tok/s/user")]
    expected = {
        "concurrency": p.concurrency, "output_tok_s": p.output_throughput,
        "output_tok_s_per_gpu": p.output_throughput_per_gpu,
        "output_tok_s_per_user": p.output_throughput_per_user,
        "requests_per_s": p.request_throughput, "latency_ms": p.latency_ms,
    }
    config_json = {
        "schema": "autotune.deploy/1", "study": study, "trial": rec.trial_number,
        "measurement_id": rec.measurement_id, "runner": rec.runner, "model": model,
        "scenario": scenario, "config": config.to_dict(), "label": config.label(),
        "feasible": rec.feasible, "expected": expected, "slo": [t.to_dict() for t in rec.terms],
        "engine": engine, "launch": launch.to_dict(),
    }
    terms = "\n".join(f"  {t.term}: measured {t.measured_ms:,.1f} ms, margin {t.margin:+.1%}"
                      for t in rec.terms) or "  (no SLO: maximum throughput)"
    replicas = (f"{config.dp} replicas of TP{config.tp} x PP{config.pp}, on ports "
                f"{', '.join(map(str, launch.ports))} (put a load balancer in front)"
                if config.dp > 1 else f"one replica of TP{config.tp} x PP{config.pp}, port "
                f"{launch.ports[0]}")
    note = checkpoint_note(scenario, rec.runner_settings)
    quantized = f"  Note: {note}.\n" if note else ""
    warmup = int((rec.runner_settings or {}).get("warmup", 2 if engine == "trtllm" else 4))
    per_node = gpus_per_node(scenario)
    multi = deploy_nodes.spans_nodes(config, per_node)
    if multi:
        nodes = deploy_nodes.node_count(config, per_node)
        replicas = (f"{replicas} over {nodes} nodes of {per_node} GPUs: submit "
                    f"{deploy_nodes.SBATCH} to Slurm (serve.sh is the same script, for an "
                    f"allocation you hold), or apply {deploy_nodes.LWS} to Kubernetes")
    if engine == "vllm":
        files_txt = f"""  {SERVE_SCRIPT:<28}starts vllm serve: {replicas}
  {launch.options_file:<28}the engine arguments every `vllm serve --config` reads
  {BENCH_SCRIPT:<28}re-measures replica 0 with vllm bench serve (serve.sh running)
  {CONFIG_JSON:<28}the config, the scenario and the expected metrics"""
        pad = " " * 30
        remeasure = f"""  ./serve.sh & ./bench.sh     waits for replica 0, runs vllm bench serve at
{pad}concurrency {per_rep} (random prompts: isl {workload.isl}, osl
{pad}{workload.osl}) and writes {VLLM_RESULT_FILE}
  Replicas serve independent requests, so one replica at concurrency/dp shows the
  deployment's per-GPU throughput and latencies. Prefix caching is off, as measured;
  `enable-prefix-caching: true` helps real traffic that shares prompt prefixes."""
        bench = vllm_bench_script(config, model, served_name(scenario, model), workload,
                                  p.concurrency, header, warmup)
    else:
        files_txt = f"""  {SERVE_SCRIPT:<28}starts trtllm-serve: {replicas}
  {OPTIONS_FILE:<28}the LLM API options serve.sh and bench.sh pass
  {BENCH_SCRIPT:<28}re-measures the config with trtllm-bench (one replica)
  {CONFIG_JSON:<28}the config, the scenario and the expected metrics"""
        lengths = f"isl {workload.isl}, osl {workload.osl}"
        remeasure = f"""  ./bench.sh                  prepares {DATASET_FILE} ({lengths}),
                              runs trtllm-bench throughput on {config.gpus_per_replica} GPUs at
                              concurrency {per_rep} and writes {REPORT_FILE}
  Replicas serve independent requests, so one replica at concurrency/dp shows the
  deployment's per-GPU throughput and latencies. Older TensorRT-LLM releases without
  `trtllm-bench prepare-dataset` make the dataset with benchmarks/cpp/prepare_dataset.py."""
        bench = bench_script(config, model, workload, p.concurrency, header, release, warmup,
                             per_node)
    files = {}
    if multi:
        def sbatch(batch: bool) -> str:
            return deploy_nodes.sbatch_script(engine, config, per_node, launch.commands,
                                              launch.ports, model, header, batch=batch)

        files = {SERVE_SCRIPT: sbatch(False), deploy_nodes.SBATCH: sbatch(True),
                 deploy_nodes.LWS: deploy_nodes.lws_manifest(
                     engine, config, per_node, launch.commands[0], launch.ports[0],
                     launch.options_file, launch.options_yaml, model,
                     image=engine_image(rec, engine))}
        files_txt += (f"\n  {deploy_nodes.SBATCH:<28}the replicas on their nodes, for sbatch"
                      f"\n  {deploy_nodes.LWS:<28}a LeaderWorkerSet: a pod per node, the "
                      "options in a ConfigMap")
    readme = f"""{header[0]}
{header[1]}

Files
{files_txt}

Serve it
  ./serve.sh                  (MODEL=/path/to/checkpoint ./serve.sh for a local copy)
{quantized}
Re-measure it
{remeasure}

Expected (runner {rec.runner}, concurrency {conc} over all replicas)
  output tok/s          {p.output_throughput:,.1f}
  output tok/s per GPU  {p.output_throughput_per_gpu:,.1f}
  output tok/s per user {p.output_throughput_per_user:,.1f}
  TTFT p99              {p.latency_ms['ttft']['p99']:,.1f} ms
  TPOT p99              {p.latency_ms['tpot']['p99']:,.1f} ms
SLO {slo}
{terms}
"""
    return {
        SERVE_SCRIPT: serve_script(launch, model, header),
        launch.options_file: launch.options_yaml,
        BENCH_SCRIPT: bench,
        CONFIG_JSON: json.dumps(config_json, indent=2, default=str) + "\n",
        README_TXT: readme,
        **files,
    }


def gpus_per_node(scenario: dict) -> int:
    """GPUs per node of a study's system (8, an HGX node, for studies that do not say)."""
    return int((scenario.get("gpu_spec") or {}).get("gpus_per_node") or 8)


def engine_image(rec: Recommendation, engine: str) -> str | None:
    """The container image of the release a recommendation was measured on (None: unknown)."""
    settings = rec.runner_settings or {}
    if engine == "vllm" and settings.get("vllm_version") not in (None, "unknown"):
        return f"vllm/vllm-openai:v{settings['vllm_version']}"
    if engine == "trtllm" and settings.get("trtllm_version") not in (None, "unknown"):
        return f"nvcr.io/nvidia/tensorrt-llm/release:{settings['trtllm_version']}"
    return None


def write_deploy(out, rec: Recommendation, scenario: dict, study: str, *,
                 force: bool = False, recommended: bool = True,
                 engine: str | None = None) -> dict[str, str]:
    """Write the deploy folder ``out`` (all files or none); the files written (name -> text)."""
    from autotune.atomic import check_out_dir, write_folder

    out = check_out_dir(out, names=DEPLOY_FILES, force=force)
    files = deploy_files(rec, scenario, study, recommended=recommended, engine=engine)
    write_folder(out, {name: (text.encode(), 0o755 if name.endswith(".sh") else 0o644)
                       for name, text in files.items()})
    return files


__all__ = [
    "BENCH_SCRIPT", "DEPLOY_FILES", "ENGINES", "LaunchPlan", "bench_argvs", "bench_script",
    "checkpoint_note", "deploy_files", "engine_of", "launch_plan", "measured_release", "model_ref",
    "plan_for", "serve_script", "vllm_bench_script", "vllm_engine_args", "vllm_launch_plan",
    "write_deploy",
]
