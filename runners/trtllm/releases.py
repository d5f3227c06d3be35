"""Which TensorRT-LLM release has what: the facts the runner's command lines, YAML and parsing
depend on, from NVIDIA/TensorRT-LLM's sources and PRs (shared/docs/trtllm.md, "Which release has
what"). One table, asked by version; an unknown version gets the newest behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

#: Releases the runner is tested against (the stand-in emulates each one).
SUPPORTED = ("1.0", "1.2", "1.3", "main")

_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.?(rc|dev|a|b|post)\.?(\d+))?")
# A pre-release sorts before its final release; a post-release after it.
_PRE_RANK = {"dev": 0, "a": 1, "b": 2, "rc": 3, None: 4, "post": 5}


@total_ordering
@dataclass(frozen=True)
class Version:
    """A TensorRT-LLM version (``1.0.0rc4``, ``1.3.0.dev2026``), ordered like PEP 440's."""

    major: int
    minor: int
    patch: int = 0
    pre: str | None = None  # rc, dev, a, b or post
    pre_number: int = 0
    text: str = ""

    @classmethod
    def parse(cls, text: str | None) -> Version | None:
        """The version of ``text``; None when it is not one (unknown)."""
        if not text:
            return None
        m = _VERSION.match(text)
        if not m:
            return None
        return cls(int(m[1]), int(m[2]), int(m[3] or 0), m[4], int(m[5] or 0), text.strip())

    def _key(self) -> tuple:
        return (self.major, self.minor, self.patch, _PRE_RANK[self.pre], self.pre_number)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text or f"{self.major}.{self.minor}.{self.patch}"


def _v(text: str) -> Version:
    version = Version.parse(text)
    assert version is not None, text
    return version


@dataclass(frozen=True)
class Release:
    """What one TensorRT-LLM release can do (``version`` None: unknown, taken as the newest)."""

    version: Version | None

    def _since(self, first: str) -> bool:
        return self.version is None or self.version >= _v(first)

    @property
    def label(self) -> str:
        return str(self.version) if self.version else "unknown"

    @property
    def tensorrt_backend(self) -> bool:
        """``--backend tensorrt`` (``trtllm-bench build``, ``--engine_dir``): removed in 1.3
        (PRs #15918, #16369, #16612, #17076, #18850). Unknown versions are not refused."""
        return self.version is None or self.version < _v("1.3.0.dev0")

    @property
    def eos_id(self) -> bool:
        """``trtllm-bench throughput --eos_id`` (PR #3776, ~2025-04): absent in 0.19 and before."""
        return self._since("0.20.0.dev0")

    @property
    def cuda_graph_padding(self) -> str | None:
        """The LLM-API field that pads CUDA graphs, or None before ``cuda_graph_config``
        existed (< 1.0): ``padding_enabled`` until PR #6003, ``enable_padding`` from ~1.0.0rc4.
        The LLM arguments are strict: an unknown field fails the run."""
        if not self._since("1.0.0.dev0"):
            return None
        return "enable_padding" if self._since("1.0.0rc4") else "padding_enabled"

    @property
    def prepare_dataset(self) -> bool:
        """``trtllm-bench prepare-dataset`` (PR #9250, 2025-11): main and 1.3; before, the
        repository's ``benchmarks/cpp/prepare_dataset.py``."""
        return self._since("1.3.0.dev0")

    @property
    def reports_its_version(self) -> bool:
        """Whether the report's ``engine.version`` is the real one: 1.2 and later write "1.2"
        whatever they are (TensorRT-LLM issue #11560)."""
        return self.version is not None and self.version < _v("1.2.0.dev0")

    @property
    def task_id_required(self) -> bool:
        """Dataset lines must carry ``task_id`` (``bench/utils/data.py`` reads
        ``data["task_id"]``) up to 1.0; later releases default it."""
        return self.version is None or self.version < _v("1.1.0.dev0")

    def implications(self) -> list[str]:
        """What this release means for a search, in short phrases (for ``doctor``)."""
        out = ["--backend tensorrt available" if self.tensorrt_backend
               else "--backend tensorrt removed (pytorch only)"]
        if not self.eos_id:
            out.append("no --eos_id (outputs may stop early)")
        if self.cuda_graph_padding is None:
            out.append("no cuda_graph_config in the LLM API")
        if not self.reports_its_version and self.version is not None:
            out.append("reports say 1.2 whatever the release (version read from the install)")
        return out


__all__ = ["SUPPORTED", "Release", "Version"]
