"""Tiny models and batches for the core tests, built directly (no Hydra, no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# Two cores shared by several engineers: one intra-op thread avoids OpenMP spin contention on tiny matrices.
torch.set_num_threads(1)

VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
LLAMA_KWARGS = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=True)


def make_vit(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KWARGS)
    model.jactus_arch = {"library": "timm", "name": "vit_tiny_patch16_224", "kwargs": VIT_KWARGS}
    return model.eval()


@pytest.fixture
def tiny_vit():
    return make_vit()


@pytest.fixture
def vit_factory():
    return make_vit


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_KWARGS))
    model.jactus_arch = {"library": "transformers", "config": model.config.to_dict()}
    return model.eval()


@pytest.fixture
def vision_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator))
            for _ in range(2)]


def vision_loss(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@pytest.fixture
def losses():
    return {"vision": vision_loss, "lm": lm_loss}


def make_lm_data(rows: int = 4, length: int = 9, seed: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded sequences of different lengths; labels -100 on padding (and on each row's first token)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 64, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(rows):
        attention_mask[row, length - (row * 2) % 5:] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[:, 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_rows(data: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append({key: value[start:start + size] for key, value in data.items()})
        start += size
    return out


@pytest.fixture
def lm_data():
    return make_lm_data, split_rows
