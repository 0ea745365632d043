"""Where local data lives. Data is always read by path, never copied into the repository."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "UNIDETOX_DATA_DIR"


def default_data_dir() -> Path:
    """``$UNIDETOX_DATA_DIR`` if set, else the first existing ``shared/data`` beside the checkout or the cwd.

    Returns the preferred location even when it does not exist, so that error messages can name it.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    candidates = [
        Path(__file__).resolve().parents[2] / "shared" / "data",  # <checkout>/../shared/data (editable install)
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]


def require_file(path: str | os.PathLike, what: str,
                 elsewhere: str = "Pass the right path (recipes: the matching `*.path=...` override)") -> Path:
    """Return ``path`` as a Path, or raise ``FileNotFoundError`` naming it and how to point elsewhere (``elsewhere``:
    the caller's own way, beside setting the data folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. {elsewhere}, or set ${DATA_ENV_VAR} to the folder that holds the shared "
            "data sets."
        )
    return path
