"""Profiles: the node's own numbers in place of the datasheet's and the default constants.

A profile is stored by name in the study database. It may hold a ``hardware`` part (what
``autotune probe`` measured) and a ``calibration`` part (the model constants ``autotune
calibrate`` fitted to a study's real measurements). ``--profile NAME`` applies it to the GPU spec
and the constants the sim runner uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autotune.errors import UserError
from autotune.model.calibration import Calibration, load_calibration
from autotune.model.perf import FABRIC_EFF
from autotune.probe import HardwareProfile
from autotune.specs import GpuSpec


@dataclass(frozen=True)
class Profile:
    name: str
    gpu: str | None = None  # the catalog GPU it was taken on or fitted for, if known
    hardware: HardwareProfile | None = None
    calibration: Calibration | None = None
    source: str = ""  # "probe", "calibrate --study NAME", ...

    def to_dict(self) -> dict:
        return {"name": self.name, "gpu": self.gpu, "source": self.source,
                "hardware": self.hardware.to_dict() if self.hardware else None,
                "calibration": self.calibration.to_dict() if self.calibration else None}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(name=data["name"], gpu=data.get("gpu"), source=data.get("source", ""),
                   hardware=HardwareProfile.from_dict(data["hardware"]) if data.get("hardware")
                   else None,
                   calibration=Calibration.from_dict(data["calibration"])
                   if data.get("calibration") else None)

    def apply(self, gpu: GpuSpec, precision: str) -> tuple[GpuSpec, Calibration]:
        """The GPU spec and constants to model with under this profile.

        Measured throughputs are what the model's *achieved* rates must equal, so each becomes
        a peak of measured / efficiency: the model then computes peak x efficiency = measured.
        """
        cal = self.calibration or load_calibration(gpu.name, precision)
        hw = self.hardware
        if hw is None:
            return gpu, cal
        tflops = dict(gpu.tflops)
        for dtype in tflops:
            measured = hw.peak_tflops(dtype)
            if measured:
                tflops[dtype] = measured / cal.gemm_eff
        changes: dict = {"tflops": tflops, "memory_gib": hw.memory_gib,
                         "mem_bw_tb_s": hw.memory_tb_s / cal.mem_eff}
        bus = hw.allreduce_bus_gb_s()
        if bus:
            changes["nvlink_gb_s"] = bus / cal.ar_bw_eff
        latency = hw.allreduce_latency_us()
        if latency:
            cal = replace(cal, ar_latency_us=latency)
        between = hw.fabric_gb_s()
        if between:  # the model achieves FABRIC_EFF of the fabric's bandwidth
            changes["fabric_gb_s"] = between / FABRIC_EFF
            changes["fabric_latency_us"] = hw.fabric_latency_us()
        return replace(gpu, **changes), cal


def load_profile(store, name: str) -> Profile:
    data = store.profile(name)
    if data is None:
        names = store.profile_names()
        hint = f" (profiles here: {', '.join(names)})" if names else \
            " (make one with `autotune probe` or `autotune calibrate`)"
        raise UserError(f"no profile named {name!r}{hint}")
    return Profile.from_dict(data)


__all__ = ["Profile", "load_profile"]
