"""The distilled detoxifying text: a small corpus sampled by contrastive decoding, reused to detox any model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

METADATA_FILE = "metadata.json"
TEXT_COLUMN = "text"
# The authors' CSV (EminLU/UniDetox) names its column "Text".
TEXT_COLUMN_ALIASES = ("text", "Text", "generated_text", "content")


@dataclass
class DistilledDetoxDataset:
    """Distilled text (``dataset`` with a ``text`` column, plus ``num_tokens`` when built here) and its metadata.

    Build one with :meth:`build` (contrastive decoding between a base model and an anti-expert) or read one
    with :meth:`load`, which takes a directory written by :meth:`save`/:meth:`build`, or a plain CSV/JSONL file
    with a text column (the authors' released CSV with its ``Text`` column loads as is).
    """

    dataset: datasets.Dataset
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if TEXT_COLUMN not in self.dataset.column_names:
            raise ValueError(
                f"A DistilledDetoxDataset needs a `{TEXT_COLUMN}` column; got columns {self.dataset.column_names}."
            )
        if len(self.dataset) == 0:
            raise ValueError("The distilled dataset is empty: there is no text to fine-tune on.")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def texts(self) -> list[str]:
        return list(self.dataset[TEXT_COLUMN])

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``output_dir`` (HF ``save_to_disk`` layout + ``metadata.json``)."""
        output_dir = Path(output_dir)
        self.dataset.save_to_disk(str(output_dir))
        (output_dir / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, default=str))
        return output_dir

    @classmethod
    def load(cls, path: str | os.PathLike, text_column: str | None = None) -> DistilledDetoxDataset:
        """Load a saved dataset directory, or a CSV / JSONL / JSON file with a text column."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"No distilled dataset at {path}: pass a directory written by DistilledDetoxDataset.build/save, "
                "or a CSV/JSONL file with a text column."
            )
        if path.is_dir():
            if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
                raise FileNotFoundError(
                    f"{path} is a directory but not a saved dataset (no dataset_info.json/state.json); "
                    "was the build interrupted? Rerun it to resume."
                )
            dataset = datasets.load_from_disk(str(path))
            meta_file = path / METADATA_FILE
            metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            return cls(dataset, metadata)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            dataset = datasets.Dataset.from_csv(str(path))
        elif suffix in (".jsonl", ".json"):
            dataset = datasets.Dataset.from_json(str(path))
        else:
            raise ValueError(f"Cannot read {path}: expected a saved dataset directory or a .csv/.jsonl/.json file.")
        column = text_column or next((c for c in TEXT_COLUMN_ALIASES if c in dataset.column_names), None)
        if column is None or column not in dataset.column_names:
            raise ValueError(
                f"{path} has no text column (looked for {text_column or TEXT_COLUMN_ALIASES}); its columns are "
                f"{dataset.column_names}. Pass text_column=..."
            )
        dataset = dataset.select_columns([column])
        if column != TEXT_COLUMN:
            dataset = dataset.rename_column(column, TEXT_COLUMN)
        dataset = dataset.filter(lambda row: isinstance(row[TEXT_COLUMN], str) and row[TEXT_COLUMN].strip() != "")
        return cls(dataset, {"source_file": str(path), "num_samples": len(dataset)})
