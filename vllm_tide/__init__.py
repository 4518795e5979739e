"""vllm-tide: per-token early exit (TIDE) for vLLM."""
from .errors import TideConfigError
from .stats import exit_stats, reset_exit_stats

__all__ = ["TideConfigError", "exit_stats", "reset_exit_stats"]
__version__ = "0.1.0"
