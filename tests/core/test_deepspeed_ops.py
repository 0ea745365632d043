"""unidetox.deepspeed_ops: a torch extension build lock that no live process holds is removed and named, one that a
live build holds is left to it, one whose holder cannot be checked is refused naming the file; and a one-process
DeepSpeed run marks the shared-memory all-reduce op unusable instead of compiling it."""

from __future__ import annotations

import logging
import os
import re

import pytest
from torch.utils.file_baton import FileBaton

from unidetox import deepspeed_ops
from unidetox.deepspeed_ops import SHM_COMM_OP, StaleBuildLock, clear_stale_build_locks, extensions_root


def _plant_lock(root, op=SHM_COMM_OP):
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # what a build killed half way leaves: the file, with no process holding it
    return lock


def test_a_lock_no_process_holds_is_removed_and_named(tmp_path, caplog):
    lock = _plant_lock(tmp_path)
    other = tmp_path / "cpu_adam" / "cpu_adam.so"  # a finished build beside it is not touched
    other.parent.mkdir()
    other.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="unidetox.deepspeed_ops"):
        assert clear_stale_build_locks(tmp_path) == [lock]
    assert not lock.exists() and lock.parent.is_dir() and other.is_file()
    assert f"Removed the stale build lock {lock}" in caplog.text


def test_a_lock_a_live_build_holds_is_left_to_it(tmp_path, caplog):
    lock = tmp_path / SHM_COMM_OP / "lock"
    lock.parent.mkdir()
    baton = FileBaton(str(lock))  # how torch's extension build takes the lock: created and held open
    assert baton.try_acquire()
    try:
        assert deepspeed_ops.lock_holders(lock) == [os.getpid()]
        with caplog.at_level(logging.INFO, logger="unidetox.deepspeed_ops"):
            assert clear_stale_build_locks(tmp_path) == []
        assert lock.exists() and f"process {os.getpid()} holds {lock}" in caplog.text
    finally:
        baton.release()


def test_a_lock_of_another_user_is_refused_naming_the_file(tmp_path, monkeypatch):
    lock = _plant_lock(tmp_path)
    monkeypatch.setattr(deepspeed_ops.os, "getuid", lambda: lock.stat().st_uid + 1)
    with pytest.raises(StaleBuildLock, match=rf"{re.escape(str(lock))}.*rm {re.escape(str(lock))}.*TORCH_EXTENSIONS_DIR"):
        clear_stale_build_locks(tmp_path)
    assert lock.exists()


def test_the_extensions_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root().parent.name == "torch_extensions"  # torch's default, one folder per Python and build


@pytest.mark.parametrize("world_size, compatible", [(None, False), ("1", False), ("2", None)])
def test_one_process_marks_the_shm_op_unusable(tmp_path, monkeypatch, world_size, compatible):
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().get_op_builder("ShareMemCommBuilder") is None:
        pytest.skip("DeepSpeed's accelerator here has no shared-memory op")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    ops = dict(deepspeed.ops.__compatible_ops__)
    ops.pop(SHM_COMM_OP, None)
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", ops)  # the process's own dict is restored afterwards
    lock = _plant_lock(tmp_path)
    deepspeed_ops.prepare_deepspeed()
    assert not lock.exists()
    assert ops.get(SHM_COMM_OP) is compatible  # several processes: DeepSpeed's own probe decides
