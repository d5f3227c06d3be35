"""The ``vllm`` runner: vLLM's ``vllm serve`` + ``vllm bench serve`` on the node.

- ``settings``: the runner's options and their checks, the vLLM they name;
- ``argv``: THE builder of ``vllm serve`` / ``vllm bench serve`` command lines and the
  ``--config`` YAML (the deploy folder uses it too);
- ``_runner``: the runner itself; ``_server``: servers' lifecycle and failure classes;
  ``_result``: reading ``vllm bench serve``'s saved results.
"""

from autotune.runners.vllm._runner import VllmRunner
from autotune.runners.vllm.settings import VllmSettings, resolve_settings, vllm_version

__all__ = ["VllmRunner", "VllmSettings", "resolve_settings", "vllm_version"]
