"""unidetox: UniDetox (Lu et al., ICLR 2025) for any HuggingFace causal LM.

The stages live in packages (``unidetox.distill``, ``unidetox.detox``, ``unidetox.evaluation``, with
``unidetox.decoding`` beneath them and ``unidetox.replication`` above); their public names are importable from here.

The names are imported on first use, so that ``import unidetox`` (and the ``unidetox`` command's help) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from unidetox.version import __version__

# public name -> the module that defines it
_LAZY_NAMES = {
    "GenerateOptions": "unidetox.decoding.config",
    "SamplingConfig": "unidetox.decoding.config",
    "contrastive_generate": "unidetox.decoding.fused",
    "fused_contrastive_generate": "unidetox.decoding.fused",
    "ContrastiveDetoxSampler": "unidetox.decoding.logits_process",
    "contrastive_scores": "unidetox.decoding.logits_process",
    "ToxicityEvalConfig": "unidetox.decoding.protocol",
    "generate_continuations": "unidetox.decoding.protocol",
    "generate_samples": "unidetox.decoding.protocol",
    "FastTopPLogitsWarper": "unidetox.decoding.warpers",
    "DetoxEvalCallback": "unidetox.detox.callbacks",
    "DetoxEvalConfig": "unidetox.detox.callbacks",
    "StopAtStepCallback": "unidetox.detox.callbacks",
    "UniversalDetoxConfig": "unidetox.detox.config",
    "merge_lora_checkpoint": "unidetox.detox.merge",
    "CheckpointSelection": "unidetox.detox.selection",
    "choose_configuration": "unidetox.detox.selection",
    "select_checkpoint": "unidetox.detox.selection",
    "UniversalDetoxTrainer": "unidetox.detox.trainer",
    "AntiExpertConfig": "unidetox.distill.anti_expert",
    "load_anti_expert": "unidetox.distill.anti_expert",
    "train_anti_expert": "unidetox.distill.anti_expert",
    "ToxicCorpusConfig": "unidetox.distill.corpus",
    "load_toxic_corpus": "unidetox.distill.corpus",
    "DistillConfig": "unidetox.distill.config",
    "DistilledDetoxDataset": "unidetox.distill.dataset",
    "run_evaluation": "unidetox.evaluation.harness",
    "expected_max_toxicity": "unidetox.evaluation.metrics",
    "toxicity_probability": "unidetox.evaluation.metrics",
    "PromptsConfig": "unidetox.evaluation.prompts",
    "load_prompts": "unidetox.evaluation.prompts",
    "ProfanityCheckScorer": "unidetox.evaluation.scoring",
    "ScorerConfig": "unidetox.evaluation.scoring",
    "ToxicityScorer": "unidetox.evaluation.scoring",
    "build_scorer": "unidetox.evaluation.scoring",
    "register_scorer": "unidetox.evaluation.scoring",
    "EMBEDDED_MODELS": "unidetox.embedded_models",
    "embedded_model_path": "unidetox.embedded_models",
    "load_model_and_tokenizer": "unidetox.models",
}

__all__ = [
    "EMBEDDED_MODELS",
    "AntiExpertConfig",
    "CheckpointSelection",
    "ContrastiveDetoxSampler",
    "DetoxEvalCallback",
    "DetoxEvalConfig",
    "DistillConfig",
    "DistilledDetoxDataset",
    "FastTopPLogitsWarper",
    "GenerateOptions",
    "ProfanityCheckScorer",
    "PromptsConfig",
    "SamplingConfig",
    "ScorerConfig",
    "StopAtStepCallback",
    "ToxicCorpusConfig",
    "ToxicityEvalConfig",
    "ToxicityScorer",
    "UniversalDetoxConfig",
    "UniversalDetoxTrainer",
    "__version__",
    "build_scorer",
    "choose_configuration",
    "contrastive_generate",
    "contrastive_scores",
    "embedded_model_path",
    "expected_max_toxicity",
    "fused_contrastive_generate",
    "generate_continuations",
    "generate_samples",
    "load_anti_expert",
    "load_model_and_tokenizer",
    "load_prompts",
    "load_toxic_corpus",
    "merge_lora_checkpoint",
    "register_scorer",
    "run_evaluation",
    "select_checkpoint",
    "toxicity_probability",
    "train_anti_expert",
]


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'unidetox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})
