"""What a failed ``trtllm-bench`` run left in its log: the class of failure it stands for.

Running the commands is ``autotune.runners._process``'s (process groups, timeouts, logs).
"""

from __future__ import annotations

import re
from pathlib import Path

from autotune.errors import (
    BuildFailed,
    BuildOutOfMemory,
    Crashed,
    InvalidConfig,
    Killed,
    OutOfMemory,
    SequenceLimit,
    TrialFailure,
)
from autotune.runners._process import (
    KILLED_CODES,
    JobResult,
    first_error,
    line_at,
    log_tail,
    read_log,
)

_RUN_OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|cudaErrorMemoryAllocation|"
                      r"CUDA error: out of memory|Error Code 2: OutOfMemory|"
                      # the C++ allocator, and the PyTorch executor (1.x) at start-up
                      r"cudaMallocAsync\(.*\): out of memory|"
                      r"Executor creation failed due to insufficient GPU memory|"
                      r"might indicate insufficient GPU memory")
#: A prompt longer than the token budget without chunked prefill (1.x executor).
_PROMPT_TOO_LONG = re.compile(r"RequestError: .*should not exceed max_num_tokens.*")
_BUILD_OOM = re.compile(_RUN_OOM.pattern + r"|insufficient memory|out of memory", re.IGNORECASE)
_INVALID = re.compile(r"Parallelism mapping of TP\d+-PP\d+ is currently unsupported|"
                      r"is not consistent with the engine's tp_size|"
                      r"(?:attention heads|num_heads|num_attention_heads|head_num)\b"
                      r".*\bdivisible\b")
_SEQUENCE = re.compile(r"Engine supports a max sequence of (\d+)")
_NEEDED_SEQUENCE = re.compile(r"contains a maximum sequence of (\d+)")
_MPI = re.compile(r"PRTE ERROR|NCCL error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError|"
                  r"MPI_ABORT|MPI_ERR_")
_USAGE = re.compile(r"^(?:Error: (?:No such option|Missing option|Invalid value|Got unexpected).*|"
                    r"Usage: .*)$", re.MULTILINE)


def _meaningful(text: str) -> str:
    """The log without lines that mention memory but are not errors: TensorRT's builder prints
    ``Skipping tactic ... insufficient memory`` for tactics it merely skips."""
    return "\n".join(line for line in text.splitlines() if "Skipping tactic" not in line)


def _invalid_layout(text: str) -> str | None:
    """The line that says the parallel layout is refused, if any."""
    m = _INVALID.search(text)
    if m:
        return line_at(text, m.start(), m.end())
    lines = text.splitlines()
    for i, line in enumerate(lines):
        # A bare ``AssertionError`` under an ``assert ... % tp ...`` source line: TensorRT-LLM's
        # check that the attention heads split over the tensor-parallel ranks.
        if line.strip() == "AssertionError":
            context = " ".join(lines[max(0, i - 3):i])
            if "%" in context and re.search(r"\btp|head", context):
                return (context.strip().splitlines() or ["AssertionError"])[-1].strip() + \
                    " -> AssertionError"
    return None


def needed_sequence(message: str) -> int | None:
    """The sequence length a dataset needs, from a sequence-limit failure's message."""
    m = _NEEDED_SEQUENCE.search(message)
    return int(m.group(1)) if m else None


def classify(result: JobResult, *, phase: str) -> TrialFailure:
    """The failure a failed job stands for, from its exit status and log (``phase``: "build"
    or "run")."""
    path = result.job.log_path
    text = _meaningful(read_log(path))
    tail, where = log_tail(path), str(path)
    rc = result.returncode
    kw = {"log_tail": tail, "log_path": where}
    has_traceback = "Traceback (most recent call last)" in text

    if rc in KILLED_CODES and not has_traceback:
        return Killed(f"{phase} killed by SIGKILL (exit {rc}) with no traceback: typically the "
                      "host ran out of memory", **kw)
    if phase == "build":
        if (why := _invalid_layout(text)) is not None:
            return InvalidConfig(f"engine build refused the layout: {why}", **kw)
        # "Engine building failed" follows every kind of build error; only memory errors make
        # the configuration infeasible.
        if m := _BUILD_OOM.search(text):
            return BuildOutOfMemory(f"engine build ran out of GPU memory: {m.group(0)}", **kw)
        return BuildFailed(f"engine build failed (exit {rc}): {first_error(text)}", **kw)
    if m := _SEQUENCE.search(text):
        return SequenceLimit(line_at(text, m.start(), m.end()), **kw)
    if (why := _invalid_layout(text)) is not None:
        return InvalidConfig(f"TensorRT-LLM refused the layout: {why}", **kw)
    if m := _PROMPT_TOO_LONG.search(text):
        return InvalidConfig(f"TensorRT-LLM refused the requests: {m.group(0)[:300]}", **kw)
    if m := _RUN_OOM.search(text):
        return OutOfMemory(f"run ran out of GPU memory: {m.group(0)}", **kw)
    if rc in KILLED_CODES:
        return Killed(f"run killed by SIGKILL (exit {rc})", **kw)
    if m := _MPI.search(text):
        return Crashed(f"MPI/NCCL failure (exit {rc}): {first_error(text) or m.group(0)}", **kw)
    if rc == 2 and (m := _USAGE.search(text)):
        return Crashed(f"trtllm-bench refused its arguments (exit 2; another TensorRT-LLM "
                       f"version?): {first_error(text)}", **kw)
    return Crashed(f"trtllm-bench exited with {rc}: {first_error(text)}", **kw)


def oom_in_log(path: Path) -> bool:
    """True when a run's log shows a GPU out-of-memory error (even if it exited 0)."""
    return bool(_RUN_OOM.search(_meaningful(read_log(path))))


__all__ = ["classify", "needed_sequence", "oom_in_log"]
