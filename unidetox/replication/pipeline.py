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

The sections of the config are :mod:`unidetox.replication.config`; each stage's arguments are composed in
:mod:`unidetox.replication.plan`; :func:`run` is the sequence of :mod:`unidetox.replication.phases`, each a function
returning what the later ones read. With ``launcher.engine=submitit`` the stages that are not finished run as
submitit jobs, locally or on SLURM (:mod:`unidetox.replication.stages`, :mod:`unidetox.replication.launcher`).
"""


from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unidetox.detox.callbacks import DetoxEvalConfig
from unidetox.detox.selection import SelectionRule
from unidetox.distill.corpus import ToxicCorpusConfig
from unidetox.hydra_config import compose_config, parse_dataclass, save_resolved_config, to_container
from unidetox.logging_setup import configure_logging
from unidetox.processes import process_state, wait_for_everyone
from unidetox.replication.config import (
    BaselineArguments,
    DistillAlphaArguments,
    DistillSweepArguments,
    GridArguments,
    ReplicateArguments,
    SuccessBar,
    TargetArguments,
    TestArguments,
    ValidationMeasurementArguments,
    ValidationSplitArguments,
)
from unidetox.replication.launcher import LauncherArguments
from unidetox.replication.phases import (
    Replication,
    apply_configuration,
    distill_texts,
    evaluate_on_test_prompts,
    make_baseline_data,
    negate_task_vectors,
    run_grid,
    select_configuration,
    write_report,
)
from unidetox.replication.stages import Stages
from unidetox.run_dir import holds_output_dir

logger = logging.getLogger(__name__)


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
        validation=ValidationMeasurementArguments(
            **vars(parse_dataclass(validation, ValidationSplitArguments, name="validation")),
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
    unknown = [t for t in args.grid.transfer_targets if t not in args.targets]
    if unknown:
        raise ValueError(f"`grid.transfer_targets` {unknown} are not keys of `targets` ({sorted(args.targets)}).")
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
    started = time.perf_counter()
    rep = Replication(args, stages, state, out)
    distill = distill_texts(rep)
    grid = run_grid(rep, distill)
    chosen = select_configuration(rep, grid)
    data = make_baseline_data(rep, grid, chosen)
    applied = apply_configuration(rep, grid, chosen, data)
    taskvec = negate_task_vectors(rep, grid)
    test = evaluate_on_test_prompts(rep, applied, taskvec)
    report = write_report(rep, distill, grid, chosen, data, taskvec, test)
    if state.is_main_process:
        print((out / "report.md").read_text(), flush=True)
        logger.info("Replication done in %.0fs: %s", time.perf_counter() - started, out / "report.md")
    wait_for_everyone()
    return ReplicateResult(str(out), report, stages.session)
