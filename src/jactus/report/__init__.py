"""jactus-report: the `summary.json` files of a sweep as the paper's tables, gaps, a long CSV and plots.

`load` reads the runs, `tables` builds the tables, `gaps` the reference-minus-other gaps, `plots` the figures, `cli`
the command (`jactus-report --help`, and the module docstring of `jactus.report.cli` for every output).
"""

from .cli import Report, log_to_wandb, main, wants_wandb, write_report
from .gaps import GapsError, GapTable, build_gaps, parse_gaps
from .load import AVERAGE, FAILED, MISSING, RATIO, load_summaries, results_frame, row_label, split_values
from .plots import plot_acc_vs_params, plot_rank_heatmap
from .tables import Cell, ResultTable, build_table, build_tables, lower_is_better

__all__ = [
    "AVERAGE", "FAILED", "MISSING", "RATIO", "Cell", "GapTable", "GapsError", "Report", "ResultTable", "build_gaps",
    "build_table", "build_tables", "load_summaries", "log_to_wandb", "lower_is_better", "main", "parse_gaps",
    "plot_acc_vs_params", "plot_rank_heatmap", "results_frame", "row_label", "split_values", "wants_wandb",
    "write_report",
]
