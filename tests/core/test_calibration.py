import pytest
import torch

from jactus.core import CalibrationStats, calibrate, warmup_head

Q, K, V = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
DOWN = "model.layers.1.mlp.down_proj"


def assert_close(actual, expected, rtol=1e-4):
    """Close relative to the matrix scale (fp32 gradients: tiny off-diagonal entries carry rounding noise)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def reference_stats(model, batches, loss_fn, names):
    """Sx, Sg straight from the definition: masked tokens, gradients of the summed loss (mean * label count)."""
    inputs, outputs = {n: [] for n in names}, {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        def hook(module, args, output, name=name):
            output.retain_grad()
            inputs[name].append(args[0].detach())
            outputs[name].append(output)
        hooks.append(modules[name].register_forward_hook(hook))
    sums_x = {n: 0 for n in names}
    sums_g = {n: 0 for n in names}
    tokens = 0
    for batch in batches:
        loss = loss_fn(model, batch) * (batch["labels"][:, 1:] != -100).sum()
        loss.backward()
        mask = batch["attention_mask"].bool()
        tokens += int(mask.sum())
        for name in names:
            x = inputs[name].pop()[mask].double()
            g = outputs[name].pop().grad[mask].double()
            sums_x[name] = sums_x[name] + x.T @ x
            sums_g[name] = sums_g[name] + g.T @ g
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {n: (sums_x[n] / tokens, sums_g[n] / tokens) for n in names}, tokens


def test_covariances_match_definition_with_padding(tiny_llama, lm_data, losses):
    make, split = lm_data
    batches = split(make(rows=4), [2, 2])
    stats = calibrate(tiny_llama, batches, losses["lm"], progress=False)
    expected, tokens = reference_stats(tiny_llama, batches, losses["lm"], [Q, DOWN])
    assert tokens < 4 * 9  # padding really was masked
    for name in (Q, DOWN):
        assert stats.layers[name].tokens == tokens
        assert_close(stats.layers[name].input_cov, expected[name][0])
        assert_close(stats.layers[name].grad_cov, expected[name][1])


def test_statistics_do_not_depend_on_batch_split(tiny_llama, lm_data, losses):
    make, split = lm_data
    data = make(rows=4)
    one = calibrate(tiny_llama, split(data, [4]), losses["lm"], progress=False)
    three = calibrate(tiny_llama, split(data, [1, 2, 1]), losses["lm"], progress=False)
    for name, st in one.layers.items():
        assert st.tokens == three.layers[name].tokens
        assert_close(st.input_cov, three.layers[name].input_cov)
        assert_close(st.grad_cov, three.layers[name].grad_cov)


def test_shared_inputs_stored_once(tiny_llama, lm_data, losses, tmp_path):
    make, split = lm_data
    stats = calibrate(tiny_llama, split(make(), [4]), losses["lm"], progress=False)
    assert [Q, K, V] in stats.input_groups
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in stats.input_groups
    assert stats.layers[Q].input_cov is stats.layers[K].input_cov is stats.layers[V].input_cov
    assert stats.layers[Q].grad_cov.shape == (32, 32) and stats.layers[K].grad_cov.shape == (16, 16)
    stats.save(tmp_path / "stats.pt")
    raw = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert len(raw["input_covs"]) == 2 * 4  # per decoder layer: qkv, o, gate/up, down
    loaded = CalibrationStats.load(tmp_path / "stats.pt")
    assert loaded.layers[Q].input_cov is loaded.layers[V].input_cov
    torch.testing.assert_close(loaded.layers[DOWN].grad_cov, stats.layers[DOWN].grad_cov)


def test_one_pass_over_the_layers_given_equals_the_full_pass(tiny_llama, lm_data, losses):
    """`calibrate` runs one pass (no hidden repeats): split into the driver's passes, each call reads the batches
    once and its statistics equal the full pass's; a one-shot iterator works as well as a list."""
    from jactus.core.calibration import input_groups, split_passes
    from jactus.core.targets import find_targets

    make, split = lm_data
    batches = split(make(), [2, 2])
    full = calibrate(tiny_llama, batches, losses["lm"], progress=False)
    modules = find_targets(tiny_llama)
    groups = input_groups(tiny_llama, modules, batches[0], losses["lm"])
    passes = split_passes(groups, modules, True, 160_000)
    assert len(passes) >= 2
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return losses["lm"](model, batch)
    for pass_groups in passes:
        calls.clear()
        subset = {name: modules[name] for group in pass_groups for name in group}
        part = calibrate(tiny_llama, iter(batches), counting_loss, subset, groups=pass_groups, progress=False)
        assert len(calls) == len(batches)  # known groups: no discovery forward, one pass
        assert set(part.layers) == set(subset)
        assert part.nbytes() <= 160_000
        for name, st in part.layers.items():
            torch.testing.assert_close(st.input_cov, full.layers[name].input_cov, rtol=1e-12, atol=0)
            torch.testing.assert_close(st.grad_cov, full.layers[name].grad_cov, rtol=1e-12, atol=0)
    assert full.layers[Q].input_cov is full.layers[K].input_cov
    with pytest.raises(ValueError, match="got no calibration batches"):
        calibrate(tiny_llama, [], losses["lm"], progress=False)


def test_vit_all_patch_tokens_and_flags_restored(tiny_vit, vision_batches, losses):
    tiny_vit.train()
    tiny_vit.blocks[0].norm1.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in tiny_vit.named_parameters()}
    stats = calibrate(tiny_vit, vision_batches, losses["vision"], progress=False)
    assert {n: p.requires_grad for n, p in tiny_vit.named_parameters()} == before
    assert tiny_vit.training and all(p.grad is None for p in tiny_vit.parameters())
    assert stats.layers["blocks.0.attn.qkv"].tokens == 2 * 4 * 17  # 16 patches + cls token per image
    assert stats.input_groups == []  # timm's fused qkv is one layer

    def failing(model, batch):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(tiny_vit, vision_batches, failing, progress=False)
    assert {n: p.requires_grad for n, p in tiny_vit.named_parameters()} == before


def test_non_finite_inputs_name_the_layer(tiny_vit, vision_batches, losses):
    images, labels = vision_batches[0]
    images = images.clone()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="blocks.0.attn.qkv"):
        calibrate(tiny_vit, [(images, labels)], losses["vision"], need_gradients=False, progress=False)
    with pytest.raises(FloatingPointError, match="loss is not finite"):
        calibrate(tiny_vit, [(images, labels)], losses["vision"], progress=False)


def test_warmup_head_trains_only_head(tiny_vit, vision_batches, losses):
    backbone = tiny_vit.blocks[0].mlp.fc1.weight.detach().clone()
    head = tiny_vit.head.weight.detach().clone()
    flags = {n: p.requires_grad for n, p in tiny_vit.named_parameters()}
    steps = warmup_head(tiny_vit, tiny_vit.head.parameters(), vision_batches, losses["vision"], steps=3, lr=1e-2)
    assert len(steps) == 3
    assert torch.equal(tiny_vit.blocks[0].mlp.fc1.weight, backbone)
    assert not torch.equal(tiny_vit.head.weight, head)
    assert {n: p.requires_grad for n, p in tiny_vit.named_parameters()} == flags


def test_input_only_batches_add_to_sx_and_not_to_sg(tiny_llama, lm_data, losses):
    """Sx: the second moment over the tokens of the task and the input-only batches; Sg: the task batches' alone."""
    make, split = lm_data
    task, text = split(make(rows=4), [2, 2]), split(make(rows=3, seed=7), [3])
    stats = calibrate(tiny_llama, task, losses["lm"], progress=False, input_batches=text)
    expected, task_tokens = reference_stats(tiny_llama, task, losses["lm"], [Q, DOWN])
    both, all_tokens = reference_stats(tiny_llama, [*task, *text], losses["lm"], [Q, DOWN])
    assert all_tokens > task_tokens
    for name in (Q, DOWN):
        assert stats.layers[name].tokens == all_tokens
        assert_close(stats.layers[name].input_cov, both[name][0])
        assert_close(stats.layers[name].grad_cov, expected[name][1])
    assert all(not p.requires_grad or p.grad is None for p in tiny_llama.parameters())
