"""Search spaces shipped with autotune (YAML files; ``default.yaml`` is the default)."""
