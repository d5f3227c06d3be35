"""The fitted constants of the performance model, per GPU and precision (data/calibration/).

``benchmarks/calibrate.py`` fits them on NVIDIA's published TensorRT-LLM numbers and ``autotune
calibrate`` on a study's own measurements; ``perf.PerfModel`` uses them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import cache
from importlib import resources

import yaml

#: The back end the shipped constants describe by default (TensorRT-LLM 1.x, PyTorch back end).
DEFAULT_BACKEND = "pytorch"
#: TensorRT-LLM generations a calibration file may hold overrides for.
BACKENDS = ("pytorch", "trt", "pytorch-no-graphs")
#: The constants that belong to the generation (the runtime), not the GPU: a TensorRT engine
#: fuses a layer into a few kernels and replays its iterations as CUDA graphs, the PyTorch back
#: end launches a dozen per layer, and without CUDA graphs it pays every launch on the host.
BACKEND_CONSTANTS = ("iter_overhead_ms", "layer_overhead_us")
#: The constants that belong to a serving engine other than TensorRT-LLM
#: (``engines/<engine>.yaml``): its runtime's fixed costs and its all-reduce kernel. The rest
#: (GEMM and HBM efficiencies per number format, NVLink, attention) are the GPU's, shared.
ENGINE_CONSTANTS = ("ar_latency_us", "layer_overhead_us", "iter_overhead_ms", "seq_overhead_us",
                    "request_overhead_ms")
#: The serving engine the per-GPU files describe (TensorRT-LLM); the others' files
#: (``engines/<engine>.yaml``) override the constants that belong to the engine, not the GPU.
DEFAULT_ENGINE = "trtllm"
ENGINES = ("trtllm", "vllm", "sglang")
#: The physical range each constant is fitted within (``benchmarks/calibrate.py``), in its own
#: unit. Kept here so the fit and the tests check the same thing:
#: - ``ar_latency_us``: launch + synchronisation of one small-message all-reduce on NVLink:
#:   the custom one-shot/two-shot all-reduce kernels that TensorRT-LLM, vLLM and SGLang use for
#:   decode-sized messages take ~5-15 us on 8 GPUs (NCCL's low-latency protocol ~10-25 us, which
#:   they fall back to for large messages, where the bytes term dominates anyway);
#: - ``ar_nccl_latency_us``: the same for a message too large for those kernels (NCCL's ring or
#:   NVLS all-reduce: kernel launch, channel set-up, the protocol's hand-shakes, ~20-50 us);
#: - ``p2p_latency_us``: one stage-to-stage send (a copy-engine or NCCL send/recv);
#: - ``layer_overhead_us``: what one layer's dozen kernels cost beyond their bytes and FLOPs
#:   (launch gaps, tails, small kernels: norms, RoPE, KV-cache writes);
#: - ``request_overhead_ms``: a request's path outside the GPU's iterations, paid once before
#:   its first token (HTTP, tokenisation, hand-over to the scheduler, streaming the token back);
#: - ``mem_eff``: achievable share of HBM bandwidth for streaming weight reads (~0.6-0.92 of the
#:   datasheet; a device-to-device copy reaches ~0.9 on H100/H200), per number format: the
#:   kernels that stream FP4 weights unpack them and apply their block scales on the way;
#: - ``moe_overhead_us``: what a mixture-of-experts block costs beyond its GEMMs' bytes and
#:   FLOPs and the layer's fixed cost: the router's top-k, permuting the tokens to their
#:   experts and back, the grouped GEMMs' launches (a handful of kernels, ~5-80 us).
BOUNDS: dict[str, tuple[float, float]] = {
    "gemm_eff": (0.2, 1.0),
    "gemm_half_tokens": (1.0, 4096.0),
    "mem_eff": (0.5, 0.95),
    "attn_eff": (0.05, 1.0),
    "ar_latency_us": (2.0, 15.0),
    "ar_nccl_latency_us": (10.0, 60.0),
    "p2p_latency_us": (2.0, 40.0),
    "ar_bw_eff": (0.05, 1.0),
    "layer_overhead_us": (0.1, 60.0),
    "iter_overhead_ms": (0.01, 20.0),
    "seq_overhead_us": (0.01, 200.0),
    "request_overhead_ms": (0.5, 300.0),
    "moe_overhead_us": (2.0, 80.0),
}


@dataclass(frozen=True)
class Calibration:
    """The fitted constants of the model for one GPU and precision (see data/calibration/).

    Efficiencies are fractions of the GPU's datasheet peaks; ``profile.py`` relies on
    achieved = peak x efficiency for the GEMM, HBM and all-reduce rates.
    """

    gemm_eff: float = 0.65  # fraction of dense peak FLOP/s that large GEMMs reach
    gemm_half_tokens: float = 150.0  # tokens (per expert for MoE) at which GEMMs reach half of it
    mem_eff: float = 0.80  # fraction of HBM bandwidth that weight and KV-cache reads reach
    attn_eff: float = 0.65  # fraction of 16-bit dense peak that prefill attention reaches
    ar_latency_us: float = 12.0  # launch + sync of one all-reduce, any size (microseconds)
    ar_bw_eff: float = 0.75  # all-reduce bus bandwidth / per-direction NVLink bandwidth
    ar_nccl_latency_us: float = 30.0  # the same above the custom kernel's size (NCCL)
    iter_overhead_ms: float = 0.5  # fixed cost of one scheduler iteration (milliseconds)
    seq_overhead_us: float = 5.0  # cost per request in every iteration (microseconds)
    layer_overhead_us: float = 5.0  # fixed cost of one layer per iteration (microseconds)
    p2p_latency_us: float = 15.0  # fixed cost of one stage-to-stage send (microseconds)
    request_overhead_ms: float = 1.0  # once per request, before its first token (milliseconds)
    moe_overhead_us: float = 20.0  # fixed cost of one MoE block per iteration (microseconds)

    def out_of_bounds(self) -> list[str]:
        """Names of the constants outside their physical range (``BOUNDS``)."""
        return [n for n, (lo, hi) in BOUNDS.items()
                if not lo * (1 - 1e-6) <= getattr(self, n) <= hi * (1 + 1e-6)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown calibration constants: {', '.join(sorted(unknown))}")
        return cls(**{k: float(v) for k, v in data.items()})


def _calibration_folder():
    return resources.files("autotune").joinpath("data", "calibration")


def calibration_file(gpu: str, precision: str) -> str | None:
    """The file holding ``gpu``/``precision``'s constants, or None (then ``default.yaml``).

    A precision without its own file borrows another precision's file of the same GPU (FP8
    first): NVLink, attention and the fixed costs are the GPU's; the GEMM rate and the HBM
    share that weight streaming reaches are the borrowed precision's.
    """
    folder = _calibration_folder()
    for p in (precision, "fp8", "bf16", "fp4"):
        name = f"{gpu}-{p}.yaml"
        if folder.joinpath(name).is_file():
            return name
    return None


@cache
def load_calibration(gpu: str, precision: str, backend: str | None = None,
                     engine: str | None = None) -> Calibration:
    """Constants for ``gpu``/``precision``: ``<gpu>-<precision>.yaml`` over ``default.yaml``.

    A file's top-level constants describe ``DEFAULT_BACKEND``; its ``backends:`` map overrides
    some of them for another TensorRT-LLM generation (``trt``: the TensorRT engines of 0.12-0.17,
    ``pytorch-no-graphs``: the PyTorch back end without CUDA graphs). ``engine`` (None:
    TensorRT-LLM) other than ``trtllm`` lays ``engines/<engine>.yaml`` over the result: its
    top-level constants, then those of its ``gpus: {<gpu>: ...}`` map.
    """
    folder = _calibration_folder()
    merged = yaml.safe_load(folder.joinpath("default.yaml").read_text())
    merged.pop("backends", None)
    name = calibration_file(gpu, precision)
    overrides: dict = {}
    if name:
        specific = dict(yaml.safe_load(folder.joinpath(name).read_text()) or {})
        overrides = specific.pop("backends", None) or {}
        specific.pop("fit", None)  # provenance of the fit, not a constant
        merged.update(specific)
    if backend and backend != DEFAULT_BACKEND:
        if backend not in BACKENDS:
            raise ValueError(f"unknown back end {backend!r}: use one of {', '.join(BACKENDS)}")
        over = overrides.get(backend) or {}
        _only(over, BACKEND_CONSTANTS, f"{name}: back end {backend!r}")
        merged.update(over)
    if engine and engine != DEFAULT_ENGINE:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
        path = folder.joinpath("engines", f"{engine}.yaml")
        if path.is_file():
            data = dict(yaml.safe_load(path.read_text()) or {})
            per_gpu = data.pop("gpus", None) or {}
            data.pop("fit", None)
            _only(data, ENGINE_CONSTANTS, f"engines/{engine}.yaml")
            merged.update(data)
            _only(per_gpu.get(gpu) or {}, ENGINE_CONSTANTS, f"engines/{engine}.yaml ({gpu})")
            merged.update(per_gpu.get(gpu) or {})
    return Calibration.from_dict(merged)


def _only(constants: dict, allowed: tuple[str, ...], where: str) -> None:
    """Refuse a file's override of a constant that is not its to set (ValueError)."""
    foreign = sorted(set(constants) - set(allowed))
    if foreign:
        raise ValueError(f"{where} sets {', '.join(foreign)}, which belong to the GPU "
                         f"(it may set {', '.join(allowed)})")


def with_constants(cal: Calibration, **changes: float) -> Calibration:
    """A copy of ``cal`` with some constants changed (used by calibration and tests)."""
    return replace(cal, **changes)


__all__ = ["BACKENDS", "BACKEND_CONSTANTS", "BOUNDS", "DEFAULT_BACKEND", "DEFAULT_ENGINE",
           "ENGINES", "ENGINE_CONSTANTS", "Calibration", "calibration_file", "load_calibration",
           "with_constants"]
