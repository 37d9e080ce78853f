"""The old home of metrics, reports and plots, kept so `from headstart.evaluation import ...` still works.

They now live in `metrics` (compute_metrics, wilson_interval, worst_errors), `reporting`
(the terminal and Markdown reports) and `plots` (the figures). Nothing in the package
imports this module; import from those three instead.
"""

from .metrics import compute_metrics, wilson_interval, worst_errors
from .plots import plot_confusion_matrix, plot_training_curve, plot_worst_errors
from .reporting import format_report, markdown_sections, markdown_skipped, markdown_table, write_report_markdown

__all__ = ["compute_metrics", "format_report", "markdown_sections", "markdown_skipped", "markdown_table",
           "plot_confusion_matrix", "plot_training_curve", "plot_worst_errors", "wilson_interval",
           "worst_errors", "write_report_markdown"]
