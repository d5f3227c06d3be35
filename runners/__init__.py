"""Measurement back ends. ``get_runner(name)`` imports a runner only when it is asked for."""

from __future__ import annotations

from importlib import import_module

from autotune.errors import UserError
from autotune.runners._base import EngineBuilder, NoOptions, Runner

#: Runner name -> "module:Class". Heavy runners are imported lazily.
RUNNERS: dict[str, str] = {
    "sim": "autotune.runners.sim:SimRunner",
    "trtllm": "autotune.runners.trtllm:TrtllmRunner",
    "vllm": "autotune.runners.vllm:VllmRunner",
}


def get_runner(name: str) -> type[Runner]:
    """The runner class registered under ``name``, or a plug-in given as ``module:Class``
    (UserError if there is none)."""
    target = RUNNERS.get(name, name if ":" in name else None)
    if target is None:
        raise UserError(f"unknown runner {name!r}: use one of {', '.join(RUNNERS)}, "
                        "or a plug-in as module:Class")
    module, _, cls_name = target.partition(":")
    try:
        cls = getattr(import_module(module), cls_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot load runner {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise UserError(f"runner {name!r} is not a subclass of autotune.runners.Runner")
    return cls


__all__ = ["EngineBuilder", "NoOptions", "RUNNERS", "Runner", "get_runner"]
