"""Secrets never reach a file or a log: one place that knows which config values are secret and hides them.

A config key is secret when its last part names a credential (``api_key``, ``token``, ``password``...). Every
config that is saved, logged or put into a report goes through :func:`mask_secrets`; error text that may quote a
secret (an HTTP library's message with the request URL in it) goes through :func:`redact`.

Example:
    >>> from unidetox.secret_masking import mask_secrets, redact
    >>> mask_secrets({"scorer": {"name": "perspective", "api_key": "abc123"}})
    {'scorer': {'name': 'perspective', 'api_key': '***'}}
    >>> redact("GET https://x/analyze?key=abc123 failed", ["abc123"])
    'GET https://x/analyze?key=*** failed'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# ``pad_token``/``start_token`` are vocabulary settings, not credentials: only named kinds of token are secret.
SECRET_KEY_PATTERN = re.compile(
    r"^(key|token|secret|password|passwd|credentials?)$|(^|_)(api_?key|secret|password|passwd)$|"
    r"(^|_)(hub|hf|auth|access|api|bearer)_token$",
    re.IGNORECASE,
)


def is_secret_key(key: Any) -> bool:
    """True for config keys that hold credentials: ``api_key``, ``hub_token``, ``password``, ``key``..."""
    return isinstance(key, str) and bool(SECRET_KEY_PATTERN.search(key))


def mask_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists and OmegaConf containers) with every secret value replaced by ``***``.

    Empty values (``None``, ``""``) stay as they are, so a saved config still shows that no key was set.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra, a dependency
        pass
    if isinstance(obj, Mapping):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else mask_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_secrets(v) for v in obj)
    return obj


def secret_values(obj: Any) -> list[str]:
    """Every non-empty secret value in ``obj`` (to :func:`redact` them from text)."""
    found: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str) and v:
                found.append(v)
            else:
                found += secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += secret_values(v)
    return found


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
