"""The shard store of a distillation: one file per finished batch, and the commit of the merged dataset.

A build's ``output_dir`` holds ``shards/config.json`` (the settings the shards were sampled with) and one
``shards/batch-NNNNNN.json`` per finished global batch, each written at once (temp file + ``os.replace``), so a
rerun skips finished batches. Batch ``i`` is seeded by :func:`batch_seed` from ``(seed, i)`` only, never from the
rank that samples it. :func:`commit` moves the merged dataset in and writes ``metadata.json`` last: its presence
marks a complete build.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import datasets

from unidetox.files import atomic_write_json, read_json_file

METADATA_FILE = "metadata.json"
SHARDS_DIR = "shards"
SHARD_CONFIG_FILE = "config.json"
SUMMARY_SAMPLES_FILE = "summary_samples.jsonl"
# Seed streams: the distilled text, and the plain samples the summary compares it with.
STREAM_DISTILL, STREAM_BASE, STREAM_ANTI = 0, 1, 2
METADATA_FIX = ("Delete it and rerun the build into the same output_dir: it merges the finished shards again and "
                "rewrites the file.")


def batch_seed(seed: int, index: int, stream: int = STREAM_DISTILL) -> int:
    """The RNG seed of global batch ``index``: a function of ``(seed, index, stream)`` only, never of the rank."""
    return (seed * 1_000_003 + stream * 1_000_000_007 + index) % (2**63 - 1)


def shard_path(shards: Path, index: int) -> Path:
    """Where the shard of global batch ``index`` lives in the folder ``shards``."""
    return shards / f"batch-{index:06d}.json"


def batch_rows(index: int, num_samples: int, batch_size: int) -> int:
    """How many texts global batch ``index`` holds: ``batch_size``, fewer in the last batch.

    Computed per batch, never as a list of all batches, so a build of any size starts sampling at once."""
    return min(batch_size, num_samples - index * batch_size)


def read_shard(path: Path, index: int, seed: int, expected_rows: int) -> dict | None:
    """Shard ``index`` of a build with ``seed``; ``None`` when it is missing or incomplete (it is sampled again).

    A complete shard that records another batch or seed than its name says (a file copied over another) is
    refused: using it would repeat or mix texts, and resampling it would hide that the folder was tampered with.
    """
    try:
        shard = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(shard, dict) or not isinstance(shard.get("token_ids"), list):
        return None
    if len(shard["token_ids"]) != expected_rows:
        return None
    expected_seed = batch_seed(seed, index)
    if shard.get("batch") != index or shard.get("seed") != expected_seed:
        raise ValueError(
            f"{path} holds batch {shard.get('batch')!r} (seed {shard.get('seed')!r}), not batch {index} (seed "
            f"{expected_seed}) as its name says: it was copied or moved from another shard or build. Delete it "
            "and rerun to sample this batch again."
        )
    return shard


def read_shard_settings(path: Path, overwrite: bool) -> dict | None:
    """The settings the shards in ``path.parent`` were sampled with (``None``: no shards yet).

    Unreadable settings match no build: refused, or with ``overwrite`` discarded with their shards."""
    if not path.is_file():
        return None
    try:
        return read_json_file(path, fix=f"Its shards cannot be matched to any settings: delete the folder "
                                        f"{path.parent} and rerun, or pass overwrite=True to discard them.")
    except ValueError:
        if not overwrite:
            raise
        return {}


def commit(dataset: datasets.Dataset, metadata: dict[str, Any], out: Path) -> None:
    """Stage ``dataset`` next to its final place in ``out``, move it in, and write ``metadata`` last (the commit
    marker), so a directory with ``metadata.json`` always holds a complete dataset."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
    atomic_write_json(out / METADATA_FILE, metadata)


def read_committed(path: Path) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The dataset saved in ``path`` and its metadata (``{}`` when it has no ``metadata.json``)."""
    dataset = datasets.load_from_disk(str(path))
    meta_file = path / METADATA_FILE
    metadata = read_json_file(meta_file, fix=METADATA_FIX) if meta_file.is_file() else {}
    return dataset, metadata
