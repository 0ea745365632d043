"""The evaluate stage's results written into the model cards of the models it evaluated.

With ``model_card.update: true``, every evaluated model that is a local directory holding a ``README.md`` model
card gets its test numbers in the card's ``model-index`` (:func:`~unidetox.detox.model_card.merge_eval_results`):
TP and EMT (mean over seeds) on the prompt set, WikiText perplexity, MMLU accuracy. A result already on the card
for the same metric and data is replaced, not duplicated; a model without a card gets none.

Example:
    >>> from unidetox.evaluation.pipeline import parse_args, run
    >>> run(parse_args(["models=[runs/detox-smollm2/merged]", "model_card.update=true"]))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult

from unidetox.cards import (
    MODEL_CARD_FILE,
    TASK_NAME,
    TASK_TYPE,
    held_out_text_dataset,
    merge_eval_results,
    prompt_set_dataset,
    toxicity_eval_results,
    written_model_card,
)

logger = logging.getLogger(__name__)

MMLU_HUB_DATASET = "cais/mmlu"
# The WikiText file the harness reads when `perplexity.wikitext_path` is null.
DEFAULT_WIKITEXT_FILE = "wiki.test.raw"


@dataclass
class ModelCardConfig:
    """Whether the evaluate stage writes its results into the evaluated models' cards (the `model_card` section)."""

    update: bool = field(
        default=False,
        metadata={"help": "Merge each evaluated local model directory's results into the model-index of its README.md "
                  "(a card is never created)."},
    )


def mmlu_eval_result(accuracy: float, mmlu: Mapping[str, Any]) -> EvalResult:
    """MMLU accuracy as a model-index result (``mmlu``: the report's MMLU settings)."""
    limit = mmlu.get("limit")
    subset = f", {limit} questions per subject" if limit else ""
    return EvalResult(
        task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=MMLU_HUB_DATASET,
        dataset_name=f"MMLU ({mmlu.get('k_shot')}-shot, {mmlu.get('format')} format{subset})",
        dataset_config="all" if not mmlu.get("subjects") else ",".join(mmlu["subjects"]),
        dataset_split=mmlu.get("split"), dataset_args={"num_few_shot": mmlu.get("k_shot")},
        metric_type="accuracy", metric_name="MMLU accuracy", metric_value=float(accuracy),
    )


def report_eval_results(report: Mapping[str, Any], key: str) -> list[EvalResult]:
    """The results of model ``key`` of an evaluate report (``report.json``) as model-index entries."""
    model = report["models"][key]
    wikitext = model.get("wikitext_perplexity") or {}
    wikitext_file = (report.get("perplexity") or {}).get("wikitext_path") or DEFAULT_WIKITEXT_FILE
    results = toxicity_eval_results(
        prompt_set_dataset(report["prompts"]),
        (model.get("toxicity_probability") or {}).get("mean"), (model.get("expected_max_toxicity") or {}).get("mean"),
        held_out_text_dataset(wikitext_file), wikitext.get("perplexity"),
    )
    if (model.get("mmlu") or {}).get("accuracy") is not None:
        results.append(mmlu_eval_result(model["mmlu"]["accuracy"], report["mmlu"]))
    return results


def update_model_cards(report: Mapping[str, Any]) -> list[Path]:
    """Merge each evaluated local model's results into its model card; returns the cards updated.

    Only plainly sampled models count (a contrastive-decoding entry is the model plus an anti-expert, not the
    model), and only local directories that already hold a model card unidetox wrote (a user's own ``README.md`` is
    left as it is). A card whose metadata header is not valid YAML is left as it is, with a warning naming it; the
    other cards are still written.
    """
    updated = []
    for key, model in report["models"].items():
        if (model.get("decoding") or {}).get("method") != "sampling":
            continue
        directory = Path(model["name_or_path"])
        if not directory.is_dir():
            continue
        card = written_model_card(directory) or directory / MODEL_CARD_FILE
        try:
            merged = merge_eval_results(card, report_eval_results(report, key))
        except (yaml.YAMLError, ValueError) as err:
            logger.warning("Could not write the evaluation of %s into %s: its metadata header is not valid YAML "
                           "(%s). Fix the header between the leading `---` lines and rerun to add the results.",
                           key, card, " ".join(str(err).split()))
            continue
        if merged:
            logger.info("Wrote the evaluation of %s into %s", key, card)
            updated.append(card)
        else:
            logger.info("%s holds no %s: no model card to write its evaluation into", directory, MODEL_CARD_FILE)
    return updated
