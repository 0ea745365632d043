"""Where local data lives: the folder ``$UNIDETOX_DATA_DIR`` names. Data is always read by path, never copied into
the repository.

The folder is stated, never guessed from where the package happens to be installed: a missing setting raises
:class:`DataDirNotSet` naming the variable and the fix. ``make`` sets it to ``../shared/data`` beside the checkout
unless it is set already, and so does the test suite (``tests/conftest.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV_VAR = "UNIDETOX_DATA_DIR"
# How to pass the folder instead, for the callers that do not say their own way.
PASS_DATA_DIR = "pass the folder itself (the recipes and the CLI: data_dir=PATH)"


class DataDirNotSet(FileNotFoundError):
    """No data folder was passed and ``$UNIDETOX_DATA_DIR`` is not set."""


def default_data_dir(elsewhere: str = PASS_DATA_DIR) -> Path:
    """The shared data folder, ``$UNIDETOX_DATA_DIR`` (``~`` expanded).

    Returned whether or not it exists, so that a missing file's error names where it was looked for. When the
    variable is unset or empty, raises :class:`DataDirNotSet` naming it and how to set it, and ``elsewhere``: the
    caller's own way to pass the folder.
    """
    value = os.environ.get(DATA_ENV_VAR)
    if not value:
        raise DataDirNotSet(
            f"No data folder: ${DATA_ENV_VAR} is not set. Set it to the folder that holds the shared data sets "
            f"(export {DATA_ENV_VAR}=/path/to/shared/data; `make` sets ../shared/data beside the checkout), or "
            f"{elsewhere}."
        )
    return Path(value).expanduser()


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
