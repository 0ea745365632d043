"""One short digest for settings: what makes two cached results the same computation.

>>> from unidetox.fingerprints import settings_digest
>>> settings_digest({"b": 1, "a": [2, 3]}) == settings_digest({"a": [2, 3], "b": 1})
True
>>> len(settings_digest({"alpha": 0.1}))
16
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def settings_digest(settings: Any) -> str:
    """The first 16 hex digits of the SHA-256 of ``settings`` as sorted JSON (values JSON cannot hold as text)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
