"""Checks of configuration values that several stages share, each raising a ``ValueError`` that names the value."""

from __future__ import annotations

from typing import Any


def require_count(name: str, value: Any, fix: str = "") -> None:
    """Raise a ``ValueError`` naming ``name`` and ``value`` unless ``value`` is an integer >= 1 (a bool is not a
    count); ``fix`` is appended to the message.

    Example:
        >>> require_count("preselect_top_k", 0, " or null (off)")
        Traceback (most recent call last):
        ValueError: `preselect_top_k` has to be an integer >= 1 or null (off), but is 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` has to be an integer >= 1{fix}, but is {value!r}.")


def require_counts(config: Any, names: tuple[str, ...]) -> None:
    """:func:`require_count` for each of the fields ``names`` of ``config``, in order.

    Example:
        >>> from types import SimpleNamespace
        >>> require_counts(SimpleNamespace(num_samples=0), ("num_samples",))
        Traceback (most recent call last):
        ValueError: `num_samples` has to be an integer >= 1, but is 0.
    """
    for name in names:
        require_count(name, getattr(config, name))
