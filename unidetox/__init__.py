"""unidetox: UniDetox (Lu et al., ICLR 2025) for any HuggingFace causal LM."""

from unidetox.decoding.fused import contrastive_generate  # noqa: E402
from unidetox.decoding.sampler import ContrastiveDetoxSampler, contrastive_scores  # noqa: E402
from unidetox.decoding.sampling import generate_continuations  # noqa: E402
from unidetox.detox.config import UniversalDetoxConfig  # noqa: E402
from unidetox.detox.trainer import UniversalDetoxTrainer  # noqa: E402
from unidetox.distill.dataset import DistilledDetoxDataset  # noqa: E402
from unidetox.evaluation.prompts import load_prompts  # noqa: E402
from unidetox.evaluation.scoring import ProfanityCheckScorer, ToxicityScorer, build_scorer  # noqa: E402
from unidetox.models import EMBEDDED_MODELS, embedded_model_path, load_model_and_tokenizer  # noqa: E402
from unidetox.version import __version__  # noqa: F401

__all__ = [
    "EMBEDDED_MODELS",
    "ContrastiveDetoxSampler",
    "DistilledDetoxDataset",
    "ProfanityCheckScorer",
    "ToxicityScorer",
    "UniversalDetoxConfig",
    "UniversalDetoxTrainer",
    "build_scorer",
    "contrastive_generate",
    "contrastive_scores",
    "embedded_model_path",
    "generate_continuations",
    "load_model_and_tokenizer",
    "load_prompts",
]
