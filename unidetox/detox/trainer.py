"""Detox any causal LM by fine-tuning it on distilled detoxifying text, with ONE configuration for every model.

The UniDetox claim (Lu et al., ICLR 2025, https://huggingface.co/papers/2504.20500) is universality: text
distilled once, from one model, detoxifies other models (other sizes, families, tokenizers) with a single
hyperparameter configuration (:class:`~unidetox.detox.config.UniversalDetoxConfig`).
:class:`UniversalDetoxTrainer` is a :class:`trl.SFTTrainer` that takes the distilled text in any of its forms and
re-tokenizes it for the *target's* own tokenizer (:mod:`unidetox.detox.tokenization`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTTrainer

from unidetox.cards import MODEL_CARD_FILE, model_card_path
from unidetox.detox.callbacks import DetoxEvalCallback, StopAtStepCallback
from unidetox.detox.config import UniversalDetoxConfig
from unidetox.detox.merge import MERGED_SUBDIR, merge_lora_checkpoint
from unidetox.detox.model_card import render_model_card
from unidetox.detox.tokenization import as_distilled_dataset, tokenize_for_target
from unidetox.distill.dataset import DistilledDetoxDataset
from unidetox.models import EMBEDDED_MODELS, load_tokenizer, resolve_model_path
from unidetox.secret_masking import SavesArgsWithoutSecrets

logger = logging.getLogger(__name__)


class UniversalDetoxTrainer(SavesArgsWithoutSecrets, SFTTrainer):
    r"""Fine-tune any causal LM on distilled detoxifying text (UniDetox step 3), as a :class:`trl.SFTTrainer`.

    Args:
        model (`str`, `os.PathLike` or `PreTrainedModel`):
            A hub id (``"meta-llama/Llama-2-7b-hf"``), a local checkpoint directory, an embedded name
            (``"smollm2-135m"``, ``"gemma3-270m"``), or a model object (a :class:`peft.PeftModel` too).
        args (:class:`UniversalDetoxConfig`, *optional*):
            The configuration; the paper's defaults with ``output_dir="unidetox-<model>"`` when omitted.
        train_dataset:
            A :class:`~unidetox.DistilledDetoxDataset`, a ``datasets.Dataset`` with a ``text`` column, a path to a saved
            dataset directory or to a CSV/JSONL file (e.g. the authors'
            ``generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv``), or an already tokenized dataset with an
            ``input_ids`` column (used as is). Text is re-tokenized with the target's tokenizer, framed with BOS/EOS
            the way the target expects (see :class:`UniversalDetoxConfig`).
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The target's tokenizer; loaded from ``model`` when omitted (a pad token is set when missing).
        peft_config (`peft.PeftConfig`, *optional*):
            LoRA (or another PEFT method) instead of full fine-tuning.
        text_column (`str`, *optional*):
            The text column of a CSV/JSONL/``Dataset`` (``text``, ``Text`` ... are found automatically).
        **kwargs: passed on to :class:`trl.SFTTrainer` (``eval_dataset``, ``callbacks``, ``optimizers``, ...).

    Example:
        >>> from peft import LoraConfig
        >>> from unidetox import UniversalDetoxConfig, UniversalDetoxTrainer
        >>> trainer = UniversalDetoxTrainer(
        ...     model="gemma3-270m",
        ...     args=UniversalDetoxConfig(output_dir="runs/detox-gemma3", max_steps=200, save_steps=50,
        ...                               learning_rate=5e-4, max_length=128, save_merged_model=True),
        ...     train_dataset="runs/distill-default",
        ...     peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        ... )  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.save_model()  # writes the adapter, a model card and <output_dir>/merged  # doctest: +SKIP
    """

    _tag_names = ["trl", "sft", "unidetox", "detoxification"]
    _name = "UniversalDetox"
    # Evaluation results (huggingface_hub.EvalResult) the model card's model-index carries; the pipeline sets them.
    model_card_eval_results: tuple = ()

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel,
        args: UniversalDetoxConfig | None = None,
        train_dataset: DistilledDetoxDataset | datasets.Dataset | str | os.PathLike | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        text_column: str | None = None,
        **kwargs,
    ):
        if train_dataset is None:
            raise ValueError(
                "`train_dataset` is required: the distilled detoxifying text (a DistilledDetoxDataset, or a path to one "
                "or to a CSV/JSONL file)."
            )
        model, processing_class, self.base_model_name = _target_model_and_tokenizer(model, processing_class)
        if args is None:
            args = UniversalDetoxConfig(output_dir=f"unidetox-{Path(self.base_model_name.rstrip('/')).name}")
        elif not isinstance(args, UniversalDetoxConfig):
            raise TypeError(
                f"`args` must be a UniversalDetoxConfig (the universal configuration), got {type(args).__name__}; build "
                "one with UniversalDetoxConfig(**your_args.to_dict()) if needed."
            )
        tokenized, self.distilled_metadata = _target_dataset(train_dataset, processing_class, args, text_column)
        self.num_target_tokens = int(sum(len(ids) for ids in tokenized["input_ids"]))
        self._peft_config_used = peft_config
        if args.stop_at_step is not None:
            callbacks = [*(callbacks or []), StopAtStepCallback(args.stop_at_step)]

        super().__init__(
            model=model,
            args=args,
            train_dataset=tokenized,
            processing_class=processing_class,
            peft_config=peft_config,
            callbacks=callbacks,
            **kwargs,
        )
        for callback in self.callback_handler.callbacks:  # validation metrics reach report_to through self.log
            if isinstance(callback, DetoxEvalCallback):
                callback.bind_trainer(self)

    # -- saving --------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model (or adapter) with the tokenizer and a UniDetox model card; with ``save_merged_model`` and a
        PEFT adapter, also a merged full model under ``<output_dir>/merged`` (final save only, not checkpoints)."""
        output_dir = output_dir or self.args.output_dir
        # Where the card goes is decided before saving: peft writes (or updates) README.md with an adapter, and a
        # README.md the user put there must come out of the save unchanged.
        card = model_card_path(output_dir)
        readme = Path(output_dir) / MODEL_CARD_FILE
        user_readme = readme.read_bytes() if card != readme and self.is_world_process_zero() else None
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.is_world_process_zero():
            if user_readme is not None and (not readme.is_file() or readme.read_bytes() != user_readme):
                readme.write_bytes(user_readme)
            self._write_model_card(card)
        if not _internal_call and self.args.save_merged_model and self._is_peft():
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero():
                merged_dir = merge_lora_checkpoint(output_dir, Path(output_dir) / MERGED_SUBDIR)
                self._write_model_card(model_card_path(merged_dir), merged=True)
            self.accelerator.wait_for_everyone()

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        # trl calls this at every checkpoint to refresh the card in `<output_dir>`.
        if self.is_world_process_zero():
            self._write_model_card(model_card_path(self.args.output_dir))

    def _is_peft(self) -> bool:
        from accelerate.utils import is_peft_model

        return is_peft_model(self.accelerator.unwrap_model(self.model))

    def training_config_summary(self) -> dict[str, Any]:
        """The fields that define the detox configuration (for model cards and result files)."""
        keys = [
            "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_steps",
            "stop_at_step", "save_steps", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "bf16", "fp16",
            "packing", "add_bos_token", "add_eos_token", "gradient_checkpointing",
        ]
        summary = {k: getattr(self.args, k) for k in keys}
        summary["world_size"] = self.args.world_size
        summary["effective_batch_size"] = (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        )
        peft_config = self._peft_config_used
        if peft_config is not None:
            summary["peft"] = {
                k: (sorted(v) if isinstance(v, set) else v)
                for k, v in peft_config.to_dict().items()
                if k in {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"}
            }
        return json.loads(json.dumps(summary, default=str))

    def _write_model_card(self, path: Path, merged: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            render_model_card(
                base_model=self.base_model_name,
                distilled_metadata=self.distilled_metadata,
                config=self.training_config_summary(),
                num_target_tokens=self.num_target_tokens,
                global_step=self.state.global_step if self.state is not None else 0,
                merged=merged,
                adapter=self._is_peft() and not merged,
                eval_results=self.model_card_eval_results,
            )
        )
        return path


def _target_model_and_tokenizer(
    model: str | os.PathLike | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[str | PreTrainedModel, PreTrainedTokenizerBase, str]:
    """``(model, tokenizer, base model name)`` of the target: a name or path becomes the directory ``SFTTrainer``
    loads the model from (an embedded name, its provisioned one); the tokenizer, when not given, is the model's own.
    A tokenizer without a pad token pads with its EOS token."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model = resolve_model_path(model)  # SFTTrainer loads it with args.model_init_kwargs (fp32 by default)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(model)
            except OSError as err:
                raise OSError(
                    f"Cannot load the tokenizer of model {name!r}: it is not a local directory and the hub copy is "
                    f"unreachable or not cached. Pass a local checkpoint path, an embedded name "
                    f"({', '.join(EMBEDDED_MODELS)}), or make the hub reachable (unset HF_HUB_OFFLINE)."
                ) from err
    elif isinstance(model, torch.nn.Module):
        config_name = getattr(getattr(model, "config", None), "_name_or_path", None)
        name = config_name or f"<in-memory {type(model).__name__}>"
        if tokenizer is None:
            if not config_name:
                raise ValueError(
                    "Cannot find the tokenizer of a model object without `config._name_or_path`; pass "
                    "processing_class=<the target's tokenizer>."
                )
            tokenizer = load_tokenizer(config_name)
    else:
        raise TypeError(
            f"`model` must be a hub id, a local path, an embedded name ({', '.join(EMBEDDED_MODELS)}) or a model "
            f"object; got {type(model).__name__}."
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"`processing_class` must be the target's tokenizer (PreTrainedTokenizerBase); got {type(tokenizer).__name__}."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, name


def _target_dataset(
    train_dataset: DistilledDetoxDataset | datasets.Dataset | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    args: UniversalDetoxConfig,
    text_column: str | None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The distilled text re-tokenized for THIS target (an already tokenized dataset is used as it is), and the
    metadata of the distilled text."""
    if isinstance(train_dataset, datasets.Dataset) and "input_ids" in train_dataset.column_names:
        return train_dataset, {"source": "pre-tokenized dataset", "num_samples": len(train_dataset)}
    distilled = as_distilled_dataset(train_dataset, text_column=text_column)
    metadata = dict(distilled.metadata)
    metadata.setdefault("num_samples", len(distilled))
    tokenized = tokenize_for_target(
        distilled.dataset,
        tokenizer,
        add_bos_token=args.add_bos_token,
        add_eos_token=args.add_eos_token,
        num_proc=args.dataset_num_proc,
    )
    return tokenized, metadata
