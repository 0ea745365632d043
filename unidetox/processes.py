"""This process's place in a multi-process run (``accelerate launch`` / ``torchrun``), on GPUs and on CPUs."""

from __future__ import annotations

import os

from unidetox.deepspeed_ops import prepare_deepspeed


def process_state():
    """The process-wide :class:`accelerate.PartialState`, joined to the process group on CPU-only machines too.

    Without ``cpu=True`` accelerate forms a process group only for accelerators, so ``torchrun --nproc_per_node 2``
    or ``accelerate launch --num_processes 2`` on a CPU machine would run two independent copies that each believe
    they are alone. ``PartialState`` is a singleton: the first construction decides, so every unidetox entry point
    goes through this function.
    """
    from accelerate import PartialState

    if uses_deepspeed():  # accelerate launch with a DeepSpeed config: PartialState has DeepSpeed form the group
        prepare_deepspeed()
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not has_accelerator()
    return PartialState(cpu=use_cpu)


def _joined_group():
    """torch.distributed when this process is already in a process group (a launcher's, a Trainer's or the user's)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, number of processes)`` of this run: the joined process group's, else the launcher's."""
    dist = _joined_group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    state = process_state()
    return state.process_index, state.num_processes


def is_main_process() -> bool:
    """True on the process that writes shared files (rank 0), and in a plain single-process run."""
    return rank_and_world_size()[0] == 0


def wait_for_everyone() -> None:
    """A barrier over every process of the run; returns at once in a single-process run."""
    if rank_and_world_size()[1] > 1:
        dist = _joined_group()
        dist.barrier() if dist is not None else process_state().wait_for_everyone()


def gather_objects(items: list) -> list:
    """Every process's ``items``, concatenated in rank order, on every process (a copy in a single process)."""
    world = rank_and_world_size()[1]
    if world == 1:
        return list(items)
    dist = _joined_group()
    if dist is None:
        process_state()  # joins the launcher's group
        import torch.distributed as dist
    gathered: list = [None] * world
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def end_process_group() -> None:
    """Leave the process group, if this process joined one, before the interpreter exits.

    A gloo process group left to interpreter teardown can abort a rank ("terminate called without an active
    exception", SIGABRT) after all its work is done, which fails the whole launch (pytorch/pytorch#190489); NCCL
    warns about leaked resources. Every recipe calls this once, after ``main()`` returned on every rank (never from
    an error path, where a rank that still waits in a collective would hang it); a script that trains through the
    library should do the same.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def has_accelerator() -> bool:
    """True when torch sees a GPU (CUDA/ROCm), an XPU or Apple MPS."""
    import torch

    if torch.cuda.is_available():
        return True
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return True
    return torch.backends.mps.is_available()


def uses_deepspeed(deepspeed_config=None) -> bool:
    """True when a DeepSpeed config is given or ``accelerate launch`` runs with a DeepSpeed config file."""
    return bool(deepspeed_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
