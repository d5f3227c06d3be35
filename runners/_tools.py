"""What every runner of an external engine needs of its executables: finding them, reading the
engine's version from its package metadata without importing it, keeping secrets out of what is
stored, and writing files other workers read whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

_SECRET = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)


def find_executable(name: str) -> str | None:
    """An executable by path (when ``name`` holds a slash) or on PATH, as an absolute path."""
    if os.sep in name:
        p = Path(name).expanduser()
        return str(p.resolve()) if p.is_file() and os.access(p, os.X_OK) else None
    found = shutil.which(name)
    return str(Path(found).resolve()) if found else None


def interpreter_of(executable: str) -> list[str] | None:
    """The Python interpreter an entry-point script's ``#!`` line names (None: not a Python
    script)."""
    try:
        with open(executable, "rb") as fh:
            first = fh.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    interpreter = first[2:].decode("utf-8", errors="replace").split()
    if not interpreter or not any("python" in Path(part).name for part in interpreter):
        return None
    return interpreter


def package_version(executable: str, distributions: Sequence[str],
                    env: dict[str, str] | None = None, timeout_s: float = 30.0) -> str | None:
    """The version of the first of ``distributions`` installed beside ``executable`` (an entry
    point script), read from package metadata by the interpreter of its ``#!`` line without
    importing the package (engines take seconds to import); None if unknown."""
    interpreter = interpreter_of(executable)
    if interpreter is None:
        return None
    code = ("import importlib.metadata as m\n"
            f"for d in {tuple(distributions)!r}:\n"
            "    try:\n        print(m.version(d)); break\n"
            "    except m.PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([*interpreter, "-c", code], capture_output=True, text=True,
                             timeout=timeout_s, env=env, stdin=subprocess.DEVNULL, shell=False)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip().splitlines()
    return version[0].strip() if out.returncode == 0 and version else None


def public_env(env: dict[str, str]) -> dict[str, str]:
    """Environment for the settings key and the database: secrets named, never stored."""
    return {k: ("<redacted>" if _SECRET.search(k) else v) for k, v in sorted(env.items())}


def replica_devices(config, num_gpus: int, visible: str | None) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``config``'s replicas: consecutive slices of
    ``tp * pp`` of the visible devices (``visible``, else ``0..num_gpus-1``); None for a single
    replica, which keeps the environment as it is. InvalidConfig when too few are visible."""
    from autotune.errors import InvalidConfig

    if config.dp == 1:
        return [None]
    devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible
               else [str(i) for i in range(num_gpus)])
    per = config.gpus_per_replica
    if len(devices) < per * config.dp:
        raise InvalidConfig(f"{config.label()} needs {per * config.dp} GPUs; "
                            f"{len(devices)} are visible")
    return [",".join(devices[r * per:(r + 1) * per]) for r in range(config.dp)]


def check_run_options(settings, timeouts: Sequence[str]) -> None:
    """The options every runner of a real engine shares (UserError, one line): ``num_requests``
    a positive integer or None, ``warmup`` a non-negative integer, each of ``timeouts`` a
    positive number of seconds, ``env`` a mapping of names to strings."""
    from autotune.errors import UserError

    n = settings.num_requests
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise UserError(f"--num-requests must be a positive integer, got {n!r}")
    w = settings.warmup
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise UserError(f"warmup must be a non-negative integer, got {w!r}")
    for name in timeouts:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number of seconds, "
                            f"got {value!r}")
    env = settings.env
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in env.items()):
        raise UserError("env must map variable names to string values")


def checkpoint_folder(value: str | None) -> str | None:
    """``--model-path`` as an absolute path (None stays None); UserError when it is not a
    readable folder."""
    from autotune.errors import UserError

    if value is None:
        return None
    p = Path(value).expanduser()
    if not p.is_dir():
        raise UserError(f"--model-path {str(value)!r} is not a folder")
    if not os.access(p, os.R_OK | os.X_OK):
        raise UserError(f"--model-path {str(value)!r} is not readable")
    return str(p.resolve())


def write_json(path: Path, data) -> None:
    """Write atomically (temporary file + rename): other workers read whole files only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


__all__ = ["check_run_options", "checkpoint_folder", "find_executable",
           "interpreter_of", "package_version", "public_env", "replica_devices", "write_json"]
