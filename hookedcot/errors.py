"""The one base class of every error hookedcot raises on purpose.

Why a module of its own, importing nothing: every other module (conversions/ included) derives its
errors from `HookedCoTError`, so it must be importable first and from anywhere without a cycle.
Each specific error keeps its historical built-in base too (`ConversionError` is a `ValueError`,
`HookNameError` a `KeyError`, ...), so `except ValueError` code keeps working, while
`except hookedcot.HookedCoTError` catches everything hookedcot refuses, and nothing else.
"""

from __future__ import annotations


class HookedCoTError(Exception):
    """Raised on purpose by hookedcot: bad input, a file it cannot trust, a misuse it can name.

    Any other exception type escaping hookedcot is a bug; the message of a HookedCoTError names
    the file or argument, what is wrong with it and how to fix it."""
