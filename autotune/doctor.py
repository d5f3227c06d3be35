"""``autotune doctor``: is this node ready for ``autotune search --runner trtllm`` (or
``--runner vllm``)?

Each check gives one line and a status: ``ok``, ``warn`` (works, but look), ``skip`` (not asked
for) or ``fail``. The node is ready when nothing failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from autotune.errors import UserError, install_hint

#: Free space below which the workspace check fails (GiB): engines of large models take
#: hundreds of GiB, datasets and logs a few.
DEFAULT_MIN_FREE_GIB = 50.0
STATUSES = ("ok", "warn", "skip", "fail")


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``status`` is ok, warn, skip or fail; ``detail`` one line."""

    name: str
    status: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_trtllm_bench(executable: str | None) -> Check:
    """trtllm-bench found (on PATH or at the given path), TensorRT-LLM's version and what that
    release implies for a search."""
    from autotune.runners._tools import find_executable
    from autotune.runners.trtllm import trtllm_version
    from autotune.runners.trtllm.releases import SUPPORTED, Release, Version

    name = executable or "trtllm-bench"
    path = find_executable(name)
    if path is None:
        where = "at that path" if os.sep in name else "on PATH"
        return Check("trtllm-bench", "fail", f"{name!r} not found {where}: install TensorRT-LLM "
                     "(pip or NVIDIA's container) or pass --trtllm-bench PATH")
    version = trtllm_version(path)
    if version is None:
        return Check("trtllm-bench", "warn", f"{path} (TensorRT-LLM version unknown: its Python "
                     "has no tensorrt_llm package metadata)")
    release = Release(Version.parse(version))
    detail = f"{path} (TensorRT-LLM {version}: {'; '.join(release.implications())})"
    if release.version is None or release.version < Version.parse("1.0.0"):
        return Check("trtllm-bench", "warn", f"{detail}; autotune is tested with "
                     f"{', '.join(SUPPORTED)}")
    return Check("trtllm-bench", "ok", detail)


#: The vLLM release the vllm runner is tested against (a real engine in the test suite).
VLLM_TESTED = "0.32"


def check_vllm(executable: str | None) -> Check:
    """vllm found (on PATH or at the given path) and its version (package metadata, read
    without importing vllm)."""
    from autotune.runners._tools import find_executable
    from autotune.runners.vllm import vllm_version

    name = executable or "vllm"
    path = find_executable(name)
    if path is None:
        where = "at that path" if os.sep in name else "on PATH"
        return Check("vllm", "fail", f"{name!r} not found {where}: install vLLM (pip install "
                     "vllm, in any environment) or pass --vllm PATH")
    version = vllm_version(path)
    if version is None:
        return Check("vllm", "warn", f"{path} (vLLM version unknown: its Python has no vllm "
                     "package metadata)")
    build = " (a CPU build: use --gpu cpu)" if "+cpu" in version else ""
    detail = f"{path}: vLLM {version}{build}"
    if not version.startswith(VLLM_TESTED):
        return Check("vllm", "warn", f"{detail}; autotune is tested with vLLM {VLLM_TESTED}")
    return Check("vllm", "ok", detail)


def check_gpus() -> Check:
    """GPUs visible to ``nvidia-smi --query-gpu`` (count, name, memory)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("GPUs", "fail", "none visible (no nvidia-smi on PATH)")
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("GPUs", "fail", f"nvidia-smi did not answer: {exc}")
    if out.returncode != 0:
        first = (out.stderr or out.stdout).strip().splitlines()
        return Check("GPUs", "fail", f"nvidia-smi failed (exit {out.returncode}): "
                     f"{first[0] if first else 'no output'}")
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            gpus.append((parts[1], float(parts[2]) / 1024))  # MiB -> GiB
        except ValueError:
            continue
    if not gpus:
        return Check("GPUs", "fail", "nvidia-smi lists no GPUs")
    kinds = Counter(name for name, _ in gpus)
    memory = min(mem for _, mem in gpus)
    detail = ", ".join(f"{n} x {name}" for name, n in kinds.items())
    detail += f", {memory:.1f} GiB each" if len(kinds) == 1 else f", smallest {memory:.1f} GiB"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        detail += f" (CUDA_VISIBLE_DEVICES={visible})"
    # TensorRT-LLM needs identical GPUs in one deployment.
    return Check("GPUs", "ok" if len(kinds) == 1 else "warn", detail)


def check_model(model_path: str | None, engine: str = "trtllm-bench") -> Check:
    """The checkpoint folder is readable and its config.json describes a decoder model."""
    from autotune.specs import model_from_hf_config

    if model_path is None:
        return Check("model", "skip", f"no --model-path ({engine} downloads the model from "
                     "Hugging Face by name)")
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return Check("model", "fail", f"{model_path!r} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        return Check("model", "fail", f"{model_path!r} is not readable")
    config = folder / "config.json"
    if not config.is_file():
        return Check("model", "fail", f"{model_path!r} has no config.json")
    try:
        spec = model_from_hf_config(config)
    except UserError as exc:
        return Check("model", "fail", str(exc))
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    detail = (f"{folder}: {spec.name}, {spec.layers} layers, {spec.heads} heads "
              f"({spec.kv_heads} KV), {spec.total_params / 1e9:.1f} B parameters")
    if not weights:
        return Check("model", "warn", detail + "; no weight files (*.safetensors) found")
    unreadable = [p.name for p in weights if not os.access(p, os.R_OK)]
    if unreadable:
        return Check("model", "fail", f"{folder}: weight file {unreadable[0]!r} is not readable")
    return Check("model", "ok", f"{detail}, {len(weights)} weight files")


def check_workspace(workspace: str, min_free_gib: float = DEFAULT_MIN_FREE_GIB) -> Check:
    """Free disk space (and write access) where datasets, engines, reports and logs go."""
    folder = Path(workspace).expanduser().resolve()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return Check("workspace", "fail", f"{str(folder)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check("workspace", "fail", f"cannot write in {str(existing)!r}")
    free = shutil.disk_usage(existing).free / 2**30
    where = str(folder) if existing == folder else f"{folder} (to be created)"
    if free < min_free_gib:
        return Check("workspace", "fail", f"{where}: {free:,.1f} GiB free, less than "
                     f"{min_free_gib:g} GiB (--min-free-gb)")
    return Check("workspace", "ok", f"{where}: {free:,.1f} GiB free")


def check_database(url: str) -> Check:
    """The study database can be reached (SQLite: the file or its folder can be written)."""
    from autotune.db import check_sqlite_file, engine_kwargs, parse_url, redact, sqlite_path

    try:
        parsed = parse_url(url)
    except UserError as exc:
        return Check("database", "fail", str(exc))
    safe = redact(parsed)
    path = sqlite_path(parsed)
    if parsed.drivername.startswith("sqlite"):
        if path is None:
            return Check("database", "ok", f"{safe} (in memory)")
        try:
            check_sqlite_file(path, must_exist=False)
        except UserError as exc:
            return Check("database", "fail", str(exc))
        return Check("database", "ok", f"{safe}: " + ("exists" if path.exists()
                                                       else "will be created"))
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    kwargs = engine_kwargs(parsed)
    if parsed.drivername.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = create_engine(parsed, **kwargs)
    except ModuleNotFoundError as exc:
        return Check("database", "fail", f"{safe}: driver {exc.name!r} is not installed "
                     f"({install_hint('postgres')})")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return Check("database", "fail", f"{safe}: {first[0] if first else type(exc).__name__}")
    finally:
        engine.dispose()
    return Check("database", "ok", f"{safe}: reachable")


RUNNERS = ("trtllm", "vllm")


def run_checks(*, model_path: str | None, workspace: str, storage: str,
               trtllm_bench: str | None = None, vllm: str | None = None, runner: str = "trtllm",
               min_free_gib: float = DEFAULT_MIN_FREE_GIB) -> list[Check]:
    """Every check for ``runner``, in the order they are printed."""
    if runner not in RUNNERS:
        raise UserError(f"doctor checks --runner {' or '.join(RUNNERS)}, not {runner!r}")
    if runner == "vllm":
        engine = check_vllm(vllm)
        # A CPU build of vLLM runs on the cores (`--gpu cpu`): no GPU to look for.
        gpus = (Check("GPUs", "skip", "a CPU build of vLLM: ranks are CPU cores (--gpu cpu)")
                if "+cpu" in engine.detail else check_gpus())
        checks = [engine, gpus, check_model(model_path, "vllm serve")]
    else:
        checks = [check_trtllm_bench(trtllm_bench), check_gpus(), check_model(model_path)]
    return [*checks, check_workspace(workspace, min_free_gib), check_database(storage)]


def ready(checks: list[Check]) -> bool:
    return not any(c.status == "fail" for c in checks)


def verdict(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.status == "fail"]
    if not failed:
        runner = "vllm" if checks and checks[0].name == "vllm" else "trtllm"
        return f"ready: `autotune search --runner {runner}` can run on this node"
    return f"not ready: {len(failed)} check(s) failed ({', '.join(failed)})"


def print_checks(checks: list[Check]) -> None:
    """One line per check, then the verdict (stdout)."""
    from rich.markup import escape

    from autotune import console

    colour = {"ok": "green", "warn": "yellow", "skip": "dim", "fail": "bold red"}
    width = max(len(c.name) for c in checks)
    for c in checks:
        console.out.print(f"[{colour[c.status]}]{c.status:<4}[/]  {c.name:<{width}}  "
                          f"{escape(c.detail)}", soft_wrap=True)
    style = "bold green" if ready(checks) else "bold red"
    console.out.print(f"[{style}]{escape(verdict(checks))}[/]", soft_wrap=True)


__all__ = [
    "DEFAULT_MIN_FREE_GIB",
    "Check",
    "check_database",
    "check_gpus",
    "check_model",
    "check_trtllm_bench",
    "check_vllm",
    "check_workspace",
    "print_checks",
    "ready",
    "run_checks",
    "verdict",
]
