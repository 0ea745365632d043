"""The settings of one contrastive decoding: how each token is drawn, and what one ``generate``-style call asks for.

:class:`SamplingConfig` is the decoding rule (the ``sampler:`` section of ``conf/distill.yaml``);
:class:`GenerateOptions` are the per-call arguments that mirror ``generate()`` (length, EOS/pad, greedy or
sampled, scores returned). :func:`~unidetox.contrastive_generate`, :func:`~unidetox.decoding.fused.generate_resolved`
and :func:`~unidetox.fused_contrastive_generate` take both whole; each is checked once, when it is made.

Example:
    >>> from unidetox.decoding.config import GenerateOptions, SamplingConfig
    >>> SamplingConfig(alpha=0.1).beta is None
    True
    >>> GenerateOptions(max_new_tokens=64, do_sample=False).min_new_tokens
    0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from unidetox.decoding.logits_process import validate_alpha_beta


@dataclass
class SamplingConfig:
    """How each token is drawn (the paper: alpha 0.1, pure log-ratio, no top-k/top-p, temperature 1)."""

    alpha: float = field(default=0.1, metadata={"help": "Adaptive plausibility threshold in (0, 1]."})
    beta: float | None = field(
        default=None, metadata={"help": "None (paper): log p_base - log p_anti; a float: (1+beta) log p_base - beta log p_anti."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Temperature applied to the contrastive scores."})
    top_k: int = field(default=0, metadata={"help": "Top-k after contrast (0: none, the paper)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus threshold after contrast (1.0: none, the paper)."})
    stop_at_eos: bool = field(default=True, metadata={"help": "End a sample at the tokenizer's EOS token."})

    def __post_init__(self):
        validate_alpha_beta(self.alpha, self.beta)
        if not self.temperature > 0:
            raise ValueError(f"`temperature` has to be > 0, but is {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"`top_k` has to be >= 0 (0 disables it), but is {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` has to be in (0, 1] (1 disables it), but is {self.top_p}.")


@dataclass
class GenerateOptions:
    """The ``generate()`` arguments of one decoding call besides the sampling rule.

    ``eos_token_id``/``pad_token_id`` left as ``None`` come from the model's generation config, as in
    ``generate()``; an empty list of EOS ids never stops a row. ``do_sample=False`` takes the highest contrastive
    score at each step (the temperature, top-k and top-p of the :class:`SamplingConfig` are then not applied).
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = True
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    output_scores: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` has to be >= 1, but is {self.max_new_tokens}.")
        if self.min_new_tokens < 0:
            raise ValueError(f"`min_new_tokens` has to be >= 0, but is {self.min_new_tokens}.")
