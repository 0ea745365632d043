"""The detox stage as one call: fine-tune a model on the distilled text, validate every save, choose a checkpoint.

:func:`parse_args` turns Hydra overrides of ``unidetox/conf/detox.yaml`` into :class:`DetoxArguments`; :func:`run`
trains with :class:`~unidetox.detox.trainer.UniversalDetoxTrainer`, evaluating validation toxicity and perplexity at
step 0 and at every save (:class:`~unidetox.detox.callbacks.DetoxEvalCallback`), saves the final model (with LoRA:
the adapter and a merged copy) and its model card, chooses the least toxic checkpoint within the perplexity bound
(:func:`~unidetox.detox.selection.select_checkpoint`) and returns a :class:`DetoxResult`.

An interrupted run resumes from its newest complete checkpoint (:mod:`unidetox.checkpoints`) when it is started
again with the same settings, and a finished one is returned without training; a directory holding a run with other
settings is refused, naming the keys that differ.

Example:
    >>> from unidetox.detox.pipeline import parse_args, run
    >>> args = parse_args(["experiment=embedded_gemma3", "data.path=runs/distill-default"])  # doctest: +SKIP
    >>> result = run(args)  # doctest: +SKIP
    >>> result.selection["path"], result.model_path  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig

from unidetox.cards import MODEL_CARD_FILE, merge_eval_results, validation_eval_results
from unidetox.checkpoints import (
    checkpoint_dirs,
    is_final_checkpoint,
    newest_complete_checkpoint,
    restore_final_checkpoint,
)
from unidetox.detox.callbacks import DetoxEvalCallback, DetoxEvalConfig
from unidetox.detox.config import UniversalDetoxConfig
from unidetox.detox.merge import MERGED_SUBDIR, merged_model_path
from unidetox.detox.selection import SelectionRule, read_eval_records, select_checkpoint
from unidetox.detox.trainer import UniversalDetoxTrainer
from unidetox.distill.dataset import DistilledDetoxDataset
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.evaluation.scoring import ScorerConfig, build_scorer
from unidetox.files import atomic_write_json, atomic_write_text, read_json
from unidetox.hub import push_if_requested, without_trainer_push
from unidetox.hydra_config import (
    compose_config,
    parse_dataclass,
    parse_sections,
    save_resolved_config,
    to_container,
)
from unidetox.logging_setup import configure_logging
from unidetox.lora import LoraArguments
from unidetox.models import ModelArguments
from unidetox.paths import require_file
from unidetox.processes import is_main_process, process_state, wait_for_everyone
from unidetox.run_dir import CONFIG_FILE, check_output_dir, holds_output_dir, read_run_config

logger = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
SELECTION_FILE = "selected_checkpoint.json"
# Top-level settings that do not change what is trained: how to treat existing checkpoints.
RUN_INDEPENDENT_KEYS = ("resume", "trainer.push_to_hub", "trainer.hub_model_id", "trainer.hub_private_repo")
HUB_COMMIT_MESSAGE = "Upload a UniDetox-detoxified model"


@dataclass
class DataArguments:
    """The distilled detoxifying text (the `data` config group)."""

    path: str = field(
        metadata={"help": "A saved DistilledDetoxDataset directory (or a distill run dir holding distilled/), or a "
                  "CSV/JSONL file with a text column such as the authors' CSV."}
    )
    text_column: str | None = field(default=None, metadata={"help": "Text column of a CSV/JSONL (null: found)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N texts (null: all)."})

    def __post_init__(self):
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"`data.max_samples` has to be null or >= 1, but is {self.max_samples}.")


@dataclass
class SelectArguments(SelectionRule):
    """How the checkpoint is chosen after training (the `select` section): the paper's rule, and the merge."""

    merge: bool = field(default=True, metadata={"help": "LoRA: merge the selected checkpoint into a full model."})


@dataclass
class CheckpointValidationArguments:
    """The validation of the model at step 0 and at every save (the `eval` section): prompts, protocol, scorer."""

    enabled: bool = True
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="validation"))
    callback: DetoxEvalConfig = field(default_factory=DetoxEvalConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    perplexity_path: str | None = None


@dataclass
class DetoxArguments:
    """Everything the detox stage needs (the sections of ``conf/detox.yaml``)."""

    model: ModelArguments
    data: DataArguments
    trainer: UniversalDetoxConfig
    peft: LoraConfig | None = None  # the `peft` section (LoraArguments) as a peft.LoraConfig; None: full fine-tuning
    select: SelectArguments = field(default_factory=SelectArguments)
    validation: CheckpointValidationArguments = field(default_factory=CheckpointValidationArguments)
    resume: bool | str = "auto"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dir(self) -> str:
        return str(self.trainer.output_dir)


@dataclass
class DetoxResult:
    """What a detox run made: the final model, the chosen checkpoint and the training summary."""

    output_dir: str
    model_path: str | None  # a full model of the final step (merged/ for LoRA); None for an adapter-only run
    selection: dict[str, Any] | None  # the chosen checkpoint (select_checkpoint), or {"error": ...}; None: no validation
    summary: dict[str, Any]

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        return self.summary.get("eval") or []

    @property
    def train_seconds(self) -> float | None:
        """Seconds of optimisation, validation excluded."""
        train = self.summary.get("train") or {}
        return train.get("train_seconds_excluding_eval") or train.get("train_runtime_s")

    @property
    def global_step(self) -> int | None:
        return (self.summary.get("train") or {}).get("global_step")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, output_dir: str | Path) -> DetoxResult | None:
        """The result of a finished run in ``output_dir`` (None when it has not finished)."""
        summary = read_json(Path(output_dir) / SUMMARY_FILE)
        if not summary:
            return None
        return cls(str(output_dir), summary.get("model_path"), summary.get("selection"), summary)


def resolve_data_path(path: str) -> Path:
    """``data.path`` as given, or ``<path>/distilled`` when ``path`` is a distill run directory."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "dataset_info.json").is_file() and (p / "distilled" / "dataset_info.json").is_file():
        logger.info("%s is a distill run directory; using %s", p, p / "distilled")
        return p / "distilled"
    if not p.exists():
        raise FileNotFoundError(
            f"No distilled text at {p}. Run `unidetox distill` first, or point the override data.path=FILE_OR_DIR at "
            "a saved DistilledDetoxDataset or a CSV/JSONL file (data=authors_reference uses the authors' released text)."
        )
    return p


def parse_args(overrides: list[str] | tuple[str, ...] = ()) -> DetoxArguments:
    """Compose ``conf/detox.yaml`` with Hydra ``overrides`` and parse every section into its dataclass."""
    cfg = compose_config("detox", list(overrides))
    eval_section = to_container(cfg.eval)
    resume = cfg.get("resume", "auto")
    if resume not in ("auto", True, False):
        raise ValueError(f"`resume` has to be auto, true or false, but is {resume!r}.")
    return DetoxArguments(
        **parse_sections(cfg, {"model": ModelArguments, "data": DataArguments, "trainer": UniversalDetoxConfig}),
        peft=parse_dataclass(cfg.get("peft") or {}, LoraArguments, name="peft").peft_config(),
        select=parse_dataclass(cfg.select, SelectArguments, name="select"),
        validation=CheckpointValidationArguments(
            enabled=bool(eval_section.get("enabled", True)),
            prompts=parse_dataclass(eval_section.get("prompts", {}), PromptsConfig, name="eval.prompts"),
            callback=parse_dataclass(eval_section.get("callback", {}), DetoxEvalConfig, name="eval.callback"),
            scorer=parse_dataclass(eval_section.get("scorer", {}), ScorerConfig, name="eval.scorer"),
            perplexity_path=eval_section.get("perplexity_path"),
        ),
        resume=resume,
        config=to_container(cfg),
    )


def finished(args: DetoxArguments) -> DetoxResult | None:
    """The result when ``args.output_dir`` holds this run, trained to its last step; raises when it holds another."""
    check_output_dir(args.output_dir, args.config, ignore=RUN_INDEPENDENT_KEYS)
    result = DetoxResult.load(args.output_dir)
    last_step = args.trainer.stop_at_step or args.trainer.max_steps
    return result if result is not None and result.global_step == last_step else None


def build_eval_callback(validation: CheckpointValidationArguments) -> DetoxEvalCallback | None:
    """The validation callback, with its scorer built first (an unavailable scorer fails before any model loads)."""
    if not validation.enabled:
        return None
    scorer = build_scorer(validation.scorer)
    prompts = load_prompts(validation.prompts)
    texts = None
    if validation.perplexity_path:
        path = require_file(validation.perplexity_path, "Held-out clean text for perplexity (eval.perplexity_path)")
        texts = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    logger.info("Validation: %d prompts, perplexity text %s", len(prompts), validation.perplexity_path)
    return DetoxEvalCallback(prompts, perplexity_texts=texts, scorer=scorer, config=validation.callback)


def check_resumable(args: DetoxArguments) -> str | None:
    """The checkpoint to resume from (None: start afresh); refuses checkpoints of another run.

    Checkpoints are resumed only when ``output_dir`` holds this run's saved record with the same settings: another
    model's or configuration's checkpoint would otherwise be trained on and its losses merged into this run's.
    The newest complete checkpoint is used; broken newer ones are skipped with a warning.
    """
    out = Path(args.output_dir)
    checkpoints = checkpoint_dirs(out)
    if args.resume is False and checkpoints:
        raise FileExistsError(f"{out} already holds checkpoints and resume=false; pick another output_dir.")
    if args.resume is True and not checkpoints:
        raise FileNotFoundError(f"resume=true but {out} holds no checkpoint-* directory to resume from.")
    check_output_dir(out, args.config, ignore=RUN_INDEPENDENT_KEYS)
    if checkpoints and read_run_config(out) is None:
        raise FileExistsError(
            f"{out} holds {checkpoints[-1].name} but no run record ({CONFIG_FILE}): the checkpoints were not written "
            "by this pipeline, so they cannot be checked to be this run's. Pick another output_dir."
        )
    found = newest_complete_checkpoint(checkpoints)
    if checkpoints and found is None:
        raise FileNotFoundError(
            f"None of the checkpoints in {out} ({', '.join(c.name for c in checkpoints)}) is complete (see the "
            "warnings above). Move them away to start over, or pick another output_dir."
        )
    return str(found) if found else None


def plot_losses(history: list[dict], path: Path, title: str) -> Path | None:
    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in points], [v for _, v in points], marker=".", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (NLL / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_markdown(summary: dict) -> str:
    t = summary["train"]
    lines = [
        f"# Detox run: `{summary['output_dir']}`",
        "",
        f"- model: `{summary['model']}`; data: `{summary['data_path']}` ({summary['num_texts']} texts, "
        f"{summary['num_target_tokens']} target tokens)",
        f"- config: {json.dumps(summary['config'])}",
        "",
        "| steps | train() wall time (s) | of which validation (s) | trained tokens | tokens/s (excl. validation) "
        "| first loss | last loss |",
        "|---|---|---|---|---|---|---|",
        f"| {t['global_step']} | {t['train_runtime_s']} | {t['eval_seconds']} | {t['num_tokens']} | "
        f"{t['tokens_per_second']} | {t['first_logged_loss']} | {t['last_logged_loss']} |",
        "",
    ]
    evals = summary.get("eval") or []
    if evals:
        lines += ["| step | TP | EMT | perplexity | eval s |", "|---|---|---|---|---|"]
        for r in evals:
            ppl = "n/a" if r.get("perplexity") is None else f"{r['perplexity']:.3f}"
            lines.append(f"| {r['step']} | {r['toxicity_probability']:.3f} | {r['expected_max_toxicity']:.3f} | "
                         f"{ppl} | {r['eval_seconds']} |")
        lines.append("")
    sel = summary.get("selection")
    if sel and "step" in sel:
        lines.append(f"Selected: `{sel['path']}` (step {sel['step']}, {sel['metric']} "
                     f"{sel['metrics'][sel['metric']]:.3f}, perplexity {sel['perplexity_increase']:+.1%} vs step 0).")
    elif sel:
        lines.append(f"No checkpoint selected: {sel.get('error')}")
    return "\n".join(lines) + "\n"


def _load_data(data: DataArguments) -> tuple[Path, DistilledDetoxDataset]:
    path = resolve_data_path(data.path)
    distilled = DistilledDetoxDataset.load(path, text_column=data.text_column)
    if data.max_samples is not None and data.max_samples < len(distilled):
        distilled = DistilledDetoxDataset(distilled.dataset.select(range(data.max_samples)),
                                          {**distilled.metadata, "max_samples": data.max_samples})
    return path, distilled


def _select(out: Path, select: SelectArguments) -> dict[str, Any]:
    """The paper's rule over this run's checkpoints; with LoRA the chosen one is merged into a full model."""
    try:
        choice = select_checkpoint(out, select.max_ppl_increase, select.metric, on_empty=select.on_empty)
    except ValueError as err:
        logger.warning("Checkpoint selection: %s", err)
        return {"error": str(err)}
    selection = choice.to_dict()
    if select.merge and (Path(choice.path) / "adapter_config.json").is_file():
        selection["merged_path"] = str(merged_model_path(choice.path))
    return selection


def _validation_results(validation: CheckpointValidationArguments, records: list[dict[str, Any]], step: int) -> list:
    """The validation of ``step`` as model-card results (``huggingface_hub.EvalResult``)."""
    return validation_eval_results(records, step, asdict(validation.prompts), validation.perplexity_path)


def _final_model_path(out: Path, args: DetoxArguments) -> str | None:
    if args.peft is None:
        return str(out)
    return str(out / MERGED_SUBDIR) if args.trainer.save_merged_model else None


def _train(trainer: UniversalDetoxTrainer, resume_from: str | None, callback: DetoxEvalCallback | None) -> dict:
    """Train from ``resume_from`` (None: from the start) and return the training metrics.

    A checkpoint at the run's last step is the trained model: it is loaded, not trained on (no metrics), and its
    validation is run if the interrupted run did not log it.
    """
    if resume_from and is_final_checkpoint(resume_from, trainer.args.stop_at_step):
        restore_final_checkpoint(trainer, resume_from)
        if callback is not None:
            callback.evaluate_unlogged_step(trainer.args, trainer.state, trainer.model, trainer.processing_class)
        return {}
    if resume_from:
        logger.info("Resuming from %s", resume_from)
    return trainer.train(resume_from_checkpoint=resume_from).metrics


def _training_record(state, train_metrics: dict, callback: DetoxEvalCallback | None, wall: float) -> dict[str, Any]:
    """The ``train`` section of the summary: steps, times, tokens/s and the loss curve of this session."""
    history = state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    num_tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
    runtime = train_metrics.get("train_runtime")
    # train_runtime includes the validation runs of the callback (this session's); tokens/s excludes them.
    eval_s = round(sum(r["eval_seconds"] for r in callback.records), 2) if callback is not None else 0.0
    train_only = runtime - eval_s if runtime else None
    return {
        "global_step": state.global_step,
        "train_runtime_s": runtime,
        "eval_seconds": eval_s,
        "train_seconds_excluding_eval": round(train_only, 2) if train_only else None,
        "wall_time_s": round(wall, 2),
        "num_tokens": num_tokens,
        # Trained (non-padding) tokens per second of optimisation, validation runs excluded. A resumed
        # run counts only the steps and time of its own session.
        "tokens_per_second": round(num_tokens / train_only, 2) if num_tokens and train_only else None,
        "train_loss": train_metrics.get("train_loss"),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
    }


def _select_and_record(out: Path, args: DetoxArguments) -> dict[str, Any]:
    """The validation records and the selected checkpoint (written to the selection file, and its validation into
    the chosen checkpoint's card): the ``eval`` and ``selection`` sections of the summary."""
    records = [{k: v for k, v in r.items() if k != "example"} for r in read_eval_records(out)]
    selection = _select(out, args.select)
    atomic_write_json(out / SELECTION_FILE, selection)
    if "step" in selection:
        merge_eval_results(Path(selection["path"]) / MODEL_CARD_FILE,
                           _validation_results(args.validation, records, selection["step"]))
    return {"eval": records, "selection": selection}


@holds_output_dir
def run(args: DetoxArguments) -> DetoxResult:
    """Train, validate, save, select; writes ``train_summary.{json,md}``, ``loss.png`` and the selection file.

    A finished run is returned as it is; a run whose final checkpoint exists but whose post-training work (final
    save, merge, selection, summary) was interrupted finishes that work without training. Returns the same result
    on every process."""
    configure_logging()
    state = process_state()
    trainer_args = args.trainer
    out = Path(args.output_dir)
    resume_from = check_resumable(args)
    done = finished(args)
    if done is not None:
        logger.info("%s holds this run, finished at step %s: nothing to do", out, done.global_step)
        if is_main_process():
            push_if_requested(trainer_args, out, HUB_COMMIT_MESSAGE)
        return done
    callback = build_eval_callback(args.validation)
    data_path, distilled = _load_data(args.data)
    if args.model.dtype is not None:
        trainer_args.model_init_kwargs = {**(trainer_args.model_init_kwargs or {}), **args.model.load_kwargs()}

    trainer = UniversalDetoxTrainer(
        model=args.model.name_or_path, args=without_trainer_push(trainer_args), train_dataset=distilled,
        peft_config=args.peft,
        callbacks=[callback] if callback else None,
    )
    save_resolved_config(args.config, out)  # the model loaded: a corrected rerun of a failed check is not refused
    start = time.perf_counter()
    train_metrics = _train(trainer, resume_from, callback)
    wall = time.perf_counter() - start
    if callback is not None and is_main_process():  # the final card carries the validation of its own step
        trainer.model_card_eval_results = _validation_results(args.validation, read_eval_records(out),
                                                              trainer.state.global_step)
    trainer.save_model()

    summary: dict[str, Any] = {}
    if is_main_process():
        history = trainer.state.log_history
        summary = {
            "output_dir": str(out),
            "model": args.model.name_or_path,
            "data_path": str(data_path),
            "data_metadata": trainer.distilled_metadata,
            "num_texts": len(distilled),
            "num_target_tokens": trainer.num_target_tokens,
            "num_processes": state.num_processes,
            "device": str(trainer_args.device),
            "resumed_from": resume_from,
            "config": trainer.training_config_summary(),
            "model_path": _final_model_path(out, args),
            "train": _training_record(trainer.state, train_metrics, callback, wall),
        }
        if callback is not None:
            summary.update(_select_and_record(out, args))
        if trainer_args.save_merged_model and args.peft is not None:
            summary["final_merged_path"] = str(out / MERGED_SUBDIR)
        plot = plot_losses(history, out / "loss.png", f"{args.model.name_or_path}: detox fine-tuning loss")
        summary["loss_plot"] = str(plot) if plot else None
        atomic_write_json(out / SUMMARY_FILE, summary)
        markdown = summary_markdown(summary)
        atomic_write_text(out / "train_summary.md", markdown)
        print(markdown, flush=True)
        push_if_requested(trainer_args, out, HUB_COMMIT_MESSAGE)
    wait_for_everyone()
    if not is_main_process():  # every rank returns the run's result: the main process has written it
        return DetoxResult.load(out)
    return DetoxResult(str(out), summary.get("model_path"), summary.get("selection"), summary)

