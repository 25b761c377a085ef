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
