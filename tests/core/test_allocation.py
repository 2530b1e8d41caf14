import pytest
import torch

import jactus.core.allocation as allocation
from jactus.core import RankPlan, calibrate, count_params, find_targets, plan_ranks


def layer_table(model, multiple):
    """name -> (m, n, bias, s^2 descending) from a plain SVD of each target's weight."""
    table = {}
    for name, module in find_targets(model).items():
        s = torch.linalg.svdvals(module.weight.detach().double())
        table[name] = (module.out_features, module.in_features, module.bias is not None, s ** 2)
    return table


def cost(m, n, bias, rank):
    return (m * n if rank is None else (m + n) * rank) + (m if bias else 0)


def naive_greedy(table, fixed, limit, multiple):
    """One unit at a time to the layer with the best gain per parameter among the steps that still fit."""
    ranks = {name: (multiple if multiple < m * n // (m + n) else None) for name, (m, n, _, _) in table.items()}
    deployed = fixed + sum(cost(m, n, b, ranks[name]) for name, (m, n, b, _) in table.items())
    while True:
        best = None
        for name, (m, n, b, gains) in table.items():
            rank = ranks[name]
            if rank is None:
                continue
            nxt = rank + multiple if rank + multiple < m * n // (m + n) else None
            gain = float(gains[rank:nxt].sum()) if nxt is not None else float(gains[rank:].sum())
            step = cost(m, n, b, nxt) - cost(m, n, b, rank)
            if deployed + step <= limit and (best is None or gain / step > best[0]):
                best = (gain / step, name, nxt, step)
        if best is None:
            return ranks, deployed
        ranks[best[1]] = best[2]
        deployed += best[3]


@pytest.mark.parametrize("budget", [0.55, 0.7, 0.85, 0.97])
def test_marginal_gain_meets_budget_and_equals_naive_greedy(tiny_vit, budget):
    multiple = 2
    plan = plan_ranks(tiny_vit, None, budget, stats_mode="none", rank_multiple=multiple)
    table = layer_table(tiny_vit, multiple)
    total = count_params(tiny_vit)
    fixed = total - sum(cost(m, n, b, None) for m, n, b, _ in table.values())
    expected, deployed = naive_greedy(table, fixed, budget * total, multiple)
    assert plan.ranks == expected and plan.params_deployed == deployed
    assert plan.ratio <= budget
    unit = max((m + n) * multiple for m, n, _, _ in table.values())
    assert budget - plan.ratio < max(unit, *(m * n for m, n, _, _ in table.values())) / total
    # Factorized layers never reach floor(mn / (m + n)); the remaining budget is less than any next step.
    for name, rank in plan.ranks.items():
        m, n, b, _ = table[name]
        if rank is not None:
            assert rank % multiple == 0 and rank < m * n // (m + n)
            nxt = rank + multiple if rank + multiple < m * n // (m + n) else None
            assert plan.params_deployed + cost(m, n, b, nxt) - cost(m, n, b, rank) > budget * total


def test_greedy_contains_global_sort_prefix(tiny_vit):
    """Gains per layer do not increase, so the greedy equals a global sort of s^2 / (m + n) units."""
    plan = plan_ranks(tiny_vit, None, 0.6, stats_mode="none", rank_multiple=1, scope="targets")
    table = layer_table(tiny_vit, 1)
    units = sorted(((float(g[j]) / (m + n), name, j) for name, (m, n, _, g) in table.items()
                    for j in range(1, m * n // (m + n) - 1)), reverse=True)
    taken = {name: 1 for name in table}
    deployed = sum(cost(m, n, b, 1) for m, n, b, _ in table.values())
    for _, name, j in units:
        m, n, _, _ = table[name]
        if deployed + m + n > 0.6 * plan.params_original:
            break
        assert taken[name] == j  # the sort takes each layer's units in order
        taken[name] += 1
        deployed += m + n
    for name, rank in plan.ranks.items():
        assert rank is not None and rank >= taken[name]


def test_dense_fallback(tiny_vit):
    plan = plan_ranks(tiny_vit, None, 1.0, stats_mode="none", rank_multiple=1)
    assert all(rank is None for rank in plan.ranks.values()) and plan.ratio == 1.0
    # proj is 32 x 32: floor(mn / (m + n)) = 16, so a multiple of 16 can only keep it dense.
    plan = plan_ranks(tiny_vit, None, 0.9, stats_mode="none", rank_multiple=16)
    assert plan.ranks["blocks.0.attn.proj"] is None and plan.ranks["blocks.1.attn.proj"] is None


def test_list_of_budgets_uses_one_spectra_computation(tiny_vit, vision_batches, losses, monkeypatch):
    stats = calibrate(tiny_vit, vision_batches, losses["vision"], progress=False)
    calls = []
    original = allocation.layer_spectra

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(allocation, "layer_spectra", counting)
    plans = plan_ranks(tiny_vit, stats, [0.6, 0.8, 0.95])
    assert len(calls) == 1 and [p.budget for p in plans] == [0.6, 0.8, 0.95]
    assert all(p.ratio <= p.budget for p in plans)
    assert plans[0].params_deployed <= plans[1].params_deployed <= plans[2].params_deployed
    assert plans[1] == plan_ranks(tiny_vit, stats, 0.8)
    assert RankPlan.from_dict(plans[1].to_dict()) == plans[1]


@pytest.mark.parametrize("allocator", ["uniform", "energy"])
def test_other_allocators_meet_budget(tiny_vit, allocator):
    for budget in (0.6, 0.9):
        plan = plan_ranks(tiny_vit, None, budget, allocator=allocator, stats_mode="none", scope="targets",
                          rank_multiple=2)
        assert plan.ratio <= budget and plan.allocator == allocator
        assert plan.params_original == sum(cost(m.out_features, m.in_features, True, None)
                                           for m in find_targets(tiny_vit).values())
    fixed = plan_ranks(tiny_vit, None, None, allocator="energy", energy=0.5, stats_mode="none", rank_multiple=1)
    assert fixed.energy == 0.5 and fixed.ratio < 1.0


def test_uniform_keeps_the_same_fraction(tiny_vit):
    plan = plan_ranks(tiny_vit, None, 0.7, allocator="uniform", stats_mode="none", scope="targets", rank_multiple=1)
    ranks = plan.ranks
    assert ranks["blocks.0.attn.proj"] == ranks["blocks.1.attn.proj"]
    assert ranks["blocks.0.mlp.fc1"] == ranks["blocks.0.mlp.fc2"]


def test_impossible_budgets_and_unknown_names(tiny_vit):
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"budget={bad}"):
            plan_ranks(tiny_vit, None, bad, stats_mode="none")
    with pytest.raises(ValueError, match=r"budget=0.05 is not achievable.*\[0\.\d+, 1\.0\]"):
        plan_ranks(tiny_vit, None, 0.05, stats_mode="none")
    with pytest.raises(ValueError, match="marginal_gain, uniform, energy"):
        plan_ranks(tiny_vit, None, 0.8, allocator="greedy", stats_mode="none")
    with pytest.raises(ValueError, match="model, targets"):
        plan_ranks(tiny_vit, None, 0.8, scope="all", stats_mode="none")
    with pytest.raises(ValueError, match="kfac, input, gradient, none, asvd"):
        plan_ranks(tiny_vit, None, 0.8, stats_mode="fisher")


def test_nan_statistics_name_the_layer(tiny_vit, vision_batches, losses):
    stats = calibrate(tiny_vit, vision_batches, losses["vision"], progress=False)
    stats.layers["blocks.1.mlp.fc2"].grad_cov[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="blocks.1.mlp.fc2"):
        plan_ranks(tiny_vit, stats, 0.8)
    for mode in ("input", "asvd"):  # the gradient statistics are not read
        assert plan_ranks(tiny_vit, stats, 0.8, stats_mode=mode).ratio <= 0.8


def test_plan_records_each_layers_residual(tiny_vit):
    """With stats_mode=none the residual is the weight's own truncation error ||W - W_r||_F^2 (Eckart-Young), 0 for a
    dense layer; it survives to_dict/from_dict, and a plan saved before it existed still loads (residual None)."""
    plan = plan_ranks(tiny_vit, None, 0.9, stats_mode="none", rank_multiple=16)  # proj kept dense (test above)
    targets = find_targets(tiny_vit)
    assert set(plan.residual) == set(plan.ranks) and any(r is None for r in plan.ranks.values())
    assert any(r is not None for r in plan.ranks.values())
    for name, rank in plan.ranks.items():
        weight = targets[name].weight.detach().double()
        if rank is None:
            assert plan.residual[name] == 0.0
            continue
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        truncated = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        assert plan.residual[name] == pytest.approx(float(((weight - truncated) ** 2).sum()), rel=1e-9)
        assert plan.residual[name] > 0
    again = RankPlan.from_dict(plan.to_dict())
    assert again == plan and again.residual == plan.residual
    old = plan.to_dict()
    del old["residual"]
    assert RankPlan.from_dict(old).residual is None and RankPlan.from_dict(old) == plan
