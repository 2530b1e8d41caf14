from __future__ import annotations

import onnx
import pytest
import timm
import torch

from jactus.models import LoadedModel, create_vision_model

from .conftest import TINY_VIT


def rebuild(model):
    arch = model.jactus_arch
    assert arch["library"] == "timm"
    copy = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"])
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def test_tiny_vit_builds_and_rebuilds_from_jactus_arch():
    loaded = create_vision_model("vit_tiny_patch16_224", num_classes=5, **TINY_VIT)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.family, loaded.head_names, loaded.tokenizer) == ("vision", ["head"], None)
    assert loaded.model.jactus_arch["kwargs"] == {"num_classes": 5, **TINY_VIT}
    x = torch.randn(2, 3, 32, 32)
    model = loaded.model.eval()
    assert model(x).shape == (2, 5)
    torch.testing.assert_close(rebuild(model)(x), model(x))


def test_checkpoint_path_keeps_backbone_and_replaces_a_mismatched_head(tmp_path):
    source = create_vision_model("vit_tiny_patch16_224", num_classes=7, **TINY_VIT).model
    torch.save(source.state_dict(), tmp_path / "model.pth")
    same = create_vision_model("vit_tiny_patch16_224", 7, checkpoint_path=str(tmp_path / "model.pth"), **TINY_VIT)
    torch.testing.assert_close(same.model.head.weight, source.head.weight)
    other = create_vision_model("vit_tiny_patch16_224", 3, checkpoint_path=str(tmp_path / "model.pth"),
                                **{**TINY_VIT, "img_size": 48})
    torch.testing.assert_close(other.model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert other.model.head.out_features == 3 and other.model.pos_embed.shape == (1, 1 + 6 * 6, 48)


def test_bad_names_sources_and_sizes_fail_early(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        create_vision_model("vit_tiny_patch16_2244", 10)
    with pytest.raises(ValueError, match="unknown embedded vision model 'dinov3'.*dinov2_small"):
        create_vision_model("vit_small_patch14_dinov2", 10, embedded="dinov3")
    with pytest.raises(ValueError, match="num_classes=0"):
        create_vision_model("vit_tiny_patch16_224", 0, **TINY_VIT)
    with pytest.raises(ValueError, match="one weight source"):
        create_vision_model("vit_tiny_patch16_224", 10, pretrained=True, checkpoint_path="x.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_vision_model("vit_tiny_patch16_224", 10, checkpoint_path=str(tmp_path / "nope.pth"))


@pytest.mark.assets
def test_dinov2_conversion_matches_onnxruntime(jactus_cache):
    """The converted timm backbone reproduces the ONNX graph's backbone output (its final LayerNorm, exposed as
    an extra graph output), position embeddings resampled from 518 to the graph's 224 pixels included."""
    import onnxruntime as ort

    from jactus.models.dinov2_onnx import onnx_path

    loaded = create_vision_model("vit_small_patch14_dinov2", 10, img_size=224, embedded="dinov2_small")
    cached = list(jactus_cache.glob("*.safetensors"))
    assert len(cached) == 1
    assert loaded.head_names == ["head"] and loaded.name == "dinov2_small"
    assert loaded.model.jactus_arch == {"library": "timm", "name": "vit_small_patch14_dinov2",
                                        "kwargs": {"num_classes": 10, "img_size": 224}}

    graph = onnx.load(str(onnx_path()))
    backbone_out = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(backbone_out, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (expected,) = session.run([backbone_out], {"input_image": x.numpy()})
    with torch.no_grad():
        got = loaded.model.eval().forward_features(x)
    assert got.shape == (2, 257, 384)
    assert (got - torch.from_numpy(expected)).abs().max().item() < 1e-4

    # The second load reads the cache (the file is not rewritten) and the 518-pixel model needs no resampling.
    stamp = cached[0].stat().st_mtime_ns
    native = create_vision_model("vit_small_patch14_dinov2", 4, embedded="dinov2_small")
    assert cached[0].stat().st_mtime_ns == stamp
    assert native.model.pos_embed.shape == (1, 1 + 37 * 37, 384)
    # HF's Dinov2Model has 22,056,576 parameters; timm has no (all-zero) mask_token of 384
    assert sum(p.numel() for n, p in native.model.named_parameters() if not n.startswith("head")) == 22_056_192
    torch.testing.assert_close(native.model.blocks[5].attn.qkv.weight, loaded.model.blocks[5].attn.qkv.weight)
