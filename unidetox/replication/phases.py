"""The replication's phases, in order; each runs its stages through :class:`~unidetox.replication.stages.Stages`
and returns what the later phases read:

1. :func:`distill_texts`: an anti-expert and distilled text per source and alpha (and, beside them, the test stages
   that need only the base models);
2. :func:`run_grid`: the detox grid on the grid target;
3. :func:`select_configuration`: the paper's rule picks one (source, alpha, learning rate, steps);
4. :func:`make_baseline_data`: the baselines' training text;
5. :func:`apply_configuration`: the chosen configuration, unchanged, on every target and text;
6. :func:`negate_task_vectors`: the task-vector baseline, its lambda picked on the validation prompts;
7. :func:`evaluate_on_test_prompts`: every model on the test prompts;
8. :func:`write_report`: ``report.{json,md}`` and the plot.

:mod:`unidetox.replication.pipeline` runs them; :mod:`unidetox.replication.plan` composes each stage's arguments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from unidetox.detox import pipeline as detox_stage
from unidetox.detox.merge import merged_model_path
from unidetox.detox.selection import checkpoint_dir
from unidetox.distill import pipeline as distill_stage
from unidetox.distill.dataset import DistilledDetoxDataset
from unidetox.evaluation import pipeline as evaluate_stage
from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.paired import prompt_kinds
from unidetox.evaluation.prompts import load_prompts
from unidetox.files import atomic_write_json, read_json
from unidetox.models import load_model_and_tokenizer
from unidetox.processes import is_main_process, wait_for_everyone
from unidetox.replication.baselines import (
    TASK_VECTOR_MARKER,
    build_plain_sample_dataset,
    build_text_dataset,
    negate_task_vector,
    plain_sample_settings,
)
from unidetox.replication.config import CHOOSE_ON, ReplicateArguments
from unidetox.replication.formatting import format_number
from unidetox.replication.plan import (
    CHOSEN_RECIPE_FILE,
    apply_args,
    apply_method_args,
    assert_disjoint_prompts,
    chosen_recipe,
    decoding_test_args,
    distill_stage_name,
    evaluate_on_test,
    grid_run_name,
    model_test_args,
    plan_distill,
    plan_grid,
    prompts_for_test,
    validation_evaluate_args,
    validation_prompts,
    write_chosen_recipe,
)
from unidetox.replication.report import (
    assemble_report,
    example_continuations,
    grid_records,
    stage_times,
    write_replication_report,
)
from unidetox.replication.source_study import read_plain_samples, source_study
from unidetox.replication.stages import LOG_FILE, Stages

ModelKey = tuple[str, str]  # (target, method): a row of the table


@dataclass
class Replication:
    """What every phase reads: the arguments, the stage runner, this process and the output directory."""

    args: ReplicateArguments
    stages: Stages
    state: Any  # the process state (:func:`unidetox.processes.process_state`)
    out: Path

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def test_dir(self) -> Path:
        return self.out / "test"

    def test_model(self, label: str, model) -> None:
        """One model on the test prompts; its parts (test/parts/) are what the joint test stage reports."""
        self.stages.run_pipeline_stage(f"test/{label}", evaluate_stage, model_test_args(self.args, label, model))


# ----------------------------------------------------------------------------------------------------------------
# 1. Anti-experts and distilled text per source and alpha
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DistillPhase:
    plan: dict[tuple[str, float], distill_stage.DistillArguments]  # (source, alpha) -> its distill stage
    first_alpha: float  # each source's run at this alpha trains the anti-expert its other alphas reuse
    split_info: dict[str, int]  # how many validation and test prompts there are


def distill_texts(rep: Replication) -> DistillPhase:
    """Start the distill stages; what needs only the base models (their test stages, inference-time decoding)
    comes early too: under the job engine it runs beside the anti-experts' training and the distillation."""
    args, stages = rep.args, rep.stages
    plan = plan_distill(args)
    first_alpha = float(args.distill.alphas[0])
    # Never tune on the test set: checked before any test prompt is used.
    split_info = assert_disjoint_prompts(validation_prompts(args), prompts_for_test(args))
    # Each source's first alpha trains its anti-expert; the runs that reuse it come after every source's first.
    for (source, alpha), distill_args in sorted(plan.items(), key=lambda item: item[0][1] != first_alpha):
        if alpha != first_alpha:
            stages.wait_for(distill_stage_name(source, first_alpha))
        stages.run_pipeline_stage(distill_stage_name(source, alpha), distill_stage, distill_args)
        if (source, alpha) == next(iter(plan)):
            for tname, target in args.targets.items():
                rep.test_model(f"{tname}-base", target.model)
    if args.baselines.decoding:
        anti_expert = stages.result(distill_stage_name(args.anti_expert_source, first_alpha)).anti_expert_path
        stages.run_pipeline_stage("test/decoding", evaluate_stage, decoding_test_args(args, anti_expert))
    return DistillPhase(plan, first_alpha, split_info)


# ----------------------------------------------------------------------------------------------------------------
# 2. The grid on the grid target
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GridPhase:
    distilled: dict[tuple[str, float], distill_stage.DistillResult]  # (source, alpha) -> its distill stage's result
    plan: dict[str, tuple[dict, detox_stage.DetoxArguments]]  # run name -> (hyperparameters, detox arguments)
    results: dict[str, detox_stage.DetoxResult]  # run name -> its detox stage's result (every target's runs)
    first_alpha: float
    transfer: dict[str, dict[str, tuple[dict, detox_stage.DetoxArguments]]] = field(default_factory=dict)
    # transfer target -> its plan: the same runs as ``plan`` on that target

    def records(self, plan: dict[str, tuple[dict, detox_stage.DetoxArguments]]) -> list[dict[str, Any]]:
        """The validation records of the runs of ``plan`` (:func:`grid_records`)."""
        return grid_records({name: (config, self.results[name].eval_records) for name, (config, _) in plan.items()})

    def anti_expert_path(self, source: str) -> str:
        """The anti-expert of ``source`` (trained by its first alpha's distill stage)."""
        return self.distilled[(source, self.first_alpha)].anti_expert_path

    def anti_expert_seconds(self, source: str) -> float:
        """How long training the anti-expert of ``source`` took."""
        return self.distilled[(source, self.first_alpha)].stages["anti_expert"].get("train_wall_time_s") or 0.0


def run_grid(rep: Replication, distill: DistillPhase) -> GridPhase:
    """The grid's detox stages on the grid target and on each transfer target: each distilled text's runs start
    once it is there."""
    distilled, plans = {}, {target: {} for target in rep.args.grid_targets}
    for key in distill.plan:
        distilled[key] = rep.stages.result(distill_stage_name(*key))
        for target, plan in plans.items():
            for name, (config, grid_args) in plan_grid(rep.args, {key: distilled[key].distilled_path}, target).items():
                plan[name] = (config, grid_args)
                rep.stages.run_pipeline_stage(f"grid/{name}", detox_stage, grid_args)
    results = {name: rep.stages.result(f"grid/{name}") for plan in plans.values() for name in plan}
    grid_plan = plans.pop(rep.args.grid.target)
    return GridPhase(distilled, grid_plan, results, distill.first_alpha, plans)


# ----------------------------------------------------------------------------------------------------------------
# 3. The single configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    record: dict[str, Any]  # selection.json: the choice, the table and the rule
    source: str
    alpha: float
    learning_rate: float
    steps: int
    distilled: distill_stage.DistillResult  # the chosen (source, alpha)'s distill stage

    @property
    def choice(self) -> dict[str, Any]:
        return self.record["choice"]


def select_configuration(rep: Replication, grid: GridPhase) -> Selection:
    """The paper's rule over every (grid run, checkpoint) (or, with ``grid.choose_on=every_target``, its declared
    variant over every target), written to ``selection.json`` and, as a detox recipe for any model, to
    ``chosen_recipe.yaml``."""
    args, sel = rep.args, rep.args.select
    rule = {"max_ppl_increase": sel.max_ppl_increase, "metric": sel.metric, "on_empty": sel.on_empty}
    if grid.transfer:
        record = {**_choose_with_transfer(args, grid), "rule": {**rule, "choose_on": args.grid.choose_on}}
    else:
        choice, table = sel.choose(grid.records(grid.plan))
        record = {"choice": choice, "table": table, "rule": rule}
    choice = record["choice"]
    if _write_if_changed(rep.out / "selection.json", record):
        rep.stages.log("selection", "ran", 0.0, choice={k: choice[k] for k in ("run", "step", "config")})
    else:
        rep.stages.log("selection", "cached", 0.0)
    config = choice["config"]
    chosen = Selection(record, config["source"], config["alpha"], config["learning_rate"], int(choice["step"]),
                       grid.distilled[(config["source"], config["alpha"])])
    if rep.is_main:
        recipe = chosen_recipe(apply_args(args, args.grid_target, chosen.distilled.distilled_path,
                                          rep.out / "apply" / f"{args.grid.target}-unidetox",
                                          float(chosen.learning_rate), chosen.steps, list(args.apply_overrides)))
        write_chosen_recipe(rep.out / CHOSEN_RECIPE_FILE, recipe, choice)
    return chosen


def _choose_with_transfer(args: ReplicateArguments, grid: GridPhase) -> dict[str, Any]:
    """``choice``, ``table`` (the grid target's, the choice flagged) and ``transfer_curve`` (every configuration's
    validation on every grid-trained target, :meth:`SelectionRule.across_targets`); with the declared variant also
    ``paper_choice``, what the paper's rule on the grid target alone would have taken."""
    sel = args.select
    records = {args.grid.target: grid.records(grid.plan), **{t: grid.records(p) for t, p in grid.transfer.items()}}
    paper_choice, table = sel.choose(records[args.grid.target])
    if args.grid.choose_on == CHOOSE_ON[0]:
        choice, curve, extra = paper_choice, sel.across_targets(records), {}
    else:
        choice, curve = sel.choose_on_every_target(records)
        extra = {"paper_choice": {k: paper_choice[k] for k in ("run", "step", "config")}}
    for row in table:
        row["chosen"] = (row.get("run"), row.get("step")) == (choice["run"], choice["step"])
    for row in curve:
        row["chosen"] = row["config"] == choice["config"]
    return {"choice": choice, "table": table, "transfer_curve": curve, **extra}


# ----------------------------------------------------------------------------------------------------------------
# 4. Baseline data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BaselineData:
    paths: dict[str, str]  # method -> the text it fine-tunes on, the chosen distilled text first
    seconds: dict[str, float]  # method -> seconds it took to make that text (the control's: see _data_seconds)


def make_baseline_data(rep: Replication, grid: GridPhase, chosen: Selection) -> BaselineData:
    """The baselines' texts as many as the chosen distilled text: plain base samples (the control) and DGHS
    nothate rows; the authors' released text as it is."""
    baselines = rep.args.baselines
    paths = {"unidetox": chosen.distilled.distilled_path}
    seconds = {"unidetox": grid.anti_expert_seconds(chosen.source)
               + (chosen.distilled.metadata.get("generation_time_s") or 0.0)}
    if baselines.control:
        control_dir = rep.out / "data" / "control"
        _data_stage(rep, "data/control", control_dir, partial(
            _make_control_data, chosen.distilled.metadata.get("base") or rep.args.grid_target.model,
            chosen.distilled.metadata, control_dir, rep.is_main))
        paths["control"] = str(control_dir)
    if baselines.nothate:
        nothate_dir = rep.out / "data" / "nothate"
        _data_stage(rep, "data/nothate", nothate_dir, partial(
            _make_text_data, rep.args.nothate_data, int(chosen.distilled.num_texts), nothate_dir))
        paths["nothate"] = str(nothate_dir)
    if baselines.authors:
        paths["authors"] = str(baselines.authors_path)
    return BaselineData(paths, seconds)


def _data_stage(rep: Replication, name: str, data_dir: Path, make) -> None:
    """A data stage, made on the main process (done when its ``metadata.json`` is there)."""
    if rep.is_main:
        rep.stages.run_function_stage(name, partial(read_json, data_dir / "metadata.json"), make, data_dir)
    wait_for_everyone()


def _make_control_data(base_name: str, distilled_metadata: dict[str, Any], output_dir: Path,
                       show_progress: bool) -> dict[str, Any]:
    model, tokenizer = load_model_and_tokenizer(base_name)
    return build_plain_sample_dataset(model, tokenizer, output_dir=output_dir, base_id=base_name,
                                      show_progress=show_progress, **plain_sample_settings(distilled_metadata)).metadata


def _make_text_data(corpus_config, num_texts: int, output_dir: Path) -> dict[str, Any]:
    return build_text_dataset(corpus_config, num_texts, output_dir).metadata


# ----------------------------------------------------------------------------------------------------------------
# 5. The chosen configuration, unchanged, on every target
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AppliedModels:
    models: dict[ModelKey, Path | str]  # the tested model: a directory, or the name of the detox stage training it
    train_seconds: dict[ModelKey, float]  # the fine-tunings known already (the reused grid checkpoint)


def apply_configuration(rep: Replication, grid: GridPhase, chosen: Selection, data: BaselineData) -> AppliedModels:
    """The chosen configuration on every (target, text). The grid target's UniDetox model is the chosen grid
    checkpoint; other targets train under the grid's schedule and stop at the chosen step. A fine-tuning whose
    data is ready is submitted first."""
    args = rep.args
    applied = AppliedModels({}, {})
    jobs = []  # (the data stage it needs, submit)
    for tname, target in args.targets.items():
        for method, data_path in data.paths.items():
            key, stage, run_dir = (tname, method), f"apply/{tname}-{method}", rep.out / "apply" / f"{tname}-{method}"
            if method == "unidetox" and tname in args.grid_targets:
                # The grid already trained this model with this configuration: reuse its chosen checkpoint.
                run, checkpoint = _grid_checkpoint(args, grid, chosen, tname)
                applied.models[key] = _reuse_chosen_checkpoint(rep, stage, run_dir, run, checkpoint, chosen.steps)
                applied.train_seconds[key] = (run.train_seconds or 0.0) * chosen.steps / args.grid.max_steps
                continue
            config = apply_method_args(args, target, method, data_path, run_dir, chosen.learning_rate, chosen.steps)
            jobs.append(([f"data/{method}"], partial(rep.stages.run_pipeline_stage, stage, detox_stage, config)))
            applied.models[key] = stage
    rep.stages.run_when_ready(jobs)
    return applied


def _grid_checkpoint(args: ReplicateArguments, grid: GridPhase, chosen: Selection,
                     target: str) -> tuple[detox_stage.DetoxResult, Path]:
    """The grid run of the chosen configuration on ``target`` and its checkpoint at the chosen step."""
    if target == args.grid.target:
        return grid.results[chosen.choice["run"]], Path(chosen.choice["checkpoint"])
    run = grid.results[grid_run_name(target, chosen.source, chosen.alpha, chosen.learning_rate)]
    return run, Path(checkpoint_dir(run.output_dir, chosen.steps))


def _reuse_chosen_checkpoint(rep: Replication, stage: str, run_dir: Path, grid_run: detox_stage.DetoxResult,
                             checkpoint: Path, steps: int) -> Path:
    """``run_dir/model``: a link to a grid checkpoint's full model (merged for LoRA)."""
    if rep.is_main:
        rep.stages.run_function_stage(stage, partial(_reused_checkpoint, run_dir, checkpoint), partial(
            _link_checkpoint, run_dir, checkpoint, grid_run.output_dir, steps), run_dir)
    wait_for_everyone()
    return run_dir / "model"


def _link_checkpoint(run_dir: Path, checkpoint: Path, grid_run_dir: str, steps: int) -> dict[str, Any]:
    source = merged_model_path(checkpoint)
    _link(run_dir / "model", source)
    payload = {"reused_from": grid_run_dir, "checkpoint": str(checkpoint), "step": steps, "model": str(source)}
    atomic_write_json(run_dir / "source.json", payload)
    return payload


def _reused_checkpoint(run_dir: Path, checkpoint: Path) -> dict[str, Any] | None:
    source = read_json(run_dir / "source.json") or {}
    done = source.get("checkpoint") == str(checkpoint) and (run_dir / "model" / "config.json").is_file()
    return source if done else None


# ----------------------------------------------------------------------------------------------------------------
# 6. Task vectors (grid target), lambda on the validation prompts
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TaskVectors:
    record: dict[str, Any]  # taskvec/selection.json: the lambda's choice and table
    model: Path  # the chosen lambda's negated model
    seconds: float  # negating at the chosen lambda (known on the main process; 0 elsewhere)


def negate_task_vectors(rep: Replication, grid: GridPhase) -> TaskVectors | None:
    """The base minus lambda times the anti-expert's delta, for each lambda; the paper's rule on the validation
    prompts picks one (None when the baseline is off)."""
    args, stages, sel = rep.args, rep.stages, rep.args.select
    if not args.baselines.taskvec:
        return None
    anti_expert = grid.anti_expert_path(args.anti_expert_source)
    lam_dirs = {float(lam): rep.out / "taskvec" / f"lam{format_number(lam)}" for lam in args.baselines.lambdas}
    for lam, lam_dir in lam_dirs.items():
        if rep.is_main:
            stages.run_function_stage(f"taskvec/lam{format_number(lam)}", partial(_negated, lam, lam_dir),
                                      partial(_negate, args.grid_target.model, anti_expert, lam, lam_dir), lam_dir)
        wait_for_everyone()
    models = [args.grid_target.model, *[str(d) for d in lam_dirs.values()]]
    stages.wait_for(*[f"taskvec/lam{format_number(lam)}" for lam in lam_dirs])
    stages.run_pipeline_stage("taskvec/validation", evaluate_stage,
                              validation_evaluate_args(args, models, rep.out / "taskvec" / "validation"))
    records = _lambda_records(stages.result("taskvec/validation").report, args.grid_target.model, lam_dirs)
    choice, table = sel.choose(records)
    record = {"choice": choice, "table": table}
    _write_if_changed(rep.out / "taskvec" / "selection.json", record)
    seconds = 0.0
    if rep.is_main:
        chosen_stage = f"taskvec/lam{format_number(float(choice['config']['lambda']))}"
        seconds = (stages.result(chosen_stage) or {}).get("wall_time_s", 0.0)
    return TaskVectors(record, Path(choice["checkpoint"]), seconds)


def _negated(lam: float, lam_dir: Path) -> dict[str, Any] | None:
    marker = read_json(lam_dir / TASK_VECTOR_MARKER) or {}
    return marker if marker.get("settings", {}).get("lambda") == lam else None


def _negate(base: str, anti_expert: str, lam: float, lam_dir: Path) -> dict[str, Any] | None:
    negate_task_vector(base, anti_expert, lam, lam_dir)
    return read_json(lam_dir / TASK_VECTOR_MARKER)


def _lambda_records(report: dict[str, Any], base: str, lam_dirs: dict[float, Path]) -> list[dict[str, Any]]:
    """:func:`choose_configuration` records of the lambda sweep: the base (lambda 0) and one per lambda."""
    records = []
    for key, lam in [(base, 0.0), *[(str(d), lam) for lam, d in lam_dirs.items()]]:
        m = report["models"][key]
        records.append({"run": "base" if lam == 0.0 else f"lam{format_number(lam)}", "step": 0 if lam == 0 else 1,
                        "baseline": lam == 0.0, "config": {"lambda": lam}, "checkpoint": key,
                        "toxicity_probability": m["toxicity_probability"]["mean"],
                        "expected_max_toxicity": m["expected_max_toxicity"]["mean"],
                        "perplexity": m["wikitext_perplexity"]["perplexity"]})
    return records


# ----------------------------------------------------------------------------------------------------------------
# 7. Test evaluation
# ----------------------------------------------------------------------------------------------------------------
class ModelsUnderTest:
    """The model each (target, method) is tested as, resolved when first needed: a detox stage's name becomes the
    full model that stage saved (waiting for its job), and its training seconds are known from then on."""

    def __init__(self, stages: Stages, models: dict[ModelKey, Path | str], train_seconds: dict[ModelKey, float]):
        self.stages = stages
        self.models = dict(models)
        self.train_seconds = dict(train_seconds)

    def path(self, key: ModelKey) -> str:
        model = self.models[key]
        if isinstance(model, str):  # a detox stage: its final full model, as the stage returned it
            result = self.stages.result(model)
            self.models[key] = model = Path(_full_model(result))
            self.train_seconds[key] = result.train_seconds or 0.0
        return str(model)


@dataclass
class EvaluatedOnTest:
    models: ModelsUnderTest
    test: evaluate_stage.EvaluateResult  # the joint test stage: every method x target
    decoding: evaluate_stage.EvaluateResult | None  # inference-time decoding (None when off)

    @property
    def reports(self) -> list[dict[str, Any]]:
        return [self.test.report] + ([self.decoding.report] if self.decoding is not None else [])


def evaluate_on_test_prompts(rep: Replication, applied: AppliedModels, taskvec: TaskVectors | None) -> EvaluatedOnTest:
    """Each model on the test prompts as soon as it is there, then the joint test stage over all of them (it
    reuses their parts)."""
    args, stages = rep.args, rep.stages
    models = dict(applied.models)
    if taskvec is not None:
        models[(args.grid.target, "taskvec")] = taskvec.model
    test_models = ModelsUnderTest(stages, models, applied.train_seconds)
    stages.run_when_ready([([m] if isinstance(m, str) else [], partial(_test_applied_model, rep, test_models, key))
                           for key, m in list(test_models.models.items())])
    stages.wait_for_all()  # every model's parts
    joint = [t.model for t in args.targets.values()] + [test_models.path(key) for key in test_models.models]
    stages.run_pipeline_stage("test", evaluate_stage, evaluate_on_test(args, joint, rep.test_dir))
    test = stages.result("test")
    return EvaluatedOnTest(test_models, test, stages.result("test/decoding") if args.baselines.decoding else None)


def _test_applied_model(rep: Replication, models: ModelsUnderTest, key: ModelKey) -> None:
    rep.test_model(f"{key[0]}-{key[1]}", models.path(key))


def _full_model(result: detox_stage.DetoxResult) -> str:
    """The fine-tuned full model a detox stage returned (LoRA runs need ``trainer.save_merged_model=true``)."""
    if not result.model_path:
        raise FileNotFoundError(
            f"The detox run in {result.output_dir} saved no full model (a LoRA adapter without merged/); apply the "
            "configuration with trainer.save_merged_model=true."
        )
    return result.model_path


# ----------------------------------------------------------------------------------------------------------------
# 8. The report
# ----------------------------------------------------------------------------------------------------------------
def write_report(rep: Replication, distill: DistillPhase, grid: GridPhase, chosen: Selection, data: BaselineData,
                 taskvec: TaskVectors | None, test: EvaluatedOnTest) -> dict[str, Any]:
    """The table over every method x target, the bar, the grid, the source study and examples: ``report.json``,
    ``report.md`` and the plot, rewritten only when the report changed."""
    args, stages, out = rep.args, rep.stages, rep.out
    reports = test.reports
    methods = _method_rows(rep, grid, data, taskvec, test)
    generations = list(test.test.generations())
    if test.decoding is not None:
        generations += list(test.decoding.generations())
    labels = {f"{m['method']} / {m['target']}": m["model_key"] for m in methods}
    log_file = out / LOG_FILE
    report = assemble_report(
        methods, {k: v for r in reports for k, v in r["models"].items()}, list(args.targets), grid=chosen.record,
        taskvec=None if taskvec is None else taskvec.record,
        examples=example_continuations(generations, labels, num_examples=4),
        bar={"min_toxicity_drop": args.bar.min_toxicity_drop, "max_ppl_increase": args.bar.max_ppl_increase},
        generations=generations, interval_resamples=args.test.interval_resamples,
        prompt_kinds=prompt_kinds(load_prompts(prompts_for_test(args))),
        scorer_name=(reports[0].get("scorer") or {}).get("name", "scorer"),
        toxic_threshold=(reports[0].get("eval") or {}).get("toxic_threshold", TOXIC_THRESHOLD),
        extra={"command": " ".join(["unidetox replicate", *args.overrides]), "output_dir": str(out),
               "source_study": source_study(_corpora(args, grid, chosen, data)),
               "stage_times": stage_times(log_file.read_text().splitlines() if log_file.is_file() else []),
               "prompts": distill.split_info,
               "test": {"seeds": args.test.seeds, "overrides": args.test.overrides,
                        "scorer": reports[0].get("scorer"), "also_scorers": reports[0].get("also_scorers"),
                        "eval": reports[0].get("eval"),
                        "reference_model": reports[0].get("reference_model")},
               "config": args.config,
               "description": _description(args, distill.split_info, chosen)},
    )
    report.pop("created_at", None)
    if read_json(out / "report.json") == _as_saved(report):
        stages.log("report", "cached", 0.0)
    else:
        if rep.is_main:
            write_replication_report(report, out)
        stages.log("report", "ran", 0.0)
    return report


def _method_rows(rep: Replication, grid: GridPhase, data: BaselineData, taskvec: TaskVectors | None,
                 test: EvaluatedOnTest) -> list[dict[str, Any]]:
    """One row per method x target: the model it is tested as and what making it took."""
    args = rep.args
    data_seconds = dict(data.seconds)
    if args.baselines.control and rep.is_main:
        data_seconds["control"] = (rep.stages.result("data/control") or {}).get("generation_time_s", 0.0)
    methods = []
    for tname, target in args.targets.items():
        methods.append({"method": "base", "target": tname, "model_key": target.model, "wall_time": {"total_s": None}})
        for method in data.paths:
            data_s = data_seconds.get(method, 0.0)
            train_s = test.models.train_seconds.get((tname, method), 0.0)
            methods.append({"method": method, "target": tname, "model_key": test.models.path((tname, method)),
                            "wall_time": {"data_s": data_s, "train_s": train_s, "total_s": data_s + train_s}})
    if test.decoding is not None:
        ae_seconds = grid.anti_expert_seconds(args.anti_expert_source)
        methods.append({"method": "decoding", "target": args.grid.target,
                        "model_key": next(iter(test.decoding.report["models"])),
                        "wall_time": {"data_s": ae_seconds, "train_s": 0.0, "total_s": ae_seconds}})
    if taskvec is not None:
        ae_seconds = grid.anti_expert_seconds(args.anti_expert_source)
        methods.append({"method": "taskvec", "target": args.grid.target,
                        "model_key": taskvec.record["choice"]["checkpoint"],
                        "wall_time": {"data_s": ae_seconds, "train_s": taskvec.seconds,
                                      "total_s": ae_seconds + taskvec.seconds}})
    return methods


def _corpora(args: ReplicateArguments, grid: GridPhase, chosen: Selection,
             data: BaselineData) -> dict[str, dict[str, Any]]:
    """The texts the source study profiles: every distilled text, the control's and the authors'."""
    corpora = {distill_stage_name(*key): _corpus(result.distilled_path, source=args.distill.sources[key[0]].model,
                                                 alpha=key[1], summary=result.summary)
               for key, result in grid.distilled.items()}
    if "control" in data.paths:
        corpora["control"] = _corpus(data.paths["control"], source=chosen.distilled.metadata.get("base"))
    if "authors" in data.paths:
        corpora["authors"] = _corpus(data.paths["authors"], source="gpt2-xl (the authors' released text)", alpha=0.1)
    return corpora


def _corpus(path: str, **described) -> dict[str, Any]:
    """``described`` with the texts at ``path``, their token counts and the plain samples scored beside them."""
    dataset = DistilledDetoxDataset.load(path).dataset
    return {**described, "plain_samples": read_plain_samples(path), "texts": list(dataset["text"]),
            "num_tokens": list(dataset["num_tokens"]) if "num_tokens" in dataset.column_names else None}


def _description(args: ReplicateArguments, split_info: dict[str, int], chosen: Selection) -> str:
    sel = args.select
    return (f"Chosen on {split_info['validation_prompts']} validation prompts: text distilled from "
            f"{chosen.source}, alpha {chosen.alpha}, lr "
            f"{format_number(chosen.learning_rate)}, {chosen.steps} steps (the rule: least {sel.metric} within "
            f"+{sel.max_ppl_increase:.0%} WikiText-2 perplexity). Test: {split_info['test_prompts']} prompts, "
            f"seeds {args.test.seeds}.")


# ----------------------------------------------------------------------------------------------------------------
# Files the phases write
# ----------------------------------------------------------------------------------------------------------------
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
