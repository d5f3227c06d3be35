"""The ``trtllm`` runner: TensorRT-LLM's ``trtllm-bench`` on the node.

- ``settings``: the runner's options and their checks, the executables they name;
- ``releases``: which TensorRT-LLM release has what (options, YAML fields, report quirks);
- ``argv``: THE builder of ``trtllm-bench``/``trtllm-serve`` command lines and their LLM-API YAML
  (the deploy folder uses it too);
- ``_runner``: the runner itself; ``_engines``: the engine cache; ``_process``: failure classes
  from logs (running commands is ``autotune.runners._process``'s); ``_report``: report parsing;
  ``_dataset``: the request files.
"""

from autotune.runners.trtllm._runner import TrtllmRunner
from autotune.runners.trtllm.settings import (
    BACKENDS,
    LAUNCHERS,
    Tools,
    TrtllmSettings,
    resolve_settings,
    trtllm_version,
)

__all__ = [
    "BACKENDS", "LAUNCHERS", "Tools", "TrtllmRunner", "TrtllmSettings",
    "resolve_settings", "trtllm_version",
]
