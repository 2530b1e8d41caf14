import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from jactus.core import CalibrationStats, RankPlan, calibrate, plan_ranks


def _spawn(target: str, tmp_path) -> None:
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # the spawned children inherit sys.path and import the worker module from it
    try:
        import dist_worker

        mp.spawn(getattr(dist_worker, target), args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    finally:
        sys.path.remove(here)


def test_two_process_gloo_statistics_equal_single_process(tmp_path):
    _spawn("run", tmp_path)
    import dist_worker

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


def test_perturbed_rank_still_builds_rank_zeros_plan_and_layers(tmp_path):
    """DDP simulated on 2 gloo processes: a 1e-12 perturbation of one rank's statistics flips a tie in its own plan,
    yet both ranks build the same shapes and bitwise the same layers; warmed-up heads agree; a rank without a
    calibration batch makes both ranks fail with the same message (no hang)."""
    _spawn("run_perturbed", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"perturbed{r}.pt") for r in range(2))
    assert rank0["local_plan"] != rank1["local_plan"], "the perturbation should flip the tie in rank 1's own plan"
    assert rank0["plan"] == rank1["plan"] == rank0["local_plan"]
    assert rank0["layers"].keys() == rank1["layers"].keys() == {"twin_a", "twin_b"}
    for name, tensors in rank0["layers"].items():
        assert tensors["C"].shape == (rank0["plan"][name],) * 2
        for key, value in tensors.items():
            assert torch.equal(value, rank1["layers"][name][key]), f"{name}.{key} differs between ranks"
    torch.testing.assert_close(rank0["head"], rank1["head"], rtol=0, atol=0)
    for result in (rank0, rank1):
        assert "rank(s) [1] of 2 got no calibration batch" in result["empty_error"]
