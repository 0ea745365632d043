"""The replication's configuration: one dataclass per section of ``unidetox/conf/replicate.yaml``, gathered in
:class:`ReplicateArguments` (:func:`unidetox.replication.pipeline.parse_args` composes and parses them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from unidetox.detox.callbacks import DetoxEvalConfig
from unidetox.detox.selection import SelectionRule
from unidetox.distill.corpus import ToxicCorpusConfig
from unidetox.replication.launcher import LauncherArguments


@dataclass
class TargetArguments:
    """A model and the stage overrides that select it: a target the chosen configuration is applied to (an entry
    of `targets`, detox overrides) or a distillation source (an entry of `distill.sources`, distill overrides)."""

    model: str = field(metadata={"help": "The base model: hub id, path or embedded name (the test's base row)."})
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "Stage overrides that select this model, e.g. experiment=X."}
    )


@dataclass
class DistillAlphaArguments:
    """The alphas of the distill stage's runs and the overrides every run shares."""

    alphas: list[float] = field(
        default_factory=lambda: [0.1, 0.2],
        metadata={"help": "Sampler alphas; a source's first run trains its anti-expert, the others reuse it."},
    )
    overrides: list[str] = field(default_factory=list, metadata={"help": "distill overrides of every run."})

    def __post_init__(self):
        if not self.alphas or len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"`distill.alphas` has to be a non-empty list of distinct values, but is {self.alphas}.")
        bad = [a for a in self.alphas if not 0.0 < float(a) <= 1.0]
        if bad:
            raise ValueError(f"`distill.alphas` have to be in (0, 1]; got {bad}.")


@dataclass
class DistillSweepArguments(DistillAlphaArguments):
    """The distill stage's runs: one per source model and alpha."""

    sources: dict[str, TargetArguments] = field(
        default_factory=dict,
        metadata={"help": "name -> {model, overrides}: the models the text is distilled from, each contrasted with "
                  "its own anti-expert (trained on the same toxic rows). The source is a dimension of the grid."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.sources:
            raise ValueError("`distill.sources` is empty; name at least one source model, e.g. "
                             "distill.sources={smollm2:{model:smollm2-135m,overrides:[experiment=embedded_smollm2]}}.")
        bad_names = [n for n in self.sources if not n or "/" in n or "-" in n]
        if bad_names:
            raise ValueError(f"`distill.sources` names {bad_names} are used in directory names and may not be empty "
                             "or hold '/' or '-'; rename them (e.g. smollm2, gemma3).")


@dataclass
class ValidationSplitArguments:
    """Which validation prompts are used, and how the prompt set is split (the test uses the same split)."""

    num_prompts: int | None = field(default=50, metadata={"help": "Validation prompts (null: the whole split)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the validation/test split (same for both sides)."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Share of prompts in the validation split."})
    evaluate_overrides: list[str] = field(
        default_factory=list, metadata={"help": "Extra evaluate overrides of the lambda sweep (e.g. the prompt source)."}
    )

    def __post_init__(self):
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"`validation.validation_fraction` has to be in (0, 1), but is {self.validation_fraction}.")


@dataclass
class ValidationMeasurementArguments(ValidationSplitArguments):
    """The validation measurement of the grid (detox stage) and of the task-vector lambda sweep (evaluate stage)."""

    protocol: DetoxEvalConfig = field(
        default_factory=DetoxEvalConfig, metadata={"help": "The sampling protocol, its seed and perplexity windows."}
    )
    protocol_fields: list[str] = field(
        default_factory=list,
        metadata={"help": "The protocol fields the replication's config sets and hands to the stages (the others "
                  "are the stages' own defaults, checked to agree with the protocol's)."},
    )


CHOOSE_ON = ("grid_target", "every_target")  # whose validation the configuration is chosen on


@dataclass
class GridArguments:
    """The grid the single configuration is chosen on (the grid target only): alpha x learning rate x steps."""

    target: str = field(default="smollm2", metadata={"help": "Key of `targets`: the model the grid is run on."})
    learning_rates: list[float] = field(default_factory=lambda: [5e-4, 2e-4], metadata={"help": "Learning rates."})
    max_steps: int = field(default=200, metadata={"help": "Steps of every grid run (the steps axis: its saves)."})
    save_steps: int = field(default=50, metadata={"help": "A checkpoint + validation evaluation every N steps."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "Extra detox overrides of the grid runs."})
    transfer_targets: list[str] = field(
        default_factory=list,
        metadata={"help": "Keys of `targets` on which every grid run is also trained and validated, so the report "
                  "draws each grid point's validation on them beside the grid target's (the transfer curve). The "
                  "paper's rule does not read them unless choose_on=every_target."},
    )
    choose_on: str = field(
        default="grid_target",
        metadata={"help": f"Which validation the choice reads: {CHOOSE_ON[0]!r}, the paper's rule on the grid "
                  f"target (chosen on one model, then transferred), or {CHOOSE_ON[1]!r}, a declared variant: every "
                  "grid and transfer target within its perplexity bound, the smallest worst relative change of "
                  "the metric (chosen on all of them)."},
    )

    def __post_init__(self):
        if self.choose_on not in CHOOSE_ON:
            raise ValueError(f"`grid.choose_on` has to be one of {CHOOSE_ON}, but is {self.choose_on!r}.")
        if self.choose_on == CHOOSE_ON[1] and not self.transfer_targets:
            raise ValueError("`grid.choose_on=every_target` reads the transfer targets' validation, but "
                             "`grid.transfer_targets` is empty; name them (e.g. grid.transfer_targets=[gemma3]).")
        if self.target in self.transfer_targets or len(set(self.transfer_targets)) < len(self.transfer_targets):
            raise ValueError(f"`grid.transfer_targets` {self.transfer_targets} has to list other targets than "
                             f"`grid.target` ({self.target!r}), each once.")
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"`grid.learning_rates` has to be a non-empty list of positive values: {self.learning_rates}.")
        if not 1 <= self.save_steps <= self.max_steps:
            raise ValueError(
                f"`grid.save_steps` ({self.save_steps}) has to be in [1, grid.max_steps={self.max_steps}]: every save "
                "is a point of the grid's steps axis."
            )


@dataclass
class BaselineArguments:
    """Which baselines run, and their settings."""

    control: bool = field(default=True, metadata={"help": "Fine-tune on plain base samples (the control)."})
    nothate: bool = field(default=True, metadata={"help": "Fine-tune on DGHS nothate rows."})
    authors: bool = field(default=True, metadata={"help": "Fine-tune on the authors' released distilled text."})
    authors_path: str | None = field(default=None, metadata={"help": "The authors' CSV."})
    authors_max_samples: int | None = field(default=None, metadata={"help": "Use only the first N texts (null: all)."})
    decoding: bool = field(default=True, metadata={"help": "Inference-time contrastive decoding (grid target)."})
    decoding_alpha: float = field(default=0.1, metadata={"help": "Alpha of inference-time decoding."})
    taskvec: bool = field(default=True, metadata={"help": "Task-vector negation of the anti-expert (grid target)."})
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0], metadata={"help": "Lambdas to validate."})

    def __post_init__(self):
        if self.authors and not self.authors_path:
            raise ValueError("`baselines.authors_path` is empty; set it to the authors' CSV or baselines.authors=false.")
        if self.taskvec and (not self.lambdas or any(lam <= 0 for lam in self.lambdas)):
            raise ValueError(f"`baselines.lambdas` has to list positive values, but is {self.lambdas}.")


@dataclass
class TestArguments:
    """The test evaluation (the evaluate stage on the TEST split)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Sampling seeds (>= 2)."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "evaluate overrides (sizes)."})
    interval_resamples: int = field(
        default=10_000, metadata={"help": "Bootstrap resamples of the paired intervals over test prompts."}
    )

    def __post_init__(self):
        # Two seeds give a spread over seeds; the claims rest on the paired intervals over prompts.
        if len(set(self.seeds)) < 2:
            raise ValueError(f"`test.seeds` needs at least 2 distinct seeds (mean ± std), but is {self.seeds}.")


@dataclass
class SuccessBar:
    """What counts as success, judged from the test numbers: every target's relative drops and perplexity cost."""

    min_toxicity_drop: float = field(default=0.3, metadata={"help": "Required relative TP and EMT drop."})
    max_ppl_increase: float = field(default=0.1, metadata={"help": "Allowed relative WikiText perplexity rise."})


@dataclass
class ReplicateArguments:
    """Everything the replication needs (the sections of ``conf/replicate.yaml``)."""

    output_dir: str
    data_dir: str
    targets: dict[str, TargetArguments]
    distill: DistillSweepArguments
    validation: ValidationMeasurementArguments
    grid: GridArguments
    select: SelectionRule  # the paper's rule, for the grid and the lambda sweep
    baselines: BaselineArguments
    nothate_data: ToxicCorpusConfig
    test: TestArguments
    bar: SuccessBar
    detox_overrides: list[str] = field(default_factory=list)
    apply_overrides: list[str] = field(default_factory=list)
    launcher: LauncherArguments = field(
        default_factory=LauncherArguments, metadata={"help": "Where the stages run: here, or as submitit jobs."}
    )
    overrides: list[str] = field(default_factory=list, metadata={"help": "The overrides it was parsed from."})
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def grid_target(self) -> TargetArguments:
        return self.targets[self.grid.target]

    @property
    def grid_targets(self) -> list[str]:
        """Every target the grid trains and validates: the grid target first, then the transfer targets."""
        return [self.grid.target, *self.grid.transfer_targets]

    @property
    def anti_expert_source(self) -> str | None:
        """The source whose anti-expert the grid-target baselines use (inference-time decoding and task vectors
        need an anti-expert of the grid target's own model and vocabulary): the source of that model."""
        return next((name for name, s in self.distill.sources.items() if s.model == self.grid_target.model), None)

