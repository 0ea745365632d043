"""The shard store: per-batch seeds, shard files, and the commit that writes metadata.json last."""

import json
from pathlib import Path

import datasets
import pytest

from unidetox.distill.shards import (
    METADATA_FILE,
    STREAM_BASE,
    batch_rows,
    batch_seed,
    commit,
    read_committed,
    read_shard,
    shard_path,
)


def test_batch_seeds_and_sizes_depend_on_the_batch_only():
    assert batch_seed(3, 0) != batch_seed(3, 1) != batch_seed(4, 1)
    assert batch_seed(3, 1, STREAM_BASE) != batch_seed(3, 1)
    assert [batch_rows(i, 10, 4) for i in range(3)] == [4, 4, 2]
    assert shard_path(Path("s"), 7).name == "batch-000007.json"


def test_commit_writes_the_dataset_then_its_marker_and_reads_back(tmp_path):
    out = tmp_path / "built"
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "num_tokens": [1, 1]})
    commit(dataset, {"num_samples": 2, "fingerprint": {"seed": 0}}, out)
    assert (out / METADATA_FILE).is_file()
    assert not list(out.glob(".staging-*"))
    loaded, metadata = read_committed(out)
    assert loaded["text"] == ["a", "b"] and metadata == {"num_samples": 2, "fingerprint": {"seed": 0}}


def test_a_partial_shard_is_sampled_again_and_a_moved_one_refused(tmp_path):
    path = shard_path(tmp_path, 1)
    path.write_text(json.dumps({"batch": 1, "seed": batch_seed(0, 1), "token_ids": [[1]]}))
    assert read_shard(path, 1, 0, expected_rows=2) is None  # one row of two: incomplete
    assert read_shard(path, 1, 0, expected_rows=1)["token_ids"] == [[1]]
    with pytest.raises(ValueError, match=r"holds batch 1 .* not batch 2"):
        read_shard(path, 2, 0, expected_rows=1)
