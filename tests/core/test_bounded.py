"""compress_model: the memory-bounded two-phase driver equals one calibrate -> plan_ranks -> factorize."""

import pytest
import torch

from jactus import calibrate, compress_model, factorize, plan_ranks
from jactus.core import FactorizedLinear, layer_spectra

# Statistics bytes per shared-input group in float64 (n^2 once, m^2 per layer), from the conftest shapes:
# tiny Llama (hidden 32, intermediate 64, 2 KV heads of 8): q/k/v (32^2 + 32^2 + 2 * 16^2) * 8 = 20480,
# o 16384, gate/up (32^2 + 2 * 64^2) * 8 = 73728, down (64^2 + 32^2) * 8 = 40960; 151552 per decoder layer.
# Packed in order under 80_000: [qkv0 o0] [gate/up0] [down0 qkv1 o1] [gate/up1] [down1] -> 5 passes.
# tiny ViT (dim 32, mlp 128): qkv (32^2 + 96^2) * 8 = 81920, proj 16384, fc1 and fc2 139264 each.
# Under 160_000: [qkv0 proj0] [fc1_0] [fc2_0] [qkv1 proj1] [fc1_1] [fc2_1] -> 6 passes.
CASES = {"llama": (80_000, 5), "vit": (160_000, 6)}


def setup(family, tiny_llama, tiny_vit, lm_data, vision_batches, losses):
    """(fp64 model, batches, loss, a probe forward)."""
    if family == "vit":
        model = tiny_vit.double()
        batches = [(images.double(), labels) for images, labels in vision_batches]
        return model, batches, losses["vision"], lambda m: m(batches[0][0])
    make, split = lm_data
    data = make(rows=4)
    return tiny_llama.double(), split(data, [2, 2]), losses["lm"], lambda m: m(
        input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def factors(model):
    return {name: (m.U, m.C, m.V) for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("family,memory", [("llama", {"offload_to_cpu": True}), ("vit", {"park_layers_on_cpu": True})])
def test_bounded_passes_equal_one_shot(family, memory, tiny_llama, tiny_vit, lm_data, vision_batches, losses):
    model, batches, loss, probe = setup(family, tiny_llama, tiny_vit, lm_data, vision_batches, losses)
    head = ["head"] if family == "vit" else []
    reference = _copy(model)
    stats = calibrate(reference, batches, loss, progress=False)
    plan = plan_ranks(reference, stats, 0.7, rank_multiple=2)
    reference = factorize(reference, stats, plan, head_names=head, progress=False)

    calls = []

    def counting(m, batch):
        calls.append(1)
        return loss(m, batch)
    max_bytes, passes = CASES[family]
    streamed, streamed_plan = compress_model(model, batches, counting, 0.7, rank_multiple=2, head_names=head,
                                             max_stats_bytes=max_bytes, progress=False, **memory)
    assert streamed is model and streamed_plan == plan
    info = model.jactus_compress_stats
    assert info["passes"] == passes and max(info["pass_stats_bytes"]) <= max_bytes
    assert len(calls) == 1 + (2 * passes - 1) * len(batches)  # group discovery, P passes, then P - 1 again
    assert set(info["stages_s"]) == {"phase1_calibrate", "phase1_spectra", "plan", "phase2_calibrate",
                                     "phase2_factorize", "swap"}
    expected = factors(reference)
    assert expected and set(factors(model)) == set(expected)
    for name, (U, C, V) in factors(model).items():
        for got, want in zip((U, C, V), expected[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(probe(model), probe(reference), rtol=1e-8, atol=1e-10)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in reference.named_parameters()}
    assert model.jactus_rank_map == reference.jactus_rank_map


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_float32_statistics_halve_the_bytes_and_stay_close(tiny_llama, lm_data, losses):
    make, split = lm_data
    batches = split(make(rows=4), [2, 2])
    exact = calibrate(tiny_llama, batches, losses["lm"], progress=False)
    single = calibrate(tiny_llama, batches, losses["lm"], progress=False, stats_dtype=torch.float32)
    for name, st in exact.layers.items():
        assert single.layers[name].input_cov.dtype == torch.float32
        for got, want in ((single.layers[name].input_cov, st.input_cov), (single.layers[name].grad_cov, st.grad_cov)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # The same byte budget holds twice the float32 statistics: 75776 bytes per decoder layer -> 2 passes, not 5.
    _, _ = compress_model(tiny_llama, batches, losses["lm"], 0.7, rank_multiple=2, max_stats_bytes=80_000,
                          stats_dtype=torch.float32, progress=False)
    assert tiny_llama.jactus_compress_stats["passes"] == 2
    with pytest.raises(ValueError, match="stats_dtype=torch.float16"):
        calibrate(tiny_llama, batches, losses["lm"], progress=False, stats_dtype=torch.float16)


def test_list_of_budgets_equals_single_runs(tiny_vit, vit_factory, vision_batches, losses):
    results = compress_model(tiny_vit, vision_batches, losses["vision"], [0.6, 0.8], max_stats_bytes=200_000,
                             progress=False)
    assert [plan.budget for _, plan in results] == [0.6, 0.8] and results[1][0] is tiny_vit
    images = vision_batches[0][0]
    for (model, plan), budget in zip(results, (0.6, 0.8), strict=True):
        single, single_plan = compress_model(vit_factory(), vision_batches, losses["vision"], budget,
                                             max_stats_bytes=200_000, progress=False)
        assert plan == single_plan
        with torch.no_grad():
            torch.testing.assert_close(model(images), single(images), rtol=1e-5, atol=1e-6)


def test_precomputed_spectra_give_the_same_plan(tiny_vit, vision_batches, losses):
    stats = calibrate(tiny_vit, vision_batches, losses["vision"], progress=False)
    spectra = layer_spectra(tiny_vit, stats)
    assert plan_ranks(tiny_vit, None, 0.7, spectra=spectra) == plan_ranks(tiny_vit, stats, 0.7)
    spectra["blocks.0.mlp.fc1"] = spectra["blocks.0.mlp.fc1"][:3]
    with pytest.raises(ValueError, match=r"spectra\['blocks.0.mlp.fc1'\] has shape \(3,\); expected \(32,\)"):
        plan_ranks(tiny_vit, None, 0.7, spectra=spectra)


def test_bad_inputs_fail_before_calibrating(tiny_llama, lm_data, losses):
    make, split = lm_data
    batches = split(make(rows=4), [2, 2])
    with pytest.raises(ValueError, match="max_stats_bytes=1000 is below the"):  # smaller than one group
        compress_model(tiny_llama, batches, losses["lm"], 0.7, max_stats_bytes=1000, progress=False)
    with pytest.raises(ValueError, match="not an iterator"):
        compress_model(tiny_llama, iter(batches), losses["lm"], 0.7, progress=False)
    with pytest.raises(ValueError, match="budget=1.5"):
        compress_model(tiny_llama, batches, losses["lm"], 1.5, progress=False)
    with pytest.raises(ValueError, match="head module 'classifier'"):
        compress_model(tiny_llama, batches, losses["lm"], 0.7, head_names=["classifier"], progress=False)
    assert not any(isinstance(m, FactorizedLinear) for m in tiny_llama.modules())
