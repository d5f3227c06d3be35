"""Running engine commands: argv lists in their own process groups, wall-clock limits, whole-group
kills, long-lived servers, and reading what a failed run left in its log (every runner of a real
engine uses this; what a log *means* is each runner's own).

Nothing here goes through a shell: every command is an argv list started with ``shell=False``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from autotune.errors import Crashed, Interrupted, TimedOut

#: Lines of a failed run's log kept with the failure (and in the database).
TAIL_LINES = 40
#: Seconds a process group gets between SIGTERM and SIGKILL when its run timed out.
TERM_GRACE_S = 5.0
#: Exit statuses of a process killed by SIGKILL: as Popen reports it, and as shells and MPI
#: launchers report it (128 + 9).
KILLED_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)

#: The watchdog of each engine's process group: it blocks on a pipe whose only writer is this
#: process, and when that closes (this process ended, however: even by SIGKILL, which runs no
#: clean-up) it kills the group. Without it a killed worker would leave a server holding the
#: GPUs, and the next trial on them would run out of memory. (It cannot sit in the group: that
#: is another session's, which setpgid may not join.)
_WATCHDOG = ("import os, signal, sys\nsys.stdin.buffer.read()\ntry:\n"
             "    os.killpg(int(sys.argv[1]), signal.SIGKILL)\nexcept OSError:\n    pass\n")


@dataclass(frozen=True)
class Job:
    """One command to run: argv (never a shell string), its log file and its environment."""

    argv: tuple[str, ...]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict, hash=False)
    cwd: Path | None = None


@dataclass(frozen=True)
class JobResult:
    """How a job ended. ``returncode`` is None when it was stopped because a sibling failed."""

    job: Job
    returncode: int | None
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class ProcessGroups:
    """Runs jobs, each as the leader of a new process group, and kills whole groups.

    ``interrupt()`` may be called from a signal handler or another thread: it sends SIGKILL to
    every running group without waiting or taking locks, and the ``run`` in progress then raises
    ``Interrupted`` (or the signal handler's KeyboardInterrupt unwinds through it, killing what
    is left).
    """

    def __init__(self, drain_s: float = 60.0):
        self.drain_s = drain_s  # how long to wait for a killed group's processes to be gone
        self.interrupted = False
        self._running: list[subprocess.Popen] = []
        # group id -> the write end of its watchdog's pipe, and the watchdog
        self._watchdogs: dict[int, tuple[int, subprocess.Popen]] = {}

    def run(self, jobs: list[Job], timeout_s: float, what: str = "the command") -> list[JobResult]:
        """Run ``jobs`` side by side until all end, one fails, or ``timeout_s`` passes.

        Raises TimedOut (all groups killed), Interrupted, or Crashed when a command cannot be
        started; otherwise returns one result per job (a failed one is the caller's to classify).
        """
        started = time.monotonic()
        procs: list[subprocess.Popen] = []
        codes: list[int | None] = []
        try:
            for job in jobs:
                procs.append(self._start(job))
                codes.append(None)
            deadline = started + timeout_s
            pause = 0.02
            while True:
                if self.interrupted:
                    raise Interrupted(f"{what} interrupted by the user; its processes were killed",
                                      log_tail=log_tail(jobs[0].log_path),
                                      log_path=str(jobs[0].log_path))
                for i, p in enumerate(procs):
                    if codes[i] is None:
                        codes[i] = p.poll()
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0) for c in codes):
                    break  # one replica failed: the measurement has failed, stop the others
                if time.monotonic() > deadline:
                    for p in procs:
                        self._kill(p, grace_s=TERM_GRACE_S)
                    raise TimedOut(
                        f"{what} made no result within {timeout_s:g} s; its process group was "
                        "killed", log_tail=log_tail(jobs[0].log_path),
                        log_path=str(jobs[0].log_path))
                time.sleep(pause)
                pause = min(pause * 1.5, 0.5)  # quick for short runs, idle for long ones
        finally:
            # Whatever happened (done, failed, timed out, KeyboardInterrupt), no process of these
            # groups may outlive the run: stragglers (MPI ranks) would keep GPU memory.
            for p in procs:
                self._kill(p, grace_s=0.0)
                if p in self._running:
                    self._running.remove(p)
        elapsed = time.monotonic() - started
        return [JobResult(job, code, elapsed) for job, code in zip(jobs, codes)]

    def start(self, job: Job) -> subprocess.Popen:
        """Start a long-lived process (a server) in its own group; ``stop`` ends it. Raises
        Crashed when it cannot be started, Interrupted after ``interrupt``."""
        if self.interrupted:
            raise Interrupted("interrupted by the user before the start")
        return self._start(job)

    def stop(self, proc: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> int | None:
        """End ``proc``'s whole group (SIGTERM, ``grace_s``, SIGKILL) and wait until every
        process of it is gone; returns its exit status (None if it could not be reaped)."""
        self._kill(proc, grace_s=grace_s)
        if proc in self._running:
            self._running.remove(proc)
        return proc.returncode

    def interrupt(self) -> None:
        """Kill every running group now (safe from a signal handler: no locks, no waiting)."""
        self.interrupted = True
        for p in list(self._running):
            _signal_group(p.pid, signal.SIGKILL)

    def _start(self, job: Job) -> subprocess.Popen:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "ab") as log:
            try:
                # A new session makes the child the leader of its own process group, so a kill
                # reaches everything it spawned (MPI ranks, launch wrappers) and nothing of ours.
                proc = subprocess.Popen(
                    list(job.argv), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env=job.env or None, cwd=job.cwd,
                    start_new_session=True, close_fds=True, shell=False)
            except OSError as exc:
                raise Crashed(f"cannot start {job.argv[0]!r}: {exc.strerror or exc}",
                              log_path=str(job.log_path)) from None
        self._running.append(proc)
        self._watch(proc)
        return proc

    def _watch(self, proc: subprocess.Popen) -> None:
        """Start ``proc``'s group's watchdog (``_WATCHDOG``): the group dies with us."""
        read, write = os.pipe()  # not inheritable: no other child holds the write end open
        try:
            dog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(proc.pid)], stdin=read,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   close_fds=True)
        except OSError:  # pragma: no cover - cannot start our own interpreter
            os.close(write)
        else:
            self._watchdogs[proc.pid] = (write, dog)
        finally:
            os.close(read)

    def _kill(self, proc: subprocess.Popen, grace_s: float) -> None:
        """SIGTERM (when ``grace_s``), then SIGKILL the group; wait until its processes are gone."""
        if grace_s > 0 and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=self.drain_s)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state) process
            pass
        # GPU memory is only free once every process of the group has exited.
        wait_group_gone(proc.pid, self.drain_s)
        watch = self._watchdogs.pop(proc.pid, None)
        if watch is not None:
            # The group is gone: end its watchdog before it could signal a group id that the
            # system may hand out again.
            watch[1].kill()
            os.close(watch[0])
            try:
                watch[1].wait(timeout=self.drain_s)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
                pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """True while a process (not a zombie) of process group ``pgid`` exists."""
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces and parentheses): state, ppid,
        # pgrp, ...
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) >= 3 and rest[2] == str(pgid) and rest[0] != "Z":
            return True
    return False


def wait_group_gone(pgid: int, limit_s: float) -> bool:
    """Wait up to ``limit_s`` for every process of group ``pgid`` to exit; True if they did."""
    deadline = time.monotonic() + limit_s
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- logs ----------------------------------------------------------------------------------
def read_log(path: Path, max_bytes: int = 4 * 2**20) -> str:
    """The last ``max_bytes`` of a log (decoded leniently; '' when there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log."""
    return "\n".join(read_log(path, 256 * 1024).splitlines()[-lines:])


# Patterns from TensorRT-LLM's logs (shared/docs/trtllm.md, "Failures a runner must classify").


#: A line that names an exception or an error, in Python and C++ logs.
_ERROR_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception)\b.*$|^.*\[E\].*$|^Error: .*$",
                         re.MULTILINE)


def line_at(text: str, start: int, end: int) -> str:
    """The whole line holding ``text[start:end]`` (at most 300 characters)."""
    first = text.rfind("\n", 0, start) + 1
    last = text.find("\n", end)
    return text[first:last if last != -1 else len(text)].strip()[:300]


def first_error(text: str) -> str:
    """The most telling error line of a log (the last exception line, else its last line)."""
    found = _ERROR_LINE.findall(text)
    line = (found[-1] if found else next(
        (ln for ln in reversed(text.splitlines()) if ln.strip()), "")).strip()
    return line[:300]


__all__ = [
    "KILLED_CODES",
    "TAIL_LINES",
    "TERM_GRACE_S",
    "Job",
    "JobResult",
    "ProcessGroups",
    "first_error",
    "group_alive",
    "line_at",
    "log_tail",
    "read_log",
    "wait_group_gone",
]
