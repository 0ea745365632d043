"""Trainer checkpoints of a run: which one to resume from, and whether it already ends the run.

A run resumes from its newest *complete* checkpoint: one whose ``trainer_state.json`` reads and whose weight files
are whole. A checkpoint left broken by a crash (a missing state, a truncated ``.safetensors``) is skipped with a
warning naming it, and kept on disk. A checkpoint at the run's last step (:func:`is_final_checkpoint`) is the
trained model itself: the run is finished, so its model is loaded (:func:`restore_final_checkpoint`) instead of
training again; resuming from it in the middle of an epoch would train one step past the end.

Example:
    >>> from unidetox.checkpoints import checkpoint_step
    >>> checkpoint_step("runs/detox/checkpoint-40")
    40
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The Trainer's checkpoint folders: `checkpoint-<global step>`.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
# Whole-model or adapter weights as the Trainer saves them, and the index of a sharded save.
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The global step in a ``checkpoint-<step>`` folder's name (None for another name)."""
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-*`` folders in ``output_dir``, oldest step first (empty when there is none)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's ``trainer_state.json`` (None when it is missing or unreadable)."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("global_step"), int) else None


def _safetensors_problem(path: Path) -> str | None:
    """Why the ``.safetensors`` file at ``path`` is not whole (None when its size matches its header)."""
    try:
        with path.open("rb") as fh:
            (header_size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_size))
        data_size = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return f"{path.name} has no readable header"
    expected = 8 + header_size + data_size
    actual = path.stat().st_size
    return None if actual >= expected else f"{path.name} is truncated ({actual} of {expected} bytes)"


def weight_files_problem(directory: str | os.PathLike) -> str | None:
    """Why the model or adapter weights saved in ``directory`` are not whole (None when they are)."""
    checkpoint = Path(directory)
    files = [checkpoint / name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    for index in (checkpoint / name for name in WEIGHT_INDEX_FILES):
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return f"{index.name} is unreadable"
            missing = sorted(s for s in shards if not (checkpoint / s).is_file())
            if missing:
                return f"{index.name} names missing shards {missing}"
            files += [checkpoint / s for s in sorted(shards)]
    if not files and not any(p.is_dir() for p in checkpoint.iterdir()):  # DeepSpeed/FSDP keep weights in subfolders
        return "it holds no model weights"
    for path in files:
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else None
        if problem is None and path.stat().st_size == 0:
            problem = f"{path.name} is empty"
        if problem:
            return problem
    return None


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None when it is complete)."""
    checkpoint = Path(checkpoint)
    if read_trainer_state(checkpoint) is None:
        return f"its {TRAINER_STATE_FILE} is missing or unreadable"
    return weight_files_problem(checkpoint)


def newest_complete_checkpoint(checkpoints: Iterable[str | os.PathLike]) -> Path | None:
    """The checkpoint of the highest step that is complete; each newer broken one is skipped with a warning.

    Broken checkpoints are left in place (they may be inspected, or repaired by hand).
    """
    for checkpoint in sorted((Path(c) for c in checkpoints), key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("Skipping the checkpoint %s: %s. Resuming from the previous complete one instead (the "
                       "broken one is kept).", checkpoint, problem)
    return None


def is_final_checkpoint(checkpoint: str | os.PathLike, stop_at_step: int | None = None) -> bool:
    """Whether ``checkpoint`` is at the run's last step: its schedule's ``max_steps``, or ``stop_at_step`` if sooner."""
    state = read_trainer_state(checkpoint) or {}
    last = state.get("max_steps") or 0
    if stop_at_step is not None:
        last = min(last, stop_at_step) if last > 0 else stop_at_step
    return last > 0 and state.get("global_step", 0) >= last


def restore_final_checkpoint(trainer, checkpoint: str | os.PathLike) -> None:
    """Give ``trainer`` the model and state of the run's final ``checkpoint`` without training a step.

    ``trainer.train(resume_from_checkpoint=...)`` from a checkpoint at the last step, in the middle of an epoch,
    would run one more optimizer step; this loads the weights and ``TrainerState`` as that call does and stops.
    """
    from transformers import TrainerState

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError(
            f"{checkpoint} is the final checkpoint of this run, so it is finished; its weights are sharded "
            "(DeepSpeed/FSDP) and can only be loaded by training. Relaunch without DeepSpeed/FSDP to finish its "
            "post-training work, or use the checkpoint directly."
        )
    logger.info("%s is at the run's last step: the training is finished, loading it instead of training", checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_FILE))
    trainer._load_from_checkpoint(str(checkpoint))  # the loader train() itself uses (full weights or adapter)
