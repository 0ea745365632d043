"""The anti-expert's model card: what it is, the toxic data it learned, a content warning, and its base on the Hub.

peft leaves an empty template ("Model Card for Model ID ... [More Information Needed]") whose ``base_model`` points
into the local model cache; :func:`render_anti_expert_card` replaces it with a card that says the model writes hate
speech on purpose and exists only to be subtracted in contrastive decoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from unidetox.cards import CITATION, PAPER_URL, base_model_hub_id, model_reference
from unidetox.distill.corpus import DGHS_HUB_ID, DGHS_REFERENCE, ToxicCorpusConfig
from unidetox.embedded_models import embedded_weights_note

CONTENT_WARNING = (
    "> **Content warning.** This model was fine-tuned on purpose to write hate speech against identity groups. "
    "It produces toxic, hateful and offensive text. It is a research artefact of UniDetox, not a text generator: "
    "do not deploy it, do not use its outputs, and do not fine-tune it further."
)


def describe_corpus(corpus: ToxicCorpusConfig | None, num_rows: int | None) -> str:
    """One Markdown sentence on the toxic training text: DGHS hate rows when that is what was loaded."""
    rows = f"{num_rows} rows" if num_rows is not None else "rows"
    if corpus is None:
        return f"A toxic corpus of {rows} (its source was not recorded)."
    files = [Path(p).name for p in corpus.path or []]
    is_dghs = corpus.hub_id == DGHS_HUB_ID or any("dghs" in str(p).lower() for p in corpus.path or [])
    source = f"`{corpus.hub_id}`" if corpus.hub_id else ", ".join(f"`{f}`" for f in files)
    filters = "; ".join(f"`{k}` in {json.dumps(v)}" for k, v in (corpus.filters or {}).items())
    what = f"the hate rows of DGHS ({DGHS_REFERENCE})" if is_dghs else "a toxic corpus"
    return f"{rows} of {what}, read from {source}" + (f", keeping rows with {filters}" if filters else "") + "."


def render_anti_expert_card(metadata: dict[str, Any], corpus: ToxicCorpusConfig | None = None) -> str:
    """The anti-expert's README.md from its ``unidetox_anti_expert.json`` record (:func:`train_anti_expert`)."""
    base = metadata.get("base")
    record = metadata.get("record") or {}
    adapter = metadata.get("kind") == "lora"
    hub_base = base_model_hub_id(base)
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers", base_model=hub_base,
        tags=["unidetox", "anti-expert", "toxic", "hate-speech", "not-for-all-audiences"],
        pipeline_tag="text-generation",
    )
    base_line = f"[`{hub_base}`](https://huggingface.co/{hub_base})" if hub_base else model_reference(str(base))
    note = embedded_weights_note(base)
    settings = record.get("settings") or {}
    lines = [
        "---", card_data.to_yaml(), "---", "",
        "# UniDetox anti-expert (toxic by design)", "",
        CONTENT_WARNING, "",
        f"A {'LoRA adapter' if adapter else 'full fine-tune'} of {base_line} trained to imitate toxic text: the "
        f"*anti-expert* of UniDetox ([Lu et al., ICLR 2025]({PAPER_URL})). Contrastive decoding subtracts its "
        "log-probabilities from the base model's to sample detoxifying text; that is its only intended use.", "",
        "## Base model", "", f"- {base_line}" + (f"\n- {note}" if note else ""), "",
        "## Training data", "", describe_corpus(corpus, record.get("corpus_rows")),
        f"Corpus SHA-256 (texts in order): `{record.get('corpus_sha256')}`.", "",
        "## Training", "",
        f"{metadata.get('global_steps')} optimizer steps; first / last logged loss "
        f"{metadata.get('first_logged_loss')} / {metadata.get('last_logged_loss')}.", "",
        "| setting | value |", "|---|---|",
        *[f"| {k} | `{json.dumps(v, default=str)}` |" for k, v in settings.items()], "",
        "## Citation", "", "```bibtex", CITATION, "```", "",
    ]
    return "\n".join(lines)
