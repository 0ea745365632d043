#!/usr/bin/env python
"""Detox any causal LM with the distilled detoxifying text and ONE configuration (UniDetox step 3).

    accelerate launch recipes/detox.py                                      # smollm2-135m, embedded LoRA config, CPU
    accelerate launch recipes/detox.py experiment=embedded_gemma3 data.path=FILE_OR_DIR output_dir=DIR trainer.max_steps=N
    accelerate launch recipes/detox.py model=meta-llama/Llama-2-7b-hf trainer=paper
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/detox.py experiment=paper_llama2_7b

Steps: (1) train with :class:`unidetox.UniversalDetoxTrainer`, evaluating validation toxicity and perplexity at
step 0 and at every save (:class:`unidetox.detox.callbacks.DetoxEvalCallback`), resuming from the newest checkpoint in
``output_dir`` when there is one; (2) save the final model (with LoRA: the adapter and a merged copy) and its model
card; (3) choose the least toxic checkpoint within the perplexity bound (:func:`unidetox.detox.selection.select_checkpoint`)
and, with LoRA, merge it; (4) write ``train_summary.json``/``.md`` (wall time, tokens/s, losses) and ``loss.png``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from unidetox.detox.callbacks import DetoxEvalCallback, DetoxEvalConfig  # noqa: E402
from unidetox.detox.selection import select_checkpoint  # noqa: E402
from unidetox.detox.config import UniversalDetoxConfig  # noqa: E402
from unidetox.hydra_config import compose_config, parse_dataclass, save_resolved_config, to_container  # noqa: E402
from unidetox.io import atomic_write_json  # noqa: E402
from unidetox.processes import end_process_group  # noqa: E402

logger = logging.getLogger("unidetox.recipes.detox")


@dataclass
class ModelArguments:
    """The model to detoxify (the shared `model` config group)."""

    name_or_path: str = field(metadata={"help": "Hub id, local path, or embedded name (smollm2-135m, gemma3-270m)."})
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype: float32/bfloat16/float16/auto; null: float32 (bf16 autocast on GPU)."},
    )


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
class SelectArguments:
    """How the checkpoint is chosen after training (the `select` section)."""

    max_ppl_increase: float = field(default=0.1, metadata={"help": "Allowed relative perplexity increase (0.1 = +10%)."})
    metric: str = field(default="expected_max_toxicity", metadata={"help": "expected_max_toxicity or toxicity_probability."})
    merge: bool = field(default=True, metadata={"help": "LoRA: merge the selected checkpoint into a full model."})


def resolve_data_path(path: str) -> Path:
    """``data.path`` as given, or ``<path>/distilled`` when ``path`` is a distill run directory."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "dataset_info.json").is_file() and (p / "distilled" / "dataset_info.json").is_file():
        logger.info("%s is a distill run directory; using %s", p, p / "distilled")
        return p / "distilled"
    if not p.exists():
        raise FileNotFoundError(
            f"No distilled text at {p}. Run `accelerate launch recipes/distill.py` first, or point the override "
            "data.path=FILE_OR_DIR at a saved DistilledDetoxDataset or a CSV/JSONL file (data=authors_reference uses "
            "the authors' released text)."
        )
    return p


def build_peft_config(section: dict[str, Any] | None):
    """``peft`` section -> ``peft.LoraConfig`` (``use_peft: false`` -> None, i.e. full fine-tuning)."""
    section = dict(section or {})
    if not section.pop("use_peft", False):
        return None
    from peft import LoraConfig

    section.setdefault("task_type", "CAUSAL_LM")
    try:
        return LoraConfig(**section)
    except TypeError as err:
        raise ValueError(f"Bad `peft` section {section}: {err}. Use peft.LoraConfig field names.") from err


def parse_config(overrides):
    """Compose ``conf/detox.yaml`` with ``overrides`` and parse every section into its dataclass."""
    from unidetox.evaluation.prompts import PromptsConfig
    from unidetox.evaluation.scoring import ScorerConfig

    cfg = compose_config("detox", overrides)
    eval_section = to_container(cfg.eval)
    parsed = {
        "model": parse_dataclass(cfg.model, ModelArguments),
        "data": parse_dataclass(cfg.data, DataArguments),
        "trainer": parse_dataclass(cfg.trainer, UniversalDetoxConfig),
        "peft": build_peft_config(to_container(cfg.get("peft"))),
        "select": parse_dataclass(cfg.select, SelectArguments),
        "eval_enabled": bool(eval_section.get("enabled", True)),
        "prompts": parse_dataclass(eval_section.get("prompts", {}), PromptsConfig),
        "perplexity_path": eval_section.get("perplexity_path"),
        "callback": parse_dataclass(eval_section.get("callback", {}), DetoxEvalConfig),
        "scorer": parse_dataclass(eval_section.get("scorer", {}), ScorerConfig),
    }
    resume = cfg.get("resume", "auto")
    if resume not in ("auto", True, False):
        raise ValueError(f"`resume` has to be auto, true or false, but is {resume!r}.")
    parsed["resume"] = resume
    return cfg, parsed


def build_eval_callback(parsed) -> DetoxEvalCallback | None:
    if not parsed["eval_enabled"]:
        return None
    from unidetox.evaluation.prompts import load_prompts
    from unidetox.evaluation.scoring import build_scorer
    from unidetox.paths import require_file

    prompts = load_prompts(parsed["prompts"])
    texts = None
    if parsed["perplexity_path"]:
        path = require_file(parsed["perplexity_path"], "Held-out clean text for perplexity (eval.perplexity_path)")
        texts = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    logger.info("Validation: %d prompts, perplexity text %s", len(prompts), parsed["perplexity_path"])
    return DetoxEvalCallback(prompts, perplexity_texts=texts, scorer=build_scorer(parsed["scorer"]),
                             config=parsed["callback"])


def last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


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


def main(overrides: list[str] | None = None) -> dict:
    import torch

    from unidetox.detox.selection import read_eval_records
    from unidetox.detox.merge import MERGED_SUBDIR, merge_lora_checkpoint
    from unidetox.detox.trainer import UniversalDetoxTrainer
    from unidetox.distill.dataset import DistilledDetoxDataset
    from unidetox.processes import process_state

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = sys.argv[1:] if overrides is None else overrides
    cfg, parsed = parse_config(overrides)
    state = process_state()
    args: UniversalDetoxConfig = parsed["trainer"]
    model_args: ModelArguments = parsed["model"]
    data_args: DataArguments = parsed["data"]
    out = Path(args.output_dir)

    resume_from = last_checkpoint(out) if parsed["resume"] in ("auto", True) else None
    if parsed["resume"] is False and last_checkpoint(out):
        raise FileExistsError(f"{out} already holds checkpoints and resume=false; pick another output_dir.")
    if parsed["resume"] is True and resume_from is None:
        raise FileNotFoundError(f"resume=true but {out} holds no checkpoint-* directory to resume from.")
    if state.is_main_process:
        save_resolved_config(cfg, out)

    data_path = resolve_data_path(data_args.path)
    distilled = DistilledDetoxDataset.load(data_path, text_column=data_args.text_column)
    if data_args.max_samples is not None and data_args.max_samples < len(distilled):
        distilled = DistilledDetoxDataset(distilled.dataset.select(range(data_args.max_samples)),
                                          {**distilled.metadata, "max_samples": data_args.max_samples})
    if model_args.dtype is not None:
        dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "dtype": dtype}

    callback = build_eval_callback(parsed)
    trainer = UniversalDetoxTrainer(
        model=model_args.name_or_path, args=args, train_dataset=distilled, peft_config=parsed["peft"],
        callbacks=[callback] if callback else None,
    )
    if resume_from:
        logger.info("Resuming from %s", resume_from)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - start
    trainer.save_model()

    summary: dict[str, Any] = {}
    if state.is_main_process:
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        num_tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), None)
        runtime = result.metrics.get("train_runtime")
        # train_runtime includes the validation runs of the callback (this session's); tokens/s excludes them.
        eval_s = round(sum(r["eval_seconds"] for r in callback.records), 2) if callback is not None else 0.0
        train_only = runtime - eval_s if runtime else None
        summary = {
            "output_dir": str(out),
            "command": " ".join(["accelerate launch recipes/detox.py", *overrides]),
            "model": model_args.name_or_path,
            "data_path": str(data_path),
            "data_metadata": trainer.distilled_metadata,
            "num_texts": len(distilled),
            "num_target_tokens": trainer.num_target_tokens,
            "num_processes": state.num_processes,
            "device": str(args.device),
            "resumed_from": resume_from,
            "config": trainer.training_config_summary(),
            "train": {
                "global_step": trainer.state.global_step,
                "train_runtime_s": runtime,
                "eval_seconds": eval_s,
                "train_seconds_excluding_eval": round(train_only, 2) if train_only else None,
                "wall_time_s": round(wall, 2),
                "num_tokens": num_tokens,
                # Trained (non-padding) tokens per second of optimisation, validation runs excluded. A resumed
                # run counts only the steps and time of its own session.
                "tokens_per_second": round(num_tokens / train_only, 2) if num_tokens and train_only else None,
                "train_loss": result.metrics.get("train_loss"),
                "first_logged_loss": losses[0] if losses else None,
                "last_logged_loss": losses[-1] if losses else None,
                "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
            },
        }
        if callback is not None:
            summary["eval"] = [{k: v for k, v in r.items() if k != "example"} for r in read_eval_records(out)]
            select = parsed["select"]
            try:
                choice = select_checkpoint(out, max_ppl_increase=select.max_ppl_increase, metric=select.metric)
                selection = choice.to_dict()
                if select.merge and (Path(choice.path) / "adapter_config.json").is_file():
                    merged = Path(choice.path) / MERGED_SUBDIR
                    if not (merged / "config.json").is_file():
                        merge_lora_checkpoint(choice.path, merged)
                    selection["merged_path"] = str(merged)
            except ValueError as err:
                logger.warning("Checkpoint selection: %s", err)
                selection = {"error": str(err)}
            (out / "selected_checkpoint.json").write_text(json.dumps(selection, indent=2, default=str))
            summary["selection"] = selection
        if args.save_merged_model and parsed["peft"] is not None:
            summary["final_merged_path"] = str(out / MERGED_SUBDIR)
        plot = plot_losses(trainer.state.log_history, out / "loss.png",
                           f"{model_args.name_or_path}: detox fine-tuning loss")
        summary["loss_plot"] = str(plot) if plot else None
        atomic_write_json(out / "train_summary.json", summary)
        md = summary_markdown(summary)
        (out / "train_summary.md").write_text(md)
        print(md, flush=True)
    state.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
    end_process_group()
