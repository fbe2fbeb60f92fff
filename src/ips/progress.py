"""Progress bars (tqdm), or nothing: one factory for training, prediction and extraction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class NoBar:
    """Stands in for a bar that is not shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(total: int, desc: str, *, unit: str = "it", leave: bool = True, show: bool = True) -> Any:
    """A tqdm bar over ``total`` steps (use as a context or call ``close``); `NoBar` when not
    shown."""
    if not show:
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)


def iterate(items: Iterable, desc: str, *, leave: bool = False, show: bool = True) -> Iterator:
    """``items`` with a tqdm bar (which has ``set_postfix``), or as they are."""
    if not show:
        return iter(items)
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=leave, dynamic_ncols=True)
