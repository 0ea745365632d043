"""The distilled detoxifying text: a small corpus sampled by contrastive decoding, reused to detox any model.

:class:`DistilledDetoxDataset` holds the texts and their metadata: :meth:`~DistilledDetoxDataset.build` distills
them (:mod:`unidetox.distill.distiller`), :meth:`~DistilledDetoxDataset.load` reads a build, a saved dataset or
a CSV/JSONL file, :meth:`~DistilledDetoxDataset.save` and :meth:`~DistilledDetoxDataset.push_to_hub` write them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from huggingface_hub import HfApi

from unidetox.distill.corpus import TEXT_COLUMN
from unidetox.distill.dataset_card import anti_expert_training_record, render_dataset_card
from unidetox.distill.distiller import build_distilled
from unidetox.distill.shards import METADATA_FILE, SHARDS_DIR, read_committed
from unidetox.secret_masking import mask_secrets

# The authors' CSV (EminLU/UniDetox) names its column "Text".
TEXT_COLUMN_ALIASES = ("text", "Text", "generated_text", "content")
# Where the distilled dataset lives inside a `recipes/distill.py` output directory.
RECIPE_SUBDIR = "distilled"

logger = logging.getLogger(__name__)


@dataclass
class DistilledDetoxDataset:
    """Distilled text (``dataset`` with a ``text`` column, plus ``num_tokens`` when built here) and its metadata.

    Build one with :meth:`build` (contrastive decoding between a base model and an anti-expert) or read one
    with :meth:`load`, which takes a directory written by :meth:`save`/:meth:`build` (or a ``recipes/distill.py``
    output directory), or a plain CSV/JSONL file with a text column (the authors' released CSV with its ``Text``
    column loads as is).

    Example:
        >>> from unidetox import DistilledDetoxDataset, load_model_and_tokenizer
        >>> base, tokenizer = load_model_and_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> from unidetox import DistillConfig
        >>> distill = DistillConfig(num_samples=128, max_length=128, batch_size=16, start_token="<|endoftext|>")
        >>> distilled = DistilledDetoxDataset.build(  # doctest: +SKIP
        ...     base, "runs/distill-default/anti_expert", tokenizer, distill=distill, output_dir="runs/my-distilled",
        ... )
        >>> distilled.texts[:2]  # doctest: +SKIP
        >>> DistilledDetoxDataset.load("../shared/data/unidetox_reference/generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv")  # doctest: +SKIP
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

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.metadata.get("summary")

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``output_dir`` (HF ``save_to_disk`` layout + ``metadata.json``)."""
        output_dir = Path(output_dir)
        self.dataset.save_to_disk(str(output_dir))
        (output_dir / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, default=str))
        return output_dir

    @classmethod
    def load(cls, path: str | os.PathLike, text_column: str | None = None) -> DistilledDetoxDataset:
        """Load a saved dataset directory (or a distill recipe output dir), or a CSV / JSONL / JSON file."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"No distilled dataset at {path}: pass a directory written by DistilledDetoxDataset.build/save, "
                "or a CSV/JSONL file with a text column."
            )
        if path.is_dir():
            is_saved = (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
            if not is_saved and (path / RECIPE_SUBDIR).is_dir():  # recipes/distill.py's output_dir
                return cls.load(path / RECIPE_SUBDIR, text_column=text_column)
            if (path / SHARDS_DIR).is_dir() and not (path / METADATA_FILE).is_file():
                raise FileNotFoundError(
                    f"{path} holds an unfinished build (shards but no {METADATA_FILE}); rerun the build to resume it."
                )
            if not is_saved:
                raise FileNotFoundError(
                    f"{path} is a directory but not a saved dataset (no dataset_info.json/state.json); "
                    "was the build interrupted? Rerun it to resume."
                )
            return cls(*read_committed(path))
        frame = _read_table(path)
        columns = [str(c) for c in frame.columns]
        column = text_column or next((c for c in TEXT_COLUMN_ALIASES if c in columns), None)
        if column is None or column not in columns:
            raise ValueError(
                f"{path} has no text column (looked for {text_column or TEXT_COLUMN_ALIASES}); its columns are "
                f"{columns}. Pass text_column=..."
            )
        values = frame[column].tolist()
        texts = [v for v in values if isinstance(v, str) and v.strip()]
        not_strings = sum(not isinstance(v, str) for v in values)
        dropped = len(values) - len(texts)
        blank = dropped - not_strings
        if not texts:
            raise ValueError(
                f"{path} has no text in its {column!r} column: {dropped} of {len(values)} rows dropped "
                f"({not_strings} not strings, {blank} blank). Fine-tuning needs non-empty strings; check the "
                "file, or pass text_column=... for another column."
            )
        if dropped:
            logger.warning("%s: dropped %d of %d rows without text in %r (%d not strings, %d blank)", path,
                           dropped, len(values), column, not_strings, blank)
        dataset = datasets.Dataset.from_dict({TEXT_COLUMN: texts})
        return cls(dataset, {"source_file": str(path), "num_samples": len(dataset)})

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload UniDetox distilled detoxifying text",
    ) -> str:
        """Publish the texts as a Hub dataset with a dataset card; returns the repository's URL.

        The card (``README.md``, :func:`~unidetox.distill.dataset_card.render_dataset_card`) and the metadata
        (``unidetox_metadata.json``) are committed first; ``datasets.Dataset.push_to_hub`` then uploads the texts
        as parquet and merges its ``dataset_info``/``configs`` into that card, keeping the card's text. The token
        goes to the Hub client only: no file, card or log line holds it.

        Example:
            >>> distilled = DistilledDetoxDataset.load("runs/distill")  # doctest: +SKIP
            >>> distilled.push_to_hub("my-org/unidetox-smollm2-distilled", private=True)  # doctest: +SKIP
        """
        if not isinstance(repo_id, str) or not repo_id.strip():
            raise ValueError(f"`repo_id` has to name a Hub dataset repository (e.g. 'my-org/distilled'), got {repo_id!r}.")
        if not isinstance(self.dataset, datasets.Dataset) or len(self.dataset) == 0:
            raise ValueError(
                f"There is no distilled text to push to {repo_id}: the dataset is "
                f"{'empty' if isinstance(self.dataset, datasets.Dataset) else 'missing'}. Build or load one first."
            )
        if not any(text.strip() for text in self.texts):
            raise ValueError(
                f"All {len(self)} distilled texts are blank; there is nothing to push to {repo_id}. Rebuild the "
                "dataset (a start token that is not EOS, a larger `max_length`)."
            )
        card = render_dataset_card(
            self.metadata, self.summary, num_texts=len(self), repo_id=repo_id,
            anti_expert_record=anti_expert_training_record(self.metadata.get("anti_expert")),
        )
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        logger.info("Pushing %d distilled texts to %s", len(self), repo_url.repo_id)
        with tempfile.TemporaryDirectory() as staging:
            Path(staging, "README.md").write_text(card, encoding="utf-8")
            Path(staging, "unidetox_metadata.json").write_text(
                json.dumps(mask_secrets(self.metadata), indent=2, default=str), encoding="utf-8")
            api.upload_folder(repo_id=repo_url.repo_id, repo_type="dataset", folder_path=staging,
                              commit_message=commit_message)
        self.dataset.push_to_hub(repo_url.repo_id, private=private, token=token, commit_message=commit_message)
        return str(repo_url)

    # ------------------------------------------------------------------------------------------------------------
    # The distiller's engine, bound here so that the container's class is what a build returns.
    build = classmethod(build_distilled)


def _is_blank_file(path: Path) -> bool:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV / JSONL / JSON file as a DataFrame with at least one row; raise naming the file otherwise."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(
            f"Cannot read {path}: expected a saved dataset directory or a .csv/.jsonl/.json file."
        )
    if _is_blank_file(path):
        raise ValueError(f"{path} is empty (no header and no rows): there is no text to load.")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            try:
                frame = pd.read_json(path, dtype=False)
            except ValueError:  # a .json file holding JSON lines
                frame = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"Could not parse {path} as {suffix[1:].upper()}: {err}") from err
    if len(frame) == 0:
        columns = [str(c) for c in frame.columns]
        raise ValueError(f"{path} has no rows (columns: {columns}): there is no text to load.")
    return frame
