"""Deprecated names that keep working: a module-level ``__getattr__`` that returns the new object with a warning."""

from __future__ import annotations

import warnings
from typing import Any, Callable


def renamed(module: str, names: dict[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``old -> (new name, loader of the new object)`` with a ``FutureWarning``."""

    def __getattr__(name: str) -> Any:
        if name in names:
            new, load = names[name]
            warnings.warn(f"{name} is renamed {new}; the old name will be removed.", FutureWarning, stacklevel=2)
            return load()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
