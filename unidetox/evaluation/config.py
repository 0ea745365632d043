"""The settings of the evaluate stage: one dataclass per section of ``conf/evaluate.yaml`` and
:class:`EvaluateArguments`, which holds them all and is what :func:`unidetox.evaluation.harness.run_evaluation` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unidetox.decoding.logits_process import validate_alpha_beta
from unidetox.decoding.protocol import ToxicityEvalConfig
from unidetox.evaluation.capabilities import CapabilitiesConfig
from unidetox.evaluation.mmlu import MMLUConfig
from unidetox.evaluation.model_card import ModelCardConfig
from unidetox.evaluation.prompts import PromptsConfig
from unidetox.evaluation.scoring import ScorerConfig


@dataclass
class PerplexityConfig:
    """Fluency measurements: conditional perplexity under a reference LM and WikiText-2 perplexity."""

    reference_model: str | None = field(
        default="gemma3-270m",
        metadata={"help": "Reference LM for the conditional perplexity of continuations (paper: "
                  "meta-llama/Llama-2-7b-hf); hub id, path or embedded name. null disables it."},
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass for conditional perplexity."})
    max_perplexity: float = field(default=1e4, metadata={"help": "Samples at or above this are dropped (authors)."})
    wikitext: bool = field(default=True, metadata={"help": "Measure each model's WikiText-2 test perplexity."})
    wikitext_path: str | None = field(
        default=None, metadata={"help": "wiki.test.raw (default: data_dir/wikitext2/wiki.test.raw)."}
    )
    max_length: int = field(default=1024, metadata={"help": "WikiText sliding window length (capped by the model)."})
    stride: int = field(default=512, metadata={"help": "WikiText sliding window stride."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Score only the first N WikiText tokens (quick CPU runs); None = all."}
    )
    wikitext_batch_size: int = field(default=2, metadata={"help": "Windows per forward pass."})

    def __post_init__(self):
        if self.reference_model in ("", "none", "None"):
            self.reference_model = None
        if self.batch_size < 1 or self.wikitext_batch_size < 1:
            raise ValueError(f"Batch sizes have to be >= 1, got {self.batch_size} and {self.wikitext_batch_size}.")
        if not 1 <= self.stride <= self.max_length:
            raise ValueError(f"`stride` has to be in [1, max_length={self.max_length}], but is {self.stride}.")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"`max_tokens` has to be None or >= 2, but is {self.max_tokens}.")
        if not self.max_perplexity > 1:
            raise ValueError(f"`max_perplexity` has to be > 1, but is {self.max_perplexity}.")


@dataclass
class DecodingConfig:
    """Optional inference-time UniDetox: sample with a ``ContrastiveDetoxSampler`` against an anti-expert."""

    anti_expert: str | None = field(
        default=None, metadata={"help": "Toxic model sharing the evaluated models' vocabulary; enables the method."}
    )
    alpha: float = field(default=0.1, metadata={"help": "Adaptive plausibility threshold (paper: 0.1)."})
    beta: float | None = field(default=None, metadata={"help": "None: log p_base - log p_anti (paper)."})
    also_plain: bool = field(default=True, metadata={"help": "Also evaluate each model with plain sampling."})

    def __post_init__(self):
        if self.anti_expert in ("", "none", "None"):
            self.anti_expert = None
        validate_alpha_beta(self.alpha, self.beta)


@dataclass
class EvaluateArguments:
    """Everything the evaluate stage needs (the sections of ``conf/evaluate.yaml``).

    ``parts_dir`` is where finished parts are cached (default ``output_dir/parts``; runs that share it reuse each
    other's parts); ``config`` is the composed config, recorded in the report with its secrets masked.
    """

    models: list[str]
    seeds: list[int]
    output_dir: str
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: ToxicityEvalConfig = field(default_factory=ToxicityEvalConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    # Every stored continuation is also scored by these, and the report gives TP/EMT under each next to `scorer`'s.
    also_scorers: list[ScorerConfig] = field(default_factory=lambda: [ScorerConfig(name="jigsaw_bilstm")])
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    mmlu: MMLUConfig = field(default_factory=MMLUConfig)
    capabilities: CapabilitiesConfig = field(default_factory=CapabilitiesConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    model_card: ModelCardConfig = field(default_factory=ModelCardConfig)
    data_dir: str | None = None
    dtype: str | None = None
    progress: bool = True
    parts_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
