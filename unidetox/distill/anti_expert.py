"""The toxic *anti-expert*: the base model fine-tuned (fully or with LoRA) on hateful text.

Training goes through trl's ``SFTTrainer`` (tokenisation, EOS appending, right padding with ``-100`` labels on
padding, DDP/DeepSpeed under ``accelerate launch``). The result is saved together with a small
``unidetox_anti_expert.json`` holding a fingerprint of (base model, corpus texts, training settings, number of
processes): calling :func:`train_anti_expert` again with the same inputs reuses the saved anti-expert instead of
training, and a different configuration pointed at the same directory raises instead of silently overwriting it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from trl import SFTConfig, SFTTrainer

from unidetox.checkpoints import (
    checkpoint_dirs,
    checkpoint_step,
    is_final_checkpoint,
    newest_complete_checkpoint,
    restore_final_checkpoint,
)
from unidetox.deepspeed_ops import prepare_deepspeed
from unidetox.distill.anti_expert_card import render_anti_expert_card
from unidetox.distill.corpus import TEXT_COLUMN, ToxicCorpusConfig, corpus_fingerprint
from unidetox.files import atomic_write_json
from unidetox.hub import without_trainer_push
from unidetox.lora import LoraArguments
from unidetox.model_identity import model_config_fingerprint
from unidetox.models import (
    ADAPTER_CONFIG_FILE,
    check_model_location,
    load_adapter_model,
    load_model,
    load_model_and_tokenizer,
    read_adapter_config,
)
from unidetox.processes import has_accelerator, is_main_process, uses_deepspeed, wait_for_everyone
from unidetox.secret_masking import SavesArgsWithoutSecrets
from unidetox.version import __version__

logger = logging.getLogger(__name__)

MARKER_FILE = "unidetox_anti_expert.json"
MODEL_CARD_FILE = "README.md"
PENDING_FILE = "unidetox_anti_expert.pending.json"
# Settings that change the trained weights; everything else (logging, saving, output paths) does not.
FINGERPRINT_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type",
    "warmup_steps", "optim", "seed", "data_seed", "bf16", "fp16", "max_length", "packing", "eos_token",
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "start_token",
)


@dataclass
class AntiExpertConfig(SFTConfig):
    r"""
    Configuration of the anti-expert fine-tuning: trl's [`SFTConfig`] (so every `TrainingArguments` field works)
    plus LoRA settings, the start token and reuse options. Defaults follow the paper (full fine-tuning, 3 epochs,
    lr 1e-5, batch 4); set `use_peft=True` for a LoRA adapter.

    Example:

    ```python
    >>> from unidetox.distill.anti_expert import AntiExpertConfig, train_anti_expert
    >>> from unidetox.distill.corpus import load_dghs
    >>> from unidetox import load_model_and_tokenizer

    >>> model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    >>> config = AntiExpertConfig(output_dir="runs/anti-expert", use_peft=True, max_steps=64, learning_rate=1e-3)
    >>> result = train_anti_expert(model, tokenizer, load_dghs(), config, base_name_or_path="smollm2-135m")
    >>> result.path
    PosixPath('runs/anti-expert')
    ```
    """

    # Defaults that differ from SFTConfig: the paper's anti-expert, and CPU-friendly precision/checkpointing.
    learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate (paper: 1e-5 for GPT-2 XL)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the toxic corpus (paper: 3)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per process (paper: 4)."})
    max_length: int | None = field(
        default=128,
        metadata={"help": "Truncate training texts to this many tokens (DGHS texts are short; 128 covers them)."},
    )
    bf16: bool | None = field(
        default=False, metadata={"help": "Train in bf16 mixed precision (off by default: exact fp32 on CPU)."}
    )
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Trade compute for memory (useful for GPT-2 XL on small GPUs)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5)."}
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "Intermediate checkpoints (`steps`/`epoch`); an interrupted training resumes from them."},
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Loggers to report to."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: peft's `all-linear`)."}
    )
    start_token: str | None = field(
        default=None,
        metadata={
            "help": "Token prepended to each training text (unless the tokenizer already starts texts with it). Set "
            "it to the distillation start token so the anti-expert learns toxic text right after it. None: texts "
            "are used as they are (the paper)."
        },
    )
    pretrained_path: str | None = field(
        default=None,
        metadata={
            "help": "Use this existing anti-expert (a model directory, hub id, or LoRA adapter directory) instead of "
            "training one."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Retrain even if `output_dir` holds an anti-expert trained with different settings."},
    )

    def __post_init__(self):
        # On a machine without an accelerator, TrainingArguments forms a CPU process group only with use_cpu:
        # without it, torchrun / accelerate launch with N processes would train N unrelated copies. (DeepSpeed
        # forms its own group, and use_cpu would switch it off.)
        if not self.use_cpu and not has_accelerator() and not uses_deepspeed(self.deepspeed):
            self.use_cpu = True
        if uses_deepspeed(self.deepspeed):
            prepare_deepspeed()  # before TrainingArguments lets DeepSpeed form its process group
        super().__post_init__()
        self.lora_settings()  # raises for LoRA settings that cannot be trained with
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(
                f"Set `num_train_epochs` > 0 or `max_steps` > 0 (got {self.num_train_epochs} and {self.max_steps})."
            )
        if self.start_token == "":
            raise ValueError("`start_token` is an empty string; use None for no start token.")

    def fingerprint_settings(self) -> dict[str, Any]:
        values = {name: getattr(self, name, None) for name in FINGERPRINT_FIELDS}
        return {k: (str(v) if not isinstance(v, (int, float, str, bool, list, type(None))) else v) for k, v in values.items()}

    def lora_settings(self) -> LoraArguments:
        """The LoRA settings as the detox stage spells them (no `lora_target_modules`: every linear layer)."""
        return LoraArguments(
            use_peft=self.use_peft,
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules) if self.lora_target_modules else "all-linear",
        )

    def lora_config(self):
        """The ``peft.LoraConfig`` of the adapter (None when ``use_peft`` is off)."""
        return self.lora_settings().peft_config()


@dataclass
class AntiExpertResult:
    """Where the anti-expert lies, whether this call trained it, and its recorded metadata."""

    path: Path
    trained: bool
    metadata: dict[str, Any]

    @property
    def is_adapter(self) -> bool:
        return (self.path / ADAPTER_CONFIG_FILE).is_file()


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``unidetox_anti_expert.json`` record of a saved anti-expert, or None."""
    marker = Path(path) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def anti_expert_fingerprint(
    base_name_or_path: str, model, corpus: datasets.Dataset, config: AntiExpertConfig
) -> tuple[str, dict[str, Any]]:
    """``(sha256, record)`` identifying an anti-expert by what determines its weights."""
    record = {
        "base": str(base_name_or_path),
        "base_config_sha256": model_config_fingerprint(model.config),
        "corpus_sha256": corpus_fingerprint(corpus),
        "corpus_rows": len(corpus),
        "world_size": config.world_size,
        "settings": config.fingerprint_settings(),
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return digest, record


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _with_start_token(corpus: datasets.Dataset, tokenizer, start_token: str | None) -> datasets.Dataset:
    if start_token is None:
        return corpus
    vocab = tokenizer.get_vocab()
    if start_token not in vocab:
        raise ValueError(
            f"`start_token` {start_token!r} is not a token of the {type(tokenizer).__name__} vocabulary; pass one "
            f"of its tokens (bos: {tokenizer.bos_token!r}, eos: {tokenizer.eos_token!r}) or None."
        )
    first = tokenizer("x")["input_ids"][:1]
    if first == [vocab[start_token]]:  # the tokenizer already starts every text with it (e.g. gemma's <bos>)
        return corpus
    return corpus.map(lambda row: {TEXT_COLUMN: start_token + row[TEXT_COLUMN]})


class AntiExpertTrainer(SavesArgsWithoutSecrets, SFTTrainer):
    """The anti-expert's ``SFTTrainer``; its saved ``training_args.bin`` holds no secret."""


def build_anti_expert_trainer(model, tokenizer, corpus: datasets.Dataset, config: AntiExpertConfig, callbacks=None):
    """The ``SFTTrainer`` that :func:`train_anti_expert` runs: causal-LM loss on every text token (plus the appended
    EOS), right padding whose labels are ``-100``, LoRA when ``config.use_peft``."""
    train_dataset = _with_start_token(corpus.select_columns([TEXT_COLUMN]), tokenizer, config.start_token)
    return AntiExpertTrainer(
        model=model,
        args=without_trainer_push(config),  # the pipeline pushes the saved anti-expert with its card
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=config.lora_config() if config.use_peft else None,
        callbacks=callbacks,
    )


def train_anti_expert(
    model,
    tokenizer,
    corpus: datasets.Dataset,
    config: AntiExpertConfig,
    base_name_or_path: str | None = None,
    callbacks: list | None = None,
    corpus_config: ToxicCorpusConfig | None = None,
) -> AntiExpertResult:
    """Fine-tune ``model`` on ``corpus`` into an anti-expert saved at ``config.output_dir``, or reuse a saved one.

    Args:
        model: the base model (a ``PreTrainedModel``; it is trained in place, or wrapped with LoRA layers, as
            ``SFTTrainer`` does) or a name/path for :func:`unidetox.load_model_and_tokenizer`.
        tokenizer: its tokenizer (``None`` when ``model`` is a name).
        corpus: a ``Dataset`` with a ``text`` column (see :mod:`unidetox.distill.corpus`).
        config: an :class:`AntiExpertConfig`; ``output_dir`` is where the anti-expert is saved.
        base_name_or_path: how to reload the base (recorded, and used to rebuild a LoRA anti-expert). Defaults to
            ``model`` when it is a string, else ``model.config._name_or_path``.
        callbacks: extra ``TrainerCallback``s.
        corpus_config: where ``corpus`` was read from, for the model card (README.md) written next to the weights.

    Returns:
        An :class:`AntiExpertResult` (``trained=False`` when an anti-expert with the same fingerprint was reused).

    Under ``accelerate launch`` with N processes every rank trains (DDP through the Trainer, effective batch
    N x ``per_device_train_batch_size``); only the main process writes files, and all ranks return together.

    An interrupted training resumes from its newest complete checkpoint (a broken newer one is skipped with a
    warning); a checkpoint at the last step is loaded and saved as the anti-expert without training further.
    Only the ``checkpoint-*`` folders this training wrote are removed once it is saved; folders that were in
    ``output_dir`` before are kept, and when ``save_strategy`` would write checkpoints next to (or over) them
    the call raises instead.
    """
    model, tokenizer, base_name_or_path = _checked_inputs(model, tokenizer, corpus, config, base_name_or_path)
    out = Path(config.output_dir)
    fingerprint, record = anti_expert_fingerprint(base_name_or_path, model, corpus, config)

    existing = read_marker(out)
    if _is_reusable(out, existing, fingerprint, record, config):
        logger.info("Reusing the anti-expert at %s (same base, corpus and settings)", out)
        return AntiExpertResult(out, trained=False, metadata=existing)
    pending = out / PENDING_FILE
    foreign, resume = _resume_point(out, fingerprint, config)
    if resume:
        logger.info("Resuming the anti-expert training from %s", resume)
    wait_for_everyone()  # every rank has read marker and pending record before the main process rewrites them

    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        if existing is not None:  # overwrite: the old weights must not survive next to the new ones
            (out / MARKER_FILE).unlink(missing_ok=True)
        atomic_write_json(pending, {"fingerprint": fingerprint, "record": record,
                                    "foreign_checkpoints": foreign})
    wait_for_everyone()

    trainer = build_anti_expert_trainer(model, tokenizer, corpus, config, callbacks)
    start = time.perf_counter()
    train_loss = _train_or_restore(trainer, resume)
    wall = time.perf_counter() - start
    trainer.save_model(str(out))

    metadata = {"fingerprint": fingerprint, "record": record, "kind": "lora" if config.use_peft else "full",
                "base": str(base_name_or_path), **_training_record(trainer, train_loss, wall), "resumed_from": resume,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unidetox_version": _version()}
    if is_main_process():
        _complete(out, tokenizer, metadata, corpus_config, foreign)
    wait_for_everyone()
    return AntiExpertResult(out, trained=True, metadata=metadata)


def _is_reusable(out: Path, existing: dict | None, fingerprint: str, record: dict, config: AntiExpertConfig) -> bool:
    """True when the anti-expert saved in ``out`` (its marker ``existing``) has this ``fingerprint``; one trained with
    other settings raises unless ``config.overwrite``."""
    if existing is None:
        return False
    if existing.get("fingerprint") == fingerprint:
        return True
    if not config.overwrite:
        changes = _diff(existing.get("record", {}), record)
        raise ValueError(
            f"{out} holds an anti-expert trained with other settings ({'; '.join(changes) or 'unknown'}). "
            "Use another `output_dir`, or set `overwrite=True` to retrain it."
        )
    return False


def _training_record(trainer, train_loss: float, wall: float) -> dict[str, Any]:
    """The losses, steps and time of a finished training, as the marker records them."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "train_loss": train_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "global_steps": trainer.state.global_step,
        "train_wall_time_s": round(wall, 2),
    }


def load_if_named(model, tokenizer):
    """``(model, tokenizer)``, the model loaded when it is a name or path (with its own tokenizer unless one is
    given); a missing tokenizer raises."""
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            model, tokenizer = load_model_and_tokenizer(model)
        else:
            model = load_model(model, pad_token_id=tokenizer.pad_token_id)
    if tokenizer is None:
        raise ValueError("Pass the base model's `tokenizer`.")
    return model, tokenizer


def _checked_inputs(model, tokenizer, corpus: datasets.Dataset, config: AntiExpertConfig,
                    base_name_or_path: str | None):
    """The base model and tokenizer (loaded when ``model`` is a name) and the base's name, once the arguments of
    :func:`train_anti_expert` are checked."""
    if config.pretrained_path:
        raise ValueError(
            f"`pretrained_path` is set ({config.pretrained_path!r}): load it with `load_anti_expert` instead of "
            "training (recipes do this automatically)."
        )
    if config.output_dir is None:
        raise ValueError("`AntiExpertConfig.output_dir` is None; set where the anti-expert is saved.")
    if TEXT_COLUMN not in corpus.column_names or len(corpus) == 0:
        raise ValueError(f"`corpus` needs a non-empty `{TEXT_COLUMN}` column; got {corpus}.")
    if isinstance(model, (str, os.PathLike)):
        base_name_or_path = base_name_or_path or str(model)
    model, tokenizer = load_if_named(model, tokenizer)
    return model, tokenizer, base_name_or_path or getattr(model.config, "_name_or_path", None) or "unknown"


def _resume_point(out: Path, fingerprint: str, config: AntiExpertConfig) -> tuple[list[str], str | None]:
    """The checkpoint folders in ``out`` this training did not write (kept, never resumed from), and the newest
    complete checkpoint of its own to resume from (None: start). Raises when ``save_strategy`` would write
    checkpoints next to or over folders it did not write."""
    present = _checkpoint_steps(out)
    started = _read_pending(out / PENDING_FILE)
    if started is not None and started.get("fingerprint") == fingerprint and "foreign_checkpoints" in started:
        # The same training was interrupted: the checkpoints it wrote are its own, to resume from and remove.
        foreign = sorted(set(started["foreign_checkpoints"]) & set(present))
    else:
        foreign = sorted(present)
    newest = newest_complete_checkpoint(out / name for name in present if name not in foreign)
    save_strategy = getattr(config.save_strategy, "value", config.save_strategy)
    if foreign and save_strategy != "no":
        raise ValueError(
            f"{out} holds checkpoint folders this training did not write ({', '.join(foreign)}), and "
            f"`save_strategy={save_strategy!r}` would write its own next to or over them. Move them away, "
            "use another `output_dir`, or set `save_strategy='no'`."
        )
    return foreign, str(newest) if newest else None


def _complete(out: Path, tokenizer, metadata: dict[str, Any], corpus_config: ToxicCorpusConfig | None,
              foreign: list[str]) -> None:
    """The main process's last writes: tokenizer, model card, the spent checkpoints removed, then the marker."""
    tokenizer.save_pretrained(str(out))
    # peft's template card names the local cache as base_model and warns of nothing: this card replaces it.
    (out / MODEL_CARD_FILE).write_text(render_anti_expert_card(metadata, corpus_config), encoding="utf-8")
    for name in _checkpoint_steps(out):  # the weights are saved: this training's checkpoints are spent
        if name not in foreign:
            shutil.rmtree(out / name, ignore_errors=True)
    atomic_write_json(out / MARKER_FILE, metadata)  # written last: its presence means "complete"
    (out / PENDING_FILE).unlink(missing_ok=True)


def _train_or_restore(trainer, resume: str | None) -> float | None:
    """Train from ``resume`` (None: from the start) and return the training loss; a checkpoint at the last step
    is the trained anti-expert, so it is loaded instead (no loss: this call trained nothing)."""
    if resume and is_final_checkpoint(resume):
        restore_final_checkpoint(trainer, resume)
        return None
    return trainer.train(resume_from_checkpoint=resume).training_loss


def _checkpoint_steps(out: Path) -> dict[str, int]:
    """``{folder name: step}`` of the Trainer checkpoint folders in ``out``."""
    return {path.name: checkpoint_step(path) for path in checkpoint_dirs(out)}


def _read_pending(pending: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(pending.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _version() -> str:
    return __version__


def load_anti_expert(
    path_or_name: str | os.PathLike,
    base_name_or_path: str | None = None,
    merge: bool = True,
    base_model=None,
    **model_kwargs,
):
    """Load an anti-expert saved by :func:`train_anti_expert` (or any model directory / hub id).

    A LoRA adapter directory is applied to a fresh copy of its base and, with ``merge=True``, merged into it,
    so the result is an independent plain model that never shares weights with the base used for sampling.
    The base is ``base_model`` (an in-memory model; a deep copy of it gets the adapter, the object passed
    stays untouched), else loaded from ``base_name_or_path``, else from the base recorded in
    ``unidetox_anti_expert.json``, else from the adapter's ``base_model_name_or_path``. No tokenizer is
    loaded.
    """
    path = Path(path_or_name).expanduser()
    if (path / ADAPTER_CONFIG_FILE).is_file():
        adapter_config = read_adapter_config(path)
        if base_model is not None:
            if base_name_or_path is not None or model_kwargs:
                given = (["base_name_or_path"] if base_name_or_path is not None else []) + list(model_kwargs)
                raise ValueError(
                    f"`base_model` is the base the adapter is attached to, so {', '.join(given)} (used to load "
                    "a base) would be ignored; pass either `base_model` or those."
                )
            base = copy.deepcopy(base_model)
        else:
            marker = read_marker(path) or {}
            name = base_name_or_path or marker.get("base") or adapter_config.get("base_model_name_or_path")
            if not name:
                raise ValueError(
                    f"{path} is a LoRA adapter without a recorded base model; pass `base_name_or_path` or "
                    "`base_model`."
                )
            base = load_model(name, **model_kwargs)
        return load_adapter_model(path, base, merge=merge)
    check_model_location(path_or_name, "anti-expert")
    model = load_model(str(path) if path.exists() else str(path_or_name), **model_kwargs)
    return model.eval()
