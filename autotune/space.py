"""The search space: which configurations a study may propose, loaded from YAML.

The parallel layout is one categorical over the valid (tp, pp, dp) triples (and never a tp and a
pp sampled apart), for a mixture-of-experts model over (tp, pp, dp, ep, attention DP): TPE learns
far better when it only ever sees valid points (see shared/docs/optuna-notes.md). Layouts whose
weights cannot fit in GPU memory are left out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from autotune.config import EngineConfig, layout_label, parse_layout
from autotune.errors import InvalidConfig, PredictedOutOfMemory, UserError
from autotune.measurement import MAX_CONCURRENCY
from autotune.scenario import Scenario

_KEYS = ("tp", "pp", "max_batch_size", "max_num_tokens", "kv_fraction", "chunked_prefill",
         "concurrency")
#: Settings of mixture-of-experts models only, and their choices when a space does not list
#: them (a space written before MoE support stays valid and dense models never see them).
_MOE_KEYS = {"ep": (1, 2, 4, 8, 16), "attention_dp": (False, True)}


@dataclass(frozen=True)
class Layout:
    """A parallel layout: ``tp x pp`` GPUs per replica, ``dp`` replicas; for a MoE model the
    expert parallelism and attention DP inside each stage's ``tp`` GPUs (see EngineConfig)."""

    tp: int
    pp: int
    dp: int
    ep: int = 1
    attention_dp: bool = False

    @property
    def label(self) -> str:
        return layout_label(self.tp, self.pp, self.dp, self.ep, self.attention_dp)

    @classmethod
    def parse(cls, label: str) -> Layout:
        return cls(*parse_layout(label))

    @classmethod
    def of(cls, config: EngineConfig) -> Layout:
        return cls(config.tp, config.pp, config.dp, config.ep, config.attention_dp)


@dataclass(frozen=True)
class SearchSpace:
    """Choices for each setting; ``concurrency`` is the load ladder each trial measures."""

    tp: tuple[int, ...]
    pp: tuple[int, ...]
    max_batch_size: tuple[int, ...]
    max_num_tokens: tuple[int, ...]
    kv_fraction: tuple[float, ...]
    chunked_prefill: tuple[bool, ...]
    concurrency: tuple[int, ...]
    source: str = "default"
    ep: tuple[int, ...] = _MOE_KEYS["ep"]
    attention_dp: tuple[bool, ...] = _MOE_KEYS["attention_dp"]

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | None = None) -> SearchSpace:
        """A shipped space by name (``default``) or a YAML file path."""
        name = name_or_path or "default"
        shipped = resources.files("autotune.search_spaces").joinpath(f"{name}.yaml")
        if shipped.is_file():
            text, source = shipped.read_text(), name
        else:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"search space {name!r} is neither a shipped space nor a YAML file")
            text, source = path.read_text(), str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"search space {source!r} is not valid YAML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: object, source: str = "<dict>") -> SearchSpace:
        if not isinstance(data, dict):
            raise UserError(f"search space {source!r} must be a mapping of setting -> list")
        unknown = sorted(set(data) - set(_KEYS) - set(_MOE_KEYS))
        if unknown:
            raise UserError(f"search space {source!r}: unknown key(s) {', '.join(unknown)} "
                            f"(known: {', '.join(_KEYS + tuple(_MOE_KEYS))})")
        missing = [k for k in _KEYS if k not in data]
        if missing:
            raise UserError(f"search space {source!r}: missing key(s) {', '.join(missing)}")

        def values(key, kind, ok, what):
            raw = data[key]
            if not isinstance(raw, list) or not raw:
                raise UserError(f"search space {source!r}: {key} must be a non-empty list")
            out = []
            for v in raw:
                if kind is int and v == "max" and key == "concurrency":
                    out.append(MAX_CONCURRENCY)
                    continue
                if kind is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                if not isinstance(v, kind) or (kind is int and isinstance(v, bool)) or not ok(v):
                    raise UserError(f"search space {source!r}: {key} value {v!r} is invalid "
                                    f"({what})")
                out.append(v)
            if len(set(out)) != len(out):
                raise UserError(f"search space {source!r}: {key} lists a value twice")
            return tuple(out)

        pos = lambda v: v >= 1  # noqa: E731
        ladder = values("concurrency", int, pos, "a positive integer or 'max'")
        finite = sorted(c for c in ladder if c != MAX_CONCURRENCY)
        return cls(
            tp=values("tp", int, pos, "a positive integer"),
            pp=values("pp", int, pos, "a positive integer"),
            max_batch_size=values("max_batch_size", int, pos, "a positive integer"),
            max_num_tokens=values("max_num_tokens", int, lambda v: v >= 64, "an integer >= 64"),
            kv_fraction=values("kv_fraction", float, lambda v: 0 < v < 1, "between 0 and 1"),
            chunked_prefill=values("chunked_prefill", bool, lambda v: True, "true or false"),
            concurrency=tuple(finite) + ((MAX_CONCURRENCY,) if MAX_CONCURRENCY in ladder else ()),
            source=source,
            ep=values("ep", int, pos, "a positive integer") if "ep" in data else _MOE_KEYS["ep"],
            attention_dp=(values("attention_dp", bool, lambda v: True, "true or false")
                          if "attention_dp" in data else _MOE_KEYS["attention_dp"]),
        )

    # ---- layouts and configs ------------------------------------------------------------
    def layouts(self, scenario: Scenario, *, weights_only: bool = False) -> list[Layout]:
        """Valid layouts for the scenario that the model says can run; UserError if none is.

        By default a layout must leave room for a KV cache at the space's smallest limits (the
        model's whole memory plan: what the sim runner can simulate). ``weights_only``: only
        the weights must fit, for a real engine, which decides itself near the edge.
        """
        # The model decides what fits; the layout rules are the engines' (one owner for both).
        from autotune.model import PerfModel, check_layout, gate
        from autotune.model.feasibility import check_placement

        m, n = scenario.model, scenario.num_gpus
        out, reasons = [], []
        # A MoE model's layouts also choose the expert parallelism and attention DP inside each
        # stage's tp GPUs (dense models: ep 1, no attention DP).
        moe = (itertools.product(sorted(self.ep), sorted(self.attention_dp)) if m.is_moe
               else [(1, False)])
        for (tp, pp), (ep, adp) in itertools.product(
                itertools.product(sorted(self.tp), sorted(self.pp)), list(moe)):
            if n % (tp * pp):
                continue
            cfg = EngineConfig(tp=tp, pp=pp, dp=n // (tp * pp), precision=scenario.precision,
                               max_num_tokens=min(self.max_num_tokens),
                               max_batch_size=min(self.max_batch_size),
                               kv_fraction=max(self.kv_fraction), ep=ep, attention_dp=adp)
            try:
                check_layout(m, cfg)
                if n > scenario.gpu.gpus_per_node:
                    check_placement(scenario.gpu, cfg)
            except InvalidConfig as exc:
                if m.heads % tp:  # the one rule worth naming: the others only trim the space
                    reasons.append(f"tp{tp}: {exc}")
                continue
            perf = PerfModel(m, scenario.gpu, cfg, scenario.calibration)
            try:
                gate(perf)
            except PredictedOutOfMemory:
                reasons.append(f"tp{tp}-pp{pp}: weights do not fit")
                continue
            if not weights_only and not perf.memory().fits:
                reasons.append(f"tp{tp}-pp{pp}: no room for a KV cache")
                continue
            out.append(Layout.of(cfg))
        if not out:
            why = "; ".join(reasons) or "no tp*pp from the space divides the GPU count"
            raise UserError(f"no valid parallel layout for {m.name} on {n}x{scenario.gpu.name} "
                            f"in space {self.source!r} ({why})")
        return out

    def suggest(self, trial, layouts: list[Layout], precision: str) -> EngineConfig:
        """Ask an Optuna trial for one configuration (all categoricals, fixed choices)."""
        layout = Layout.parse(trial.suggest_categorical("layout", [lay.label for lay in layouts]))
        return EngineConfig(
            tp=layout.tp, pp=layout.pp, dp=layout.dp, ep=layout.ep,
            attention_dp=layout.attention_dp,
            max_batch_size=trial.suggest_categorical("max_batch_size", list(self.max_batch_size)),
            max_num_tokens=trial.suggest_categorical("max_num_tokens", list(self.max_num_tokens)),
            kv_fraction=trial.suggest_categorical("kv_fraction", list(self.kv_fraction)),
            chunked_prefill=trial.suggest_categorical("chunked_prefill",
                                                      list(self.chunked_prefill)),
            precision=precision,
        )

    def configs(self, layouts: list[Layout], precision: str) -> Iterator[EngineConfig]:
        """Every configuration of the space, for exhaustive enumeration."""
        for lay, b, t, kv, ch in itertools.product(layouts, self.max_batch_size,
                                                   self.max_num_tokens, self.kv_fraction,
                                                   self.chunked_prefill):
            yield EngineConfig(lay.tp, lay.pp, lay.dp, b, t, kv, ch, precision, lay.ep,
                               lay.attention_dp)

    @staticmethod
    def params_of(config: EngineConfig) -> dict:
        """The Optuna params that propose ``config`` (for enqueueing trials)."""
        return {
            "layout": Layout.of(config).label,
            "max_batch_size": config.max_batch_size,
            "max_num_tokens": config.max_num_tokens,
            "kv_fraction": config.kv_fraction,
            "chunked_prefill": config.chunked_prefill,
        }

    def choices(self) -> dict[str, list]:
        """Every setting's choices, JSON-able ("max" for ``MAX_CONCURRENCY``): what a study
        records of its space, and compares when a search joins it."""
        ladder = ["max" if c == MAX_CONCURRENCY else c for c in self.concurrency]
        return {"tp": list(self.tp), "pp": list(self.pp),
                "max_batch_size": list(self.max_batch_size),
                "max_num_tokens": list(self.max_num_tokens),
                "kv_fraction": list(self.kv_fraction),
                "chunked_prefill": list(self.chunked_prefill), "concurrency": ladder,
                # The MoE settings only where a space sets its own (a study from before they
                # existed compares equal to the defaults).
                **{k: list(getattr(self, k)) for k, default in _MOE_KEYS.items()
                   if getattr(self, k) != default}}

    def size(self, layouts: list[Layout]) -> int:
        return (len(layouts) * len(self.max_batch_size) * len(self.max_num_tokens)
                * len(self.kv_fraction) * len(self.chunked_prefill))


__all__ = ["Layout", "SearchSpace"]
