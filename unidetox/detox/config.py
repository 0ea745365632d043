"""The ONE detox configuration: :class:`UniversalDetoxConfig`, a ``trl.SFTConfig`` with UniDetox's defaults and checks.

Its defaults are the paper's (AdamW, learning rate 5e-5, batch 8, 256 tokens, a fixed step budget with every
checkpoint kept for selection); the same configuration is applied unchanged to every target model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch
from trl import SFTConfig

from unidetox.deepspeed_ops import prepare_deepspeed
from unidetox.processes import has_accelerator, uses_deepspeed

logger = logging.getLogger(__name__)


def _default_bf16() -> bool:
    """bf16 mixed precision where the hardware has it (CUDA with bf16 support), fp32 elsewhere (CPU)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@dataclass
class UniversalDetoxConfig(SFTConfig):
    r"""Configuration for :class:`UniversalDetoxTrainer`: the paper's single, universal fine-tuning configuration.

    Only the fields whose defaults differ from :class:`trl.SFTConfig` or that are specific to UniDetox are listed;
    every other :class:`~transformers.TrainingArguments` / :class:`trl.SFTConfig` field works as usual.

    Defaults (the paper and the authors' code): AdamW (``optim="adamw_torch"``), ``learning_rate=5e-5``,
    ``per_device_train_batch_size=8``, ``max_length=256``, a fixed budget of ``max_steps=3000`` optimizer steps with a
    checkpoint every ``save_steps=1000`` steps, and every checkpoint kept (``save_total_limit=None``) so that the
    least toxic one within a perplexity bound can be chosen on validation prompts
    (:func:`unidetox.detox.selection.select_checkpoint`). ``bf16`` is chosen automatically when left unset: bf16 mixed
    precision on a CUDA device that supports it, fp32 on CPU.

    Example:
        >>> from unidetox import UniversalDetoxConfig
        >>> args = UniversalDetoxConfig(output_dir="runs/detox-smollm2", max_steps=200, save_steps=50)
        >>> args.learning_rate, args.per_device_train_batch_size, args.max_length, args.save_total_limit
        (5e-05, 8, 256, None)
    """

    # Paper defaults that differ from SFTConfig / TrainingArguments.
    learning_rate: float = field(
        default=5e-5,
        metadata={"help": "AdamW learning rate. The paper uses 5e-5 for every target model (the universal configuration)."},
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Batch size per device. The paper uses 8 (one device)."}
    )
    max_length: int | None = field(
        default=256,
        metadata={
            "help": "Maximum length in target-model tokens; longer texts are truncated (keeping the start). The paper "
            "uses 256. With packing, the length of each packed sequence."
        },
    )
    max_steps: int = field(
        default=3000,
        metadata={
            "help": "The fixed budget of optimizer steps (the paper trains for a fixed number of steps and keeps "
            "checkpoints along the way). Must be > 0."
        },
    )
    save_steps: float = field(
        default=1000,
        metadata={"help": "Save a checkpoint every N optimizer steps (the authors' code saves every 1000)."},
    )
    stop_at_step: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many optimizer steps while keeping the learning-rate schedule of `max_steps`: "
            "reproduces the checkpoint chosen at step N of a max_steps run on another model (the chosen configuration "
            "is the learning rate, the schedule AND the step). None (default): train all max_steps. Must be in "
            "[1, max_steps]."
        },
    )
    save_total_limit: int | None = field(
        default=None,
        metadata={
            "help": "Keep every checkpoint (None, the default) so that one can be selected on validation prompts "
            "afterwards. Setting a limit deletes older checkpoints."
        },
    )
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer. The paper uses AdamW."})
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "Integrations to report results and logs to (`'none'`, `'tensorboard'`, `'wandb'`, ...)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset (None): on when a CUDA device with bf16 support is used, off (fp32) "
            "on CPU."
        },
    )

    # UniDetox-specific.
    add_bos_token: bool | None = field(
        default=None,
        metadata={
            "help": "Whether each text starts with the target's BOS token. None (default): follow the target "
            "tokenizer's own convention (llama/gemma tokenizers that add BOS get it, GPT-2 gets none); never doubled."
        },
    )
    add_eos_token: bool = field(
        default=True,
        metadata={
            "help": "Whether each text ends with the target's EOS token (which carries loss, even when the tokenizer "
            "pads with EOS). Truncated texts lose it with the rest of their tail."
        },
    )
    save_merged_model: bool = field(
        default=False,
        metadata={
            "help": "With a `peft_config` (LoRA), also write a merged full model to `<output_dir>/merged` when the "
            "final model is saved, loadable with `AutoModelForCausalLM.from_pretrained` without peft."
        },
    )

    def __post_init__(self):
        # On a machine without an accelerator, TrainingArguments forms a CPU process group only with use_cpu:
        # without it, torchrun / accelerate launch with N processes would train N unrelated copies. (DeepSpeed
        # forms its own group, and use_cpu would switch it off.)
        if not self.use_cpu and not has_accelerator() and not uses_deepspeed(self.deepspeed):
            self.use_cpu = True
        if uses_deepspeed(self.deepspeed):
            prepare_deepspeed()  # before TrainingArguments lets DeepSpeed form its process group
        if self.bf16 is None:
            self.bf16 = False if (self.fp16 or self.use_cpu) else _default_bf16()
        super().__post_init__()
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` has to be > 0, but is {self.learning_rate}.")
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError(
                f"`max_steps` has to be a positive number of optimizer steps (UniDetox trains for a fixed step budget), "
                f"but is {self.max_steps}. Set e.g. max_steps=3000."
            )
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.max_steps:
            raise ValueError(
                f"`stop_at_step` has to be in [1, max_steps={self.max_steps}] (the step of the chosen checkpoint, with "
                f"max_steps the length of the schedule it was trained under), but is {self.stop_at_step}."
            )
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"`max_length` has to be >= 2 tokens (or None for no truncation), but is {self.max_length}.")
        if self.packing and self.max_length is None:
            raise ValueError("`packing=True` needs `max_length` (the packed sequence length); set max_length=256.")
        if self.add_bos_token not in (None, True, False):
            raise ValueError(f"`add_bos_token` has to be None, True or False, but is {self.add_bos_token!r}.")
        if self.save_strategy == "steps" and self.save_steps >= 1 and self.save_steps > self.max_steps:
            logger.warning(
                "save_steps=%s > max_steps=%s: only the final step is checkpointed, so checkpoint selection has a "
                "single candidate. Lower save_steps to compare several.", self.save_steps, self.max_steps,
            )
        if self.save_total_limit is not None:
            logger.warning(
                "save_total_limit=%s deletes older checkpoints; UniDetox selects the least toxic checkpoint afterwards, "
                "so keep them all (save_total_limit=None) unless disk space forbids it.",
                self.save_total_limit,
            )


def config_fields_help(cls=UniversalDetoxConfig) -> dict[str, str]:
    """``{field: help}`` of the fields declared by :class:`UniversalDetoxConfig` itself (for docs and tests)."""
    own = {f.name for f in fields(cls)} - {f.name for f in fields(SFTConfig)} | set(cls.__annotations__)
    return {f.name: f.metadata.get("help", "") for f in fields(cls) if f.name in own}
