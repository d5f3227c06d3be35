"""A scenario: what a study tunes for. Every worker joining a study must bring the same one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune.errors import UserError
from autotune.slo import SLO, parse_slo
from autotune.specs import GpuSpec, ModelSpec, Workload, load_gpu, load_model, resolve_precision

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
    def build(cls, *, model: str, gpu: str, num_gpus: int, precision: str | None, isl: int,
              osl: int, slo: str | None, runner: str = "sim", isl_std: float = 0.0,
              osl_std: float = 0.0, profile: Profile | None = None,
              check_context: bool = True) -> Scenario:
        """Parse and check every user-given part; raises UserError on the first bad one.

        ``check_context``: refuse prompts plus outputs longer than the model's context (only
        a replay of published runs that went past it turns this off)."""
        slo_v = parse_slo(slo)
        gpu_v = load_gpu(gpu)
        model_v = load_model(model)
        if not isinstance(num_gpus, int) or num_gpus < 1:
            raise UserError(f"--num-gpus must be >= 1, got {num_gpus!r}")
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

    def default_study_name(self) -> str:
        slo = str(self.slo).replace(":", "-").replace("<=", "le").replace("<", "lt") or "maxtput"
        slo = slo.replace(",", "_")
        return (f"{self.model.name}-{self.gpu.name}x{self.num_gpus}-{self.precision}-"
                f"{self.workload.label()}-{slo}")


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
