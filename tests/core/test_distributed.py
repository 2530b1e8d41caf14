import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from jactus.core import CalibrationStats, RankPlan, calibrate, plan_ranks


def test_two_process_gloo_statistics_equal_single_process(tmp_path):
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # the spawned children inherit sys.path and import the worker module from it
    try:
        import dist_worker

        mp.spawn(dist_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    finally:
        sys.path.remove(here)
    ranks = [CalibrationStats.load(tmp_path / f"stats{r}.pt") for r in range(2)]
    plans = [RankPlan.from_dict(torch.load(tmp_path / f"plan{r}.pt")) for r in range(2)]

    model = dist_worker.make_model()
    single = calibrate(model, dist_worker.make_batches(), dist_worker.loss_fn, progress=False)
    assert plans[0] == plans[1] == plan_ranks(model, single, 0.8, rank_multiple=1, scope="targets")
    for name, st in single.layers.items():
        a, b = ranks[0].layers[name], ranks[1].layers[name]
        assert torch.equal(a.input_cov, b.input_cov) and torch.equal(a.grad_cov, b.grad_cov)
        assert a.tokens == b.tokens == st.tokens == 4 * (15 - 2 - 4)
        torch.testing.assert_close(a.input_cov, st.input_cov, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad_cov, st.grad_cov, rtol=1e-10, atol=1e-12)
