"""The model card (``README.md``) of a detoxified model: base model, distilled data, configuration, citation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from unidetox.models import is_embedded_name

PAPER_URL = "https://huggingface.co/papers/2504.20500"
CITATION = """@inproceedings{lu2025unidetox,
  title     = {UniDetox: Universal Detoxification of Large Language Models via Dataset Distillation},
  author    = {Huimin Lu and Masaru Isonuma and Junichiro Mori and Ichiro Sakata},
  booktitle = {The Thirteenth International Conference on Learning Representations},
  year      = {2025},
  url       = {https://openreview.net/forum?id=eLLBILFRsA}
}"""


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
