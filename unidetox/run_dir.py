"""One output directory, one run: a reused directory is the same run (resumed) or refused, never silently mixed.

Every pipeline saves its resolved config as ``<output_dir>/unidetox_run.json`` (secrets masked) before it writes
anything else: a name no model file uses, so a full fine-tuning that saves its model into the same directory keeps
it. Run directories of earlier versions hold that record as ``config.json``; it is read when it is not a model's.
A later run into the same directory compares its own config with that file: the same settings resume the run;
other settings raise :class:`OutputDirConflict` naming the keys that differ. Pipelines whose work is cached
per unit with the settings that made it (the evaluation, per model and seed) accept changed settings
(``incremental=True``) and redo only the units they change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from unidetox.secret_masking import mask_secrets

CONFIG_FILE = "unidetox_run.json"
# Where earlier versions kept the record; in a full fine-tuning's directory the model's config replaced it.
LEGACY_CONFIG_FILE = "config.json"


class OutputDirConflict(ValueError):
    """An output directory holds a run made with other settings."""


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["key.sub: old -> new", ...]`` for every leaf that differs between two nested configs."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _comparable(config: Mapping[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    """The config as it is saved (JSON types, secrets masked), without the ``ignore``d (dotted) keys."""
    data = json.loads(json.dumps(mask_secrets(dict(config)), default=str))
    for key in ignore:
        *parents, leaf = key.split(".")
        section = data
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    return data


def read_run_config(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The config saved in ``output_dir`` (None when there is none or it cannot be read).

    Without ``unidetox_run.json``, an earlier version's ``config.json`` record is read, unless that file is a
    model's config (``model_type``), as a full fine-tuning's final save leaves it.
    """
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        try:
            saved = json.loads((Path(output_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and "model_type" not in saved:
            return saved
    return None


def check_output_dir(
    output_dir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    incremental: bool = False,
) -> list[str]:
    """Refuse to reuse ``output_dir`` for a run with other settings; returns the differing keys (empty: same run).

    Args:
        output_dir: the run's output directory (it need not exist).
        config: the run's resolved config (a plain dict, as :func:`unidetox.hydra_config.to_container` gives).
        ignore: keys (dotted for nested ones) that do not change what the run computes (e.g. ``progress``).
        incremental: the pipeline caches its work per unit with its own fingerprints, so other settings are allowed
            (the differences are returned for the log).

    Raises:
        OutputDirConflict: ``output_dir`` holds a run made with other settings and ``incremental`` is False.
    """
    saved = read_run_config(output_dir)
    if saved is None:
        return []
    ignore = tuple(ignore)
    diff = config_diff(_comparable(saved, ignore), _comparable(config, ignore))
    if diff and not incremental:
        shown = "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "")
        raise OutputDirConflict(
            f"{output_dir} holds a run made with other settings ({shown}). Run with the same settings to resume "
            "it, or pick another output_dir."
        )
    return diff
