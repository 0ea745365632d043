"""unidetox: UniDetox (Lu et al., ICLR 2025) for any HuggingFace causal LM.

The stages live in packages (``unidetox.distill``, ``unidetox.detox``, ``unidetox.evaluation``, with
``unidetox.decoding`` beneath them and ``unidetox.replication`` above); their public names are importable from here.
"""

from unidetox.decoding.fused import contrastive_generate, fused_contrastive_generate
from unidetox.decoding.sampler import ContrastiveDetoxSampler, contrastive_scores
from unidetox.decoding.sampling import ToxicityEvalConfig, generate_continuations, generate_samples
from unidetox.decoding.warpers import FastTopPLogitsWarper
from unidetox.detox.callbacks import DetoxEvalCallback, DetoxEvalConfig, StopAtStepCallback
from unidetox.detox.config import UniversalDetoxConfig
from unidetox.detox.merge import merge_lora_checkpoint
from unidetox.detox.selection import CheckpointSelection, choose_configuration, select_checkpoint
from unidetox.detox.trainer import UniversalDetoxTrainer
from unidetox.distill.anti_expert import AntiExpertConfig, load_anti_expert, train_anti_expert
from unidetox.distill.corpus import ToxicCorpusConfig, load_toxic_corpus
from unidetox.distill.dataset import DistillConfig, DistilledDetoxDataset, SamplingConfig
from unidetox.evaluation.harness import run_evaluation
from unidetox.evaluation.metrics import expected_max_toxicity, toxicity_probability
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.evaluation.scoring import (
    ProfanityCheckScorer,
    ScorerConfig,
    ToxicityScorer,
    build_scorer,
    register_scorer,
)
from unidetox.models import EMBEDDED_MODELS, embedded_model_path, load_model_and_tokenizer
from unidetox.version import __version__

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
