"""The replication as one call: from the base models to the paper's table with baselines.

:func:`parse_args` turns Hydra overrides of ``unidetox/conf/replicate.yaml`` into :class:`ReplicateArguments`;
:func:`run` runs every stage through the stage pipelines (:mod:`unidetox.distill.pipeline`,
:mod:`unidetox.detox.pipeline`, :mod:`unidetox.evaluation.pipeline`) and the baselines
(:mod:`unidetox.replication.baselines`), each composed once from overrides of that stage's own config, and reads
what each stage returned. A stage whose output is complete, made with the same settings, is skipped, so a rerun only
does what is missing. Layout under ``output_dir``:

    distill-{s}-a{A}/        the distill stage per source model and alpha (each source's first alpha trains
                             its own anti-expert on the same toxic rows, its other alphas reuse it)
    grid/{t}-{s}-a{A}-lr{LR}/  the detox stage on the grid target, validation at step 0 and every save
    selection.json           the paper's rule over every (grid run, checkpoint): chosen (source, alpha, lr, steps)
    chosen_recipe.yaml       that choice as a detox recipe for any model (unidetox detox recipe=PATH model=ANY)
    data/{control,nothate}/  baseline texts (plain base samples; DGHS nothate rows), as many as the distilled text
    apply/{t}-{method}/      the chosen configuration, unchanged, on every target (the grid target's UniDetox model
                             is the chosen grid checkpoint, merged; other targets train under the grid's schedule and
                             stop at the chosen step)
    taskvec/lam{L}/          base - L x anti-expert delta; taskvec/validation + taskvec/selection.json pick L
    test/models/{t}-{m}/     the evaluate stage on the TEST split, one model each, its parts cached in test/parts/
    test/                    the same over every method x target: reuses test/parts/, writes the joint report
    test/decoding/           inference-time contrastive decoding with the anti-expert (grid target only)
    report.json, report.md, toxicity_vs_perplexity.png, replicate_log.jsonl (one line per stage and run)

With ``launcher.engine=submitit`` the stages that are not finished run as submitit jobs, locally or on SLURM
(:mod:`unidetox.replication.stages`, :mod:`unidetox.replication.launcher`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from unidetox.detox import pipeline as detox_stage
from unidetox.detox.callbacks import DetoxEvalConfig
from unidetox.detox.merge import merged_model_path
from unidetox.detox.selection import SelectionRule, choose_configuration
from unidetox.distill import pipeline as distill_stage
from unidetox.distill.corpus import ToxicCorpusConfig
from unidetox.distill.dataset import DistilledDetoxDataset
from unidetox.evaluation import pipeline as evaluate_stage
from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.files import atomic_write_json, atomic_write_text, read_json
from unidetox.hydra_config import compose_config, parse_dataclass, save_resolved_config, to_container
from unidetox.logging_setup import configure_logging
from unidetox.models import load_model_and_tokenizer
from unidetox.processes import is_main_process, process_state, wait_for_everyone
from unidetox.replication.baselines import (
    TASK_VECTOR_MARKER,
    build_plain_sample_dataset,
    build_text_dataset,
    negate_task_vector,
    plain_sample_settings,
)
from unidetox.replication.launcher import LauncherArguments
from unidetox.replication.report import (
    assemble_report,
    example_continuations,
    format_number,
    grid_records,
    read_plain_samples,
    source_study,
    stage_times,
    write_replication_report,
)
from unidetox.replication.stages import LOG_FILE, Stages
from unidetox.run_dir import holds_output_dir

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
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
class ValidationArguments(ValidationSplitArguments):
    """The validation measurement of the grid (detox stage) and of the task-vector lambda sweep (evaluate stage)."""

    protocol: DetoxEvalConfig = field(
        default_factory=DetoxEvalConfig, metadata={"help": "The sampling protocol, its seed and perplexity windows."}
    )
    protocol_fields: list[str] = field(
        default_factory=list,
        metadata={"help": "The protocol fields the replication's config sets and hands to the stages (the others "
                  "are the stages' own defaults, checked to agree with the protocol's)."},
    )


@dataclass
class GridArguments:
    """The grid the single configuration is chosen on (the grid target only): alpha x learning rate x steps."""

    target: str = field(default="smollm2", metadata={"help": "Key of `targets`: the model the grid is run on."})
    learning_rates: list[float] = field(default_factory=lambda: [5e-4, 2e-4], metadata={"help": "Learning rates."})
    max_steps: int = field(default=200, metadata={"help": "Steps of every grid run (the steps axis: its saves)."})
    save_steps: int = field(default=50, metadata={"help": "A checkpoint + validation evaluation every N steps."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "Extra detox overrides of the grid runs."})

    def __post_init__(self):
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
    validation: ValidationArguments
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
    def anti_expert_source(self) -> str | None:
        """The source whose anti-expert the grid-target baselines use (inference-time decoding and task vectors
        need an anti-expert of the grid target's own model and vocabulary): the source of that model."""
        return next((name for name, s in self.distill.sources.items() if s.model == self.grid_target.model), None)


def parse_args(overrides: list[str] | tuple[str, ...] = ()) -> ReplicateArguments:
    """Compose ``conf/replicate.yaml`` with Hydra ``overrides`` and parse every section into its dataclass."""
    if any(str(o).lstrip("+").split("=", 1)[0] == "share_stages" for o in overrides):
        raise ValueError("`share_stages` was replaced by the job engine: instead of several copies of the command, "
                         "run one with launcher.engine=submitit launcher.cluster=local launcher.max_concurrent_jobs=2 "
                         "(or launcher.cluster=slurm on a cluster).")
    cfg = compose_config("replicate", list(overrides))
    validation = to_container(cfg.validation)
    protocol_section = validation.pop("protocol", {}) or {}
    protocol = parse_dataclass(protocol_section, DetoxEvalConfig, name="validation.protocol")
    baselines = to_container(cfg.baselines)
    nothate = baselines.pop("nothate_data")
    args = ReplicateArguments(
        output_dir=str(cfg.output_dir),
        data_dir=str(cfg.data_dir),
        targets={name: parse_dataclass(section, TargetArguments, name=f"targets.{name}") for name, section in cfg.targets.items()},
        distill=_parse_distill_sweep(to_container(cfg.distill)),
        validation=ValidationArguments(**vars(parse_dataclass(validation, ValidationSplitArguments, name="validation")),
                                       protocol=protocol, protocol_fields=list(protocol_section)),
        grid=parse_dataclass(cfg.grid, GridArguments, name="grid"),
        select=parse_dataclass(cfg.select, SelectionRule, name="select"),
        baselines=parse_dataclass(baselines, BaselineArguments, name="baselines"),
        nothate_data=parse_dataclass(nothate, ToxicCorpusConfig, name="baselines.nothate_data"),
        test=parse_dataclass(cfg.test, TestArguments, name="test"),
        bar=parse_dataclass(cfg.bar, SuccessBar, name="bar"),
        detox_overrides=[str(o) for o in (cfg.detox.overrides or [])],
        apply_overrides=[str(o) for o in (cfg.apply.overrides or [])],
        launcher=parse_dataclass(cfg.launcher, LauncherArguments, name="launcher"),
        overrides=list(overrides),
        config=to_container(cfg),
    )
    if args.grid.target not in args.targets:
        raise ValueError(f"`grid.target` {args.grid.target!r} is not a key of `targets` ({sorted(args.targets)}).")
    if (args.baselines.decoding or args.baselines.taskvec) and args.anti_expert_source is None:
        raise ValueError(
            f"baselines.decoding / baselines.taskvec need an anti-expert of the grid target's model "
            f"{args.grid_target.model!r}, but no entry of `distill.sources` distills from it "
            f"({ {n: s.model for n, s in args.distill.sources.items()} }); add that source or set "
            "baselines.decoding=false baselines.taskvec=false.")
    return args


def _parse_distill_sweep(section: dict) -> DistillSweepArguments:
    sources = section.pop("sources", None) or {}
    return DistillSweepArguments(
        **vars(parse_dataclass(section, DistillAlphaArguments, name="distill")),
        sources={n: parse_dataclass(s, TargetArguments, name=f"distill.sources.{n}") for n, s in sources.items()})


# ----------------------------------------------------------------------------------------------------------------
# Stage arguments: each stage's config composed once, from overrides of that stage's own config
# ----------------------------------------------------------------------------------------------------------------
def quote(value) -> str:
    """A Hydra override value quoted (paths may hold '=' as the authors' CSV name does)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _override_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    return quote(value)


def dataclass_overrides(prefix: str, obj, names=None) -> list[str]:
    """``prefix.field=value`` for the fields of a dataclass object: how the replication hands one of its typed
    sections to a stage, field for field."""
    names = [f.name for f in fields(obj)] if names is None else names
    return [f"{prefix}.{name}={_override_value(getattr(obj, name))}" for name in names]


def _data_dir_override(args: ReplicateArguments) -> str:
    return f"++data_dir={quote(args.data_dir)}"


def distill_stage_name(source: str, alpha: float) -> str:
    """The distill stage (and its directory under ``output_dir``) of one source model and alpha."""
    return f"distill-{source}-a{format_number(alpha)}"


def plan_distill(args: ReplicateArguments) -> dict[tuple[str, float], distill_stage.DistillArguments]:
    """``{(source, alpha): distill arguments}``: one distill stage per source model and alpha. Each source trains
    its own anti-expert (its first alpha's run, on the same toxic rows); its other alphas reuse it."""
    out = Path(args.output_dir)
    plan: dict[tuple[str, float], distill_stage.DistillArguments] = {}
    for name, source in args.distill.sources.items():
        first = None
        for alpha in (float(a) for a in args.distill.alphas):
            ov = [*source.overrides, *args.distill.overrides,
                  f"output_dir={quote(out / distill_stage_name(name, alpha))}", f"sampler.alpha={alpha}",
                  _data_dir_override(args)]
            if first is not None:  # one anti-expert per source: only the contrast's alpha changes
                ov.append(f"anti_expert.pretrained_path={quote(first.anti_expert.output_dir)}")
            stage = distill_stage.parse_args(ov)
            if stage.model.name_or_path != source.model:
                raise ValueError(
                    f"`distill.sources.{name}.model` is {source.model!r}, but its overrides {source.overrides} select "
                    f"{stage.model.name_or_path!r}; make them name the same model.")
            plan[(name, alpha)] = stage
            first = first or stage
    return plan


def validation_detox_overrides(validation: ValidationArguments) -> list[str]:
    """The validation measurement as detox overrides: the protocol, the prompt count and the split."""
    return [*dataclass_overrides("eval.callback", validation.protocol, validation.protocol_fields),
            f"eval.prompts.num_prompts={_override_value(validation.num_prompts)}", "eval.prompts.split=validation",
            f"eval.prompts.split_seed={validation.split_seed}",
            f"eval.prompts.validation_fraction={validation.validation_fraction}"]


def detox_args(args: ReplicateArguments, target: TargetArguments, data_path, run_dir, lr: float, steps: int,
               save_steps: int, extra: list[str]) -> detox_stage.DetoxArguments:
    """One fine-tuning run: the target, the shared configuration, the data, the learning rate and the steps."""
    overrides = [*target.overrides, *args.detox_overrides, f"data.path={quote(data_path)}",
                 f"output_dir={quote(run_dir)}", f"trainer.learning_rate={float(lr)!r}", f"trainer.max_steps={steps}",
                 f"trainer.save_steps={save_steps}", _data_dir_override(args)]
    return detox_stage.parse_args([*_training_every_step(overrides), *extra])


def _training_every_step(overrides: list[str]) -> list[str]:
    """``overrides``, pinned to train every one of ``max_steps`` when their trainer preset stops early (the default
    ``universal`` stops at step 50): the grid's runs and schedules are the replication's own. A preset without a stop
    composes as it is, so the config (and the cache of a finished run) is unchanged."""
    if compose_config("detox", overrides).trainer.get("stop_at_step") is None:
        return overrides
    return [*overrides, "++trainer.stop_at_step=null"]


def apply_args(args: ReplicateArguments, target: TargetArguments, data_path, run_dir, lr: float, chosen_steps: int,
               extra: list[str]) -> detox_stage.DetoxArguments:
    """The chosen configuration (a grid run's checkpoint) applied to a target.

    A checkpoint from the middle of a grid run was trained under the learning-rate schedule of ``grid.max_steps``,
    not under one that ends at its step: train under that schedule and stop at the chosen step
    (``trainer.stop_at_step``). At the grid's last step this is a plain run of ``chosen_steps``."""
    max_steps = args.grid.max_steps
    if chosen_steps < max_steps:
        return detox_args(args, target, data_path, run_dir, lr, max_steps, chosen_steps,
                          [*extra, f"++trainer.stop_at_step={chosen_steps}"])
    return detox_args(args, target, data_path, run_dir, lr, chosen_steps, chosen_steps, extra)


CHOSEN_RECIPE_FILE = "chosen_recipe.yaml"
RUN_SPECIFIC_TRAINER_KEYS = ("output_dir", "seed")  # where and with which seed one run trains: not the recipe


def chosen_recipe(apply: detox_stage.DetoxArguments) -> dict[str, Any]:
    """The apply step's configuration as a detox recipe for any model: the trainer settings (the schedule and the
    chosen step included, ``stop_at_step: null`` when the whole schedule is the choice), the LoRA settings and the
    distilled text (its path absolute, so the recipe works from any directory); no model, no output_dir.

    ``unidetox detox recipe=FILE model=ANY`` then trains any model exactly as the replication's apply step did."""
    trainer = {k: v for k, v in apply.config["trainer"].items() if k not in RUN_SPECIFIC_TRAINER_KEYS}
    trainer["stop_at_step"] = apply.trainer.stop_at_step
    data = {**apply.config["data"], "path": str(Path(apply.data.path).resolve())}
    return {"trainer": trainer, "peft": apply.config.get("peft") or {"use_peft": False}, "data": data}


def write_chosen_recipe(path: str | os.PathLike, recipe: dict[str, Any], choice: dict[str, Any]) -> Path:
    """``recipe`` (:func:`chosen_recipe`) as a config file of the detox recipe group, headed by what was chosen."""
    from omegaconf import OmegaConf

    config = choice.get("config", {})
    header = [
        "# @package _global_",
        "# The configuration the replication chose (the paper's rule on the validation prompts), as a recipe for",
        f"# any model: source {config.get('source')}, alpha {config.get('alpha')}, lr {config.get('learning_rate')}, "
        f"step {choice.get('step')} of its schedule.",
        f"#   unidetox detox recipe={Path(path).resolve()} model=ANY output_dir=DIR",
    ]
    return atomic_write_text(path, "\n".join(header) + "\n" + OmegaConf.to_yaml(recipe))


def plan_grid(args: ReplicateArguments, distilled: dict[tuple[str, float], str]) -> dict[str, tuple[dict, Any]]:
    """``{run name: (hyperparameters, detox arguments)}`` for source x alpha x learning rate on the grid target.

    ``distilled``: the distilled text of each (source, alpha) to plan (:attr:`DistillResult.distilled_path`)."""
    grid = args.grid
    plan = {}
    for source, alpha in distilled:
        for lr in grid.learning_rates:
            name = f"{grid.target}-{source}-a{format_number(alpha)}-lr{format_number(lr)}"
            run_dir = Path(args.output_dir) / "grid" / name
            stage = detox_args(args, args.grid_target, distilled[(source, alpha)], run_dir, float(lr), grid.max_steps,
                               grid.save_steps, [*validation_detox_overrides(args.validation), *grid.overrides])
            plan[name] = ({"source": source, "alpha": float(alpha), "learning_rate": float(lr)}, stage)
    return plan


def evaluate_on_test(args: ReplicateArguments, models: list, output_dir, extra=()) -> evaluate_stage.EvaluateArguments:
    """The evaluate stage on the TEST split (the same split seed and fraction as validation: disjoint prompts)."""
    return evaluate_stage.parse_args([
        *args.test.overrides, f"models=[{','.join(quote(m) for m in models)}]",
        f"seeds=[{','.join(str(s) for s in args.test.seeds)}]", f"output_dir={quote(output_dir)}",
        "prompts.split=test", f"prompts.split_seed={args.validation.split_seed}",
        f"prompts.validation_fraction={args.validation.validation_fraction}", *extra, _data_dir_override(args)])


def validation_evaluate_args(args: ReplicateArguments, models: list, output_dir) -> evaluate_stage.EvaluateArguments:
    """The grid's validation measurement through the evaluate stage: the same protocol and seed, the same
    perplexity windows (stride: half the window, as the callback), no MMLU, no reference-LM perplexity, no further
    scorers (the selection reads the primary scorer only)."""
    val, protocol = args.validation, args.validation.protocol
    return evaluate_stage.parse_args([
        f"models=[{','.join(quote(m) for m in models)}]", f"seeds=[{protocol.seed}]", f"output_dir={quote(output_dir)}",
        "prompts.split=validation", f"prompts.split_seed={val.split_seed}",
        f"prompts.validation_fraction={val.validation_fraction}",
        f"prompts.num_prompts={_override_value(val.num_prompts)}", *dataclass_overrides("eval", protocol.protocol()),
        "mmlu.enabled=false", "perplexity.reference_model=null", f"perplexity.max_length={protocol.ppl_max_length}",
        f"perplexity.stride={protocol.perplexity_stride}",
        f"perplexity.max_tokens={_override_value(protocol.ppl_max_tokens)}", "progress=false", "also_scorers=[]",
        *val.evaluate_overrides, _data_dir_override(args)])


def assert_disjoint_prompts(validation: PromptsConfig, test: PromptsConfig) -> dict[str, int]:
    """Load the validation and the test prompts and fail on any overlap: never tune on the test set."""
    if test.split != "test" or validation.split != "validation":
        raise ValueError(f"Validation must use split=validation and test split=test; got {validation.split!r} "
                         f"and {test.split!r}.")
    if (validation.split_seed, validation.validation_fraction) != (test.split_seed, test.validation_fraction):
        raise ValueError("The validation and test prompts are split with different split_seed/validation_fraction, so "
                         "they may overlap; set both through `validation.split_seed` / `validation.validation_fraction`.")
    validation_prompts, test_prompts = load_prompts(validation), load_prompts(test)
    shared = {p.id for p in validation_prompts} & {p.id for p in test_prompts}
    if shared:
        raise AssertionError(f"{len(shared)} prompts are both validation and test prompts; never tune on the test set.")
    return {"validation_prompts": len(validation_prompts), "test_prompts": len(test_prompts)}


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (replaced atomically when it points elsewhere)."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def _as_saved(payload: Any) -> Any:
    """``payload`` as it reads back from JSON (tuples -> lists, non-JSON values -> str)."""
    return json.loads(json.dumps(payload, default=str))


def _write_if_changed(path: Path, payload: dict) -> bool:
    """Write ``payload`` unless ``path`` already holds it (a rerun rewrites nothing); True when written."""
    if read_json(path) == _as_saved(payload):
        return False
    if is_main_process():
        atomic_write_json(path, payload)
    return True


def validation_prompts(args: ReplicateArguments) -> PromptsConfig:
    """The grid's validation prompts, as the grid target's detox stage composes them."""
    return detox_stage.parse_args([*args.grid_target.overrides, *args.detox_overrides,
                                   *validation_detox_overrides(args.validation), *args.grid.overrides,
                                   _data_dir_override(args)]).validation.prompts


@dataclass
class ReplicateResult:
    """The replication's report (``report.json``'s content) and the log of this session's stages."""

    output_dir: str
    report: dict[str, Any]
    stages: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------
@holds_output_dir
def run(args: ReplicateArguments) -> ReplicateResult:
    """Run (or resume) the whole replication and write ``report.{json,md}`` and the plot under ``output_dir``."""
    configure_logging()
    state = process_state()
    out = Path(args.output_dir)
    if args.launcher.uses_jobs and state.num_processes > 1:
        raise ValueError("launcher.engine=submitit runs each stage as a job of its own, but this driver runs "
                         f"{state.num_processes} processes; start the driver as one process (accelerate launch "
                         "--num_processes 1 ...) or set launcher.engine=inprocess.")
    # On an interrupt (Ctrl-C, SIGTERM) or a failure the stages' jobs are cancelled: a rerun never races them.
    with Stages(out, is_main=state.is_main_process, launcher=args.launcher) as stages:
        return _replicate(args, stages, state, out)


def _replicate(args: ReplicateArguments, stages: Stages, state, out: Path) -> ReplicateResult:
    save_resolved_config(args.config, out)
    targets, grid, sel, base_args = args.targets, args.grid, args.select, args.baselines
    grid_target = args.grid_target
    started = time.perf_counter()
    test_dir = out / "test"

    def model_test_stage(label: str, model) -> None:
        """One model on the test prompts; its parts (test/parts/) are what the joint test stage reports."""
        stages.pipeline(f"test/{label}", evaluate_stage,
                        evaluate_on_test(args, [str(model)], test_dir / "models" / label,
                                         [f"parts_dir={quote(test_dir / 'parts')}"]))

    # ---- 1. anti-experts + distilled text per source and alpha ---------------------------------------------------
    distill_plan = plan_distill(args)
    first_alpha = float(args.distill.alphas[0])
    # Never tune on the test set: checked before any test prompt is used.
    split_info = assert_disjoint_prompts(validation_prompts(args),
                                         evaluate_on_test(args, [grid_target.model], test_dir).prompts)
    decoding_dir = test_dir / "decoding"
    # Each source's first alpha trains its anti-expert; the runs that reuse it come after every source's first.
    for (source, alpha), distill_args in sorted(distill_plan.items(), key=lambda item: item[0][1] != first_alpha):
        if alpha != first_alpha:
            stages.wait_for(distill_stage_name(source, first_alpha))
        stages.pipeline(distill_stage_name(source, alpha), distill_stage, distill_args)
        if (source, alpha) == next(iter(distill_plan)):
            # What needs only the base models comes early: under the job engine it runs beside the anti-experts'
            # training and the distillation.
            for tname, target in targets.items():
                model_test_stage(f"{tname}-base", target.model)
    if base_args.decoding:
        anti_expert = stages.result(distill_stage_name(args.anti_expert_source, first_alpha)).anti_expert_path
        stages.pipeline("test/decoding", evaluate_stage, evaluate_on_test(
            args, [grid_target.model], decoding_dir, [f"decoding.anti_expert={quote(anti_expert)}",
                                                      f"decoding.alpha={base_args.decoding_alpha}",
                                                      "decoding.also_plain=false"]))
    # ---- 2. the grid on the grid target: each text's runs start once it is there --------------------------------
    distilled, grid_plan = {}, {}
    for key in distill_plan:
        distilled[key] = stages.result(distill_stage_name(*key))
        for name, (config, grid_args) in plan_grid(args, {key: distilled[key].distilled_path}).items():
            grid_plan[name] = (config, grid_args)
            stages.pipeline(f"grid/{name}", detox_stage, grid_args)

    def anti_expert_seconds(source: str) -> float:
        return distilled[(source, first_alpha)].stages["anti_expert"].get("train_wall_time_s") or 0.0

    if args.anti_expert_source is not None:
        anti_expert = distilled[(args.anti_expert_source, first_alpha)].anti_expert_path
        ae_seconds = anti_expert_seconds(args.anti_expert_source)
    grid_results = {name: stages.result(f"grid/{name}") for name in grid_plan}

    # ---- 3. the single configuration -----------------------------------------------------------------------------
    records = grid_records({name: (config, grid_results[name].eval_records) for name, (config, _) in grid_plan.items()})
    choice, table = choose_configuration(records, sel.max_ppl_increase, sel.metric, sel.on_empty)
    chosen_source = choice["config"]["source"]
    chosen_alpha, chosen_lr = choice["config"]["alpha"], choice["config"]["learning_rate"]
    chosen_steps = int(choice["step"])
    selection = {"choice": choice, "table": table, "rule": {"max_ppl_increase": sel.max_ppl_increase,
                                                            "metric": sel.metric, "on_empty": sel.on_empty}}
    if _write_if_changed(out / "selection.json", selection):
        stages.log("selection", "ran", 0.0, choice={k: choice[k] for k in ("run", "step", "config")})
    else:
        stages.log("selection", "cached", 0.0)
    chosen_distilled = distilled[(chosen_source, chosen_alpha)]
    if state.is_main_process:
        recipe = chosen_recipe(apply_args(args, grid_target, chosen_distilled.distilled_path,
                                          out / "apply" / f"{grid.target}-unidetox", float(chosen_lr), chosen_steps,
                                          list(args.apply_overrides)))
        write_chosen_recipe(out / CHOSEN_RECIPE_FILE, recipe, choice)

    # ---- 4. baseline data ------------------------------------------------------------------------------------
    data_paths = {"unidetox": chosen_distilled.distilled_path}
    data_seconds = {"unidetox": anti_expert_seconds(chosen_source)
                    + (chosen_distilled.metadata.get("generation_time_s") or 0.0)}
    if base_args.control:
        control_dir = out / "data" / "control"

        def make_control():
            base_name = chosen_distilled.metadata.get("base") or grid_target.model
            model, tokenizer = load_model_and_tokenizer(base_name)
            return build_plain_sample_dataset(model, tokenizer, output_dir=control_dir, base_id=base_name,
                                              show_progress=state.is_main_process,
                                              **plain_sample_settings(chosen_distilled.metadata)).metadata

        if state.is_main_process:
            stages.library("data/control", lambda: read_json(control_dir / "metadata.json"), make_control, control_dir)
        wait_for_everyone()
        data_paths["control"] = str(control_dir)
    if base_args.nothate:
        nothate_dir = out / "data" / "nothate"
        if state.is_main_process:
            stages.library("data/nothate", lambda: read_json(nothate_dir / "metadata.json"),
                           lambda: build_text_dataset(args.nothate_data, int(chosen_distilled.num_texts),
                                                      nothate_dir).metadata, nothate_dir)
        wait_for_everyone()
        data_paths["nothate"] = str(nothate_dir)
    if base_args.authors:
        data_paths["authors"] = str(base_args.authors_path)

    # ---- 5. apply the chosen configuration unchanged -------------------------------------------------------------
    apply_models: dict[tuple[str, str], Any] = {}  # the test model of (target, method), or its stage's name
    train_seconds: dict[tuple[str, str], float] = {}
    chosen_run = grid_results[choice["run"]]
    chosen_checkpoint = Path(choice["checkpoint"])
    apply_jobs = []  # (the data stage it needs, submit): a fine-tuning whose data is ready is submitted first
    for tname, target in targets.items():
        for method, data_path in data_paths.items():
            stage = f"apply/{tname}-{method}"
            run_dir = out / "apply" / f"{tname}-{method}"
            if method == "unidetox" and tname == grid.target:
                # The grid already trained this model with this configuration: reuse its chosen checkpoint.
                def reuse(run_dir=run_dir):
                    source = merged_model_path(chosen_checkpoint)
                    _link(run_dir / "model", source)
                    payload = {"reused_from": chosen_run.output_dir, "checkpoint": str(chosen_checkpoint),
                               "step": chosen_steps, "model": str(source)}
                    atomic_write_json(run_dir / "source.json", payload)
                    return payload

                def reused(run_dir=run_dir):
                    source = read_json(run_dir / "source.json") or {}
                    done = source.get("checkpoint") == str(chosen_checkpoint) and (run_dir / "model" / "config.json").is_file()
                    return source if done else None

                if state.is_main_process:
                    stages.library(stage, reused, reuse, run_dir)
                wait_for_everyone()
                apply_models[(tname, method)] = run_dir / "model"
                train_seconds[(tname, method)] = (chosen_run.train_seconds or 0.0) * chosen_steps / grid.max_steps
                continue
            extra = list(args.apply_overrides)
            if method == "authors" and base_args.authors_max_samples is not None:
                extra.append(f"data.max_samples={base_args.authors_max_samples}")

            config = apply_args(args, target, data_path, run_dir, float(chosen_lr), chosen_steps, extra)

            def fine_tune(stage=stage, config=config):
                stages.pipeline(stage, detox_stage, config)

            apply_jobs.append(([f"data/{method}"], fine_tune))
            apply_models[(tname, method)] = stage
    stages.run_when_ready(apply_jobs)

    # ---- 6. task vectors (grid target), lambda on the validation prompts -----------------------------------------
    taskvec = None
    taskvec_seconds = 0.0
    if base_args.taskvec:
        lam_dirs = {float(lam): out / "taskvec" / f"lam{format_number(lam)}" for lam in base_args.lambdas}
        for lam, lam_dir in lam_dirs.items():
            def negated(lam=lam, lam_dir=lam_dir):
                marker = read_json(lam_dir / TASK_VECTOR_MARKER) or {}
                return marker if marker.get("settings", {}).get("lambda") == lam else None

            def negate(lam=lam, lam_dir=lam_dir):
                negate_task_vector(grid_target.model, anti_expert, lam, lam_dir)
                return read_json(lam_dir / TASK_VECTOR_MARKER)

            if state.is_main_process:
                stages.library(f"taskvec/lam{format_number(lam)}", negated, negate, lam_dir)
            wait_for_everyone()
        models = [grid_target.model, *[str(d) for d in lam_dirs.values()]]
        stages.wait_for(*[f"taskvec/lam{format_number(lam)}" for lam in lam_dirs])
        stages.pipeline("taskvec/validation", evaluate_stage,
                        validation_evaluate_args(args, models, out / "taskvec" / "validation"))
        val_report = stages.result("taskvec/validation").report
        tv_records = []
        for key, lam in [(grid_target.model, 0.0), *[(str(d), lam) for lam, d in lam_dirs.items()]]:
            m = val_report["models"][key]
            tv_records.append({"run": "base" if lam == 0.0 else f"lam{format_number(lam)}", "step": 0 if lam == 0 else 1,
                               "baseline": lam == 0.0, "config": {"lambda": lam}, "checkpoint": key,
                               "toxicity_probability": m["toxicity_probability"]["mean"],
                               "expected_max_toxicity": m["expected_max_toxicity"]["mean"],
                               "perplexity": m["wikitext_perplexity"]["perplexity"]})
        tv_choice, tv_table = choose_configuration(tv_records, sel.max_ppl_increase, sel.metric, sel.on_empty)
        taskvec = {"choice": tv_choice, "table": tv_table}
        _write_if_changed(out / "taskvec" / "selection.json", taskvec)
        apply_models[(grid.target, "taskvec")] = Path(tv_choice["checkpoint"])
        chosen_lambda = float(tv_choice["config"]["lambda"])
        if state.is_main_process:
            taskvec_seconds = (stages.result(f"taskvec/lam{format_number(chosen_lambda)}") or {}).get("wall_time_s", 0.0)

    # ---- 7. test evaluation --------------------------------------------------------------------------------------
    def model_of(key) -> str:
        model = apply_models[key]
        if isinstance(model, str):  # a detox stage: its final full model, as the stage returned it
            result = stages.result(model)
            apply_models[key] = model = Path(_full_model(result))
            train_seconds[key] = result.train_seconds or 0.0
        return str(model)

    stages.run_when_ready([([m] if isinstance(m, str) else [], lambda key=key: model_test_stage(
        f"{key[0]}-{key[1]}", model_of(key))) for key, m in list(apply_models.items())])
    stages.wait_for_all()  # every model's parts
    test_models = [t.model for t in targets.values()] + [model_of(key) for key in apply_models]
    stages.pipeline("test", evaluate_stage, evaluate_on_test(args, test_models, test_dir))
    test_result = stages.result("test")
    reports = [test_result.report]
    decoding_key = None
    if base_args.decoding:
        decoding = stages.result("test/decoding")
        reports.append(decoding.report)
        decoding_key = next(iter(decoding.report["models"]))

    # ---- 8. the report ---------------------------------------------------------------------------------------
    if base_args.control and state.is_main_process:
        data_seconds["control"] = (stages.result("data/control") or {}).get("generation_time_s", 0.0)
    all_models = {k: v for r in reports for k, v in r["models"].items()}
    methods = []
    for tname, target in targets.items():
        methods.append({"method": "base", "target": tname, "model_key": target.model, "wall_time": {"total_s": None}})
        for method in data_paths:
            data_s = data_seconds.get(method, 0.0)
            train_s = train_seconds.get((tname, method), 0.0)
            methods.append({"method": method, "target": tname, "model_key": model_of((tname, method)),
                            "wall_time": {"data_s": data_s, "train_s": train_s, "total_s": data_s + train_s}})
    if decoding_key is not None:
        methods.append({"method": "decoding", "target": grid.target, "model_key": decoding_key,
                        "wall_time": {"data_s": ae_seconds, "train_s": 0.0, "total_s": ae_seconds}})
    if taskvec is not None:
        methods.append({"method": "taskvec", "target": grid.target, "model_key": taskvec["choice"]["checkpoint"],
                        "wall_time": {"data_s": ae_seconds, "train_s": taskvec_seconds,
                                      "total_s": ae_seconds + taskvec_seconds}})
    generations = list(test_result.generations())
    if base_args.decoding:
        generations += list(decoding.generations())
    labels = {f"{m['method']} / {m['target']}": m["model_key"] for m in methods}
    examples = example_continuations(generations, labels, num_examples=4)
    corpora = {distill_stage_name(*key): {"source": args.distill.sources[key[0]].model, "alpha": key[1],
                                          "path": result.distilled_path, "summary": result.summary}
               for key, result in distilled.items()}
    if "control" in data_paths:
        corpora["control"] = {"source": chosen_distilled.metadata.get("base"), "path": data_paths["control"]}
    if "authors" in data_paths:
        corpora["authors"] = {"source": "gpt2-xl (the authors' released text)", "alpha": 0.1,
                              "path": data_paths["authors"]}
    for corpus in corpora.values():
        path = corpus.pop("path")
        dataset = DistilledDetoxDataset.load(path).dataset
        corpus["plain_samples"] = read_plain_samples(path)
        corpus["texts"] = list(dataset["text"])
        corpus["num_tokens"] = list(dataset["num_tokens"]) if "num_tokens" in dataset.column_names else None
    log_file = out / LOG_FILE
    report = assemble_report(
        methods, all_models, list(targets), grid=selection, taskvec=taskvec, examples=examples,
        bar={"min_toxicity_drop": args.bar.min_toxicity_drop, "max_ppl_increase": args.bar.max_ppl_increase},
        generations=generations, interval_resamples=args.test.interval_resamples,
        scorer_name=(reports[0].get("scorer") or {}).get("name", "scorer"),
        toxic_threshold=(reports[0].get("eval") or {}).get("toxic_threshold", TOXIC_THRESHOLD),
        extra={"command": " ".join(["unidetox replicate", *args.overrides]), "output_dir": str(out),
               "source_study": source_study(corpora),
               "stage_times": stage_times(log_file.read_text().splitlines() if log_file.is_file() else []),
               "prompts": split_info,
               "test": {"seeds": args.test.seeds, "overrides": args.test.overrides,
                        "scorer": reports[0].get("scorer"), "also_scorers": reports[0].get("also_scorers"),
                        "eval": reports[0].get("eval"),
                        "reference_model": reports[0].get("reference_model")},
               "config": args.config,
               "description": (
                   f"Chosen on {split_info['validation_prompts']} validation prompts: text distilled from "
                   f"{chosen_source}, alpha {chosen_alpha}, lr "
                   f"{format_number(chosen_lr)}, {chosen_steps} steps (the rule: least {sel.metric} within "
                   f"+{sel.max_ppl_increase:.0%} WikiText-2 perplexity). Test: {split_info['test_prompts']} prompts, "
                   f"seeds {args.test.seeds}.")},
    )
    report.pop("created_at", None)
    if read_json(out / "report.json") == _as_saved(report):
        stages.log("report", "cached", 0.0)
    else:
        if state.is_main_process:
            write_replication_report(report, out)
        stages.log("report", "ran", 0.0)
    if state.is_main_process:
        print((out / "report.md").read_text(), flush=True)
        logger.info("Replication done in %.0fs: %s", time.perf_counter() - started, out / "report.md")
    wait_for_everyone()
    return ReplicateResult(str(out), report, stages.session)


def _full_model(result: detox_stage.DetoxResult) -> str:
    """The fine-tuned full model a detox stage returned (LoRA runs need ``trainer.save_merged_model=true``)."""
    if not result.model_path:
        raise FileNotFoundError(
            f"The detox run in {result.output_dir} saved no full model (a LoRA adapter without merged/); apply the "
            "configuration with trainer.save_merged_model=true."
        )
    return result.model_path

