"""Toxic corpora for the anti-expert: DGHS as the paper filters it, and any local csv/jsonl/txt file.

Every loader returns a ``datasets.Dataset`` with a single ``text`` column. Rows are kept when, for every
``filters`` entry ``column: [values]``, the row's value is one of ``values`` (compared as strings, so the YAML
``class: [0, 1]`` matches Davidson's integer column). Missing files, missing columns and filters that leave no
rows raise errors that name the path, the column and the filter.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from unidetox.paths import default_data_dir, require_file

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
DGHS_HUB_ID = "LennardZuendorf/Dynamically-Generated-Hate-Speech-Dataset"
# How the cards cite DGHS, the anti-expert's training text.
DGHS_REFERENCE = (
    "Vidgen, Thrush, Waseem and Kiela, ACL 2021: *Learning from the Worst: Dynamically Generated Datasets to "
    "Improve Online Hate Detection*, github.com/bvidgen/Dynamically-Generated-Hate-Speech-Dataset"
)
# The 34 identity codes the UniDetox authors keep (EminLU/UniDetox, toxic_gpt2_finetune_and_distill.py).
DGHS_TARGETS: tuple[str, ...] = (
    "wom", "trans", "gendermin", "bis", "gay", "gay.man", "gay.wom", "mixed.race", "ethnic.minority", "indig",
    "indig.wom", "non.white", "bla", "bla.wom", "bla.man", "asi", "asi.wom", "asi.east", "asi.south", "asi.chin",
    "asi.pak", "arab", "eastern.europe", "russian", "pol", "hispanic", "immig", "asylum", "ref", "for", "jew",
    "mus", "mus.wom", "other.religion",
)
SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".txt")


@dataclass
class ToxicCorpusConfig:
    """Where the anti-expert's toxic text comes from and which rows to keep.

    Exactly one of ``path`` (local files) and ``hub_id`` (a dataset on the HF hub) is set.

    Example:
        >>> from unidetox.distill.corpus import ToxicCorpusConfig, load_toxic_corpus
        >>> config = ToxicCorpusConfig(
        ...     path=["dghs/db_dev.csv", "dghs/db_test.csv"],
        ...     filters={"label": ["hate"], "target": list(DGHS_TARGETS)},
        ... )
        >>> corpus = load_toxic_corpus(config)  # doctest: +SKIP
        >>> len(corpus)  # doctest: +SKIP
        2044
    """

    path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local .csv/.jsonl/.json/.txt files, concatenated in order. Relative paths are resolved against "
            "`data_dir`. A .txt file holds one text per non-empty line."
        },
    )
    hub_id: str | None = field(default=None, metadata={"help": "A dataset id on the HF hub, instead of `path`."})
    hub_split: str = field(default="train", metadata={"help": "Which split of the hub dataset to load."})
    text_column: str = field(default=TEXT_COLUMN, metadata={"help": "Column that holds the text."})
    filters: dict[str, list[Any]] | None = field(
        default=None,
        metadata={
            "help": "Keep rows whose `column` value is in the given list, for every entry (AND). Values are compared "
            "as strings; exact matches only (DGHS rows with several comma-separated targets do not match, as in "
            "the paper's code)."
        },
    )
    max_samples: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many rows after filtering (a seeded shuffle picks them)."},
    )
    shuffle_seed: int = field(default=0, metadata={"help": "Seed of the shuffle used by `max_samples`."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Base folder for relative `path`s (default: unidetox.paths.default_data_dir())."},
    )

    def __post_init__(self):
        if isinstance(self.path, (str, os.PathLike)):
            self.path = [str(self.path)]
        if (self.path is None) == (self.hub_id is None):
            raise ValueError(
                f"Set exactly one of `path` and `hub_id` for the toxic corpus, got path={self.path!r} and "
                f"hub_id={self.hub_id!r} (recipes: `data=dghs_local`, `data=dghs_hub` or `data.path=[...]`)."
            )
        if self.path is not None and len(self.path) == 0:
            raise ValueError("`path` is an empty list; name at least one file.")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"`max_samples` has to be >= 1 or None, but is {self.max_samples}.")
        if self.filters is not None:
            if not isinstance(self.filters, Mapping):
                raise ValueError(f"`filters` has to map column names to lists of values, but is {self.filters!r}.")
            self.filters = {
                str(k): list(v) if isinstance(v, Sequence) and not isinstance(v, str) else [v]
                for k, v in self.filters.items()
            }
            empty = [k for k, v in self.filters.items() if not v]
            if empty:
                raise ValueError(f"`filters` for column(s) {empty} list no values, so no row could match.")

    def resolved_paths(self) -> list[Path]:
        """The corpus files; only relative ones need the data folder (``data_dir`` or ``$UNIDETOX_DATA_DIR``)."""
        paths = [Path(x).expanduser() for x in self.path or []]
        if all(p.is_absolute() for p in paths):
            return paths
        base = Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()
        return [p if p.is_absolute() else base / p for p in paths]


def _norm(value: Any) -> str:
    """Canonical string form for filter comparisons (``1``, ``1.0`` and ``"1"`` compare equal)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _read_file(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".csv":
        # Read every column as a string and keep empty cells as "" (no NaN): filter comparisons stay exact.
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix in (".jsonl", ".json"):
        try:
            frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        except ValueError as err:
            raise ValueError(f"Could not parse {path} as {'JSON lines' if suffix == '.jsonl' else 'JSON'}: {err}") from err
        return frame
    if suffix == ".txt":
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        return pd.DataFrame({TEXT_COLUMN: [line for line in lines if line.strip()]})
    raise ValueError(f"Cannot read {path}: supported toxic corpus files are {', '.join(SUPPORTED_SUFFIXES)}.")


def filter_rows(frame, filters: Mapping[str, Sequence[Any]] | None, source: str):
    """Keep rows matching every ``column: values`` entry; raise naming the column when it is missing."""
    if not filters:
        return frame
    for column in filters:
        if column not in frame.columns:
            raise ValueError(
                f"Filter column {column!r} is not in {source}; its columns are {list(frame.columns)}. "
                f"Fix `filters` (recipes: `data.filters`)."
            )
    keep = None
    for column, values in filters.items():
        wanted = {_norm(v) for v in values}
        match = frame[column].map(lambda v, wanted=wanted: _norm(v) in wanted)
        keep = match if keep is None else keep & match
    return frame[keep]


def _describe_values(frame, filters) -> str:
    parts = []
    for column in filters:
        present = sorted({_norm(v) for v in frame[column].tolist()})
        shown = ", ".join(repr(v) for v in present[:12]) + (", ..." if len(present) > 12 else "")
        parts.append(f"{column!r} holds {shown}")
    return "; ".join(parts)


def load_text_file(
    path: str | os.PathLike,
    text_column: str = TEXT_COLUMN,
    filters: Mapping[str, Sequence[Any]] | None = None,
) -> datasets.Dataset:
    """Read one local csv/jsonl/json/txt file into a ``Dataset`` with a ``text`` column.

    Example:
        >>> from unidetox.distill.corpus import load_text_file
        >>> davidson = load_text_file(  # doctest: +SKIP
        ...     "../shared/data/davidson_hate_offensive/labeled_data.csv", text_column="tweet",
        ...     filters={"class": [0, 1]},
        ... )
    """
    path = require_file(path, "Toxic corpus file")
    frame = _read_file(path)
    if text_column not in frame.columns:
        raise ValueError(
            f"Text column {text_column!r} is not in {path}; its columns are {list(frame.columns)}. "
            "Set `text_column` (recipes: `data.text_column=...`)."
        )
    total = len(frame)
    kept = filter_rows(frame, filters, str(path))
    if filters and len(kept) == 0:
        raise ValueError(
            f"The filter {dict(filters)} left 0 of {total} rows in {path} ({_describe_values(frame, filters)}). "
            "Fix `filters` (recipes: `data.filters`)."
        )
    texts = [t for t in (str(x) for x in kept[text_column].tolist()) if t.strip()]
    logger.info("%s: kept %d of %d rows", path, len(texts), total)
    return datasets.Dataset.from_dict({TEXT_COLUMN: texts})


def load_hub_corpus(
    hub_id: str,
    split: str = "train",
    text_column: str = TEXT_COLUMN,
    filters: Mapping[str, Sequence[Any]] | None = None,
) -> datasets.Dataset:
    """Load a hub dataset split and apply the same column filters as :func:`load_text_file`."""
    try:
        raw = datasets.load_dataset(hub_id, split=split)
    except Exception as err:  # network, auth, offline mode: all end here with one actionable message
        raise RuntimeError(
            f"Could not load the dataset {hub_id!r} (split {split!r}) from the HF hub: {type(err).__name__}: {err}. "
            "Without hub access use local files instead (recipes: `data=dghs_local`, or `data.path=[...]` with "
            "`data.hub_id=null`)."
        ) from err
    frame = raw.to_pandas()
    if text_column not in frame.columns:
        raise ValueError(
            f"Text column {text_column!r} is not in {hub_id} ({split}); its columns are {list(frame.columns)}."
        )
    kept = filter_rows(frame, filters, f"{hub_id} ({split})")
    if filters and len(kept) == 0:
        raise ValueError(
            f"The filter {dict(filters)} left 0 of {len(frame)} rows in {hub_id} ({split}) "
            f"({_describe_values(frame, filters)})."
        )
    texts = [t for t in (str(x) for x in kept[text_column].tolist()) if t.strip()]
    return datasets.Dataset.from_dict({TEXT_COLUMN: texts})


def load_toxic_corpus(config: ToxicCorpusConfig) -> datasets.Dataset:
    """Load the toxic corpus described by ``config`` (files concatenated in order, then ``max_samples``)."""
    if config.hub_id is not None:
        corpus = load_hub_corpus(config.hub_id, config.hub_split, config.text_column, config.filters)
    else:
        parts = [load_text_file(p, config.text_column, config.filters) for p in config.resolved_paths()]
        corpus = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(corpus) == 0:
        raise ValueError(f"The toxic corpus {config.hub_id or config.path} has no non-empty texts.")
    if config.max_samples is not None and config.max_samples < len(corpus):
        corpus = corpus.shuffle(seed=config.shuffle_seed).select(range(config.max_samples))
        corpus = corpus.flatten_indices()
    return corpus


def load_dghs(
    paths: Sequence[str | os.PathLike] | None = None,
    hub: bool = False,
    splits: Sequence[str] | None = None,
    targets: Sequence[str] | None = DGHS_TARGETS,
) -> datasets.Dataset:
    """DGHS hate text filtered as in the paper: ``label == "hate"`` and ``target`` in the 34 identity codes.

    Args:
        paths: local DGHS CSVs (default: the offline dev + test copies under ``<data_dir>/dghs``).
        hub: load ``LennardZuendorf/Dynamically-Generated-Hate-Speech-Dataset`` from the hub instead.
        splits: values of DGHS's own ``split`` column to keep (the paper: ``["train"]``, which only the hub copy
            has); ``None`` keeps all rows of the given files.
        targets: identity codes to keep (``None``: any target).

    Example:
        >>> from unidetox.distill.corpus import load_dghs
        >>> len(load_dghs())  # the offline dev + test files  # doctest: +SKIP
        2044
    """
    filters: dict[str, list[Any]] = {"label": ["hate"]}
    if targets is not None:
        filters["target"] = list(targets)
    if splits is not None:
        filters["split"] = list(splits)
    if hub:
        return load_toxic_corpus(ToxicCorpusConfig(hub_id=DGHS_HUB_ID, filters=filters))
    if paths is None:
        paths = [str(default_data_dir() / "dghs" / "db_dev.csv"), str(default_data_dir() / "dghs" / "db_test.csv")]
    return load_toxic_corpus(ToxicCorpusConfig(path=[str(p) for p in paths], filters=filters))


def corpus_fingerprint(corpus: datasets.Dataset) -> str:
    """SHA-256 over the texts in order: identifies a corpus independently of where it was read from."""
    digest = hashlib.sha256()
    for text in corpus[TEXT_COLUMN]:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()
