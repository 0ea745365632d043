"""The model card (``README.md``) of a detoxified model: base model, distilled data, configuration, results, citation.

The YAML header is built with ``huggingface_hub.ModelCardData``; evaluation results go into its ``model-index``
as ``huggingface_hub.EvalResult`` entries, the form the Hub parses into its evaluation widget and leaderboards.
:func:`merge_eval_results` adds results to a card already on disk (the evaluate stage's test numbers, the
validation numbers of a chosen checkpoint), replacing a result of the same metric on the same data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from unidetox.cards import CARD_MARKER, CITATION, PAPER_URL, base_model_hub_id, model_reference
from unidetox.embedded_models import embedded_weights_note

logger = logging.getLogger(__name__)

def _results_table(results: Sequence[EvalResult]) -> list[str]:
    rows = [f"| {r.dataset_name} | {r.metric_name or r.metric_type} | {r.metric_value:.4g} |" for r in results]
    return ["| data | metric | value |", "|---|---|---|", *rows]


# ----------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------
def render_model_card(
    base_model: str,
    distilled_metadata: dict[str, Any],
    config: dict[str, Any],
    num_target_tokens: int | None = None,
    global_step: int = 0,
    merged: bool = False,
    adapter: bool = False,
    eval_results: Sequence[EvalResult] = (),
) -> str:
    """A model card (README.md) stating the base model, the distilled data's metadata, the configuration and,
    when given, the evaluation results (in the ``model-index`` of the YAML header and as a table)."""
    name = Path(base_model.rstrip("/")).name
    model_name = f"{name}-unidetox"
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=base_model_hub_id(base_model),
        tags=["unidetox", "detoxification", "trl", "sft"],
        model_name=model_name if eval_results else None,
        eval_results=list(eval_results) or None,
    )
    kind = "LoRA adapter" if adapter else ("merged full model" if merged else "model")
    load = (
        "AutoModelForCausalLM.from_pretrained(path)  # with `peft` installed; the base model is read from adapter_config.json"
        if adapter
        else "AutoModelForCausalLM.from_pretrained(path)"
    )
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        CARD_MARKER,
        "",
        f"# {name}, detoxified with UniDetox",
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
        f"- {model_reference(base_model)}",
        *([f"- {embedded_weights_note(base_model)}"] if embedded_weights_note(base_model) else []),
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
    ]
    if eval_results:
        lines += ["## Evaluation", "", "The same results are in the `model-index` of the header.", "",
                  *_results_table(eval_results), ""]
    lines += [
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
