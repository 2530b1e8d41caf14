import pytest
from torch import nn

from jactus.core import find_targets


def test_default_targets_vit(tiny_vit):
    names = list(find_targets(tiny_vit))
    assert names == [f"blocks.{i}.{leaf}" for i in range(2) for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_default_targets_llama_excludes_head(tiny_llama):
    names = list(find_targets(tiny_llama))
    assert len(names) == 14 and "lm_head" not in names
    assert all(isinstance(m, nn.Linear) for m in find_targets(tiny_llama).values())


def test_patterns_select(tiny_vit):
    assert list(find_targets(tiny_vit, ["*.mlp.fc1"])) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert list(find_targets(tiny_vit, [r"blocks\.1\.attn\..*"])) == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]


def test_bad_pattern_names_it_and_lists_linears(tiny_vit):
    with pytest.raises(ValueError, match=r"'nope_proj'.*blocks\.0\.attn\.qkv"):
        find_targets(tiny_vit, ["mlp.fc1", "nope_proj"])
