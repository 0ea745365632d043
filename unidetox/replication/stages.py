"""Stages of the replication: each runs once, is skipped when finished, and can be shared by several copies.

A stage is a pipeline call (``distill``, ``detox``, ``evaluate``: their ``finished(args)`` says whether the output
directory already holds the run, and refuses one made with other settings) or a library call with its own
completion check. Every stage appends one line to ``<output_dir>/replicate_log.jsonl`` (``ran``, ``cached``,
``deferred`` or ``waited``, with its wall time).

With ``share=True`` several independent copies of the command (one per GPU, say, or two single-thread copies on a
CPU) split the stages: a copy *claims* a stage through a lock file under ``<output_dir>/.claims/`` before running
it; a stage another copy holds is *deferred*, and the copy waits for it (:meth:`Stages.result`,
:meth:`Stages.wait_for`) only where its output is needed. Locks die with their process, so a stage whose copy was
killed is run by the next copy that needs it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

LOG_FILE = "replicate_log.jsonl"
CLAIMS_DIR = ".claims"


class Stages:
    """Runs each stage once and hands out its result; see the module docstring."""

    def __init__(self, output_dir: Path, is_main: bool = True, share: bool = False, poll_s: float = 30.0):
        self.out = Path(output_dir)
        self.is_main = is_main
        self.share = share
        self.poll_s = poll_s
        self.session: list[dict[str, Any]] = []
        self._results: dict[str, Any] = {}
        self._deferred: dict[str, Callable[[], Any]] = {}  # stage -> a call that finds (or makes) its result

    def log(self, name: str, status: str, seconds: float, **extra) -> None:
        entry = {"stage": name, "status": status, "wall_time_s": round(seconds, 2),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **extra}
        self.session.append(entry)
        logger.info("stage %-28s %s (%.1fs)", name, status, seconds)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG_FILE).open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def _claim_file(self, name: str) -> Path:
        return self.out / CLAIMS_DIR / (name.replace("/", "__") + ".lock")

    def _try_claim(self, name: str):
        """The held claim lock of ``name``, or None when another copy holds it."""
        path = self._claim_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def _run_claimed(self, name: str, finished: Callable[[], Any], make: Callable[[], Any], **log_extra) -> Any:
        """``finished()`` when it gives a result, else ``make()``'s under this copy's claim; None when deferred."""
        result = finished()
        if result is not None:
            self.log(name, "cached", 0.0, **log_extra)
            self._results[name] = result
            return result
        claim = self._try_claim(name) if self.share else contextlib.nullcontext()
        if claim is None:
            self._deferred[name] = lambda: self._run_claimed(name, finished, make, **log_extra)
            self.log(name, "deferred", 0.0, **log_extra)
            return None
        with claim:
            if self.share:  # another copy may have finished it between our check and our claim
                result = finished()
                if result is not None:
                    self.log(name, "cached", 0.0, **log_extra)
                    self._results[name] = result
                    return result
            start = time.perf_counter()
            result = make()
            gc.collect()
            self.log(name, "ran", time.perf_counter() - start, **log_extra)
        self._results[name] = result
        return result

    def pipeline(self, name: str, pipeline, args, **log_extra) -> Any:
        """``pipeline.run(args)`` unless ``pipeline.finished(args)`` finds the run done; its result (None: deferred).

        ``pipeline`` is a stage module (:mod:`unidetox.distill.pipeline`, :mod:`unidetox.detox.pipeline`,
        :mod:`unidetox.evaluation.pipeline`). A finished directory made with other settings raises (the pipeline's
        :class:`~unidetox.run_dir.OutputDirConflict`), except for the evaluation, which redoes only what changed.
        """
        return self._run_claimed(name, lambda: pipeline.finished(args), lambda: pipeline.run(args),
                                 dir=str(getattr(args, "output_dir", "")), **log_extra)

    def library(self, name: str, finished: Callable[[], Any], make: Callable[[], Any], stage_dir: Path) -> Any:
        """``make()`` unless ``finished()`` returns its result already (anything but None)."""
        return self._run_claimed(name, finished, make, dir=str(stage_dir))

    def wait_for(self, *names: str) -> None:
        """Block until the named deferred stages (every deferred stage when none is named) are done elsewhere; a
        stage whose copy died is run here. Stages this copy ran or found cached return at once."""
        for name in list(names or self._deferred):
            retry = self._deferred.pop(name, None)
            if retry is None:
                continue
            start = time.perf_counter()
            lock = FileLock(str(self._claim_file(name)))
            while True:
                try:
                    lock.acquire(timeout=self.poll_s)
                    break
                except Timeout:  # still running in another copy
                    logger.info("waiting for stage %s (another copy runs it; %.0fs so far)", name,
                                time.perf_counter() - start)
            lock.release()
            self.log(name, "waited", time.perf_counter() - start)
            retry()

    def result(self, name: str) -> Any:
        """The stage's result, waiting for it first when another copy runs it."""
        self.wait_for(name)
        if name not in self._results:
            raise KeyError(f"Stage {name!r} has not been run in this replication.")
        return self._results[name]

    def running_elsewhere(self, name: str) -> bool:
        """True while another copy holds the claim of a stage this copy deferred."""
        if name not in self._deferred:
            return False
        lock = self._try_claim(name)
        if lock is None:
            return True
        lock.release()
        return False

    def run_when_ready(self, jobs) -> None:
        """Run ``jobs`` (``[(names of the stages a job needs, job)]``) in order, except that a job whose stages
        still run in another copy waits until no other job is ready: a copy works instead of waiting."""
        pending = list(jobs)
        while pending:
            job = next((j for j in pending if not any(self.running_elsewhere(n) for n in j[0])), pending[0])
            pending.remove(job)
            self.wait_for(*job[0])
            job[1]()
