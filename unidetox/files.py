"""The JSON and text files of a run: read leniently, written atomically (a killed job never leaves a half-written file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and move it in place (``os.replace``).

    The temporary name carries the process id, so processes writing the same file never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any, **dumps_kwargs) -> Path:
    """``payload`` as indented JSON (non-JSON values through ``str``), written atomically."""
    dumps_kwargs = {"indent": 2, "default": str, **dumps_kwargs}
    return atomic_write_text(path, json.dumps(payload, **dumps_kwargs))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None when the file is missing or unreadable (a write that was cut short)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_json_file(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in ``path``; a file that does not hold JSON raises a ``ValueError`` naming it, the line and column
    where the JSON breaks, and ``fix`` (what to do about it). A missing file raises ``FileNotFoundError``.

    Unlike :func:`read_json`, for files that must be read: settings that guard a cache, the marker of a build.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        where = "it is empty" if not err.doc.strip() else f"line {err.lineno}, column {err.colno}: {err.msg}"
        raise ValueError(f"{path} is not valid JSON ({where}). {fix}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}). {fix}") from err
