"""The trtllm runner's engine cache: one ``trtllm-bench build`` per engine key, shared by every
worker through the file system (a lock per key) and, when the study shares its database, the
``autotune_engine_cache`` table. A build that ran out of memory or refused the layout is
remembered and not tried again."""

from __future__ import annotations

import fcntl
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autotune.config import EngineConfig
from autotune.errors import BuildFailed, BuildOutOfMemory, Interrupted, InvalidConfig
from autotune.runners._process import Job, log_tail, read_log
from autotune.runners._tools import public_env, write_json
from autotune.runners.trtllm._process import classify
from autotune.runners.trtllm.argv import QUANTIZATION
from autotune.specs import Workload

ENGINE_INFO = "autotune-engine.json"
_ENGINE_SAVED = re.compile(r"ENGINE SAVED: (.+?)\s*$", re.MULTILINE)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class EngineCache:
    """Mixin of the trtllm runner: the built engine for a config, from the cache or built now.

    Expects of its host: ``options`` (TrtllmSettings), ``workspace``, ``version``, ``_procs``
    (ProcessGroups), ``engine_store``, ``engine_key``, ``build_argv``, ``_env`` and
    ``_max_seq_len``.
    """

    def _engine_for(self, config: EngineConfig, workload: Workload,
                    max_seq_len: int | None = None) -> dict:
        """The built engine for ``config``: from the cache, else built now (one builder per key,
        the others wait for it)."""
        seq = max_seq_len or self._max_seq_len(workload)
        key = self.engine_key(config, seq)
        folder = self.workspace / "engines" / key
        cached = self._cached_engine(key, folder)
        if cached is not None:
            return {**cached, "reused": True}
        with self._lock(folder.parent / f"{key}.lock"):
            cached = self._cached_engine(key, folder)  # built by another worker while we waited
            if cached is not None:
                return {**cached, "reused": True}
            return {**self._build(config, key, folder, seq), "reused": False}

    @contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._procs.interrupted:
                        raise Interrupted("interrupted while waiting for another worker's "
                                          "engine build") from None
                    time.sleep(1.0)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _cached_engine(self, key: str, folder: Path) -> dict | None:
        info = _read_json(folder / ENGINE_INFO)
        if info is None and self.engine_store is not None:
            info = self.engine_store.engine_get(key)
        if info is None:
            return None
        failure = info.get("failure")
        if failure:
            # A build that ran out of memory or refused the layout will do so again.
            cls = {c.failure_class: c for c in (BuildOutOfMemory, InvalidConfig)}.get(
                failure.get("class"), BuildFailed)
            raise cls(f"{failure.get('message', 'engine build failed')} (an earlier build with "
                      "the same engine settings)", log_tail=failure.get("log_tail", ""),
                      log_path=failure.get("log_path"))
        engine_dir = info.get("engine_dir")
        return info if engine_dir and Path(engine_dir).is_dir() else None

    def _build(self, config: EngineConfig, key: str, folder: Path, max_seq_len: int) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "build.log"
        argv = self.build_argv(config, folder, max_seq_len)
        write_json(folder / "argv.json", {"argv": argv, "env": public_env(self.options.env)})
        (result,) = self._procs.run([Job(tuple(argv), log, self._env(), cwd=folder)],
                                    self.options.build_timeout, what="trtllm-bench build")
        settings = {**config.engine_settings(), "quantization": QUANTIZATION.get(config.precision),
                    "max_seq_len": max_seq_len}
        if not result.ok:
            failure = classify(result, phase="build")
            if isinstance(failure, (BuildOutOfMemory, InvalidConfig)):
                self._record_engine(key, folder, {"key": key, "settings": settings, "failure": {
                    "class": failure.failure_class, "message": str(failure),
                    "log_tail": failure.log_tail, "log_path": failure.log_path}})
            raise failure
        saved = _ENGINE_SAVED.findall(read_log(log))
        engine_dir = Path(saved[-1]) if saved else folder / self.options.hf_name / \
            f"tp_{config.tp}_pp_{config.pp}"
        if not engine_dir.is_dir():
            raise BuildFailed(f"trtllm-bench build ended without an engine at {engine_dir}",
                              log_tail=log_tail(log), log_path=str(log))
        # The limits the engine was really built with (its config.json), else the ones asked for.
        built = (_read_json(engine_dir / "config.json") or {}).get("build_config") or {}
        limits = {}
        for k in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            value = built.get(k)
            limits[k] = value if isinstance(value, int) and value > 0 else settings[k]
        info = {"key": key, "engine_dir": str(engine_dir), "settings": settings,
                "limits": limits, "host": socket.gethostname(),
                "build_s": round(result.elapsed_s, 1), "trtllm_version": self.version,
                "log_path": str(log), "argv": argv, "built_at": time.time()}
        self._record_engine(key, folder, info)
        return info

    def _record_engine(self, key: str, folder: Path, info: dict) -> None:
        write_json(folder / ENGINE_INFO, info)
        if self.engine_store is not None:
            self.engine_store.engine_put(key, self.name, info)


__all__ = ["ENGINE_INFO", "EngineCache"]
