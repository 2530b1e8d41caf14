"""The GPU run of the offline_llama table and the scale benchmarks, for an offline GPU node reached in short,
size-limited transfers (experiments/gpu/README.md):

    python experiments/gpu/run.py prepare --max-part-mib 64     # online: the bundle in parts -> .gpu/
    python experiments/gpu/run.py run --budget-s 3600           # on the node: check, install, stages a-d
    python experiments/gpu/run.py collect OUT [OUT ...]         # back here: results folders and the report
    python experiments/gpu/run.py run --dry-run                 # anywhere, on the CPU: every stage, tiny stand-ins
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `experiments.gpu` imports

from experiments.gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
