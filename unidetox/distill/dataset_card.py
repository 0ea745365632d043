"""The dataset card (``README.md``) of distilled detoxifying text published on the Hub.

:func:`render_dataset_card` turns a :class:`~unidetox.distill.dataset.DistilledDetoxDataset`'s metadata and
toxicity summary into a card: a YAML header built with ``huggingface_hub.DatasetCardData`` (what the Hub parses:
license, tags, task and size categories, the source model when it is on the Hub) and a body stating the source
model, the anti-expert and how it was trained, the sampler settings, the fingerprint that identifies the build,
its size, the toxicity summary, a license and content warning, and the citation.

Example:
    >>> from unidetox.distill.dataset_card import render_dataset_card
    >>> card = render_dataset_card({"base": "HuggingFaceTB/SmolLM2-135M", "alpha": 0.1, "num_samples": 640}, None)
    >>> "base_model: HuggingFaceTB/SmolLM2-135M" in card
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCardData

from unidetox.cards import CITATION, PAPER_URL, WEIGHT_DIGEST_SUFFIX, hub_model_id, model_reference
from unidetox.distill.anti_expert import read_marker
from unidetox.distill.corpus import DGHS_REFERENCE
from unidetox.distill.summary import summary_markdown
from unidetox.fingerprints import settings_digest
from unidetox.secret_masking import mask_secrets

TAGS = ["unidetox", "detoxification", "synthetic"]
# The Hub's size categories: (exclusive upper bound on the number of rows, category).
SIZE_CATEGORIES = (
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
)
ANTI_EXPERT_KINDS = {"lora": "LoRA", "full": "full"}
# Sampler settings of a build, in the order the card lists them.
SAMPLER_KEYS = ("alpha", "beta", "temperature", "top_k", "top_p", "stop_at_eos", "eos_token_ids", "start_token",
                "start_token_id", "max_length", "seed", "batch_size", "num_processes", "decoding")


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` value for ``num_rows`` rows (``n<1K``, ``1K<n<10K``, ...)."""
    return next((name for bound, name in SIZE_CATEGORIES if num_rows < bound), "n>1B")


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``"path@0123456789ab"`` (a model named by the digest of its weights) -> ``("path", "0123456789ab")``."""
    match = WEIGHT_DIGEST_SUFFIX.search(model_id)
    return (model_id[: match.start()], match.group()[1:]) if match else (model_id, None)


def anti_expert_training_record(anti_expert_id: str | None) -> dict[str, Any] | None:
    """How the anti-expert named ``anti_expert_id`` was trained (its ``unidetox_anti_expert.json``), when it is a
    local directory that holds that record; None otherwise (a hub id, a model given in memory, a moved folder)."""
    if not anti_expert_id:
        return None
    path, _ = split_model_id(anti_expert_id)
    return read_marker(path) if os.path.isdir(path) else None


def _value(value: Any) -> str:
    """A table cell: the value as code, its pipes escaped (GFM splits cells on ``|`` even inside a code span)."""
    text = json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)
    return "`" + text.replace("|", "\\|") + "`"


def _table(rows: Mapping[str, Any]) -> list[str]:
    return ["| setting | value |", "|---|---|", *[f"| {k} | {_value(v)} |" for k, v in rows.items()]]


def _anti_expert_section(anti_expert_id: str | None, record: Mapping[str, Any] | None,
                         has_build_metadata: bool) -> list[str]:
    if not has_build_metadata:
        return ["Not recorded: these texts were read from a file, not built by `DistilledDetoxDataset.build`.", ""]
    if anti_expert_id is None:
        return ["None: the texts are plain samples of the source model with the same settings (the control "
                "corpus, no contrast).", ""]
    path, digest = split_model_id(anti_expert_id)
    lines = [f"- {model_reference(path)}" + (f", weights digest `{digest}`" if digest else ""), ""]
    if record is None:
        return lines + ["Its training record (`unidetox_anti_expert.json`) was not found next to it.", ""]
    training = record.get("record") or {}
    loss = record.get("train_loss")
    lines += [
        f"A {ANTI_EXPERT_KINDS.get(record.get('kind'), record.get('kind'))} fine-tune of `{record.get('base')}` on "
        f"{training.get('corpus_rows')} toxic texts (corpus SHA-256 `{str(training.get('corpus_sha256'))[:16]}`), "
        f"{record.get('global_steps')} optimizer steps, training loss "
        f"{f'{loss:.4g}' if isinstance(loss, (int, float)) else loss}. Training settings:",
        "",
        *_table(training.get("settings") or {}),
        "",
    ]
    return lines


def _introduction(card_data: DatasetCardData, repo_id: str | None) -> list[str]:
    """The card's title, content warning, what the text is, and how to load it."""
    lines = [
        f"# {card_data.pretty_name}", "",
        "> **Content warning.** The anti-expert that shaped this text was trained on hateful text, and the distilled "
        "text itself may still contain offensive, toxic or biased content: it is meant to be less toxic than the "
        "source model's own samples (see Toxicity below), not free of toxicity. Use it to fine-tune models, not as "
        "clean text.",
        "",
        f"Detoxifying text distilled with UniDetox ([Lu et al., ICLR 2025]({PAPER_URL})): sampled from the source "
        "model by contrastive decoding against a toxic anti-expert (`log p_base - log p_anti` on the base's "
        "plausible tokens). Fine-tuning a model on it with `unidetox.UniversalDetoxTrainer` is meant to lower that "
        "model's toxicity; the paper reports that one such text detoxifies models of other sizes and families.",
        "",
    ]
    if repo_id:
        lines += ["```python", "from datasets import load_dataset", f'texts = load_dataset("{repo_id}", split="train")',
                  "```", ""]
    return lines


def _sampler_and_size(metadata: Mapping[str, Any], num_texts: int | None) -> list[str]:
    """The sampler settings of a build (when recorded) and the size of the text."""
    lines = []
    sampling = metadata.get("sampling") or {}
    sampler = {k: metadata[k] if k in metadata else sampling[k] for k in SAMPLER_KEYS if k in metadata or k in sampling}
    if sampler:
        lines += ["## Sampler settings", "",
                  "`beta: null` is the paper's pure log-ratio; `top_k: 0` and `top_p: 1.0` mean no truncation.", "",
                  *_table(sampler), ""]
    lines += ["## Size", "", f"- texts: {num_texts}"]
    if metadata.get("total_tokens") is not None:
        lines.append(f"- tokens (source model's tokenizer): {metadata['total_tokens']} "
                     f"({metadata.get('mean_tokens', 0):.1f} per text)")
    if metadata.get("num_empty_texts"):
        lines.append(f"- empty texts (EOS sampled first): {metadata['num_empty_texts']}")
    return lines + [""]


def _fingerprint_and_toxicity(fingerprint: Mapping[str, Any] | None, summary: Mapping[str, Any] | None) -> list[str]:
    """The build's fingerprint (when it was built here) and its toxicity summary."""
    lines = []
    if fingerprint is not None:
        lines += ["## Fingerprint", "",
                  f"Build fingerprint `{settings_digest(fingerprint)}` (SHA-256 of the settings below). Models "
                  "are named by what decides the texts: a saved folder as `path@<digest of its weight files>`, a "
                  "Hub id by its name.", "", *_table(fingerprint), ""]
    lines += ["## Toxicity", ""]
    if summary:
        return lines + [
            "The distilled text scored next to plain samples of the source model (and of the anti-expert), drawn "
            "from the same start token with the same settings; the interval is a 95% bootstrap interval of the "
            "difference of the mean toxicity.", "", summary_markdown(summary), "",
        ]
    return lines + ["No toxicity summary was recorded for these texts.", ""]


LICENSE_AND_CITATION = [
    "## License", "",
    "No license is granted by this card (`license: other`): the texts are generated by the source model, whose "
    "license terms apply to them, and the publisher has to state the terms they release them under. The "
    f"anti-expert of the UniDetox recipe is trained on the hate rows of DGHS ({DGHS_REFERENCE}); its original "
    "repository states no license, the copy used here is redistributed in MarcoDetoxification under MIT. "
    "Cite Vidgen et al. (2021) when you use text derived from it.", "",
    "## Citation", "", "```bibtex", CITATION, "```", "",
]


def render_dataset_card(
    metadata: Mapping[str, Any],
    summary: Mapping[str, Any] | None,
    *,
    num_texts: int | None = None,
    anti_expert_record: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """The dataset card (README.md) of distilled detoxifying text.

    Args:
        metadata: the dataset's ``metadata`` (a build's ``metadata.json``, or the ``source_file`` of a loaded file).
        summary: its toxicity summary (``metadata["summary"]``), or None when none was made.
        num_texts: the number of texts (default: ``metadata["num_samples"]``).
        anti_expert_record: the anti-expert's training record (:func:`anti_expert_training_record`).
        repo_id: the Hub repository the card goes to (for the loading example).
    """
    metadata = mask_secrets(dict(metadata))
    anti_expert_record = mask_secrets(dict(anti_expert_record)) if anti_expert_record else None
    num_texts = num_texts if num_texts is not None else metadata.get("num_samples")
    base = metadata.get("base")
    fingerprint = metadata.get("fingerprint")
    card_data = DatasetCardData(
        license="other",
        tags=TAGS,
        task_categories=["text-generation"],
        size_categories=[size_category(num_texts)] if num_texts is not None else None,
        pretty_name=f"UniDetox distilled text ({Path(str(base)).name})" if base else "UniDetox distilled text",
        base_model=hub_model_id(base),
    )
    lines = ["---", card_data.to_yaml(), "---", "", *_introduction(card_data, repo_id), "## Source model", ""]
    if base:
        lines += [f"- {model_reference(str(base))}", ""]
    else:
        lines += [f"Not recorded (read from `{Path(str(metadata.get('source_file', 'a file'))).name}`).", ""]
    lines += ["## Anti-expert", "", *_anti_expert_section(metadata.get("anti_expert"), anti_expert_record,
                                                           fingerprint is not None)]
    lines += [*_sampler_and_size(metadata, num_texts), *_fingerprint_and_toxicity(fingerprint, summary),
              *LICENSE_AND_CITATION]
    return "\n".join(lines)
