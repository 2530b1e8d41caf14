"""Measured latency of the deployed models, for the report's accuracy-against-latency figure.

Reads the JSON that `experiments/bench/infer_real.py` writes: per section (`causal_lm`, `vision`) a `vs_dense` map
of deployed format -> measure (`prefill_b1`, `prefill_b8`, `decode_b1`, `images_b8`) -> throughput over the dense
model's, measured side by side in one run. A table row's latency is the dense model's time over its own, in percent
of the dense model's time (`100 / speed-up`), taken from the format it deploys as:

- rows without a budget and the adapters (LoRA, DoRA, PiSSA, full fine-tuning, zero-shot) deploy the dense model
  (adapters are merged);
- `<method>@<b>` the bench's `<method>_<b>`, else its `<method>_<b>_best` (TACO: the faster of its formats);
- other low-rank rows (compress-then-adapt, CERSA, TuneComp, JACTUS variants) at budget `b`: the bench's `jactus_<b>`,
  the same two-factor layers at about the same ranks;
- anything else has no measured latency and is left out of the figure (the report names it), as are rows on another
  footing than the bench's formats (a suffix: `(scope=targets)`, `(bytes)`, a `--split-by` value).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DENSE_METHODS = ("zero_shot", "full_ft", "lora", "dora", "pissa")
LOW_RANK_METHODS = ("jactus", "compress_then_adapt", "cersa", "tunecomp")


class LatencyError(ValueError):
    pass


def load_latency(path: str | Path, measure: str | None = None) -> tuple[str, dict[str, float]]:
    """`(measure, {format: speed-up over dense})` from a bench JSON; `measure` None: prefill_b8 where measured,
    else the first measure of the first section."""
    path = Path(path)
    if not path.is_file():
        raise LatencyError(f"--latency {path}: no such file (written by experiments/bench/infer_real.py)")
    data = json.loads(path.read_text())
    sections = {name: section["vs_dense"] for name, section in data.items()
                if isinstance(section, dict) and isinstance(section.get("vs_dense"), dict)}
    measures = list(dict.fromkeys(m for section in sections.values() for ratios in section.values() for m in ratios))
    if not measures:
        raise LatencyError(f"--latency {path}: no 'vs_dense' section (expected the JSON of "
                           f"experiments/bench/infer_real.py)")
    measure = measure or ("prefill_b8" if "prefill_b8" in measures else measures[0])
    if measure not in measures:
        raise LatencyError(f"--latency-measure {measure!r}: not in {path}; measured: {', '.join(measures)}")
    speed = {fmt: float(ratios[measure]) for section in sections.values() for fmt, ratios in section.items()
             if measure in ratios and ratios[measure]}
    return measure, speed


def row_latency(label: str, speed: dict[str, float]) -> float | None:
    """The latency of a table row in percent of the dense model's time (module docstring), or None."""
    if re.search(r"\(.*\)$", label):
        return None  # another footing than the bench's (scope=targets, a budget in bytes, a split-by value)
    method, _, budget = label.partition("@")
    method = method.strip()
    if not budget or method in DENSE_METHODS or method.startswith(("lora", "dora")):
        key = "dense"
    else:
        budget = format(float(budget), "g")
        candidates = [f"{method}_{budget}", f"{method}_{budget}_best"]
        if method.split("+")[0] in LOW_RANK_METHODS:
            candidates.append(f"jactus_{budget}")
        key = next((candidate for candidate in candidates if candidate in speed), None)
    return None if key is None or key not in speed else 100.0 / speed[key]
