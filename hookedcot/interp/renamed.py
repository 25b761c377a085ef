"""Old names of renamed tools: they keep working for one release and warn with the new name."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable


def renamed(new: Callable[..., Any], old_name: str) -> Callable[..., Any]:
    """`old_name`, calling `new` after a DeprecationWarning that names it."""

    @functools.wraps(new)
    def old(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(
            f"{old_name} is deprecated and will be removed in the next release; use {new.__module__}.{new.__name__}",
            DeprecationWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    old.__name__ = old.__qualname__ = old_name
    old.__doc__ = f"Deprecated: use `{new.__name__}`."
    return old


def renamed_constants(module: str, old: dict[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module `__getattr__` serving old constant names {old: (new name, value)} with a warning."""

    def __getattr__(name: str) -> Any:
        if name in old:
            new, value = old[name]
            warnings.warn(f"{module}.{name} is deprecated and will be removed in the next release; use {module}.{new}",
                          DeprecationWarning, stacklevel=2)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
