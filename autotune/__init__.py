"""autotune: find the LLM serving configuration with the most throughput that meets a latency SLO."""

__version__ = "0.1.0"
__all__ = ["__version__"]
