"""Observability: metrics sinks (JSONL, TensorBoard), PNG plots, progress bar."""

from kexaone_align.observe.metrics import MetricsLogger, read_metrics
from kexaone_align.observe.plots import plot_metrics
from kexaone_align.observe.progress import Progress

__all__ = ["MetricsLogger", "Progress", "plot_metrics", "read_metrics"]
