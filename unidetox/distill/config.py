"""The settings of a distillation: how much text, from which start token, how it is batched, and the summary's size.

How each token is drawn is :class:`~unidetox.decoding.config.SamplingConfig` (the decoding rule, shared with
:func:`~unidetox.contrastive_generate`); together they are what :meth:`~unidetox.DistilledDetoxDataset.build` takes.

Example:
    >>> from unidetox.distill.config import DistillConfig
    >>> DistillConfig(num_samples=64, max_length=128).batch_size
    32
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unidetox.checks import require_counts


@dataclass
class DistillConfig:
    """How much text to distill, from which start token, and how big the summary's comparison is."""

    num_samples: int = field(default=640, metadata={"help": "Number of distilled texts (paper: 640)."})
    max_length: int = field(
        default=256, metadata={"help": "Tokens sampled per text after the start token (paper: 256)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Texts sampled together in one generate() call."})
    start_token: str | None = field(
        default=None,
        metadata={"help": "Token every text starts from (None: the tokenizer's bos_token, as the paper does)."},
    )
    summary_num_samples: int = field(
        default=64,
        metadata={"help": "Plain samples of the base (and of the anti-expert) scored next to the distilled text; 0 skips."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Rebuild even if the output directory holds a build with other settings."}
    )
    fused: bool | None = field(
        default=None,
        metadata={"help": "LoRA anti-expert: None/true run base and adapter in one doubled forward per token, false "
                  "as two separate models (same tokens either way)."},
    )

    def __post_init__(self):
        require_counts(self, ("num_samples", "max_length", "batch_size"))
        if self.summary_num_samples < 0:
            raise ValueError(f"`summary_num_samples` has to be >= 0, but is {self.summary_num_samples}.")
        if self.start_token == "":
            raise ValueError("`start_token` is an empty string; use None for the tokenizer's bos_token.")
