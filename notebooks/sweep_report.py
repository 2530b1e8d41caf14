# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sweep report
#
# The paper-shaped table, accuracy against retained parameters and the per-layer rank allocation of one sweep,
# built with `jactus.report` (the same functions `jactus-report` runs). Set `SWEEP_DIRS` to the multirun folders
# (every `summary.json` below them is read) or export `JACTUS_SWEEP` before starting Jupyter.

# %%
import os
from pathlib import Path

SWEEP_DIRS = [Path(os.environ.get("JACTUS_SWEEP", "../logs/train/multiruns"))]
OUT_DIR = Path(os.environ.get("JACTUS_REPORT_OUT", "../logs/report"))
METRIC = "test/acc"

# %%
from IPython.display import Image, Markdown, display

from jactus import report

summaries, unreadable = report.load_summaries(SWEEP_DIRS)
if not summaries:
    raise FileNotFoundError(f"no summary.json under {SWEEP_DIRS}: run a sweep first (e.g. jactus-train -m ...)")
print(f"{len(summaries)} runs, {sum(s.get('status', 'ok') != 'ok' for s in summaries)} failed, "
      f"{len(unreadable)} unreadable")

# %% [markdown]
# ## Runs, long format (one row per run and dataset/task)

# %%
frame = report.results_frame(summaries, METRIC)
frame[["experiment", "model", "label", "column", "seed", "status", "value", "params_ratio"]]

# %% [markdown]
# ## The tables: mean ± std over seeds, "—" no run, "failed" every run failed, best per column in bold

# %%
tables = report.build_tables(frame)
for table in tables:
    display(Markdown(f"### {table.title}\n\n{table.to_markdown()}"))

# %% [markdown]
# ## Accuracy against retained parameters

# %%
OUT_DIR.mkdir(parents=True, exist_ok=True)
display(Image(filename=str(report.plot_acc_vs_params(tables, OUT_DIR / "acc_vs_params.png", METRIC))))

# %% [markdown]
# ## Rank allocation per layer (runs that carry a `rank_map`; grey = kept dense)

# %%
heatmap = report.plot_rank_heatmap(summaries, OUT_DIR / "rank_heatmap.png")
if heatmap is None:
    print("no run carries a rank_map")
else:
    display(Image(filename=str(heatmap)))

# %% [markdown]
# ## Everything at once: report.md, results.csv and the plots in OUT_DIR (what `jactus-report` writes)

# %%
written = report.write_report(SWEEP_DIRS, OUT_DIR, METRIC)
{name: str(path) for name, path in written.files.items()}
