"""The distilled text re-tokenized for the *target's* own tokenizer, BOS/EOS as that tokenizer expects.

What differs from the authors' fine-tuning code (EminLU/UniDetox): padding never carries loss (their collator
copies padded ``input_ids`` into ``labels``), each text ends with the target's EOS (which keeps its loss even when
the tokenizer pads with EOS), BOS follows the target tokenizer's own convention, and nothing is hard-coded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from unidetox.distill.dataset import TEXT_COLUMN, DistilledDetoxDataset


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
        >>> from unidetox.detox.tokenization import tokenize_for_target
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


