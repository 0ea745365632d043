"""The replication's plan: each stage's arguments, composed once from overrides of that stage's own config.

Every stage of :mod:`unidetox.replication.phases` gets its config here: the distill runs per source and alpha
(:func:`plan_distill`), the grid (:func:`plan_grid`), the chosen configuration on a target (:func:`apply_args`,
:func:`chosen_recipe`), the validation and test evaluations (:func:`validation_evaluate_args`,
:func:`evaluate_on_test`). The directory of each stage under ``output_dir`` is named here too.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unidetox.detox import pipeline as detox_stage
from unidetox.distill import pipeline as distill_stage
from unidetox.evaluation import pipeline as evaluate_stage
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.files import atomic_write_text
from unidetox.hydra_config import compose_config
from unidetox.replication.config import ReplicateArguments, TargetArguments, ValidationMeasurementArguments
from unidetox.replication.formatting import format_number


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


def validation_detox_overrides(validation: ValidationMeasurementArguments) -> list[str]:
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
    config = choice.get("config", {})
    header = [
        "# @package _global_",
        "# The configuration the replication chose (" + (
            "a declared variant of the paper's rule: every target's validation prompts" if choice.get("rule") ==
            "every_target" else "the paper's rule on the validation prompts") + "), as a recipe for",
        f"# any model: source {config.get('source')}, alpha {config.get('alpha')}, lr {config.get('learning_rate')}, "
        f"step {choice.get('step')} of its schedule.",
        f"#   unidetox detox recipe={Path(path).resolve()} model=ANY output_dir=DIR",
    ]
    return atomic_write_text(path, "\n".join(header) + "\n" + OmegaConf.to_yaml(recipe))


def grid_run_name(target: str, source: str, alpha: float, lr: float) -> str:
    """The grid run (and its directory under ``output_dir/grid``) of one configuration on one target."""
    return f"{target}-{source}-a{format_number(alpha)}-lr{format_number(lr)}"


def plan_grid(args: ReplicateArguments, distilled: dict[tuple[str, float], str],
              target: str | None = None) -> dict[str, tuple[dict, Any]]:
    """``{run name: (hyperparameters, detox arguments)}`` for source x alpha x learning rate on ``target`` (default:
    the grid target; a transfer target trains the same runs).

    ``distilled``: the distilled text of each (source, alpha) to plan (:attr:`DistillResult.distilled_path`)."""
    grid, target = args.grid, target or args.grid.target
    plan = {}
    for source, alpha in distilled:
        for lr in grid.learning_rates:
            name = grid_run_name(target, source, alpha, lr)
            run_dir = Path(args.output_dir) / "grid" / name
            stage = detox_args(args, args.targets[target], distilled[(source, alpha)], run_dir, float(lr),
                               grid.max_steps, grid.save_steps,
                               [*validation_detox_overrides(args.validation), *grid.overrides])
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


def prompts_for_test(args: ReplicateArguments) -> PromptsConfig:
    """The test prompts, as every test stage composes them."""
    return evaluate_on_test(args, [args.grid_target.model], Path(args.output_dir) / "test").prompts


def validation_prompts(args: ReplicateArguments) -> PromptsConfig:
    """The grid's validation prompts, as the grid target's detox stage composes them."""
    return detox_stage.parse_args([*args.grid_target.overrides, *args.detox_overrides,
                                   *validation_detox_overrides(args.validation), *args.grid.overrides,
                                   _data_dir_override(args)]).validation.prompts



def model_test_args(args: ReplicateArguments, label: str, model) -> evaluate_stage.EvaluateArguments:
    """One model on the test prompts (``test/models/{label}``); its parts (``test/parts/``) are what the joint test
    stage reports."""
    test_dir = Path(args.output_dir) / "test"
    return evaluate_on_test(args, [str(model)], test_dir / "models" / label, [f"parts_dir={quote(test_dir / 'parts')}"])


def decoding_test_args(args: ReplicateArguments, anti_expert: str) -> evaluate_stage.EvaluateArguments:
    """Inference-time contrastive decoding of the grid target with ``anti_expert`` on the test prompts."""
    return evaluate_on_test(args, [args.grid_target.model], Path(args.output_dir) / "test" / "decoding",
                            [f"decoding.anti_expert={quote(anti_expert)}",
                             f"decoding.alpha={args.baselines.decoding_alpha}", "decoding.also_plain=false"])


def apply_method_args(args: ReplicateArguments, target: TargetArguments, method: str, data_path, run_dir, lr: float,
                      chosen_steps: int) -> detox_stage.DetoxArguments:
    """The chosen configuration on ``target``, trained on the text of ``method`` (the authors' text: its first
    ``baselines.authors_max_samples`` texts when set)."""
    extra = list(args.apply_overrides)
    if method == "authors" and args.baselines.authors_max_samples is not None:
        extra.append(f"data.max_samples={args.baselines.authors_max_samples}")
    return apply_args(args, target, data_path, run_dir, float(lr), chosen_steps, extra)
