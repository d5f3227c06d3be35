"""Measurement back ends. ``get_runner(name)`` imports a runner only when it is asked for."""

from __future__ import annotations

from importlib import import_module

from autotune.errors import UserError
from autotune.runners._base import EngineBuilder, Runner

#: Runner name -> "module:Class". Heavy runners are imported lazily.
RUNNERS: dict[str, str] = {
    "sim": "autotune.runners.sim:SimRunner",
}


def get_runner(name: str) -> type[Runner]:
    """The runner class registered under ``name`` (UserError if there is none)."""
    try:
        target = RUNNERS[name]
    except KeyError:
        raise UserError(f"unknown runner {name!r}: use one of {', '.join(RUNNERS)}") from None
    module, cls = target.split(":")
    return getattr(import_module(module), cls)


__all__ = ["EngineBuilder", "RUNNERS", "Runner", "get_runner"]
