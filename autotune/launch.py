"""How to deploy a configuration: the ``trtllm-serve`` command lines and their LLM API YAML,
the ``trtllm-bench`` commands that re-measure it, and the deploy folder that holds them all."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from autotune.config import EngineConfig
from autotune.measurement import MAX_CONCURRENCY
from autotune.specs import Workload

if TYPE_CHECKING:
    from autotune.recommend import Recommendation

#: First port; replica i listens on BASE_PORT + i.
BASE_PORT = 8000
OPTIONS_FILE = "extra_llm_api_options.yaml"


@dataclass(frozen=True)
class LaunchPlan:
    """One ``trtllm-serve`` per replica (argv + the GPUs it owns) and the YAML they share."""

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


def llm_api_options(config: EngineConfig) -> dict:
    """The ``--extra_llm_api_options`` YAML content for ``config`` (LLM API field names)."""
    return {
        "enable_chunked_prefill": config.chunked_prefill,
        "kv_cache_config": {"free_gpu_memory_fraction": config.kv_fraction},
        # CUDA graphs up to the batch limit, padded, as NVIDIA's throughput recipes configure.
        "cuda_graph_config": {"enable_padding": True,
                              "max_batch_size": min(config.max_batch_size, 1024)},
    }


def serve_argv(config: EngineConfig, model: str, *, port: int = BASE_PORT,
               options_file: str = OPTIONS_FILE) -> tuple[str, ...]:
    """``trtllm-serve`` for one replica of ``config`` (an argv; never run through a shell)."""
    return (
        "trtllm-serve", model, "--backend", "pytorch",
        "--tp_size", str(config.tp), "--pp_size", str(config.pp),
        "--max_batch_size", str(config.max_batch_size),
        "--max_num_tokens", str(config.max_num_tokens),
        "--kv_cache_free_gpu_memory_fraction", f"{config.kv_fraction:g}",
        "--host", "0.0.0.0", "--port", str(port),
        "--extra_llm_api_options", options_file,
    )


def launch_plan(config: EngineConfig, model: str) -> LaunchPlan:
    """Commands that deploy ``config``: dp replicas of tp*pp GPUs each, on consecutive ports."""
    per = config.gpus_per_replica
    gpus = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(config.dp))
    ports = tuple(BASE_PORT + i for i in range(config.dp))
    return LaunchPlan(
        commands=tuple(serve_argv(config, model, port=p) for p in ports), gpus=gpus, ports=ports,
        options_yaml=yaml.safe_dump(llm_api_options(config), sort_keys=False),
    )


# ---- re-measuring with trtllm-bench --------------------------------------------------------
#: Files of the deploy folder (``autotune deploy``).
SERVE_SCRIPT, BENCH_SCRIPT, CONFIG_JSON, README_TXT = "serve.sh", "bench.sh", "config.json", \
    "README.txt"
DEPLOY_FILES = (SERVE_SCRIPT, OPTIONS_FILE, BENCH_SCRIPT, CONFIG_JSON, README_TXT)
DATASET_FILE, REPORT_FILE = "dataset.jsonl", "bench_report.json"


def replica_concurrency(config: EngineConfig, concurrency: int) -> int:
    """Requests in flight per replica when ``concurrency`` are spread over ``config.dp``
    replicas (``MAX_CONCURRENCY`` stays "all at once")."""
    if concurrency == MAX_CONCURRENCY:
        return MAX_CONCURRENCY
    return max(1, math.ceil(concurrency / config.dp))


def bench_num_requests(concurrency: int) -> int:
    """Requests for one ``trtllm-bench`` run: enough for a steady state at that load."""
    return 3000 if concurrency == MAX_CONCURRENCY else max(1000, 10 * concurrency)


def prepare_dataset_argv(model: str, workload: Workload, num_requests: int,
                         dataset: str = DATASET_FILE) -> tuple[str, ...]:
    """``trtllm-bench prepare-dataset``: synthetic requests with the study's lengths."""
    return (
        "trtllm-bench", "--model", model, "prepare-dataset", "--output", dataset,
        "token-norm-dist", "--num-requests", str(num_requests),
        "--input-mean", str(workload.isl), "--output-mean", str(workload.osl),
        "--input-stdev", f"{workload.isl_std:g}", "--output-stdev", f"{workload.osl_std:g}",
    )


def bench_argv(config: EngineConfig, model: str, concurrency: int, *, num_requests: int,
               dataset: str = DATASET_FILE, options_file: str = OPTIONS_FILE,
               report: str = REPORT_FILE, backend: str = "pytorch") -> tuple[str, ...]:
    """``trtllm-bench throughput`` for ONE replica of ``config`` (tp*pp GPUs) at
    ``concurrency`` requests in flight (``MAX_CONCURRENCY``: all at once, no flag).

    Replicas serve independent requests, so one replica at concurrency/dp measures the
    per-GPU throughput and the latencies of the whole deployment.
    """
    argv = [
        "trtllm-bench", "--model", model, "throughput", "--dataset", dataset,
        "--backend", backend, "--tp", str(config.tp), "--pp", str(config.pp),
        "--max_batch_size", str(config.max_batch_size),
        "--max_num_tokens", str(config.max_num_tokens),
        "--kv_cache_free_gpu_mem_fraction", f"{config.kv_fraction:g}",
        "--num_requests", str(num_requests), "--extra_llm_api_options", options_file,
        "--report_json", report,
    ]
    if concurrency != MAX_CONCURRENCY:
        argv[argv.index("--num_requests"):argv.index("--num_requests")] = [
            "--concurrency", str(concurrency)]
    return tuple(argv)


def _with_model_var(argv: tuple[str, ...], model: str) -> str:
    """``shlex.join(argv)`` with the model argument (``trtllm-serve MODEL``, ``--model MODEL``)
    written as ``"$MODEL"``, so a script's user can point it at a local checkpoint."""
    def is_model(i: int, arg: str) -> bool:
        return arg == model and ((i == 1 and argv[0] == "trtllm-serve") or argv[i - 1] == "--model")

    return " ".join('"$MODEL"' if is_model(i, a) else shlex.quote(a) for i, a in enumerate(argv))


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
        cmd = _with_model_var(argv, model)
        if many:
            lines.append(f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} {cmd} &")
        else:
            lines.append(f"exec {cmd}")
    if many:
        lines += [(f"# {len(plan.commands)} replicas on ports "
                   f"{', '.join(map(str, plan.ports))}: put a load balancer in front."), "wait"]
    return "\n".join(lines) + "\n"


def bench_script(config: EngineConfig, model: str, workload: Workload, concurrency: int,
                 header: list[str]) -> str:
    """``bench.sh``: prepare a dataset with the study's lengths, then re-measure one replica at
    the recommended load with ``trtllm-bench``."""
    per_replica = replica_concurrency(config, concurrency)
    n = bench_num_requests(per_replica)
    prepare = _with_model_var(prepare_dataset_argv(model, workload, n), model)
    bench = _with_model_var(bench_argv(config, model, per_replica, num_requests=n), model)
    gpus = ",".join(map(str, range(config.gpus_per_replica)))
    return "\n".join([
        "#!/usr/bin/env bash", *_comments(header),
        "set -euo pipefail", 'cd "$(dirname "$0")"',
        f"MODEL=${{MODEL:-{shlex.quote(model)}}}",
        f"export CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-{gpus}}}",
        f"[ -s {DATASET_FILE} ] || {prepare}",
        bench, "",
    ])


def deploy_files(rec: Recommendation, scenario: dict, study: str, *,
                 recommended: bool = True) -> dict[str, str]:
    """The deploy folder's files (name -> text) for ``rec`` of ``study`` (``recommended``:
    it is the study's recommendation, not a trial the user picked)."""
    config, p = rec.config, rec.point
    model = rec.launch.commands[0][1]
    workload = Workload.from_dict(scenario["workload"])
    conc = "max" if p.concurrency == MAX_CONCURRENCY else str(p.concurrency)
    per_replica = replica_concurrency(config, p.concurrency)
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
        "launch": rec.launch.to_dict(),
    }
    terms = "\n".join(f"  {t.term}: measured {t.measured_ms:,.1f} ms, margin {t.margin:+.1%}"
                      for t in rec.terms) or "  (no SLO: maximum throughput)"
    replicas = (f"{config.dp} replicas of TP{config.tp} x PP{config.pp}, on ports "
                f"{', '.join(map(str, rec.launch.ports))} (put a load balancer in front)"
                if config.dp > 1 else f"one replica of TP{config.tp} x PP{config.pp}, port "
                f"{rec.launch.ports[0]}")
    quantized = (f"  Precision {config.precision}: point MODEL at an {config.precision} checkpoint "
                 "(e.g. NVIDIA's pre-quantized\n  ones on Hugging Face) unless the model is "
                 f"{config.precision} already.\n" if config.precision in ("fp8", "fp4") else "")
    readme = f"""{header[0]}
{header[1]}

Files
  {SERVE_SCRIPT:<28}starts trtllm-serve: {replicas}
  {OPTIONS_FILE:<28}the LLM API options serve.sh and bench.sh pass
  {BENCH_SCRIPT:<28}re-measures the config with trtllm-bench (one replica)
  {CONFIG_JSON:<28}the config, the scenario and the expected metrics

Serve it
  ./serve.sh                  (MODEL=/path/to/checkpoint ./serve.sh for a local copy)
{quantized}
Re-measure it
  ./bench.sh                  prepares {DATASET_FILE} (isl {workload.isl}, osl {workload.osl}),
                              runs trtllm-bench throughput on {config.gpus_per_replica} GPUs at
                              concurrency {per_rep} and writes {REPORT_FILE}
  Replicas serve independent requests, so one replica at concurrency/dp shows the
  deployment's per-GPU throughput and latencies. Older TensorRT-LLM releases without
  `trtllm-bench prepare-dataset` make the dataset with benchmarks/cpp/prepare_dataset.py.

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
        SERVE_SCRIPT: serve_script(rec.launch, model, header),
        OPTIONS_FILE: rec.launch.options_yaml,
        BENCH_SCRIPT: bench_script(config, model, workload, p.concurrency, header),
        CONFIG_JSON: json.dumps(config_json, indent=2, default=str) + "\n",
        README_TXT: readme,
    }


def write_deploy(out, rec: Recommendation, scenario: dict, study: str, *,
                 force: bool = False, recommended: bool = True) -> dict[str, str]:
    """Write the deploy folder ``out`` (all files or none); the files written (name -> text)."""
    from autotune.atomic import check_out_dir, write_folder

    out = check_out_dir(out, names=DEPLOY_FILES, force=force)
    files = deploy_files(rec, scenario, study, recommended=recommended)
    write_folder(out, {name: (text.encode(), 0o755 if name.endswith(".sh") else 0o644)
                       for name, text in files.items()})
    return files


__all__ = [
    "BENCH_SCRIPT", "DEPLOY_FILES", "LaunchPlan", "bench_argv", "bench_num_requests",
    "bench_script", "deploy_files", "launch_plan", "llm_api_options", "prepare_dataset_argv",
    "replica_concurrency", "serve_argv", "serve_script", "write_deploy",
]
