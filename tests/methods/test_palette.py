"""Palette fine-tuning (docs/METHOD.md section 11): nested plans, nested bases whose truncation is the smaller budget's
factorization, the palette layers, per-member export (round trip through a fresh process), the budget sampler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from jactus.core import calibrate, compress_model, count_params, find_targets, load_compact, plan_ranks, save_compact
from jactus.core.palette import PaletteLinear, PaletteNorm
from jactus.core.subspace import factorize_layer, layer_metric
from jactus.methods import MethodContext
from jactus.methods.jactus_palette import BudgetSampler, JactusPalette, saliency

torch.set_num_threads(1)
KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
PALETTE = [0.55, 0.7, 0.85]


def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS)
    model.jactus_arch = {"library": "timm", "name": "vit_tiny_patch16_224", "kwargs": KWARGS}
    return model.eval()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator))
            for _ in range(2)]


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def palette_model(palette=PALETTE, **options):
    method = JactusPalette(palette=palette, rank_multiple=2, calib={}, **options)
    model = method.apply(MethodContext(model=vit(), loss_fn=loss_fn, calibration_batches=batches(),
                                       head_names=["head"]))
    return method, model


def rank_at_most(small, large) -> bool:
    """Nesting per layer: dense (None) is the largest "rank"."""
    return large is None or (small is not None and small <= large)


# ---- nested plans ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocator", ["marginal_gain", "uniform"])
def test_nested_plans_keep_a_subset_of_the_largest_plans_steps(allocator):
    model = vit()
    budgets = [0.5, 0.6, 0.7, 0.8, 0.9]
    plans = plan_ranks(model, None, budgets, allocator=allocator, stats_mode="none", rank_multiple=2, nested=True)
    assert plan_ranks(model, None, 0.9, allocator=allocator, stats_mode="none", rank_multiple=2).ranks == \
        plans[-1].ranks  # the largest budget is planned as on its own
    for plan, budget in zip(plans, budgets, strict=True):
        assert plan.ratio <= budget
        assert all(rank is None or rank % 2 == 0 for rank in plan.ranks.values())
    for small, large in zip(plans, plans[1:], strict=False):
        assert all(rank_at_most(small.ranks[name], large.ranks[name]) for name in small.ranks)
        assert small.params_deployed <= large.params_deployed


def test_nested_plan_is_the_greedy_replayed_on_the_largest_plans_steps():
    """Where the largest plan took every step the smaller greedy takes, the nested plan is the independent one."""
    model = vit()
    budgets = [0.6, 0.75, 0.9]
    nested = plan_ranks(model, None, budgets, stats_mode="none", rank_multiple=2, nested=True)
    independent = plan_ranks(model, None, budgets, stats_mode="none", rank_multiple=2)
    for a, b in zip(nested, independent, strict=True):
        top = nested[-1].ranks
        if all(rank_at_most(rank, top[name]) for name, rank in b.ranks.items()):
            assert a.ranks == b.ranks
        else:  # the independent plan took a step outside the largest plan: the nested one is smaller, still valid
            assert a.params_deployed <= b.params_deployed


# ---- nested bases ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats():
    model = vit()
    return model, calibrate(model, batches(), loss_fn, find_targets(model), progress=False)


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.5])
def test_truncated_nested_factors_equal_the_direct_factorization(stats, rho):
    """U[:, :r] C[:r, :r] V[:, :r]^T of the nested factors at rank 16 is JACTUS at rank r, task directions included:
    each prefix holds the directions the union at r is built from, and the metric-orthogonal columns make the
    leading core block the projected core of the prefix."""
    model, calibration = stats
    for name, linear in list(find_targets(model).items())[:4]:
        metric = layer_metric(calibration.layers[name], "kfac", 1e-2, name)
        U, C, V = factorize_layer(linear.weight, metric, 16, rho, nested=True)
        for rank in (2, 5, 8, 12, 16):
            Ud, Cd, Vd = factorize_layer(linear.weight, metric, rank, rho)
            direct = Ud @ Cd @ Vd.T
            truncated = U[:, :rank] @ C[:rank, :rank] @ V[:, :rank].T
            assert torch.allclose(truncated, direct, atol=1e-9 * direct.abs().max()), (name, rank)


def test_orthonormal_bases_truncate_exactly_only_without_statistics(stats):
    """Why the palette uses metric-orthogonal bases: the leading block of an orthonormal basis' core is the projected
    core of the prefix only when the metric is the identity."""
    model, calibration = stats
    name, linear = next(iter(find_targets(model).items()))
    for mode, exact in (("none", True), ("kfac", False)):
        metric = layer_metric(calibration.layers[name], mode, 1e-2, name)
        U, C, V = factorize_layer(linear.weight, metric, 16, 0.0)
        Ud, Cd, Vd = factorize_layer(linear.weight, metric, 8, 0.0)
        error = (U[:, :8] @ C[:8, :8] @ V[:, :8].T - Ud @ Cd @ Vd.T).norm() / (Ud @ Cd @ Vd.T).norm()
        assert (error < 1e-9) == exact, (mode, float(error))


# ---- the palette model -------------------------------------------------------------------------------------------
def test_each_member_computes_its_budgets_jactus_model():
    method, model = palette_model()
    assert [plan.budget for plan in method.plans] == PALETTE
    assert any(isinstance(m, PaletteLinear) for m in model.modules())
    assert any(isinstance(m, PaletteNorm) for m in model.modules())
    images = batches()[0][0]
    independent = compress_model(vit(), batches(), loss_fn, PALETTE, rank_multiple=2, head_names=["head"],
                                 progress=False)
    # A replayed plan can differ from the independent greedy (allocation docstring); PALETTE is a case where every
    # replay equals it, so every member is compared with its budget's own JACTUS model, the smaller ones included.
    assert [plan.ranks for plan in method.plans] == [plan.ranks for _, plan in independent]
    assert len({tuple(plan.ranks.items()) for plan in method.plans}) == len(PALETTE)  # three different members
    compared = []
    for (budget, activate), (reference, _) in zip(method.palette_members(), independent, strict=True):
        activate(model)
        with torch.no_grad():
            assert torch.allclose(model(images), reference(images), atol=1e-5), budget
        compared.append(budget)
    assert compared == PALETTE


def test_a_layer_dense_at_a_larger_budget_keeps_its_dense_weight():
    method, model = palette_model([0.6, 0.95])
    mixed = [(name, module) for name, module in model.named_modules()
             if isinstance(module, PaletteLinear) and None in module.ranks]
    assert mixed, "the tiny palette should keep some layer dense at 0.95 and factorize it at 0.6"
    name, layer = mixed[0]
    assert layer.weight is not None and not layer.weight.requires_grad
    assert torch.equal(layer.weight, vit().get_submodule(name).weight)


def test_a_step_on_one_member_leaves_the_others_parts_without_gradient():
    method, model = palette_model()
    method.palette_members()[0][1](model)
    loss_fn(model, batches()[0]).backward()
    for module in model.modules():
        if isinstance(module, PaletteLinear):
            if module.biases is not None:
                assert module.biases[0].grad is not None
                assert all(bias.grad is None for bias in list(module.biases)[1:])
            rank = module.ranks[0]
            if rank is not None:
                level = module.levels.index(rank)
                assert all(p.grad is None for p in list(module.core_rows)[level + 1:])
                assert module.core_rows[level].grad is not None
            assert not module.U.requires_grad and not module.V.requires_grad
        if isinstance(module, PaletteNorm):
            assert module.members[0].weight.grad is not None and module.members[-1].weight.grad is None


def test_core_blocks_never_decay():
    """With `optim.weight_decay` > 0 the core blocks are in the optimizer's no-decay group: a step with zero gradients
    (AdamW's update is then its decay alone) leaves every block as it was and shrinks the head, which decays."""
    from types import SimpleNamespace

    from jactus.lit.vision import ImageClassifier

    _, model = palette_model()
    module = ImageClassifier(model, head_names=["head"], lr=0.1, weight_decay=0.5)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    blocks = [block for layer in model.modules() if isinstance(layer, PaletteLinear)
              for block in [*layer.core_rows, *layer.core_cols]]
    assert blocks and all(block.ndim == 2 and block.requires_grad for block in blocks)
    decayed = {id(param) for group in optimizer.param_groups if group["weight_decay"] > 0 for param in group["params"]}
    assert not any(id(block) in decayed for block in blocks) and id(model.head.weight) in decayed
    before = [block.detach().clone() for block in blocks]
    head = model.head.weight.detach().clone()
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    assert all(torch.equal(block, start) for block, start in zip(blocks, before, strict=True))
    assert torch.allclose(model.head.weight, head * (1 - 0.1 * 0.5))


def _train_a_little(model):
    """Move every trainable tensor (as training would), so that members differ from their initialisation."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_export_round_trip_in_a_fresh_process(tmp_path):
    method, model = palette_model()
    _train_a_little(model)
    images = batches()[0][0]
    torch.save(images, tmp_path / "images.pt")
    for budget, activate in method.palette_members():
        activate(model)
        with torch.no_grad():
            expected = model(images)
        deployed = method.export(model)
        assert count_params(deployed) / count_params(vit()) <= budget
        assert not any(isinstance(m, (PaletteLinear, PaletteNorm)) for m in deployed.modules())
        save_compact(deployed, tmp_path / f"budget_{budget}")
        with torch.no_grad():
            assert torch.allclose(deployed(images), expected, atol=1e-5)
        torch.save(expected, tmp_path / f"expected_{budget}.pt")
    script = (
        "import sys, torch\n"
        "from jactus.core import load_compact\n"
        "root = sys.argv[1]\n"
        "images = torch.load(f'{root}/images.pt')\n"
        "for budget in sys.argv[2:]:\n"
        "    model = load_compact(f'{root}/budget_{budget}')\n"
        "    with torch.no_grad():\n"
        "        torch.save(model(images), f'{root}/loaded_{budget}.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path), *map(str, PALETTE)], check=True)
    for budget in PALETTE:
        loaded = torch.load(tmp_path / f"loaded_{budget}.pt")
        assert torch.allclose(loaded, torch.load(tmp_path / f"expected_{budget}.pt"), atol=1e-5)
        assert load_compact(tmp_path / f"budget_{budget}").jactus_rank_map  # a normal compact model


def test_export_leaves_the_palette_model_intact():
    method, model = palette_model()
    images = batches()[0][0]
    method.palette_members()[0][1](model)
    with torch.no_grad():
        before = model(images)
    method.export(model)
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_rebuild_from_structure_restores_the_palette():
    method, model = palette_model()
    _train_a_little(model)
    for step in range(3):
        method.on_train_batch_start(model, step, 10)
    structure = method.structure()
    fresh = JactusPalette(palette=PALETTE, rank_multiple=2, calib={})
    rebuilt = fresh.rebuild(vit(), structure)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert fresh.sampler.steps == method.sampler.steps
    images = batches()[0][0]
    for (_, activate), (_, activate_fresh) in zip(method.palette_members(), fresh.palette_members(), strict=True):
        activate(model)
        activate_fresh(rebuilt)
        with torch.no_grad():
            assert torch.equal(model(images), rebuilt(images))


# ---- sampling ----------------------------------------------------------------------------------------------------
def test_sampler_probabilities_sum_to_one_and_follow_the_importance():
    sampler = BudgetSampler(3, "importance", momentum=0.5, uniform_mix=0.1, seed=0)
    assert sampler.probabilities() == pytest.approx([1 / 3] * 3)  # uniform until every member has a score
    for member, score in enumerate([1.0, 4.0, 2.0]):
        sampler.observe(member, score)
    probabilities = sampler.probabilities()
    assert sum(probabilities) == pytest.approx(1.0)
    assert probabilities == pytest.approx([0.9 * s / 7 + 0.1 / 3 for s in (1.0, 4.0, 2.0)])
    sampler.observe(0, 9.0)  # moving average: 0.5 * 1 + 0.5 * 9 = 5
    assert sampler.scores[0] == pytest.approx(5.0)
    assert max(range(3), key=lambda k: sampler.probabilities()[k]) == 0
    draws = [sampler.sample() for _ in range(4000)]
    frequencies = [draws.count(k) / len(draws) for k in range(3)]
    assert frequencies == pytest.approx(sampler.probabilities(), abs=0.03)
    uniform = BudgetSampler(3, "uniform")
    uniform.scores = [1.0, 100.0, 1.0]
    assert uniform.probabilities() == pytest.approx([1 / 3] * 3)


def test_sampler_draws_are_reproducible_from_the_seed():
    first, second = BudgetSampler(4, "uniform", seed=7), BudgetSampler(4, "uniform", seed=7)
    assert [first.sample() for _ in range(20)] == [second.sample() for _ in range(20)]


def test_training_steps_score_the_member_they_trained():
    method, model = palette_model()
    method.on_train_batch_start(model, 0, 10)
    trained = method.active
    loss_fn(model, batches()[0]).backward()
    expected = saliency(model)
    assert expected > 0
    method.on_train_batch_start(model, 0, 10)  # another micro-batch of the same step: no new draw, no score
    assert method.active == trained and method.sampler.scores[trained] is None
    method.on_train_batch_start(model, 1, 10)
    assert method.sampler.scores[trained] == pytest.approx(expected)
    summary = method.summary()["palette_sampling"]
    assert summary["budgets"] == PALETTE and sum(summary["probabilities"]) == pytest.approx(1.0)
    assert sum(summary["steps"]) == 2


@pytest.mark.parametrize("options, message", [({"palette": []}, "palette"), ({"palette": [0.6, 0.6]}, "repeats"),
                                              ({"palette": [0.6, 1.2]}, "palette"),
                                              ({"sampling": "greedy"}, "sampling"),
                                              ({"importance_momentum": 1.0}, "importance_momentum")])
def test_bad_options_fail_early(options, message):
    with pytest.raises(ValueError, match=message):
        JactusPalette(**options)
