"""DeepSpeed's just-in-time built ops: no run waits forever on a build lock left by an interrupted build, and a
single process builds no op it never uses.

DeepSpeed compiles its C++/CUDA ops on first use through ``torch.utils.cpp_extension.load``, which guards each
op's build folder with a ``lock`` file (``torch.utils.file_baton.FileBaton``): the builder creates it and keeps it
open until the build ends, every other process polls until it is gone. A build killed half way (a timeout, Ctrl-C
twice, an out-of-memory kill) leaves the file behind, and every later run that needs the op waits on it forever.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# DeepSpeed's shared-memory all-reduce for CPU process groups; built by every `deepspeed.init_distributed` on the
# CPU accelerator, used only by `inference_all_reduce`, which returns at once in a one-process group.
SHM_COMM_OP = "deepspeed_shm_comm"


class StaleBuildLock(RuntimeError):
    """A torch extension build lock whose holder cannot be ruled out, so it is neither waited on nor removed."""


def extensions_root() -> Path:
    """The folder holding one build folder per torch extension, named as ``torch.utils.cpp_extension`` names it.

    ``TORCH_EXTENSIONS_DIR`` when set, else the user's cache folder with a subfolder for this Python and
    accelerator build (``~/.cache/torch_extensions/py311_cpu``)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def lock_holders(lock: Path) -> list[int]:
    """Ids of the live processes that have ``lock`` open: the build that created it keeps it open until it ends.

    Raises :class:`StaleBuildLock` when the lock belongs to another user, whose processes cannot be inspected."""
    import psutil

    if lock.stat().st_uid != os.getuid():
        raise StaleBuildLock(
            f"{lock} belongs to another user, so whether a build still holds it cannot be checked; once no build "
            f"of that op runs, remove it (rm {lock}) or set TORCH_EXTENSIONS_DIR to a folder of your own."
        )
    target = os.path.realpath(lock)
    holders = []
    for process in psutil.process_iter():
        try:
            if process.uids().real == os.getuid() and any(f.path == target for f in process.open_files()):
                holders.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone meanwhile, or not ours: a lock of ours is opened only by our own processes
    return holders


def _identity(path: Path) -> tuple[int, int, int]:
    """Tells one lock file from a later one at the same path (an inode number alone may be reused)."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def clear_stale_build_locks(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the build locks under ``root`` (default :func:`extensions_root`) that no live process holds.

    A lock that a live build holds is left alone (torch then waits for that build, as it should). Returns the locks
    removed; each removal is logged as a warning naming the file. Raises :class:`StaleBuildLock` naming a lock whose
    holder cannot be checked.

    >>> clear_stale_build_locks("/nonexistent/torch_extensions")
    []
    """
    root = Path(root) if root is not None else extensions_root()
    removed = []
    for lock in sorted(root.glob("*/lock")):
        try:
            seen = _identity(lock)
            holders = lock_holders(lock)
            if holders:
                logger.info("A build of %s is running (process %s holds %s); waiting for it.",
                            lock.parent.name, ", ".join(map(str, holders)), lock)
                continue
            if _identity(lock) != seen:  # released and taken again by a new build meanwhile
                continue
            lock.unlink()
        except FileNotFoundError:  # its build ended meanwhile
            continue
        logger.warning("Removed the stale build lock %s: no live process holds it (an earlier build of %s was "
                       "interrupted); the op is rebuilt.", lock, lock.parent.name)
        removed.append(lock)
    return removed


def prepare_deepspeed() -> None:
    """Run before DeepSpeed forms its process group: clears stale build locks and, in a one-process run, marks the
    shared-memory all-reduce op unusable so it is not compiled (minutes on a busy CPU) for a kernel never called.

    DeepSpeed reads op compatibility from ``deepspeed.ops.__compatible_ops__``, probed once per process; its own
    comment says edits to that dict persist, and ``build_shm_op`` then falls back to plain torch.distributed."""
    clear_stale_build_locks()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or importlib.util.find_spec("deepspeed") is None:
        return  # several processes: DeepSpeed decides; not installed: transformers/accelerate say so
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().get_op_builder("ShareMemCommBuilder") is None:
        return  # an accelerator without the op: nothing to skip (and no op probing started for it)
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
