"""``vllm serve`` processes: a free loopback port, readiness through ``/health``, the log kept,
the whole process group ended on every exit path; and what a failed server or benchmark left in
its log (the class of failure).

Patterns are vLLM 0.32's messages (``vllm/v1/core/kv_cache_utils.py``,
``vllm/config/model.py``, ``vllm/config/scheduler.py``, ``vllm/v1/worker/cpu_worker.py``).
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import (
    Crashed,
    Interrupted,
    InvalidConfig,
    Killed,
    OutOfMemory,
    TimedOut,
    TrialFailure,
)
from autotune.runners._process import (
    KILLED_CODES,
    Job,
    ProcessGroups,
    first_error,
    line_at,
    log_tail,
    read_log,
)

#: Memory errors at start-up: the KV cache cannot hold one sequence, no memory is left for it,
#: or the device ran out while loading or profiling.
_OOM = re.compile(r"To serve at least one request with the model's max seq len|"
                  r"No available memory for the cache blocks|"
                  r"less than requested memory for kv|"
                  # vLLM's start-up check that the asked share of memory is free (GPU and CPU)
                  r"is less than desired (?:GPU|CPU) memory utilization|"
                  r"CUDA out of memory|torch\.OutOfMemoryError|OutOfMemoryError|"
                  r"CUDA error: out of memory")
#: Configurations vLLM refuses before it loads anything.
_INVALID = re.compile(r"must be divisible by tensor parallel size|"
                      r"Pipeline parallelism is not supported for this model|"
                      r"is smaller than max_model_len|"
                      r"must be greater than or equal to max_num_seqs|"
                      r"is greater than the derived max_model_len|"
                      r"exceeds the maximum supported value|"
                      r"is not divisible by|must be divisible by")
#: argparse's refusal of an argument (exit 2): another vLLM release than the one tested.
_USAGE = re.compile(r"^(?:usage: .*|.*: error: (?:unrecognized arguments|argument|the following "
                    r"arguments are required).*)$", re.MULTILINE)
#: A port another process holds: the API server's (uvicorn), or the rendezvous of a replica over
#: several nodes (torch's TCPStore: "... code: -98, name: EADDRINUSE").
_PORT_TAKEN = re.compile(r"Address already in use|address already in use|EADDRINUSE")
#: The engine process died under a running server (the API server then answers 500).
_ENGINE_DEAD = re.compile(r"EngineDeadError|WorkerProc hit an exception|Engine core proc .* died")
_LOGGED_LINE = re.compile(r"^\(\w+ pid=\d+\) \w+ [\d-]+ [\d:]+ \[[^\]]+\] ?(.*)$", re.MULTILINE)
_EXCEPTION = re.compile(r"^(?:\w+\.)*\w+(?:Error|Exception)\b")
#: The KV cache's capacity, as vLLM logs it at start-up.
_CAPACITY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.,]+)x")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(base_url: str, timeout_s: float = 2.0) -> bool:
    """True when ``GET /health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Server:
    """One running replica: its API server's ``vllm serve`` (the leader of its own process
    group) with its port and log, and on a replica over several nodes the ``--headless`` ones
    of the other nodes (``followers``: each process with its job)."""

    proc: subprocess.Popen
    job: Job
    port: int
    host: str = "127.0.0.1"
    #: Requests of the longest length its KV cache holds, read once it is ready (the log grows
    #: with every request after that).
    fit: int | None = None
    followers: tuple[tuple[subprocess.Popen, Job], ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.job.log_path

    def alive(self) -> bool:
        return self.proc.poll() is None and all(p.poll() is None for p, _ in self.followers)

    def dead_follower(self) -> tuple[subprocess.Popen, Job] | None:
        """The first of the other nodes' processes that has exited, if any."""
        return next(((p, j) for p, j in self.followers if p.poll() is not None), None)

    def capacity(self) -> int | None:
        """Requests of the longest length the KV cache holds at once (vLLM's "Maximum
        concurrency" line), None when the log does not say."""
        found = _CAPACITY.findall(read_log(self.log_path))
        if not found:
            return None
        return int(float(found[-1][1].replace(",", "")))


def launch_server(procs: ProcessGroups, job: Job, port: int, *, host: str = "127.0.0.1",
                  followers: tuple[Job, ...] = ()) -> Server:
    """Start ``job`` (a ``vllm serve`` listening on ``host:port``) and the other nodes'
    ``followers`` without waiting for them."""
    started = []
    try:
        for follower in followers:
            started.append((procs.start(follower), follower))
        return Server(procs.start(job), job, port, host=host, followers=tuple(started))
    except BaseException:
        for proc, _ in started:
            procs.stop(proc)
        raise


def stop_server(procs: ProcessGroups, server: Server) -> None:
    """End the replica's processes on every node (each whole process group)."""
    procs.stop(server.proc)
    for proc, _ in server.followers:
        procs.stop(proc)


def wait_ready(procs: ProcessGroups, server: Server, timeout_s: float) -> Server:
    """Wait until ``server`` answers ``/health``: the server, or the failure it stands for with
    its whole process group ended (TimedOut past ``timeout_s``; Interrupted after
    ``procs.interrupt()``)."""
    job = server.job
    deadline = time.monotonic() + timeout_s
    pause = 0.2
    try:
        while True:
            if procs.interrupted:
                raise Interrupted("vllm serve interrupted by the user while starting; its "
                                  "processes were killed", log_tail=log_tail(job.log_path),
                                  log_path=str(job.log_path))
            if server.proc.poll() is not None:
                raise classify_start(server.proc.returncode, job.log_path)
            if (dead := server.dead_follower()) is not None:
                failure = classify_start(dead[0].returncode, dead[1].log_path)
                raise type(failure)(f"another node's vllm serve --headless: {failure}",
                                    log_tail=failure.log_tail, log_path=failure.log_path)
            if healthy(server.base_url):
                server.fit = server.capacity()
                return server
            if time.monotonic() > deadline:
                raise TimedOut(f"vllm serve was not ready (GET /health) within {timeout_s:g} s; "
                               "its process group was killed", log_tail=log_tail(job.log_path),
                               log_path=str(job.log_path))
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)
    except BaseException:
        stop_server(procs, server)
        raise


def classify_start(returncode: int | None, log_path: Path) -> TrialFailure:
    """The failure a ``vllm serve`` that exited before it was ready stands for."""
    text = read_log(log_path)
    kw = {"log_tail": log_tail(log_path), "log_path": str(log_path)}
    has_traceback = "Traceback (most recent call last)" in text
    if returncode in KILLED_CODES and not has_traceback:
        return Killed(f"vllm serve killed by SIGKILL (exit {returncode}) with no traceback: "
                      "typically the host ran out of memory", **kw)
    if m := _OOM.search(text):
        return OutOfMemory(f"vllm serve ran out of memory at start-up: "
                           f"{line_at(text, m.start(), m.end())}", **kw)
    if m := _INVALID.search(text):
        return InvalidConfig(f"vLLM refused the configuration: "
                             f"{line_at(text, m.start(), m.end())}", **kw)
    if returncode == 2 and (m := _USAGE.search(text)):
        return Crashed(f"vllm serve refused its arguments (exit 2; another vLLM release?): "
                       f"{first_error(text) or m.group(0)}", **kw)
    if _PORT_TAKEN.search(text):
        return Crashed(f"vllm serve could not listen on its port: {first_error(text)}", **kw)
    return Crashed(f"vllm serve exited with {returncode} before it was ready: "
                   f"{first_error(text)}", **kw)


def port_taken(failure: TrialFailure) -> bool:
    """True when a start failed only because another process took the port first."""
    return isinstance(failure, Crashed) and "could not listen on its port" in str(failure)


def engine_death(server: Server) -> TrialFailure | None:
    """Crashed when the server's log says its engine died (vLLM keeps the API server up,
    answering every request with an error), None otherwise."""
    text = read_log(server.log_path)
    if not _ENGINE_DEAD.search(text):
        return None
    # The root cause: the last exception a worker or the engine logged before the API server's
    # EngineDeadError (log lines look like "(Worker_PP1 pid=7) ERROR ... [file:line] KeyError: x"),
    # with the assert statement above a bare AssertionError.
    segment = text[_ENGINE_DEAD.search(text).start():].split("EngineDeadError")[0]
    lines = [m.group(1).strip() for m in _LOGGED_LINE.finditer(segment)]
    errors = [i for i, line in enumerate(lines) if _EXCEPTION.match(line)]
    cause = lines[errors[-1]] if errors else first_error(text)
    if cause == "AssertionError":
        asserts = [line for line in lines[:errors[-1]] if line.startswith("assert ")]
        cause = f"{asserts[-1]} -> AssertionError" if asserts else cause
    return Crashed(f"the engine died during the load point: {cause}",
                   log_tail=log_tail(server.log_path), log_path=str(server.log_path))


def classify_run(returncode: int | None, log_path: Path, server: Server | None = None
                 ) -> TrialFailure:
    """The failure a ``vllm bench serve`` that exited non-zero stands for (a server that died
    under it is named: its log says why)."""
    if server is not None and (died := engine_death(server)) is not None:
        return died
    if server is not None and not server.alive():
        dead = server.dead_follower() if server.proc.poll() is None else None
        failure = (classify_start(dead[0].returncode, dead[1].log_path) if dead else
                   classify_start(server.proc.returncode, server.log_path))
        return type(failure)(f"the server died during the load point: {failure}",
                             log_tail=failure.log_tail, log_path=failure.log_path)
    text = read_log(log_path)
    kw = {"log_tail": log_tail(log_path), "log_path": str(log_path)}
    if returncode in KILLED_CODES:
        return Killed(f"vllm bench serve killed by SIGKILL (exit {returncode})", **kw)
    if returncode == 2 and _USAGE.search(text):
        return Crashed(f"vllm bench serve refused its arguments (exit 2; another vLLM "
                       f"release?): {first_error(text)}", **kw)
    return Crashed(f"vllm bench serve exited with {returncode}: {first_error(text)}", **kw)


__all__ = ["Server", "classify_run", "classify_start", "engine_death", "free_port", "healthy",
           "launch_server", "port_taken", "stop_server", "wait_ready"]
