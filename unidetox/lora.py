"""LoRA settings, one type for both fine-tunings UniDetox runs: the toxic anti-expert's and the detox stage's.

:class:`LoraArguments` spells the settings as ``peft.LoraConfig`` does (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ...), with a ``use_peft`` switch; :meth:`LoraArguments.peft_config` checks them once and makes
the ``LoraConfig`` of a causal LM, or None for full fine-tuning. The detox stage's ``peft:`` section is parsed into
one. The anti-expert keeps its flat fields in trl's ``ModelConfig`` spelling (``use_peft``, ``lora_r``,
``lora_alpha``, ``lora_dropout``, ``lora_target_modules``: the keys of its YAML and of its fingerprint) and turns
them into one (:meth:`unidetox.distill.anti_expert.AntiExpertConfig.lora_settings`).

Example:
    >>> settings = LoraArguments(use_peft=True, r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    >>> config = settings.peft_config()
    >>> config.r, config.lora_alpha, config.target_modules, config.task_type
    (16, 32, 'all-linear', 'CAUSAL_LM')
    >>> LoraArguments(use_peft=False).peft_config() is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig

TASK_TYPE = "CAUSAL_LM"  # every model UniDetox fine-tunes is a causal LM


@dataclass
class LoraArguments:
    """Whether to train a LoRA adapter instead of every weight, and the ``peft.LoraConfig`` fields it is trained with.

    Unset fields take ``peft.LoraConfig``'s own defaults, so a section names only what it changes.
    """

    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter instead of every weight (false: full fine-tuning)."}
    )
    r: int = field(default=LoraConfig.r, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=LoraConfig.lora_alpha, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."}
    )
    lora_dropout: float = field(default=LoraConfig.lora_dropout, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | str | None = field(
        default=LoraConfig.target_modules,
        metadata={"help": "Modules to adapt: a list of names, a regex, 'all-linear' (every linear layer but the "
                  "output head), or null (peft's choice for the architecture)."},
    )
    modules_to_save: list[str] | None = field(
        default=LoraConfig.modules_to_save,
        metadata={"help": "Modules trained in full and saved next to the adapter (null: none)."},
    )
    use_rslora: bool = field(
        default=LoraConfig.use_rslora, metadata={"help": "Rank-stabilized LoRA: scale the update by alpha / sqrt(r)."}
    )
    use_dora: bool = field(
        default=LoraConfig.use_dora, metadata={"help": "Weight-decomposed LoRA (DoRA): magnitude and direction."}
    )

    def __post_init__(self):
        if not self.use_peft:
            return
        if self.r < 1:
            raise ValueError(f"The LoRA rank `r` (the anti-expert's `lora_r`) has to be >= 1, but is {self.r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` has to be > 0, but is {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` has to be in [0, 1), but is {self.lora_dropout}.")

    def peft_config(self) -> LoraConfig | None:
        """The ``peft.LoraConfig`` of a causal LM with these settings, or None when ``use_peft`` is off."""
        if not self.use_peft:
            return None
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            task_type=TASK_TYPE,
        )
