"""Progress bars for the long steps of the core, with tqdm when it is installed and silently without it (the core
library needs only torch and safetensors)."""

from __future__ import annotations

from collections.abc import Iterable


class _Silent:
    """The part of tqdm's interface the core uses, doing nothing."""

    def __init__(self, iterable: Iterable | None = None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, **kwargs):
    """`tqdm.auto.tqdm(iterable, **kwargs)`, or a silent stand-in when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
