"""This process's place in a multi-process run (``accelerate launch`` / ``torchrun``), on GPUs and on CPUs."""

from __future__ import annotations

import os


def process_state():
    """The process-wide :class:`accelerate.PartialState`, joined to the process group on CPU-only machines too.

    Without ``cpu=True`` accelerate forms a process group only for accelerators, so ``torchrun --nproc_per_node 2``
    or ``accelerate launch --num_processes 2`` on a CPU machine would run two independent copies that each believe
    they are alone. ``PartialState`` is a singleton: the first construction decides, so every unidetox entry point
    goes through this function.
    """
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not has_accelerator()
    return PartialState(cpu=use_cpu)


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
