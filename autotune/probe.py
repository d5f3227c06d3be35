"""``autotune probe``: measure this machine with PyTorch and keep the result as a profile.

What it measures, on every local GPU's kind (or on the CPU where there is none, so the same code
is exercised everywhere):
- matmul throughput (TFLOP/s) at several sizes for bf16, and fp8 where the GPU has it;
- device memory bandwidth (TB/s) from large copies;
- all-reduce and point-to-point bandwidth and latency across the local devices at several message
  sizes, one process per device (NCCL on GPUs, gloo with 2 processes on the CPU);
- with ``hosts``, the fabric between nodes: point-to-point latency and bandwidth between a
  process on node 0 and one on node 1, started there through srun or mpirun (the same command
  lines the runners use) and joined with torch.distributed over TCP.

torch is an optional extra (``probe``) and only imported here.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from autotune.errors import UserError, install_hint

#: Matrix sizes (square, elements per side) and message sizes (bytes) probed.
GPU_MATMUL_SIZES = (1024, 2048, 4096, 8192)
CPU_MATMUL_SIZES = (128, 256, 512)
GPU_MESSAGE_BYTES = (2**10, 2**16, 2**20, 2**24, 2**27)
CPU_MESSAGE_BYTES = (2**10, 2**14, 2**18, 2**22)
CPU_WORLD = 2  # gloo processes on a machine without GPUs
FABRIC_MESSAGE_BYTES = (2**10, 2**20, 2**24, 2**27)  # between nodes (GPUs)


def require_torch():
    try:
        import torch
    except ImportError:
        raise UserError(f"autotune probe needs PyTorch: {install_hint('probe')}; on a "
                        "CPU-only machine pip install torch==2.13.0 first (an unpinned torch "
                        "is a multi-GB CUDA build)") from None
    return torch


@dataclass(frozen=True)
class MatmulResult:
    dtype: str
    size: int  # m = n = k
    tflops: float


@dataclass(frozen=True)
class CommResult:
    op: str  # "all_reduce" or "p2p"
    bytes: int
    latency_us: float  # median time of one operation
    bus_gb_s: float  # NCCL-tests' bus bandwidth: all-reduce moves 2(n-1)/n of the buffer


@dataclass(frozen=True)
class HardwareProfile:
    """What ``probe`` measured on one machine (units in the field names)."""

    name: str
    device: str  # "cuda" or "cpu"
    device_name: str
    device_count: int
    memory_gib: float
    host: str
    torch_version: str
    backend: str  # collective backend: "nccl" or "gloo"
    matmul: tuple[MatmulResult, ...] = ()
    memory_tb_s: float = 0.0
    comms: tuple[CommResult, ...] = ()
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: Between nodes: point-to-point from node 0 to node 1 (``fabric_hosts``), one way.
    fabric: tuple[CommResult, ...] = ()
    fabric_hosts: tuple[str, ...] = ()

    # -- the figures the performance model uses
    def peak_tflops(self, dtype: str) -> float | None:
        values = [m.tflops for m in self.matmul if m.dtype == dtype]
        return max(values) if values else None

    def allreduce_latency_us(self) -> float | None:
        small = [c for c in self.comms if c.op == "all_reduce"]
        return min(small, key=lambda c: c.bytes).latency_us if small else None

    def allreduce_bus_gb_s(self) -> float | None:
        big = [c for c in self.comms if c.op == "all_reduce"]
        return max(c.bus_gb_s for c in big) if big else None

    def fabric_latency_us(self) -> float | None:
        """One message's time between nodes (the smallest message's), None if not probed."""
        return min(self.fabric, key=lambda c: c.bytes).latency_us if self.fabric else None

    def fabric_gb_s(self) -> float | None:
        """Bandwidth between nodes, one direction (the best message size's), None if not
        probed."""
        return max(c.bus_gb_s for c in self.fabric) if self.fabric else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HardwareProfile:
        d = dict(data)
        d["matmul"] = tuple(MatmulResult(**m) for m in d.get("matmul", ()))
        d["comms"] = tuple(CommResult(**c) for c in d.get("comms", ()))
        d["notes"] = tuple(d.get("notes", ()))
        d["fabric"] = tuple(CommResult(**c) for c in d.get("fabric", ()))
        d["fabric_hosts"] = tuple(d.get("fabric_hosts", ()))
        return cls(**d)


def _median_time(fn: Callable[[], None], sync: Callable[[], None], repeats: int,
                 min_seconds: float = 0.05, agree: Callable[[int], int] | None = None) -> float:
    """Median seconds of ``fn`` after a warm-up, repeating each sample until it is measurable.

    ``agree`` turns this process's choice of calls per sample into the one every process of a
    collective uses: ranks that called a collective a different number of times would hang.
    """
    fn()
    sync()
    inner = 1
    while True:  # enough calls per sample that timer resolution does not matter
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        enough = time.perf_counter() - t0 >= min_seconds / repeats or inner >= 1024
        if agree is not None:
            enough = bool(agree(int(enough)) == 1)  # all ranks must agree to stop
        if enough:
            break
        inner *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def probe_matmul(torch, device: str, sizes: Sequence[int], dtypes: Sequence[str],
                 repeats: int = 5) -> tuple[list[MatmulResult], list[str]]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out, notes = [], []
    for dtype in dtypes:
        for n in sizes:
            try:
                if dtype == "fp8":
                    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
                    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
                    one = torch.tensor(1.0, device=device)

                    def fn(a=a, b=b, one=one):
                        torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                         out_dtype=torch.bfloat16)
                else:
                    dt = {"bf16": torch.bfloat16, "fp16": torch.float16,
                          "fp32": torch.float32}[dtype]
                    a = torch.randn(n, n, device=device, dtype=dt)
                    b = torch.randn(n, n, device=device, dtype=dt)

                    def fn(a=a, b=b):
                        torch.matmul(a, b)
                seconds = _median_time(fn, sync, repeats)
            except (RuntimeError, TypeError, AttributeError) as exc:
                notes.append(f"matmul {dtype} {n}: not supported here ({str(exc).splitlines()[0]})")
                break
            out.append(MatmulResult(dtype, n, 2 * n**3 / seconds / 1e12))
    return out, notes


def probe_memory(torch, device: str, nbytes: int, repeats: int = 5) -> float:
    """Copy bandwidth in TB/s (a copy reads and writes every byte)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), sync, repeats)
    return 2 * nbytes / seconds / 1e12


def _agreement(torch, dist, device: str) -> Callable[[int], int]:
    """``all_agree(value)``: the minimum of ``value`` over the ranks (1 only when every rank
    says 1), so that every rank of a timed collective loop stops at the same count."""
    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def all_agree(value: int) -> int:
        flag.fill_(value)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return int(flag.item())

    return all_agree


def _one_way_s(dist, rank: int, buf, sync, repeats: int, agree) -> float:
    """Seconds for ``buf`` to go from rank 0 to rank 1 (half a ping-pong; other ranks wait)."""
    def ping():
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
    dist.barrier()
    return _median_time(ping, sync, repeats, min_seconds=0.02, agree=agree) / 2


def _comm_worker(rank: int, world: int, port: int, backend: str, sizes: Sequence[int],
                 repeats: int, results) -> None:  # pragma: no cover - runs in child processes
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo") if backend == "gloo" else None
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    all_agree = _agreement(torch, dist, device)
    rows = []
    for nbytes in sizes:
        buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        dist.barrier()
        t = _median_time(lambda buf=buf: dist.all_reduce(buf), sync, repeats, min_seconds=0.02,
                         agree=all_agree)
        rows.append(("all_reduce", nbytes, t, nbytes / t * 2 * (world - 1) / world / 1e9))
        if world >= 2:
            t = _one_way_s(dist, rank, buf, sync, repeats, all_agree)
            rows.append(("p2p", nbytes, t, nbytes / t / 1e9))
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def probe_comms(torch, world: int, backend: str, sizes: Sequence[int], repeats: int = 5
                ) -> list[CommResult]:
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    results = ctx.SimpleQueue()
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp.start_processes(_comm_worker, args=(world, port, backend, tuple(sizes), repeats, results),
                        nprocs=world, start_method="spawn", join=True)
    rows = results.get()
    return [CommResult(op, b, t * 1e6, bw) for op, b, t, bw in rows]


#: What node 0's process prints before its results (one JSON line), for the parent to find.
FABRIC_MARK = "autotune-fabric: "
FABRIC_TIMEOUT_S = 600.0


def _fabric_worker(rank: int, world: int, master: str, sizes: Sequence[int],
                   repeats: int) -> None:  # pragma: no cover - runs on each node
    """One node's process: join the others at ``master`` (host:port) and ping-pong messages of
    ``sizes`` bytes between node 0 and node 1 (NCCL between GPUs, gloo without); node 0 prints
    the one-way times."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend, device = ("nccl", "cuda") if cuda else ("gloo", "cpu")
    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    all_agree = _agreement(torch, dist, device)
    rows = []
    for nbytes in sizes:
        buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        t = _one_way_s(dist, rank, buf, sync, repeats, all_agree)
        rows.append({"op": "p2p", "bytes": nbytes, "latency_us": t * 1e6,
                     "bus_gb_s": nbytes / t / 1e9})
    if rank == 0:
        print(FABRIC_MARK + json.dumps({"backend": backend, "rows": rows}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def probe_fabric(hosts: Sequence[str], launcher: str, *, sizes: Sequence[int],
                 repeats: int = 5, port: int | None = None,
                 timeout_s: float = FABRIC_TIMEOUT_S) -> list[CommResult]:
    """Point-to-point between node 0 and node 1 of ``hosts``: one process per node, started
    through ``launcher`` (srun or mpirun, with this interpreter: the nodes share the
    environment's path) and joined on node 0 at ``port`` (a free one by default). The processes
    run side by side, their output in files; the first that fails stops the others, and none
    outlives the probe (``autotune.runners._process``). UserError naming the node and its last
    line when one fails, or when the probe outlives ``timeout_s``."""
    import sys
    import tempfile
    from pathlib import Path

    from autotune.errors import TimedOut
    from autotune.runners._launch import check_launcher, launch_prefix
    from autotune.runners._process import Job, ProcessGroups, read_log

    _, exe = check_launcher(launcher)
    if exe is None:
        raise UserError("the fabric probe reaches other nodes with --launcher srun or mpirun")
    if port is None:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    master = f"{hosts[0]}:{port}"
    with tempfile.TemporaryDirectory(prefix="autotune-fabric-") as tmp:
        jobs = [Job((*launch_prefix(launcher, hosts=[host], tasks=1, mpi=False, exe=exe),
                     sys.executable, "-m", "autotune.probe", "--fabric-rank", str(rank),
                     "--world", str(len(hosts)), "--master", master,
                     "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats)),
                    Path(tmp) / f"node-{rank}.log", dict(os.environ))
                for rank, host in enumerate(hosts)]
        try:
            results = ProcessGroups().run(jobs, timeout_s, what="the fabric probe")
        except TimedOut:
            raise UserError(f"the fabric probe over {','.join(hosts)} did not finish within "
                            f"{timeout_s:g} s (can node 1 reach {master}?)") from None
        for host, res in zip(hosts, results):
            if res.returncode not in (0, None):
                lines = read_log(res.job.log_path).strip().splitlines() or ["no output"]
                raise UserError(f"the fabric probe's process on {host} exited with "
                                f"{res.returncode}: {lines[-1]}")
        out = read_log(jobs[0].log_path)
    found = [line[len(FABRIC_MARK):] for line in out.splitlines() if line.startswith(FABRIC_MARK)]
    if not found:
        raise UserError(f"the fabric probe's process on {hosts[0]} printed no result")
    return [CommResult(**row) for row in json.loads(found[-1])["rows"]]


def probe(name: str, *, quick: bool = False, progress: Callable[[str], None] | None = None,
          hosts: Sequence[str] = (), launcher: str = "srun") -> HardwareProfile:
    """Measure this machine (all local GPUs, else the CPU) and return its profile."""
    torch = require_torch()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    repeats = 3 if quick else 7
    if cuda:
        device, count = "cuda", torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        device_name, memory_gib = props.name, props.total_memory / 2**30
        dtypes = ["bf16"] + (["fp8"] if torch.cuda.get_device_capability(0) >= (8, 9) else [])
        sizes, messages, backend, world = GPU_MATMUL_SIZES, GPU_MESSAGE_BYTES, "nccl", count
        copy_bytes = 2**30
    else:
        device, count = "cpu", 1
        device_name = platform.processor() or platform.machine()
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        dtypes = ["bf16", "fp32"]
        sizes, messages, backend, world = CPU_MATMUL_SIZES, CPU_MESSAGE_BYTES, "gloo", CPU_WORLD
        copy_bytes = 2**26
    if quick:
        sizes, messages = sizes[:2], messages[:2]
    say(f"matmul on {device_name} ({', '.join(dtypes)})")
    matmul, notes = probe_matmul(torch, device, sizes, dtypes, repeats)
    say("memory bandwidth")
    mem = probe_memory(torch, device, copy_bytes, repeats)
    comms: list[CommResult] = []
    if world >= 2:
        say(f"all-reduce and point-to-point, {world} processes ({backend})")
        comms = probe_comms(torch, world, backend, messages, repeats)
    else:
        notes.append("one GPU: no collectives to measure")
    fabric: list[CommResult] = []
    if len(hosts) >= 2:
        say(f"the fabric between {hosts[0]} and {hosts[1]} ({launcher})")
        between = FABRIC_MESSAGE_BYTES if cuda else CPU_MESSAGE_BYTES
        fabric = probe_fabric(hosts, launcher, sizes=between[:2] if quick else between,
                              repeats=repeats)
    return HardwareProfile(
        name=name, device=device, device_name=device_name, device_count=count,
        memory_gib=round(memory_gib, 2), host=socket.gethostname(),
        torch_version=torch.__version__, backend=backend, matmul=tuple(matmul),
        memory_tb_s=mem, comms=tuple(comms), seconds=time.perf_counter() - started,
        notes=tuple(notes), fabric=tuple(fabric), fabric_hosts=tuple(hosts[:2]),
    )


def _fabric_main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - per node
    """``python -m autotune.probe --fabric-rank K ...``: one node's part of ``probe_fabric``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m autotune.probe")
    p.add_argument("--fabric-rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True)
    p.add_argument("--sizes", required=True)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    _fabric_worker(a.fabric_rank, a.world, a.master, [int(x) for x in a.sizes.split(",")],
                   a.repeats)


if __name__ == "__main__":  # pragma: no cover
    _fabric_main()


__all__ = ["CommResult", "HardwareProfile", "MatmulResult", "probe", "probe_fabric",
           "require_torch"]
