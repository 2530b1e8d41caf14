"""Issue 17 item 4 table: palette vs independent JACTUS runs, from experiments/results/palette/summaries/*.json.

File names (written by run.sh, copied from logs_tmp/<name>/summary.json):
  palette_s<seed>_n<N>.json, palette_uniform_s<seed>_n<N>.json, jactus<budget>_s<seed>_n<steps>.json
Prints markdown: test acc / nll per budget and row type (mean over seeds, per-seed values), the palette-minus-
independent gaps, and wall time per run type.  Usage: python experiments/results/palette/table.py [SUMMARIES_DIR]
"""
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "summaries")
cells = defaultdict(dict)      # (row, budget) -> seed -> metrics
walls = defaultdict(list)      # row -> wall_s
ratios = {}
for path in sorted(root.glob("*.json")):
    m = re.fullmatch(r"(palette_uniform|palette|jactus(?P<b>[\d.]+))_s(?P<s>\d+)_n(?P<n>\d+)", path.stem)
    if not m:
        continue
    s, n = int(m["s"]), int(m["n"])
    summary = json.loads(path.read_text())
    if summary.get("status", "ok") != "ok":
        continue
    if m["b"] is None:
        row = f"{m[1]} ({n} steps)"
        for member in summary["palette"]:
            cells[(row, member["budget"])][s] = member["metrics"]
            ratios[(row, member["budget"])] = member["params_ratio"]
    else:
        row = f"independent ({n} steps)"
        cells[(row, float(m["b"]))][s] = summary["metrics"]
        ratios[(row, float(m["b"]))] = summary["params_ratio"]
    walls[row].append(summary["wall_s"])

def steps(row):
    return int(re.search(r"(\d+) steps", row)[1])


indep_steps = max((steps(r) for r, _ in cells if r.startswith("independent")), default=0)


def order(row):
    kind = (0 if row.startswith("palette (") and steps(row) == indep_steps else 1 if row.startswith("palette_uniform")
            else 2 if row.startswith("palette") else 3)
    return kind, -steps(row)


rows = sorted({r for r, _ in cells}, key=order)
budgets = sorted({b for _, b in cells})


def fmt(row, budget, key, digits):
    per_seed = cells.get((row, budget), {})
    if not per_seed:
        return "—"
    values = [per_seed[s][key] for s in sorted(per_seed)]
    seeds = " / ".join(f"{v:.{digits}f}" for v in values)
    return f"**{statistics.mean(values):.{digits}f}** ({seeds})"


for key, name, digits in (("test/acc", "test accuracy (%)", 2), ("test/nll", "test NLL", 3)):
    print(f"\n### {name}: mean over seeds (seed 0 / seed 1)\n")
    print("| budget | " + " | ".join(rows) + " |")
    print("|---:|" + "---:|" * len(rows))
    for b in budgets:
        print(f"| {b:g} | " + " | ".join(fmt(r, b, key, digits) for r in rows) + " |")

def gaps(ref, others):
    print(f"\n### {ref} minus others: mean gap (seed 0 / seed 1); acc in points, NLL (negative = {ref} better)\n")
    print("| budget | metric | " + " | ".join(f"− {o}" for o in others) + " |")
    print("|---:|:---|" + "---:|" * len(others))
    for b in budgets:
        for key, digits in (("test/acc", 2), ("test/nll", 3)):
            out = []
            for o in others:
                a, c = cells.get((ref, b), {}), cells.get((o, b), {})
                seeds = sorted(set(a) & set(c))
                if not seeds:
                    out.append("—")
                    continue
                d = [a[s][key] - c[s][key] for s in seeds]
                out.append(f"{statistics.mean(d):+.{digits}f} (" + " / ".join(f"{x:+.{digits}f}" for x in d) + ")")
            print(f"| {b:g} | {key} | " + " | ".join(out) + " |")


ref = next((r for r in rows if order(r)[0] == 0), None)  # the palette at the independent runs' N
if ref:
    gaps(ref, [r for r in rows if r != ref])
for r in rows:
    if order(r)[0] == 2:  # a palette of more steps: against the independent runs of N steps
        gaps(r, [o for o in rows if o.startswith("independent")])

print("\n### params ratio per member\n")
for (r, b), v in sorted(ratios.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"- {r} @ {b:g}: {100 * v:.1f}%")
print("\n### wall time per run (s, from summary.json wall_s; two runs at a time on 2 cores, 1 thread each)\n")
for r in rows:
    w = walls[r]
    print(f"- {r}: mean {statistics.mean(w):.0f} s over {len(w)} runs (min {min(w):.0f}, max {max(w):.0f})")
