"""Prometheus metrics of the server: serving (vLLM's set) and attention statistics."""

from .server_metrics import FINISH_REASONS, INTERVENTION_OPERATIONS, PROMPT_PARTS, ServerMetrics

__all__ = ["FINISH_REASONS", "INTERVENTION_OPERATIONS", "PROMPT_PARTS", "ServerMetrics"]
