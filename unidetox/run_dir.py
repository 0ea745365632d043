"""One output directory, one run: a reused directory is the same run (resumed) or refused, never silently mixed.

Every pipeline saves its resolved config as ``<output_dir>/unidetox_run.json`` (secrets masked) once its inputs and
models are loaded (a run that fails those checks records nothing, so its corrected rerun is not refused): a name no
model file uses, so a full fine-tuning that saves its model into the same directory keeps it. Run directories of
earlier versions hold that record as ``config.json``; it is read when it is not a model's. A later run into the same
directory compares its own config with that file: the same settings resume the run; other settings raise
:class:`OutputDirConflict` naming the keys that differ. Pipelines whose work is cached per unit with the settings
that made it (the evaluation, per model and seed) accept changed settings (``incremental=True``) and redo only the
units they change. Paths inside the run's directory are compared relative to it, so the same run named by a relative
and an absolute path, or moved elsewhere, is still the same run.

One run at a time: a stage's ``run`` holds ``<output_dir>/_unidetox_run.lock`` (:func:`holds_output_dir`) for its
whole lifetime, so a second run on the same directory is refused with :class:`OutputDirBusy` naming the holder's pid
and host. The lock is an ``flock`` the kernel drops when its process dies; the file keeps a JSON holder record while
it is held, so a record found on a free lock is the trace of a run that died, taken over with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from unidetox.processes import gather_objects, is_main_process, rank_and_world_size
from unidetox.secret_masking import mask_secrets

logger = logging.getLogger(__name__)

CONFIG_FILE = "unidetox_run.json"
# Where earlier versions kept the record; in a full fine-tuning's directory the model's config replaced it.
LEGACY_CONFIG_FILE = "config.json"
# "_" first: Trainer.push_to_hub uploads output_dir without "_*" files, so no pid or host name reaches the hub.
LOCK_FILE = "_unidetox_run.lock"
# Keys that say where a run writes, not what it computes: compared as places (see _located), never as settings.
LOCATION_KEYS = ("output_dir", "logging_dir", "parts_dir")
# Run directories this process holds: a run inside another run of this process (a replication's stages, a
# submitit debug job) takes its directory again without waiting on itself.
_held: dict[Path, tuple[int, int]] = {}


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


def _located(value: Any, run_dir: str, resolve: bool) -> Any:
    """``value`` with every location key's path inside ``run_dir`` written as ``<output_dir>/...`` (``resolve``:
    relative paths are taken from the working directory, as this process reads them; a saved config's are compared
    as written)."""
    if isinstance(value, dict):
        return {k: (_place(v, run_dir, resolve) if k in LOCATION_KEYS and isinstance(v, str)
                    else _located(v, run_dir, resolve)) for k, v in value.items()}
    if isinstance(value, list):
        return [_located(v, run_dir, resolve) for v in value]
    return value


def _place(path: str, run_dir: str, resolve: bool) -> str:
    normal = os.path.abspath if resolve else os.path.normpath
    path, run_dir = normal(os.path.expanduser(path)), normal(os.path.expanduser(run_dir))
    if path == run_dir:
        return "<output_dir>"
    return "<output_dir>/" + os.path.relpath(path, run_dir) if path.startswith(run_dir + os.sep) else path


def _comparable(config: Mapping[str, Any], ignore: Iterable[str], resolve: bool = False) -> dict[str, Any]:
    """The config as it is saved (JSON types, secrets masked), without the ``ignore``d (dotted) keys, its places
    inside its own ``output_dir`` relative to it, and without ``output_dir`` itself: the directory is the run's."""
    data = json.loads(json.dumps(mask_secrets(dict(config)), default=str))
    run_dir = data.pop("output_dir", None)
    if isinstance(run_dir, str):
        data = _located(data, run_dir, resolve)
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
    diff = config_diff(_comparable(saved, ignore), _comparable(config, ignore, resolve=True))
    if diff and not incremental:
        shown = "; ".join(diff[:8]) + ("; ..." if len(diff) > 8 else "")
        raise OutputDirConflict(
            f"{output_dir} holds a run made with other settings ({shown}). Run with the same settings to resume "
            "it, or pick another output_dir."
        )
    return diff


class OutputDirBusy(RuntimeError):
    """Another live run holds the output directory."""


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder record in the lock file (None: empty, the lock was released cleanly, or unreadable)."""
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run that is starting (no holder record yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``output_dir`` (created if missing) for this process while the block runs; yields the lock file.

    Raises:
        OutputDirBusy: another live process holds it (named by pid, host and start time).
    """
    run_dir = Path(output_dir).expanduser().resolve()
    if run_dir in _held:  # this process holds it already (a run inside a run): count the nesting
        fd, depth = _held[run_dir]
        _held[run_dir] = (fd, depth + 1)
        try:
            yield run_dir / LOCK_FILE
        finally:
            _held[run_dir] = (fd, depth)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_file = run_dir / LOCK_FILE
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise OutputDirBusy(
            f"{run_dir} is in use by another run ({_describe(holder)}): two runs on one directory would mix their "
            "checkpoints and records. Wait for that run to end (or stop it), or pick another output_dir."
        ) from None
    stale = _read_holder(fd)
    if stale:
        logger.warning("%s: taking over the lock of a run that ended without releasing it (%s)", run_dir,
                       _describe(stale))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[run_dir] = (fd, 1)
    try:
        yield lock_file
    finally:
        del _held[run_dir]
        os.ftruncate(fd, 0)  # an empty record: released cleanly, nothing to take over
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """:func:`output_dir_lock` for a run of one or several processes: the main process holds the lock, and when it
    is refused every process of the launch raises the same :class:`OutputDirBusy` (none waits for the others)."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if is_main_process():
            try:
                stack.enter_context(output_dir_lock(output_dir))
            except OutputDirBusy as err:
                if rank_and_world_size()[1] == 1:
                    raise
                refusal = str(err)
        if rank_and_world_size()[1] > 1:
            refusal = next((r for r in gather_objects([refusal]) if r), None)
        if refusal:
            raise OutputDirBusy(refusal)
        yield


def holds_output_dir(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorates a stage's ``run(args)``: ``args.output_dir`` is locked (:func:`run_lock`) while it runs."""

    @functools.wraps(run)
    def locked(args):
        with run_lock(args.output_dir):
            return run(args)

    return locked
