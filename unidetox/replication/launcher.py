"""Where the replication's stages run: in this process, or as jobs of submitit (a local pool, SLURM, or debug).

:class:`LauncherArguments` is the ``launcher`` section of ``conf/replicate.yaml``; :class:`StageJobs` turns it into
a submitit executor and submits one stage as one job; :class:`unidetox.replication.stages.Stages` decides what is
submitted and when it is waited for.

>>> launcher = LauncherArguments(engine="submitit", cluster="local", max_concurrent_jobs=2)
>>> launcher.uses_jobs
True
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("inprocess", "submitit")
CLUSTERS = ("local", "slurm", "debug")
STDERR_TAIL_LINES = 40


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


def run_in_job(make: Callable[..., Any], args: tuple, threads: int | None) -> tuple[Any, float]:
    """What a job runs: ``make(*args)`` with ``threads`` CPU threads; its result and its run time in seconds."""
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses a stage may start
        torch.set_num_threads(threads)
    start = time.perf_counter()
    result = make(*args)
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
        self.executor.update_parameters(
            timeout_min=launcher.timeout_min, gpus_per_node=launcher.gpus_per_node or None,
            cpus_per_task=launcher.cpus_per_task, mem_gb=launcher.mem_gb, slurm_partition=launcher.partition,
            slurm_additional_parameters=dict(launcher.additional_parameters) or None,
        )

    def submit(self, stage: str, slot: int, make: Callable[..., Any], *args):
        """Submit ``make(*args)`` as the job of ``stage``; the job's result is ``(result, run seconds)``."""
        parameters: dict[str, Any] = {"name": "unidetox-" + re.sub(r"[^A-Za-z0-9._-]+", "_", stage)}
        gpus = self.launcher.gpus_per_node
        if self.cluster == "local" and gpus:
            devices = ",".join(str(slot * gpus + i) for i in range(gpus))
            parameters["local_setup"] = [f"export CUDA_VISIBLE_DEVICES={devices}"]
        self.executor.update_parameters(**parameters)
        return self.executor.submit(run_in_job, make, args, self.launcher.threads_per_job)
