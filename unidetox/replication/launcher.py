"""Where the replication's stages run: in this process, or as jobs of submitit (a local pool, SLURM, or debug).

:class:`LauncherArguments` is the ``launcher`` section of ``conf/replicate.yaml``; :class:`StageJobs` turns it into
a submitit executor and submits one stage as one job; :class:`unidetox.replication.stages.Stages` decides what is
submitted and when it is waited for.

Two jobs never write one stage directory: :class:`StageJobs` keeps the jobs it submitted in
``<folder>/running.json`` until their results are collected, and a new driver on the same folder first looks each
leftover job up (a local job's process, a SLURM job's state). One that ended is forgotten (its stage resumes from
what it saved); one that still runs (its driver was killed outright, so nothing cancelled it) is waited for briefly,
then refused with :class:`LeftoverJobRunning`, naming the stage, the job and how to stop it.

>>> launcher = LauncherArguments(engine="submitit", cluster="local", max_concurrent_jobs=2)
>>> launcher.uses_jobs
True
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unidetox.files import atomic_write_json, read_json
from unidetox.secret_masking import secrets_from_environment, secrets_to_environment

ENGINES = ("inprocess", "submitit")
CLUSTERS = ("local", "slurm", "debug")
STDERR_TAIL_LINES = 40
RUNNING_RECORD = "running.json"
LEFTOVER_GRACE_S = 30.0  # a cancelled job ends within seconds (SIGINT, then SIGKILL from submitit's controller)


@dataclass
class LauncherArguments:
    """How the stages run: one after the other in this process, or as submitit jobs (the ``launcher`` section)."""

    engine: str = field(
        default="inprocess",
        metadata={"help": "inprocess: this process runs every stage in turn; submitit: each stage that is not "
                  "finished yet runs as a job, up to `max_concurrent_jobs` at once."},
    )
    cluster: str | None = field(
        default=None,
        metadata={"help": "submitit's executor: local (subprocesses on this machine), slurm, debug (each job in "
                  "this process, pdb on a failure); null: submitit's choice (slurm where sbatch exists, else local)."},
    )
    max_concurrent_jobs: int = field(
        default=2, metadata={"help": "Jobs running at once; the driver waits for one to end before submitting more."}
    )
    folder: str | None = field(
        default=None, metadata={"help": "submitit's folder: job pickles and logs (null: <output_dir>/jobs)."}
    )
    threads_per_job: int | None = field(
        default=None,
        metadata={"help": "CPU threads of each job (OMP_NUM_THREADS and torch's intra-op threads); null: the "
                  "job's default (every core: set it when several jobs share one CPU)."},
    )
    partition: str | None = field(default=None, metadata={"help": "SLURM partition (null: the cluster's default)."})
    gpus_per_node: int = field(
        default=0,
        metadata={"help": "GPUs of each job. With cluster=local each running job gets its own GPUs "
                  "(CUDA_VISIBLE_DEVICES), so max_concurrent_jobs x gpus_per_node GPUs are used."},
    )
    cpus_per_task: int | None = field(default=None, metadata={"help": "SLURM CPUs of each job (null: the default)."})
    mem_gb: float | None = field(default=None, metadata={"help": "SLURM memory of each job in GB (null: default)."})
    timeout_min: int = field(
        default=1440, metadata={"help": "Minutes after which a job is stopped (submitit's own default is 5)."}
    )
    additional_parameters: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Further sbatch options, e.g. {account: proj, qos: high}."}
    )

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"`launcher.engine` has to be one of {ENGINES}, but is {self.engine!r}.")
        if self.cluster is not None and self.cluster not in CLUSTERS:
            raise ValueError(f"`launcher.cluster` has to be one of {CLUSTERS} or null (submitit's choice), but is "
                             f"{self.cluster!r}.")
        if self.max_concurrent_jobs < 1:
            raise ValueError(f"`launcher.max_concurrent_jobs` has to be at least 1, but is {self.max_concurrent_jobs}.")
        for name in ("threads_per_job", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`launcher.{name}` has to be at least 1 or null, but is {value}.")
        if self.gpus_per_node < 0:
            raise ValueError(f"`launcher.gpus_per_node` has to be 0 or more, but is {self.gpus_per_node}.")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ValueError(f"`launcher.mem_gb` has to be positive or null, but is {self.mem_gb}.")
        if self.timeout_min < 1:
            raise ValueError(f"`launcher.timeout_min` has to be at least 1 minute, but is {self.timeout_min}.")

    @property
    def uses_jobs(self) -> bool:
        return self.engine == "submitit"


class StageJobFailed(RuntimeError):
    """A stage's job failed: names the stage, the job, the end of its stderr and where its logs are."""

    def __init__(self, stage: str, job, error: BaseException):
        tail = "\n".join((job.stderr() or "").splitlines()[-STDERR_TAIL_LINES:])
        super().__init__(
            f"Stage {stage!r} failed in job {job.job_id} ({type(error).__name__}). Logs: {job.paths.stderr} and "
            f"{job.paths.stdout}. The end of its stderr:\n{tail or '(empty)'}"
        )
        self.stage, self.job_id = stage, job.job_id


class LeftoverJobRunning(RuntimeError):
    """A job submitted by an earlier driver on the same jobs folder still runs: a second one would write the same
    stage directory."""

    def __init__(self, stage: str, entry: dict[str, Any], record: Path):
        job_id, cluster = entry["job_id"], entry["cluster"]
        stop = f"kill -INT {job_id}" if cluster == "local" else f"scancel {job_id}"
        super().__init__(
            f"Stage {stage!r} has a job from an earlier driver that still runs (job {job_id}, cluster {cluster}, "
            f"writing {entry.get('stage_dir') or 'an unknown directory'}): two jobs must never write one stage. "
            f"Wait for it to end or stop it (`{stop}`), then rerun; the stage resumes from what it saved. If you know "
            f"the job is gone, delete {record}."
        )
        self.stage, self.job_id = stage, job_id


def _local_job_runs(job_id: str) -> bool:
    """Whether the process of a local submitit job (its id is the pid of submitit's controller) still runs."""
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: not ours, so not our job
        return False
    if Path("/proc/self/cmdline").exists():  # Linux: a reused pid is some other program
        try:
            return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    return True


def _slurm_job_runs(folder: Path, job_id: str) -> bool:
    import submitit

    return not submitit.SlurmJob(folder=folder, job_id=job_id).done(force_check=True)


def run_in_job(make: Callable[..., Any], args: tuple, threads: int | None) -> tuple[Any, float]:
    """What a job runs: ``make(*args)`` with ``threads`` CPU threads; its result and its run time in seconds."""
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses a stage may start
        torch.set_num_threads(threads)
    start = time.perf_counter()
    result = make(*secrets_from_environment(args))
    return result, time.perf_counter() - start


class StageJobs:
    """A submitit executor with the launcher's parameters; submits one stage as one job.

    With ``cluster=local`` a job's GPUs are those of its slot (slot ``k`` of ``max_concurrent_jobs`` gets GPUs
    ``k*g .. k*g+g-1``): submitit's local executor would give every job the first ``g`` GPUs."""

    def __init__(self, launcher: LauncherArguments, folder: Path):
        import submitit

        self.launcher = launcher
        self.folder = Path(folder)
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=launcher.cluster)
        self.cluster = self.executor.cluster
        if (self.cluster == "local" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                and threading.current_thread() is threading.main_thread()):
            # A driver started with `&` from a script ignores SIGINT, and the local jobs it starts inherit that;
            # submitit cancels a local job with SIGINT, so no job of such a driver could be cancelled.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.executor.update_parameters(
            timeout_min=launcher.timeout_min, gpus_per_node=launcher.gpus_per_node or None,
            cpus_per_task=launcher.cpus_per_task, mem_gb=launcher.mem_gb, slurm_partition=launcher.partition,
            slurm_additional_parameters=dict(launcher.additional_parameters) or None,
        )
        self.record = self.folder / RUNNING_RECORD
        self._running: dict[str, dict[str, Any]] = {}
        self._refuse_leftovers()

    def _job_runs(self, entry: dict[str, Any]) -> bool:
        if entry["cluster"] == "local":
            return _local_job_runs(entry["job_id"])
        if entry["cluster"] == "slurm":
            return _slurm_job_runs(self.folder, entry["job_id"])
        return False  # debug jobs run inside their driver

    def _refuse_leftovers(self) -> None:
        """Forget the recorded jobs that ended; raise :class:`LeftoverJobRunning` for one that still runs after
        ``LEFTOVER_GRACE_S``."""
        leftovers = read_json(self.record) or {}
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while leftovers:
            leftovers = {stage: entry for stage, entry in leftovers.items() if self._job_runs(entry)}
            if leftovers and time.monotonic() >= deadline:
                stage, entry = next(iter(leftovers.items()))
                raise LeftoverJobRunning(stage, entry, self.record)
            if leftovers:
                time.sleep(1.0)
        if self.record.exists():
            self.record.unlink()

    def _save_record(self) -> None:
        if self._running:
            atomic_write_json(self.record, self._running)
        elif self.record.exists():
            self.record.unlink()

    def ended(self, stage: str) -> None:
        """The job of ``stage`` ended and its result was collected: no later driver needs to look for it."""
        if self._running.pop(stage, None) is not None:
            self._save_record()

    def submit(self, stage: str, slot: int, make: Callable[..., Any], *args, stage_dir: Path | None = None):
        """Submit ``make(*args)`` as the job of ``stage`` (writing ``stage_dir``); the job's result is ``(result,
        run seconds)``. The job stays in the running record until :meth:`ended`."""
        parameters: dict[str, Any] = {"name": "unidetox-" + re.sub(r"[^A-Za-z0-9._-]+", "_", stage)}
        gpus = self.launcher.gpus_per_node
        if self.cluster == "local" and gpus:
            devices = ",".join(str(slot * gpus + i) for i in range(gpus))
            parameters["local_setup"] = [f"export CUDA_VISIBLE_DEVICES={devices}"]
        self.executor.update_parameters(**parameters)
        # The job's pickle stays on disk: its secrets travel in the environment the job inherits, not in the file.
        args_without_secrets, secret_environment = secrets_to_environment(args)
        os.environ.update(secret_environment)
        job = self.executor.submit(run_in_job, make, args_without_secrets, self.launcher.threads_per_job)
        if self.cluster != "debug":
            self._running[stage] = {"job_id": str(job.job_id), "cluster": self.cluster,
                                    "stage_dir": str(stage_dir) if stage_dir else None,
                                    "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self._save_record()
        return job
