"""What every Hub card of unidetox states: the paper, its citation, and how a model is named.

The dataset, anti-expert, model and evaluation cards all build on these, so a model named in one card is named
the same way in the others.

>>> model_reference("HuggingFaceTB/SmolLM2-135M")
'[`HuggingFaceTB/SmolLM2-135M`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)'
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

from unidetox.embedded_models import embedded_hub_id, is_embedded_name

logger = logging.getLogger(__name__)

PAPER_URL = "https://huggingface.co/papers/2504.20500"
CITATION = """@inproceedings{lu2025unidetox,
  title     = {UniDetox: Universal Detoxification of Large Language Models via Dataset Distillation},
  author    = {Huimin Lu and Masaru Isonuma and Junichiro Mori and Ichiro Sakata},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025},
  url       = {https://openreview.net/forum?id=eLLBILFRsA}
}"""
# `model_id` names a saved directory or an in-memory model `<name>@<12 hex digits of its weights>`.
WEIGHT_DIGEST_SUFFIX = re.compile(r"@[0-9a-f]{12}$")


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it names a model on the Hub; None for a local one.

    Local: an embedded name, an existing directory, an in-memory model (``<...>``), a model named by the digest
    of its weights (``path@0123456789ab``), or anything that is not a valid repo id (an absolute path).
    """
    if not name_or_path:
        return None
    name = str(name_or_path)
    if is_embedded_name(name) or name.startswith("<") or WEIGHT_DIGEST_SUFFIX.search(name) or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_hub_id(name_or_path: str | None) -> str | None:
    """The Hub id a card names as ``base_model``: an embedded model's original repository, a Hub id as it is."""
    return embedded_hub_id(name_or_path) or hub_model_id(name_or_path)


def model_reference(name_or_path: str) -> str:
    """A model as Markdown: a link for a Hub id, ``name`` (local ...) otherwise, never a link to a local path."""
    hub_id = hub_model_id(name_or_path)
    if hub_id:
        return f"[`{hub_id}`](https://huggingface.co/{hub_id})"
    kind = "unidetox embedded model" if is_embedded_name(name_or_path) else "local model, not on the Hub"
    return f"`{name_or_path}` ({kind})"


MODEL_CARD_FILE = "README.md"
# Marks a README.md as a card this module wrote: only such a card is rewritten or updated, never a user's file.
CARD_MARKER = "<!-- written by unidetox: a later run may rewrite this card -->"
# Cards without the marker are recognised by the sentence every card of this module states.
CARD_SIGNATURE = "through `unidetox.UniversalDetoxTrainer`"
# Where the card goes when output_dir already holds a README.md this module did not write.
FALLBACK_CARD_FILE = "UNIDETOX_MODEL_CARD.md"
TASK_TYPE, TASK_NAME = "text-generation", "Text Generation"
# The ToxiGen prompts on the Hub (the `toxigen_hub` prompt source).
TOXIGEN_HUB_DATASET = "skg/toxigen-data"
# WikiText-2's raw files (wiki.test.raw ...) and the Hub configuration they make up.
WIKITEXT_FILE = re.compile(r"wiki\.(train|valid|test)\.raw")
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
WIKITEXT_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
# ----------------------------------------------------------------------------------------------------------------
# Evaluation results as model-index entries
# ----------------------------------------------------------------------------------------------------------------
def prompt_set_dataset(prompts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``dataset_*`` fields of an :class:`~huggingface_hub.EvalResult` for a prompt set.

    ``prompts`` holds the resolved prompt settings (``source``, ``path``, ``split``, optionally ``num_prompts``):
    the report's ``prompts`` entry, or a :class:`~unidetox.evaluation.prompts.PromptsConfig` as a dict.
    """
    source, path, split = prompts["source"], prompts.get("path"), prompts.get("split", "all")
    if source == "file":
        dataset_type, pretty = Path(path).name, f"Prompts from {Path(path).name}"
    elif source == "toxigen_hub":
        dataset_type, pretty = TOXIGEN_HUB_DATASET, "ToxiGen prompts"
    else:  # the local ToxiGen copies: the annotated CSV or the prompts folder
        dataset_type, pretty = "toxigen", "ToxiGen prompts"
    num_prompts = prompts.get("num_prompts")
    size = f", {num_prompts} prompts" if num_prompts else ""
    return {"dataset_type": dataset_type, "dataset_name": f"{pretty} ({split} split{size})",
            "dataset_config": source, "dataset_split": split}


def held_out_text_dataset(path: str | os.PathLike) -> dict[str, Any]:
    """The ``dataset_*`` fields of an :class:`~huggingface_hub.EvalResult` for a perplexity text file."""
    name = Path(path).name
    match = WIKITEXT_FILE.fullmatch(name)
    if match:
        return {"dataset_type": "wikitext", "dataset_name": f"WikiText-2 ({name})", "dataset_config": WIKITEXT_CONFIG,
                "dataset_split": WIKITEXT_SPLITS[match.group(1)]}
    return {"dataset_type": "text", "dataset_name": name}


def _result(dataset: Mapping[str, Any], metric_type: str, metric_name: str, value: float) -> EvalResult:
    return EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, metric_type=metric_type, metric_name=metric_name,
                      metric_value=float(value), **dataset)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def toxicity_eval_results(
    prompt_dataset: Mapping[str, Any],
    toxicity_probability: float | None,
    expected_max_toxicity: float | None,
    perplexity_dataset: Mapping[str, Any] | None = None,
    perplexity: float | None = None,
) -> list[EvalResult]:
    """TP and EMT on a prompt set, and perplexity on held-out text, as model-index results (missing ones left out)."""
    results = []
    if _finite(toxicity_probability):
        results.append(_result(prompt_dataset, "toxicity_probability", "Toxicity Probability (TP)",
                               toxicity_probability))
    if _finite(expected_max_toxicity):
        results.append(_result(prompt_dataset, "expected_max_toxicity", "Expected Maximum Toxicity (EMT)",
                               expected_max_toxicity))
    if perplexity_dataset is not None and _finite(perplexity):
        results.append(_result(perplexity_dataset, "perplexity", "Perplexity", perplexity))
    return results


def validation_eval_results(
    records: Sequence[Mapping[str, Any]],
    step: int,
    prompts: Mapping[str, Any],
    perplexity_path: str | os.PathLike | None = None,
) -> list[EvalResult]:
    """The detox run's validation at ``step`` (one of its ``detox_eval.jsonl`` records) as model-index results.

    Empty when no record is of ``step`` (a final step that was not saved, or validation switched off).
    """
    record = next((r for r in records if int(r["step"]) == step), None)
    if record is None:
        return []
    return toxicity_eval_results(
        prompt_set_dataset(prompts), record.get("toxicity_probability"), record.get("expected_max_toxicity"),
        held_out_text_dataset(perplexity_path) if perplexity_path else None, record.get("perplexity"),
    )


def _identity(result: EvalResult) -> tuple:
    """Results with the same identity are one measurement: a new value replaces the old one."""
    return (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split, result.metric_type,
            result.metric_name)


def is_unidetox_card(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a model card this module wrote (False when it is missing or unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return CARD_MARKER in text or CARD_SIGNATURE in text


def model_card_path(directory: str | os.PathLike) -> Path:
    """Where the model card of ``directory`` is written: ``README.md``, unless a README.md this module did not
    write is there; then :data:`FALLBACK_CARD_FILE` beside it, and a warning says so (the user's file is kept)."""
    readme = Path(directory) / MODEL_CARD_FILE
    if not readme.exists() or is_unidetox_card(readme):
        return readme
    fallback = readme.with_name(FALLBACK_CARD_FILE)
    logger.warning("%s was not written by unidetox, so it is kept; the model card goes to %s instead.",
                   readme, fallback)
    return fallback


def written_model_card(directory: str | os.PathLike) -> Path | None:
    """The model card this module wrote in ``directory`` (README.md or the fallback file), or None."""
    for name in (MODEL_CARD_FILE, FALLBACK_CARD_FILE):
        if is_unidetox_card(Path(directory) / name):
            return Path(directory) / name
    return None


def merge_eval_results(card_path: str | os.PathLike, results: Sequence[EvalResult]) -> bool:
    """Write ``results`` into the ``model-index`` of the model card at ``card_path``; False when there is no card.

    A result of the same metric on the same task, dataset, configuration and split replaces the one on the card;
    the others are appended. The rest of the card (header keys, body) is kept as it is. No card is created, and
    a file this module did not write is left as it is (False, with a warning).
    """
    path = Path(card_path)
    if not path.is_file():
        return False
    if not is_unidetox_card(path):
        logger.warning("%s was not written by unidetox; its results are not written into it.", path)
        return False
    card = ModelCard.load(path)
    replaced = {_identity(r) for r in results}
    kept = [r for r in (card.data.eval_results or []) if _identity(r) not in replaced]
    card.data.eval_results = kept + list(results)
    card.data.model_name = card.data.model_name or path.parent.name
    card.save(path)
    return True
