"""Stages of the replication: each runs once, is skipped when finished, and runs in this process or as a job.

A stage is a stage pipeline's run (:meth:`Stages.run_pipeline_stage`: ``distill``, ``detox``, ``evaluate``, whose
``finished(args)`` says whether the output directory already holds the run, and refuses one made with other
settings) or a function with its own completion check (:meth:`Stages.run_function_stage`). Every stage appends
one line to ``<output_dir>/replicate_log.jsonl`` (``ran`` or ``cached``, with its wall time: for a job, the job's
run time, and its ``job_id``).

Without an engine (``launcher.engine=inprocess``) this process runs every stage in turn. With
``launcher.engine=submitit`` (:mod:`unidetox.replication.launcher`) a stage that is not finished is submitted as a
submitit job and the driver goes on; :meth:`Stages.result` and :meth:`Stages.wait_for` wait for the job only where
its output is needed, at most ``max_concurrent_jobs`` jobs run at once (the driver waits for the first of them to
end before submitting more), and a stage whose arguments name a path inside the directory of a stage still running waits for
that stage first. A failed job raises :class:`~unidetox.replication.launcher.StageJobFailed` in the driver and the
driver's other jobs are cancelled, so a rerun never races a leftover job on the same directory; every stage resumes
from what it saved. The same holds when the driver itself is stopped: used as a context manager (``with Stages(...)
as stages:``), it cancels its jobs when the block ends by an exception, Ctrl-C, or a SIGTERM (turned into
``SystemExit(143)`` while the block runs, since a process killed by the default handler cancels nothing). The
finished-output checks stay in the driver: a finished stage is never submitted.

Copies of the command do not share work: each stage's run, and the driver, hold their output directory's lock
(:mod:`unidetox.run_dir`), so a second copy is refused. One mechanism schedules the stages, the engine, and
``launcher.cluster=local`` does on one machine what several copies would (``launcher.max_concurrent_jobs=2`` for two),
with the concurrency, the logs and the failures in one place.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unidetox.replication.launcher import LauncherArguments, StageJobFailed, StageJobs

logger = logging.getLogger(__name__)

LOG_FILE = "replicate_log.jsonl"
JOBS_DIR = "jobs"
JOB_POLL_S = 1.0  # how often a driver with every slot taken looks for an ended job
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _exit_on_sigterm(signum, frame):
    raise SystemExit(SIGTERM_EXIT_CODE)


@dataclass
class _SubmittedStage:
    job: Any  # a submitit Job
    slot: int
    log_extra: dict[str, Any]
    stage_dir: Path | None  # where it writes; None: unknown


class Stages:
    """Runs each stage once and hands out its result; see the module docstring."""

    def __init__(self, output_dir: Path, is_main: bool = True, launcher: LauncherArguments | None = None):
        self.out = Path(output_dir)
        self.is_main = is_main
        self.launcher = launcher or LauncherArguments()
        self.jobs = (StageJobs(self.launcher, Path(self.launcher.folder or self.out / JOBS_DIR))
                     if self.launcher.uses_jobs else None)
        self.session: list[dict[str, Any]] = []
        self._results: dict[str, Any] = {}
        self._submitted: dict[str, _SubmittedStage] = {}  # in submission order
        self._sigterm_handler_before: Any = None

    def __enter__(self) -> Stages:
        # Signal handlers can only be set from the main thread; elsewhere the caller owns the process's signals.
        if self.jobs is not None and threading.current_thread() is threading.main_thread():
            # None: a handler not set from Python, which cannot be restored; the default is the closest.
            self._sigterm_handler_before = signal.signal(signal.SIGTERM, _exit_on_sigterm) or signal.SIG_DFL
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._sigterm_handler_before is not None:
            signal.signal(signal.SIGTERM, self._sigterm_handler_before)
            self._sigterm_handler_before = None
        if exc_type is not None:
            self._cancel_all()

    def log(self, name: str, status: str, seconds: float, **extra) -> None:
        entry = {"stage": name, "status": status, "wall_time_s": round(seconds, 2),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **extra}
        self.session.append(entry)
        logger.info("stage %-28s %s (%.1fs)", name, status, seconds)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG_FILE).open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def _run(self, name: str, finished: Callable[[], Any], make: Callable[..., Any], make_args: tuple,
             stage_dir: Path | None, inputs: Any = None, **log_extra) -> Any:
        """``finished()`` when it gives a result; else ``make(*make_args)``: here (its result) or as a job (None)."""
        # The same stage again: its earlier job decides whether it is finished; and never start on the unfinished
        # output of a running stage.
        for running in [name, *self._stages_holding(inputs)]:
            if running in self._submitted:
                self._collect(running)
        result = finished()
        if result is not None:
            self.log(name, "cached", 0.0, **log_extra)
            self._results[name] = result
            return result
        if self.jobs is None:
            start = time.perf_counter()
            result = make(*make_args)
            gc.collect()
            self.log(name, "ran", time.perf_counter() - start, **log_extra)
            self._results[name] = result
            return result
        self._collect_finished()
        while len(self._submitted) >= self.launcher.max_concurrent_jobs:
            self._collect(self._first_to_end())
        slot = min(set(range(self.launcher.max_concurrent_jobs)) - {s.slot for s in self._submitted.values()})
        writes = Path(stage_dir).absolute() if stage_dir else None
        job = self.jobs.submit(name, slot, make, *make_args, stage_dir=writes)
        logger.info("stage %-28s submitted as job %s (logs: %s)", name, job.job_id, job.paths.stdout)
        self._submitted[name] = _SubmittedStage(job, slot, log_extra, writes)
        return None

    def _stages_holding(self, inputs: Any) -> list[str]:
        """The submitted stages whose directory holds a path named anywhere in ``inputs`` (a config)."""
        paths = [Path(v).absolute() for v in _strings(inputs)]
        return [name for name, stage in self._submitted.items() if stage.stage_dir is not None
                and any(p == stage.stage_dir or stage.stage_dir in p.parents for p in paths)]

    def _collect(self, name: str) -> None:
        """Wait for the job of ``name`` and keep its result; on a failure cancel the other jobs and raise."""
        stage = self._submitted[name]
        try:
            result, seconds = stage.job.result()
        except Exception as error:  # the job failed: it is over; the others are cancelled
            del self._submitted[name]
            self.jobs.ended(name)
            self._cancel_all()
            raise StageJobFailed(name, stage.job, error) from error
        except BaseException:  # the driver interrupted while it waits: this job is cancelled too
            self._cancel_all()
            raise
        del self._submitted[name]
        self.jobs.ended(name)
        self.log(name, "ran", seconds, job_id=stage.job.job_id, **stage.log_extra)
        self._results[name] = result

    def _first_to_end(self) -> str:
        """The name of the first submitted stage whose job ends: the slot it frees is used at once, however long
        the jobs submitted before it still run."""
        while True:
            for name, stage in self._submitted.items():
                if stage.job.done():
                    return name
            time.sleep(JOB_POLL_S)

    def _collect_finished(self) -> None:
        for name in [n for n, s in self._submitted.items() if s.job.done()]:
            self._collect(name)

    def _cancel_all(self) -> None:
        # A cancelled job stays in the running record: it takes a moment to end, and the next driver checks.
        for name, stage in list(self._submitted.items()):
            logger.warning("cancelling job %s of stage %s", stage.job.job_id, name)
            stage.job.cancel(check=False)
        self._submitted.clear()

    def run_pipeline_stage(self, name: str, stage_pipeline, args, **log_extra) -> Any:
        """``stage_pipeline.run(args)`` unless ``stage_pipeline.finished(args)`` finds the run done; its result
        (None: submitted as a job, see :meth:`result`).

        ``stage_pipeline`` is a stage's pipeline module (:mod:`unidetox.distill.pipeline`,
        :mod:`unidetox.detox.pipeline`, :mod:`unidetox.evaluation.pipeline`). A finished directory made with other
        settings raises (the pipeline's :class:`~unidetox.run_dir.OutputDirConflict`), except for the evaluation,
        which redoes only what changed.
        """
        stage_dir = str(getattr(args, "output_dir", "") or "")
        return self._run(name, lambda: stage_pipeline.finished(args), stage_pipeline.run, (args,), stage_dir or None,
                         inputs=getattr(args, "config", None), dir=stage_dir, **log_extra)

    def run_function_stage(self, name: str, finished: Callable[[], Any], make: Callable[[], Any],
                           stage_dir: Path) -> Any:
        """``make()`` unless ``finished()`` returns its result already (anything but None): a stage that is a
        function writing ``stage_dir`` (the baselines' data, task vectors), with its own completion check."""
        return self._run(name, finished, make, (), stage_dir, dir=str(stage_dir))

    def wait_for(self, *names: str) -> None:
        """Block until the named stages' jobs are done (none named: return at once, so a computed list that comes
        out empty never waits for everything). Stages this process ran or found cached, and names that are no
        stage, return at once."""
        for name in names:
            if name in self._submitted:
                self._collect(name)

    def wait_for_all(self) -> None:
        """Block until every submitted job is done."""
        self.wait_for(*self._submitted)

    def result(self, name: str) -> Any:
        """The stage's result, waiting for its job first."""
        self.wait_for(name)
        if name not in self._results:
            raise KeyError(f"Stage {name!r} has not been run in this replication.")
        return self._results[name]

    def running(self, name: str) -> bool:
        """True while the job of stage ``name`` runs."""
        stage = self._submitted.get(name)
        return stage is not None and not stage.job.done()

    def run_when_ready(self, jobs) -> None:
        """Run ``jobs`` (``[(names of the stages a job needs, job)]``) in order, except that a job whose stages
        still run waits until no other job is ready: the driver submits work instead of waiting."""
        pending = list(jobs)
        while pending:
            job = next((j for j in pending if not any(self.running(n) for n in j[0])), pending[0])
            pending.remove(job)
            self.wait_for(*job[0])
            job[1]()


def _strings(value: Any):
    """Every string inside a nested config (dicts, lists), paths included."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, (str, os.PathLike)) and str(value):
        yield str(value)
