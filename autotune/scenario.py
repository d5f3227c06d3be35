"""A scenario: what a study tunes for. Every worker joining a study must bring the same one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune.errors import UserError
from autotune.slo import SLO, parse_slo
from autotune.specs import (
    GpuSpec,
    ModelSpec,
    Workload,
    load_gpu,
    load_model,
    resolve_precision,
    with_nodes,
)

if TYPE_CHECKING:
    from autotune.model import Calibration
    from autotune.profile import Profile


@dataclass(frozen=True)
class Scenario:
    """Model, GPUs, precision, workload, SLO and runner of one study."""

    model: ModelSpec
    gpu: GpuSpec
    num_gpus: int
    precision: str
    workload: Workload
    slo: SLO
    runner: str = "sim"
    profile: str | None = None  # name of the profile applied to ``gpu`` and ``calibration``
    calibration: Calibration | None = None  # model constants (None: the GPU's defaults)

    @classmethod
    def build(cls, *, model: str, gpu: str, num_gpus: int | None, precision: str | None,
              isl: int, osl: int, slo: str | None, runner: str = "sim", isl_std: float = 0.0,
              osl_std: float = 0.0, profile: Profile | None = None,
              check_context: bool = True, nodes: int | None = None,
              gpus_per_node: int | None = None, fabric: str | None = None) -> Scenario:
        """Parse and check every user-given part; raises UserError on the first bad one.

        GPUs: ``num_gpus`` in all, or ``nodes`` whole nodes of the system's GPUs per node
        (``gpus_per_node`` overrides the GPU spec's, ``fabric`` names its inter-node fabric);
        neither: one node. More GPUs than one node holds must be whole nodes.

        ``check_context``: refuse prompts plus outputs longer than the model's context (only
        a replay of published runs that went past it turns this off)."""
        slo_v = parse_slo(slo)
        gpu_v = with_nodes(load_gpu(gpu), fabric=fabric, gpus_per_node=gpus_per_node)
        model_v = load_model(model)
        num_gpus = _gpu_count(gpu_v, num_gpus, nodes)
        workload = Workload(isl=isl, osl=osl, isl_std=isl_std, osl_std=osl_std)
        if check_context and model_v.max_context and isl + osl > model_v.max_context:
            raise UserError(f"--isl {isl} + --osl {osl} = {isl + osl:,} tokens is longer than "
                            f"{model_v.name}'s context of {model_v.max_context:,} tokens")
        precision_v = resolve_precision(gpu_v, precision)
        calibration = None
        if profile is not None:
            gpu_v, calibration = profile.apply(gpu_v, precision_v)
        return cls(model_v, gpu_v, num_gpus, precision_v, workload, slo_v, runner,
                   profile.name if profile else None, calibration)

    def identity(self) -> dict:
        """The JSON-able facts that must match for two workers to share a study."""
        return {
            "model": self.model.name,
            "model_spec": self.model.to_dict(),
            "gpu": self.gpu.name,
            "gpu_spec": self.gpu.to_dict(),  # the figures, not the name, say what it is
            "num_gpus": self.num_gpus,
            "precision": self.precision,
            "workload": self.workload.to_dict(),
            "slo": str(self.slo),
            "runner": self.runner,
            "profile": self.profile,
        }

    @classmethod
    def from_identity(cls, identity: dict) -> Scenario:
        """The scenario a study was created with (``identity()`` read back from the database)."""
        from autotune.specs import GpuSpec, ModelSpec

        gpu = (GpuSpec(**identity["gpu_spec"]) if identity.get("gpu_spec")
               else load_gpu(identity["gpu"]))
        return cls(ModelSpec(**identity["model_spec"]), gpu, identity["num_gpus"],
                   identity["precision"], Workload.from_dict(identity["workload"]),
                   parse_slo(identity.get("slo") or None), identity.get("runner", "sim"))

    @property
    def nodes(self) -> int:
        """Nodes the scenario's GPUs fill (1 while they fit in one)."""
        return -(-self.num_gpus // self.gpu.gpus_per_node)

    def default_study_name(self) -> str:
        slo = str(self.slo).replace(":", "-").replace("<=", "le").replace("<", "lt") or "maxtput"
        slo = slo.replace(",", "_")
        return (f"{self.model.name}-{self.gpu.name}x{self.num_gpus}-{self.precision}-"
                f"{self.workload.label()}-{slo}")


def _gpu_count(gpu: GpuSpec, num_gpus: int | None, nodes: int | None) -> int:
    """All the scenario's GPUs, from ``--num-gpus`` and/or ``--nodes`` (UserError if bad)."""
    per_node = gpu.gpus_per_node
    if nodes is not None:
        if not isinstance(nodes, int) or nodes < 1:
            raise UserError(f"--nodes must be >= 1, got {nodes!r}")
        if num_gpus is not None and num_gpus != nodes * per_node:
            raise UserError(f"--num-gpus {num_gpus} is not --nodes {nodes} x {per_node} GPUs "
                            f"per {gpu.name} node; give one of them (or --gpus-per-node)")
        return nodes * per_node
    if num_gpus is None:
        return per_node
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise UserError(f"--num-gpus must be >= 1, got {num_gpus!r}")
    if num_gpus > per_node and num_gpus % per_node:
        raise UserError(f"--num-gpus {num_gpus} spans {gpu.name} nodes of {per_node} GPUs but "
                        "not whole ones: use a multiple of it (--nodes N), or --gpus-per-node")
    return num_gpus


def identity_differences(stored: dict, wanted: dict) -> list[str]:
    """Human lines naming each fact that differs between two scenario identities."""
    out = []
    for key in ("model", "gpu", "num_gpus", "precision", "workload", "slo", "runner", "profile",
                "model_spec", "gpu_spec"):
        have, want = stored.get(key), wanted.get(key)
        if key.endswith("_spec"):
            name = key.removesuffix("_spec")
            if not isinstance(have, dict) or not isinstance(want, dict) or \
                    stored.get(name) != wanted.get(name):
                continue  # not recorded by an older autotune, or already named by the name
            # Two specs by one name (a custom GPU YAML called h100): each figure that differs.
            # A fact a study from an older autotune did not record is not a difference.
            out += [f"{name} {k}: study has {have[k]!r}, this run has {want[k]!r}"
                    for k in sorted(have) if k in want and have[k] != want[k]]
        elif have != want:
            out.append(f"{key}: study has {have!r}, this run has {want!r}")
    return out


__all__ = ["Scenario", "identity_differences"]
