"""A LoRA checkpoint merged into its base: a full model that loads without peft."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from unidetox.checkpoints import weight_files_problem
from unidetox.models import default_dtype, load_tokenizer, parse_dtype

logger = logging.getLogger(__name__)

MERGED_SUBDIR = "merged"


def merge_lora_checkpoint(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Merge a saved LoRA adapter (a final output or any ``checkpoint-N``) into its base model and save a full model.

    The base model is read from the adapter's ``adapter_config.json``; the tokenizer is copied from ``adapter_dir``.
    Works on any checkpoint after the fact, e.g. the one :func:`unidetox.detox.selection.select_checkpoint` picked.

    Example:
        >>> from unidetox.detox.merge import merge_lora_checkpoint
        >>> merge_lora_checkpoint("runs/detox-smollm2/checkpoint-150")  # -> .../checkpoint-150/merged  # doctest: +SKIP
    """
    from peft import AutoPeftModelForCausalLM

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no LoRA adapter (no adapter_config.json); full fine-tuning outputs need no merging."
        )
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{adapter_dir / 'adapter_config.json'} does not name its base model (base_model_name_or_path is empty; "
            "the model was built in memory). Set `base_model_name_or_path` there to the base model's id or path."
        )
    output_dir = Path(output_dir) if output_dir is not None else adapter_dir / MERGED_SUBDIR
    dtype = default_dtype() if dtype is None else parse_dtype(dtype)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=dtype)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    try:
        load_tokenizer(adapter_dir).save_pretrained(output_dir)
    except (OSError, ValueError) as err:  # an adapter saved without its tokenizer
        logger.warning("No tokenizer saved next to %s (%s); the merged model has none.", adapter_dir, err)
    return output_dir


def merged_model_path(checkpoint: str | os.PathLike) -> Path:
    """A full model of ``checkpoint``: the checkpoint itself, or for a LoRA adapter its ``merged/`` copy (merged once;
    again when an interrupted merge left it incomplete).

    Example:
        >>> from unidetox.detox.merge import merged_model_path
        >>> merged_model_path("runs/detox-smollm2/checkpoint-50")  # -> .../checkpoint-50/merged  # doctest: +SKIP
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / "adapter_config.json").is_file():
        return checkpoint
    merged = checkpoint / MERGED_SUBDIR
    if not (merged / "config.json").is_file() or weight_files_problem(merged):  # absent, or cut short by a kill
        merge_lora_checkpoint(checkpoint, merged)
    return merged
