#!/usr/bin/env python3
"""A stand-in ``vllm`` for fast tests: ``vllm serve`` and ``vllm bench serve`` with vLLM 0.32's
flags (anything else is refused as argparse refuses it, exit 2), its start-up checks and
messages, a real HTTP server on the given port (``/health``), a child process in the server's
group (as vLLM's EngineCore), and results in ``--save-result --save-detailed``'s format. Its
numbers come from a toy closed-loop queue, not from a model of any GPU: they only move the way a
real engine's do (more sequences in flight: more throughput, slower steps).

Faults, for failure-class tests, from ``AUTOTUNE_STANDIN_VLLM_FAULT``: ``start-crash``,
``start-hang`` (never healthy), ``start-killed`` (SIGKILL, no traceback), ``run-die`` (the server
exits when the benchmark starts: every request fails, and ``vllm bench serve`` still exits 0, as
the real one does), ``engine-dead`` (the engine dies, logging a worker's AssertionError, and the
API server answers 500 to every request), ``partial`` (some requests fail), ``bad-result`` (a
truncated result file).
``AUTOTUNE_STANDIN_VLLM_GIB`` is the device memory (GiB, default 80).

``make_standin(folder)`` writes an executable ``vllm`` (and the distribution metadata that
gives its version) and returns the environment that puts it first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = "0.32.0"
GiB = 2**30


# ---- installing it ------------------------------------------------------------------------------
def make_standin(folder: Path, version: str = VERSION) -> dict[str, str]:
    """Write ``folder/bin/vllm`` (this script, run by this interpreter) and a ``vllm``
    distribution's metadata at ``version``; returns ``{"PATH": ..., "PYTHONPATH": ...}`` that
    make them the ones found."""
    folder = Path(folder)
    bin_dir, site = folder / "bin", folder / "site"
    bin_dir.mkdir(parents=True, exist_ok=True)
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    exe = bin_dir / "vllm"
    exe.write_text(f"#!{sys.executable}\n" + Path(__file__).read_text())
    exe.chmod(0o755)
    path = os.environ.get("PATH", "")
    return {"PATH": f"{bin_dir}{os.pathsep}{path}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH"))
                                          if p)}


# ---- vllm serve ---------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"(APIServer pid={os.getpid()}) INFO {time.strftime('%m-%d %H:%M:%S')} {msg}",
          flush=True)


def _fail(exc: str, code: int = 1) -> None:
    print("Traceback (most recent call last):\n  File \"vllm/engine/arg_utils.py\", line 1, in "
          f"create_engine_config\n{exc}", flush=True)
    sys.exit(code)


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve")
    p.add_argument("model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", "-ep", action="store_true")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--quantization")
    p.add_argument("--kv-cache-dtype", default="auto")
    # Native multi-node (vllm/engine/arg_utils.py and vllm/entrypoints/cli/serve.py, 0.32).
    p.add_argument("--nnodes", "-n", type=int, default=1)
    p.add_argument("--node-rank", "-r", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29501)
    p.add_argument("--headless", action="store_true")
    return p


def _config_args(path: str) -> list[str]:
    """A ``--config`` YAML's keys as flags (vLLM's FlexibleArgumentParser rule)."""
    import yaml

    out: list[str] = []
    for key, value in (yaml.safe_load(Path(path).read_text()) or {}).items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", str(value)]
    return out


def _rendezvous(args) -> None:
    """Node 0 of a replica over several nodes: wait until every other node has joined on
    ``--master-addr:--master-port`` (torch.distributed's rendezvous), as the engine does before
    it loads anything; the links stay open (a node that dies closes its own)."""
    import socket

    server = socket.create_server((args.master_addr, args.master_port))
    server.settimeout(float(os.environ.get("AUTOTUNE_STANDIN_VLLM_RENDEZVOUS_S", "60")))
    links = []
    try:
        while len(links) < args.nnodes - 1:
            conn, _ = server.accept()
            links.append(conn)
    except TimeoutError:
        _fail(f"torch.distributed.DistNetworkError: {len(links) + 1} of {args.nnodes} nodes "
              f"joined at {args.master_addr}:{args.master_port} before the timeout")
    _log(f"all {args.nnodes} nodes joined at {args.master_addr}:{args.master_port}")
    globals()["_links"] = links


def _headless(args) -> None:
    """Another node of the replica (``--headless``): join node 0, serve no API, and live as
    long as the link to node 0 does."""
    import socket

    if os.environ.get("AUTOTUNE_STANDIN_VLLM_FAULT") == "start-crash":
        _fail("RuntimeError: Engine core initialization failed. See root cause above.")
    _log(f"headless node {args.node_rank} of {args.nnodes}: joining "
         f"{args.master_addr}:{args.master_port}")
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection((args.master_addr, args.master_port), timeout=5)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                _fail(f"torch.distributed.DistNetworkError: cannot reach "
                      f"{args.master_addr}:{args.master_port}: {exc}")
            time.sleep(0.2)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    conn.settimeout(None)
    conn.recv(1)  # returns when node 0 goes away
    _fail("RuntimeError: the connection to node 0 closed (its engine is gone)")


def serve(argv: list[str]) -> None:
    args = serve_parser().parse_args(argv)
    if args.config:
        args = serve_parser().parse_args(argv + _config_args(args.config))
    fault = os.environ.get("AUTOTUNE_STANDIN_VLLM_FAULT", "")
    _log(f"vLLM API server version {VERSION}")
    try:
        hf = json.loads((Path(args.model) / "config.json").read_text())
    except (OSError, ValueError):
        _fail(f"OSError: {args.model} does not appear to have a file named config.json")
    heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    dp = args.data_parallel_size
    max_len = args.max_model_len or hf.get("max_position_embeddings", 4096)
    if heads % tp:
        _fail(f"ValueError: Total number of attention heads ({heads}) must be divisible by "
              f"tensor parallel size ({tp}).")
    if max_len > hf.get("max_position_embeddings", max_len):
        _fail(f"ValueError: User-specified max_model_len ({max_len}) is greater than the "
              f"derived max_model_len (max_position_embeddings="
              f"{hf['max_position_embeddings']} in model's config.json).")
    if args.nnodes > 1:
        if (tp * pp * dp) % args.nnodes:
            _fail(f"ValueError: Invalid data-parallel launch options: `--nnodes {args.nnodes}` "
                  f"must evenly divide the total world size ({tp * pp * dp}). Adjust `--nnodes`, "
                  "`--data-parallel-size`, `--pipeline-parallel-size`, "
                  "`--tensor-parallel-size`, or `--prefill-context-parallel-size`.")
        if not 0 <= args.node_rank < args.nnodes:
            _fail(f"ValueError: Invalid data-parallel launch options: `--node-rank` must be "
                  f"between 0 and {args.nnodes - 1}; got `--node-rank {args.node_rank}`. Set "
                  "it to this node's zero-based index.")
    if args.headless:
        _headless(args)
    mnbt, mns = args.max_num_batched_tokens, args.max_num_seqs
    if mnbt < max_len and not args.enable_chunked_prefill:
        _fail(f"ValueError: max_num_batched_tokens ({mnbt}) is smaller than max_model_len "
              f"({max_len}). This effectively limits the maximum sequence length to "
              "max_num_batched_tokens and makes vLLM reject longer sequences.")
    if mnbt < mns:
        _fail(f"ValueError: max_num_batched_tokens ({mnbt}) must be greater than or equal to "
              f"max_num_seqs ({mns}).")
    if fault == "start-crash":
        _fail("RuntimeError: Engine core initialization failed. See root cause above.")
    if fault == "start-killed":
        os.kill(os.getpid(), signal.SIGKILL)
    # The engine core runs in a child process of the server's group, as vLLM's does.
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e6)"])
    hidden, vocab = hf["hidden_size"], hf["vocab_size"]
    kv_heads = hf.get("num_key_value_heads", heads)
    head_dim = hf.get("head_dim", hidden // heads)
    params = layers * (4 * hidden * hidden + 3 * hidden * hf["intermediate_size"]) \
        + 2 * vocab * hidden
    weights = params * 2 / (tp * pp)
    device = float(os.environ.get("AUTOTUNE_STANDIN_VLLM_GIB", "80")) * GiB
    kv_bytes = args.gpu_memory_utilization * device - weights - 0.25 * GiB
    if kv_bytes <= 0:
        engine.kill()
        _fail("ValueError: No available memory for the cache blocks. Try increasing "
              "`gpu_memory_utilization` when initializing the engine.")
    per_token = 2 * (layers / pp) * (kv_heads / tp) * head_dim * 2
    tokens = int(kv_bytes / per_token) // 16 * 16
    if tokens < max_len:
        engine.kill()
        _fail(f"ValueError: To serve at least one request with the model's max seq len "
              f"({max_len}), ({max_len * per_token / GiB:.2f} GiB KV cache is needed, which is "
              f"larger than the available KV cache memory ({kv_bytes / GiB:.2f} GiB). "
              "Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
              "initializing the engine.")
    _log(f"GPU KV cache size: {tokens:,} tokens")
    _log(f"Maximum concurrency for {max_len:,} tokens per request: {tokens / max_len:.2f}x")
    state = {"max_num_seqs": mns, "max_num_batched_tokens": mnbt, "tp": tp, "pp": pp, "dp": dp,
             "expert_parallel": args.enable_expert_parallel,
             "chunked": args.enable_chunked_prefill, "eager": args.enforce_eager,
             "capacity": tokens // max_len, "max_model_len": max_len,
             "name": args.served_model_name or args.model}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # the access log, as uvicorn's
            print(f"INFO:     {self.address_string()} - \"{self.requestline}\"", flush=True)

        def _json(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/health":
                self._json(200, {})
            elif self.path == "/v1/models":
                self._json(200, {"data": [{"id": state["name"]}]})
            elif self.path == "/standin/state":  # the stand-in benchmark's private channel
                if fault == "run-die":
                    engine.kill()
                    os._exit(1)
                if fault == "engine-dead":
                    pre = f"(Worker_PP1 pid={os.getpid()}) ERROR 12-02 01:00:56 [multiproc_" \
                          "executor.py:1063]"
                    print(f"{pre} WorkerProc hit an exception.\n{pre} Traceback (most recent "
                          f"call last):\n{pre}     assert self.intermediate_tensors is not None"
                          f"\n{pre} AssertionError\n(APIServer pid={os.getpid()}) ERROR 12-02 "
                          "01:00:56 [async_llm.py:906] vllm.v1.engine.exceptions."
                          "EngineDeadError: EngineCore encountered an issue.", flush=True)
                    state["dead"] = True
                self._json(200, state)
            else:
                self._json(404, {"detail": "Not Found"})

    if args.nnodes > 1:
        _rendezvous(args)
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *a: (engine.kill(), os._exit(0)))
    if fault == "start-hang":
        time.sleep(1e6)
    _log(f"Starting vLLM API server on http://{args.host}:{args.port}")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    engine.wait()


# ---- vllm bench serve ---------------------------------------------------------------------------
def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm bench serve")
    p.add_argument("--backend", default="openai")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--dataset-name", choices=["random", "sharegpt", "sonnet"], required=True)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", default="0.0")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true")
    p.add_argument("--result-dir")
    p.add_argument("--result-filename")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def _ratio(raw: str, which: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return float(json.loads(raw).get(which, 0.0))


def bench(argv: list[str]) -> None:
    args = bench_parser().parse_args(argv)
    fault = os.environ.get("AUTOTUNE_STANDIN_VLLM_FAULT", "")
    rng = random.Random(args.seed)
    n = args.num_prompts
    try:
        with urllib.request.urlopen(f"{args.base_url}/standin/state", timeout=10) as r:
            state = json.loads(r.read())
        error = ""
    except (urllib.error.URLError, OSError) as exc:
        state, error = None, f"aiohttp.client_exceptions.ClientConnectorError: {exc}"
    ri, ro = _ratio(args.random_range_ratio, "input"), _ratio(args.random_range_ratio, "output")
    isl = [max(1, round(args.random_input_len * rng.uniform(1 - ri, 1 + ri))) for _ in range(n)]
    osl = [max(1, round(args.random_output_len * rng.uniform(1 - ro, 1 + ro))) for _ in range(n)]
    failed = set(range(n)) if state is None or state.get("dead") else set()
    if fault == "partial":
        failed = set(range(0, n, 4))
    recs = []
    if state is not None and not state.get("dead"):
        conc = args.max_concurrency or n
        batch = max(1, min(conc, state["max_num_seqs"], state["capacity"] * state["pp"]))
        step = 0.004 * (1 + 0.04 * batch) / math.sqrt(state["tp"]) * (1.3 if state["eager"]
                                                                       else 1.0)
        clock = [0.0] * batch  # a closed loop: each slot starts its next request when free
        for i in range(n):
            slot = min(range(batch), key=clock.__getitem__)
            start = clock[slot]
            chunks = math.ceil(isl[i] / state["max_num_batched_tokens"])
            ttft = step * chunks * (1 + isl[i] / 2048) * rng.uniform(0.9, 1.1)
            gaps = [step * rng.uniform(0.8, 1.2) for _ in range(osl[i] - 1)]
            latency = ttft + sum(gaps)
            clock[slot] = start + latency
            recs.append((start, ttft, latency, gaps))
    base = time.perf_counter()
    ok = [i for i in range(n) if i not in failed]
    duration = max((recs[i][0] + recs[i][2] for i in ok), default=0.0) or 1e-3
    res = {"date": time.strftime("%Y%m%d-%H%M%S"), "endpoint_type": args.backend,
           "backend": args.backend, "label": None, "model_id": args.model,
           "tokenizer_id": args.tokenizer, "num_prompts": n, "request_rate": "inf",
           "burstiness": 1.0, "max_concurrency": args.max_concurrency,
           "duration": duration, "completed": len(ok), "failed": len(failed),
           "total_input_tokens": sum(isl[i] for i in ok),
           "total_output_tokens": sum(osl[i] for i in ok),
           "request_throughput": len(ok) / duration,
           "output_throughput": sum(osl[i] for i in ok) / duration,
           "total_token_throughput": sum(isl[i] + osl[i] for i in ok) / duration,
           "input_lens": isl,
           "output_lens": [osl[i] if i in ok else 0 for i in range(n)],
           "ttfts": [recs[i][1] if i in ok else 0.0 for i in range(n)] if recs else [0.0] * n,
           "itls": [recs[i][3] if i in ok else [] for i in range(n)] if recs else [[]] * n,
           "latencies": [recs[i][2] if i in ok else 0.0 for i in range(n)] if recs else
           [0.0] * n,
           "start_times": [base + recs[i][0] for i in range(n)] if recs else [base] * n,
           "errors": [error if i in failed else "" for i in range(n)] if state is None else
           ["" if i in ok else ("Internal Server Error" if state.get("dead") else
                                "Server disconnected") for i in range(n)],
           "generated_texts": ["" for _ in range(n)]}
    pcts = [float(p) for p in args.metric_percentiles.split(",")]
    per = {"ttft": [recs[i][1] * 1e3 for i in ok],
           "tpot": [(recs[i][2] - recs[i][1]) * 1e3 / max(osl[i] - 1, 1) for i in ok],
           "itl": [g * 1e3 for i in ok for g in recs[i][3]],
           "e2el": [recs[i][2] * 1e3 for i in ok]} if recs else {}
    for metric, values in per.items():
        values = sorted(values) or [0.0]
        res[f"mean_{metric}_ms"] = statistics.fmean(values)
        res[f"median_{metric}_ms"] = statistics.median(values)
        res[f"std_{metric}_ms"] = statistics.pstdev(values)
        for p in pcts:
            k = (len(values) - 1) * p / 100
            lo, hi = math.floor(k), math.ceil(k)
            res[f"p{p:g}_{metric}_ms"] = values[lo] + (values[hi] - values[lo]) * (k - lo)
    print("============ Serving Benchmark Result ============")
    print(f"Successful requests:                     {len(ok)}")
    print(f"Failed requests:                         {len(failed)}")
    if args.save_result:
        out = Path(args.result_dir or ".") / (args.result_filename or "result.json")
        text = json.dumps(res)
        out.write_text(text[: len(text) // 2] if fault == "bad-result" else text)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--version"]:
        print(VERSION)
        return
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:2] == ["bench", "serve"]:
        return bench(argv[2:])
    print("usage: vllm [-h] [-v] {chat,complete,serve,bench,collect-env,run-batch} ...\n"
          f"vllm: error: argument subparser: invalid choice: {' '.join(argv[:2])!r}",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
