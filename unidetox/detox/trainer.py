"""Detox any causal LM by fine-tuning it on distilled detoxifying text, with ONE configuration for every model.

The UniDetox claim (Lu et al., ICLR 2025, https://huggingface.co/papers/2504.20500) is universality: text
distilled once, from one model, detoxifies other models (other sizes, families, tokenizers) with a single
hyperparameter configuration. :class:`UniversalDetoxConfig` holds that configuration (its defaults are the paper's:
AdamW, learning rate 5e-5, batch 8, 256 tokens, a fixed step budget with every checkpoint kept for selection) and
:class:`UniversalDetoxTrainer` is a :class:`trl.SFTTrainer` that takes the distilled text in any of its forms and
re-tokenizes it for the *target's* own tokenizer.

What differs from the authors' fine-tuning code (EminLU/UniDetox): padding never carries loss (their collator
copies padded ``input_ids`` into ``labels``), each text ends with the target's EOS (which keeps its loss even when
the tokenizer pads with EOS), BOS follows the target tokenizer's own convention, and nothing is hard-coded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from unidetox.distill.dataset import TEXT_COLUMN, DistilledDetoxDataset
from unidetox.models import is_embedded_name, load_tokenizer, resolve_model_path

logger = logging.getLogger(__name__)

PAPER_URL = "https://huggingface.co/papers/2504.20500"
MERGED_SUBDIR = "merged"
CITATION = """@inproceedings{lu2025unidetox,
  title     = {UniDetox: Universal Detoxification of Large Language Models via Dataset Distillation},
  author    = {Huimin Lu and Masaru Isonuma and Junichiro Mori and Ichiro Sakata},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025},
  url       = {https://openreview.net/forum?id=eLLBILFRsA}
}"""


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
        from unidetox.processes import has_accelerator, uses_deepspeed

        if not self.use_cpu and not has_accelerator() and not uses_deepspeed(self.deepspeed):
            self.use_cpu = True
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


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization for the target model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokenPolicy:
    """How texts are framed for one tokenizer: which BOS/EOS ids are added around the raw text tokens."""

    bos_token_id: int | None
    eos_token_id: int | None

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, add_bos_token: bool | None = None, add_eos_token: bool = True
    ) -> SpecialTokenPolicy:
        """Decide BOS/EOS for ``tokenizer``; ``add_bos_token=None`` copies what ``tokenizer(text)`` does by itself."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if add_bos_token is None:
            with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
            without = tokenizer("a", add_special_tokens=False)["input_ids"]
            add_bos_token = bos is not None and len(with_specials) > len(without) and with_specials[0] == bos
        if add_bos_token and bos is None:
            raise ValueError(
                f"add_bos_token=True, but the tokenizer {type(tokenizer).__name__} has no BOS token; set "
                "tokenizer.bos_token or use add_bos_token=None."
            )
        if add_eos_token and eos is None:
            raise ValueError(
                f"add_eos_token=True, but the tokenizer {type(tokenizer).__name__} has no EOS token; set "
                "tokenizer.eos_token or use add_eos_token=False."
            )
        return cls(bos_token_id=bos if add_bos_token else None, eos_token_id=eos if add_eos_token else None)

    def frame(self, ids: list[int]) -> list[int]:
        """``[BOS] + ids + [EOS]`` as configured, without doubling a BOS/EOS the text already has."""
        ids = list(ids)
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids = ids + [self.eos_token_id]
        return ids


def tokenize_for_target(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    add_bos_token: bool | None = None,
    add_eos_token: bool = True,
    text_column: str = TEXT_COLUMN,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Re-tokenize distilled text for a target tokenizer: one ``input_ids`` row per text, framed with BOS/EOS.

    No padding and no truncation happen here: :class:`trl.SFTTrainer` truncates to ``max_length``, and its collator
    pads ``input_ids`` with the pad id and ``labels`` with -100, so padding never carries loss while the final EOS
    does (even when pad id == EOS id). Empty texts are dropped.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from unidetox.detox.trainer import tokenize_for_target
        >>> tok = AutoTokenizer.from_pretrained("gpt2")  # doctest: +SKIP
        >>> ds = tokenize_for_target(datasets.Dataset.from_dict({"text": ["Hello"]}), tok)  # doctest: +SKIP
        >>> ds[0]["input_ids"]  # GPT-2 adds no BOS; EOS <|endoftext|> appended  # doctest: +SKIP
        [15496, 50256]
    """
    if text_column not in dataset.column_names:
        raise ValueError(f"The dataset has no `{text_column}` column; its columns are {dataset.column_names}.")
    policy = SpecialTokenPolicy.for_tokenizer(tokenizer, add_bos_token, add_eos_token)

    def _tokenize(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [policy.frame(ids) if ids else [] for ids in encoded]}

    tokenized = dataset.map(
        _tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing for target"
    )
    tokenized = tokenized.filter(lambda row: len(row["input_ids"]) > 0, num_proc=num_proc)
    if len(tokenized) == 0:
        raise ValueError("Every text tokenized to nothing: there is no text to fine-tune on.")
    return tokenized


def as_distilled_dataset(
    train_dataset: DistilledDetoxDataset | datasets.Dataset | str | os.PathLike, text_column: str | None = None
) -> DistilledDetoxDataset:
    """Accept a :class:`DistilledDetoxDataset`, a ``datasets.Dataset`` with a text column, or a path to either a saved
    dataset directory or a CSV/JSONL file (the authors' CSV with its ``Text`` column works as is)."""
    if isinstance(train_dataset, DistilledDetoxDataset):
        return train_dataset
    if isinstance(train_dataset, (str, os.PathLike)):
        return DistilledDetoxDataset.load(train_dataset, text_column=text_column)
    if isinstance(train_dataset, datasets.Dataset):
        column = text_column or TEXT_COLUMN
        if column not in train_dataset.column_names:
            raise ValueError(
                f"`train_dataset` has no `{column}` column (columns: {train_dataset.column_names}); pass "
                "text_column=... or a DistilledDetoxDataset."
            )
        ds = train_dataset.select_columns([column])
        if column != TEXT_COLUMN:
            ds = ds.rename_column(column, TEXT_COLUMN)
        return DistilledDetoxDataset(ds, {"source": "in-memory datasets.Dataset", "num_samples": len(ds)})
    raise TypeError(
        "`train_dataset` must be a DistilledDetoxDataset, a datasets.Dataset with a text column, or a path to a saved "
        f"dataset directory / CSV / JSONL file; got {type(train_dataset).__name__}."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


class UniversalDetoxTrainer(SFTTrainer):
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
        # The model: hub id / local path / embedded name, or an object.
        if isinstance(model, (str, os.PathLike)):
            self.base_model_name = str(model)
            model_path = resolve_model_path(model)  # embedded names -> their provisioned directory
            if processing_class is None:
                try:
                    processing_class = load_tokenizer(model_path)
                except OSError as err:
                    raise OSError(
                        f"Cannot load the tokenizer of model {self.base_model_name!r}: it is not a local directory "
                        "and the hub copy is unreachable or not cached. Pass a local checkpoint path, an embedded name "
                        "(smollm2-135m, gemma3-270m), or make the hub reachable (unset HF_HUB_OFFLINE)."
                    ) from err
            model = model_path  # SFTTrainer loads it with args.model_init_kwargs (fp32 by default)
        elif isinstance(model, torch.nn.Module):
            config = getattr(model, "config", None)
            self.base_model_name = getattr(config, "_name_or_path", None) or f"<in-memory {type(model).__name__}>"
            if processing_class is None:
                name = getattr(config, "_name_or_path", None)
                if not name:
                    raise ValueError(
                        "Cannot find the tokenizer of a model object without `config._name_or_path`; pass "
                        "processing_class=<the target's tokenizer>."
                    )
                processing_class = load_tokenizer(name)
        else:
            raise TypeError(
                "`model` must be a hub id, a local path, an embedded name "
                f"({', '.join(['smollm2-135m', 'gemma3-270m'])}) or a model object; got {type(model).__name__}."
            )
        if not isinstance(processing_class, PreTrainedTokenizerBase):
            raise TypeError(
                f"`processing_class` must be the target's tokenizer (PreTrainedTokenizerBase); got {type(processing_class).__name__}."
            )
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token

        if args is None:
            short = Path(self.base_model_name.rstrip("/")).name
            args = UniversalDetoxConfig(output_dir=f"unidetox-{short}")
        elif not isinstance(args, UniversalDetoxConfig):
            raise TypeError(
                f"`args` must be a UniversalDetoxConfig (the universal configuration), got {type(args).__name__}; build "
                "one with UniversalDetoxConfig(**your_args.to_dict()) if needed."
            )

        # The data: distilled text re-tokenized for THIS target, unless already tokenized.
        if isinstance(train_dataset, datasets.Dataset) and "input_ids" in train_dataset.column_names:
            self.distilled_metadata: dict[str, Any] = {"source": "pre-tokenized dataset", "num_samples": len(train_dataset)}
            tokenized = train_dataset
        else:
            distilled = as_distilled_dataset(train_dataset, text_column=text_column)
            self.distilled_metadata = dict(distilled.metadata)
            self.distilled_metadata.setdefault("num_samples", len(distilled))
            tokenized = tokenize_for_target(
                distilled.dataset,
                processing_class,
                add_bos_token=args.add_bos_token,
                add_eos_token=args.add_eos_token,
                num_proc=args.dataset_num_proc,
            )
        self.num_target_tokens = int(sum(len(ids) for ids in tokenized["input_ids"]))
        self._peft_config_used = peft_config
        if args.stop_at_step is not None:
            from unidetox.detox.callbacks import StopAtStepCallback

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

    # -- saving --------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the model (or adapter) with the tokenizer and a UniDetox model card; with ``save_merged_model`` and a
        PEFT adapter, also a merged full model under ``<output_dir>/merged`` (final save only, not checkpoints)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.is_world_process_zero():
            self._write_model_card(output_dir)
        if not _internal_call and self.args.save_merged_model and self._is_peft():
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero():
                merged_dir = merge_lora_checkpoint(output_dir, Path(output_dir) / MERGED_SUBDIR)
                self._write_model_card(merged_dir, merged=True)
            self.accelerator.wait_for_everyone()

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        # trl calls this at every checkpoint to refresh `<output_dir>/README.md`.
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir)

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

    def _write_model_card(self, directory: str | os.PathLike, merged: bool = False) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "README.md"
        path.write_text(
            render_model_card(
                base_model=self.base_model_name,
                distilled_metadata=self.distilled_metadata,
                config=self.training_config_summary(),
                num_target_tokens=self.num_target_tokens,
                global_step=self.state.global_step if self.state is not None else 0,
                merged=merged,
                adapter=self._is_peft() and not merged,
            )
        )
        return path


def render_model_card(
    base_model: str,
    distilled_metadata: dict[str, Any],
    config: dict[str, Any],
    num_target_tokens: int | None = None,
    global_step: int = 0,
    merged: bool = False,
    adapter: bool = False,
) -> str:
    """A model card (README.md) stating the base model, the distilled data's metadata and the configuration."""
    local = is_embedded_name(base_model) or os.path.isdir(base_model) or base_model.startswith("<")
    hub_base = None if local else base_model
    front = ["---", "library_name: " + ("peft" if adapter else "transformers")]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front += ["tags:", "- unidetox", "- detoxification", "- trl", "- sft", "---", ""]
    kind = "LoRA adapter" if adapter else ("merged full model" if merged else "model")
    load = (
        "AutoModelForCausalLM.from_pretrained(path)  # with `peft` installed; the base model is read from adapter_config.json"
        if adapter
        else "AutoModelForCausalLM.from_pretrained(path)"
    )
    lines = front + [
        f"# {Path(base_model.rstrip('/')).name}, detoxified with UniDetox",
        "",
        f"This {kind} is `{base_model}` fine-tuned on distilled detoxifying text with UniDetox "
        f"([Lu et al., ICLR 2025]({PAPER_URL})), through `unidetox.UniversalDetoxTrainer` "
        f"({global_step} optimizer steps).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        "## Base model",
        "",
        f"- `{base_model}`" + (" (unidetox embedded model)" if is_embedded_name(base_model) else ""),
        "",
        "## Distilled detoxifying text",
        "",
        "```json",
        json.dumps(distilled_metadata, indent=2, default=str),
        "```",
        "",
    ]
    if num_target_tokens is not None:
        lines += [f"Re-tokenized for this model: {num_target_tokens} tokens (BOS/EOS included).", ""]
    lines += [
        "## Fine-tuning configuration",
        "",
        "| field | value |",
        "|---|---|",
        *[f"| {k} | `{json.dumps(v) if isinstance(v, (dict, list)) else v}` |" for k, v in config.items()],
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


def merge_lora_checkpoint(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Merge a saved LoRA adapter (a final output or any ``checkpoint-N``) into its base model and save a full model.

    The base model is read from the adapter's ``adapter_config.json``; the tokenizer is copied from ``adapter_dir``.
    Works on any checkpoint after the fact, e.g. the one :func:`unidetox.detox.selection.select_checkpoint` picked.

    Example:
        >>> from unidetox.detox.trainer import merge_lora_checkpoint
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
    if dtype is None:
        dtype = torch.float32 if not torch.cuda.is_available() else "auto"
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=dtype)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True)
    try:
        load_tokenizer(adapter_dir).save_pretrained(output_dir)
    except (OSError, ValueError) as err:  # an adapter saved without its tokenizer
        logger.warning("No tokenizer saved next to %s (%s); the merged model has none.", adapter_dir, err)
    return output_dir


def config_fields_help(cls=UniversalDetoxConfig) -> dict[str, str]:
    """``{field: help}`` of the fields declared by :class:`UniversalDetoxConfig` itself (for docs and tests)."""
    own = {f.name for f in fields(cls)} - {f.name for f in fields(SFTConfig)} | set(cls.__annotations__)
    return {f.name: f.metadata.get("help", "") for f in fields(cls) if f.name in own}


__all__ = [
    "SpecialTokenPolicy",
    "UniversalDetoxConfig",
    "UniversalDetoxTrainer",
    "as_distilled_dataset",
    "merge_lora_checkpoint",
    "render_model_card",
    "tokenize_for_target",
]
