"""Checks of configuration values that several stages share, each raising a ``ValueError`` that names the value."""

from __future__ import annotations

from typing import Any


def require_counts(config: Any, names: tuple[str, ...]) -> None:
    """Raise a ``ValueError`` naming the first of the fields ``names`` of ``config`` that is not an integer >= 1
    (a bool is not a count).

    Example:
        >>> from types import SimpleNamespace
        >>> require_counts(SimpleNamespace(num_samples=0), ("num_samples",))
        Traceback (most recent call last):
        ValueError: `num_samples` has to be an integer >= 1, but is 0.
    """
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` has to be an integer >= 1, but is {value!r}.")
