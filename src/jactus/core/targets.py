"""Which `nn.Linear` layers JACTUS compresses."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

# Leaf module names of the linears inside transformer blocks: timm ViT (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
# and HF Llama-style decoders.
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2",
                   "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Task heads are never compressed (they are new for the task, or tied to the embeddings).
HEAD_NAMES = ("head", "lm_head")


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def _matches(pattern: str, name: str) -> bool:
    """fnmatch or full regex match on the full module name; a dotted suffix (`mlp.fc1`) also matches."""
    if name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, patterns: Sequence[str] | str | None = None) -> dict[str, nn.Linear]:
    """The target linears `{full module name: module}`, in module order.

    `patterns=None`: every `nn.Linear` whose leaf name is in `DEFAULT_TARGETS`. Otherwise each pattern (fnmatch,
    regex on the full name, or a dotted suffix) selects linears; a pattern that matches no linear is an error.
    Heads (`head`, `lm_head` anywhere in the name) are excluded either way.
    """
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    candidates = {name: module for name, module in linears.items() if not _is_head(name)}
    if patterns is None:
        found = {name: m for name, m in candidates.items() if name.rsplit(".", 1)[-1] in DEFAULT_TARGETS}
        if not found:
            raise ValueError(f"no default target linear ({', '.join(DEFAULT_TARGETS)}) in {type(model).__name__}; "
                             f"pass patterns, e.g. some of: {_some(linears)}")
        return found
    if isinstance(patterns, str):
        patterns = [patterns]
    found: dict[str, nn.Linear] = {}
    for pattern in patterns:
        hits = [name for name in candidates if _matches(pattern, name)]
        if not hits:
            raise ValueError(f"target pattern {pattern!r} matches no nn.Linear of {type(model).__name__} "
                             f"(heads {HEAD_NAMES} are never targets); linears: {_some(linears)}")
        found.update((name, candidates[name]) for name in hits)
    return {name: module for name, module in candidates.items() if name in found}


def _some(names, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"
