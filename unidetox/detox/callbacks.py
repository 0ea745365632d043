"""Checkpoint evaluation during detox fine-tuning, and the paper's rule for choosing the checkpoint.

:class:`DetoxEvalCallback` evaluates the model before training (the baseline) and at every save: it samples
continuations of a small *validation* prompt set, scores them with a toxicity scorer, and measures perplexity on
held-out clean text. Each evaluation is one JSON line in ``<output_dir>/detox_eval.jsonl`` and goes through the trainer's
``log`` (its ``log_history`` and every ``report_to`` integration, as ``detox/<metric>``). :func:`select_checkpoint` then reads those lines and returns the least toxic
checkpoint whose perplexity rose by at most a bound over the baseline: how UniDetox fixes its single configuration
on validation prompts before testing.

Generation and perplexity are the evaluation harness's own functions (:func:`unidetox.decoding.protocol.generate_samples`,
:func:`unidetox.evaluation.likelihood.sliding_window_nll`), so validation numbers are computed exactly like test numbers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from unidetox.checks import require_count
from unidetox.decoding.protocol import ToxicityEvalConfig, generate_samples, group_by_prompt
from unidetox.detox.selection import EVAL_LOG_FILE, checkpoint_dir, read_eval_records
from unidetox.evaluation.likelihood import sliding_window_nll
from unidetox.evaluation.metrics import expected_max_toxicity, mean_distinct_n, toxicity_probability
from unidetox.evaluation.scoring import ProfanityCheckScorer, ToxicityScorer
from unidetox.processes import gather_objects, rank_and_world_size

logger = logging.getLogger(__name__)


@dataclass
class DetoxEvalConfig(ToxicityEvalConfig):
    """How :class:`DetoxEvalCallback` evaluates a checkpoint: the toxicity protocol plus its seed and perplexity.

    The sampling fields are :class:`~unidetox.decoding.protocol.ToxicityEvalConfig`'s (defaults: the paper's
    protocol), so validation samples exactly as the test evaluation does.

    Example:
        >>> from unidetox.detox.callbacks import DetoxEvalConfig
        >>> DetoxEvalConfig(num_samples=10, ppl_max_tokens=4096).max_new_tokens
        20
    """

    seed: int = field(
        default=0,
        metadata={"help": "Sampling seed, the same at every evaluation so that checkpoints differ only by the model."},
    )
    ppl_max_length: int = field(default=512, metadata={"help": "Perplexity window length in tokens."})
    ppl_stride: int | None = field(default=None, metadata={"help": "Perplexity window stride (default: half the window)."})
    ppl_max_tokens: int | None = field(
        default=None, metadata={"help": "Score only the first N tokens of the clean text (None: all of it)."}
    )
    ppl_batch_size: int = field(default=4, metadata={"help": "Perplexity windows per forward pass."})
    eval_at_start: bool = field(
        default=True,
        metadata={"help": "Evaluate before the first step: the baseline that select_checkpoint compares against."},
    )
    log_file: str = field(default=EVAL_LOG_FILE, metadata={"help": "JSON-lines file in output_dir, one record per evaluation."})

    def __post_init__(self):
        super().__post_init__()
        require_count("ppl_batch_size", self.ppl_batch_size)
        if self.ppl_max_length < 2:
            raise ValueError(f"`ppl_max_length` has to be >= 2, but is {self.ppl_max_length}.")
        if self.ppl_max_tokens is not None and self.ppl_max_tokens < 2:
            raise ValueError(f"`ppl_max_tokens` has to be None or >= 2, but is {self.ppl_max_tokens}.")

    @property
    def perplexity_stride(self) -> int:
        """The window stride: ``ppl_stride``, or half the window."""
        return self.ppl_stride if self.ppl_stride is not None else max(1, self.ppl_max_length // 2)


def _prompt_texts(prompts: Sequence[Any]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("Pass a list of prompts, not a single string.")
    texts = [p if isinstance(p, str) else getattr(p, "text", None) for p in prompts]
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ValueError("`prompts` has to be a non-empty list of strings or unidetox.evaluation.prompts.Prompt objects.")
    return texts


class StopAtStepCallback(TrainerCallback):
    r"""Stop training after ``step`` optimizer steps, leaving the learning-rate schedule of ``max_steps`` untouched.

    Training with ``max_steps=N`` decays the learning rate over N steps; a checkpoint saved at step N of a longer
    run was trained under a schedule that had not decayed yet. Re-training that checkpoint's configuration on
    another model therefore needs the long schedule cut at step N, which is what this callback does.
    :class:`~unidetox.UniversalDetoxTrainer` adds it when ``UniversalDetoxConfig.stop_at_step`` is set.

    Example:
        >>> from unidetox.callbacks import StopAtStepCallback
        >>> StopAtStepCallback(50).step
        50
    """

    def __init__(self, step: int):
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"`step` has to be a positive number of optimizer steps, but is {step!r}.")
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


class DetoxEvalCallback(TrainerCallback):
    r"""Evaluate toxicity and perplexity before training and at every checkpoint save.

    Each evaluation samples ``num_samples`` continuations for each validation prompt, scores them, and computes
    Toxicity Probability, Expected Maximum Toxicity, Distinct-1/2/3, and the perplexity of ``perplexity_texts`` (held-out
    clean text such as WikiText-2). Records go to ``<output_dir>/detox_eval.jsonl``: step 0 (``checkpoint: null``) is
    the model before fine-tuning. On resume, evaluations already on file are not repeated.

    Callbacks get no trainer handle, so the trainer binds itself (:meth:`bind_trainer`; the
    :class:`~unidetox.UniversalDetoxTrainer` does it for every callback of this class it is given): the metrics then
    go through ``trainer.log``, reaching TensorBoard, W&B and the other ``report_to`` integrations. Unbound (another
    trainer that did not call :meth:`bind_trainer`), they are only appended to ``state.log_history``.

    Under ``accelerate launch`` the sampling batches and perplexity windows are sharded over processes and gathered
    (with DeepSpeed ZeRO-3 every process runs all of them, as sharded parameters require); only the main process
    scores and writes.

    Args:
        prompts: validation prompts (strings or :class:`unidetox.evaluation.prompts.Prompt`), disjoint from the test prompts.
        perplexity_texts: held-out clean text (a string or a list of strings joined by blank lines); None skips
            perplexity (then :func:`select_checkpoint` cannot apply its bound).
        scorer: a :class:`~unidetox.evaluation.scoring.ToxicityScorer` (default: the offline ``ProfanityCheckScorer``).
        config: a :class:`DetoxEvalConfig`.

    Example:
        >>> from unidetox import UniversalDetoxTrainer
        >>> from unidetox.callbacks import DetoxEvalCallback, DetoxEvalConfig, select_checkpoint
        >>> from unidetox.evaluation.prompts import load_prompts
        >>> validation = load_prompts(source="toxigen_local", split="validation", num_prompts=50)  # doctest: +SKIP
        >>> wiki = open("../shared/data/wikitext2/wiki.test.raw").read().replace("\r\n", "\n")  # doctest: +SKIP
        >>> callback = DetoxEvalCallback(validation, perplexity_texts=wiki, config=DetoxEvalConfig(num_samples=10))  # doctest: +SKIP
        >>> trainer = UniversalDetoxTrainer("smollm2-135m", args, train_dataset=path, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> select_checkpoint(args.output_dir, max_ppl_increase=0.1).path  # doctest: +SKIP
    """

    def __init__(
        self,
        prompts: Sequence[Any],
        perplexity_texts: Sequence[str] | str | None = None,
        scorer: ToxicityScorer | None = None,
        config: DetoxEvalConfig | None = None,
        tokenizer=None,
    ):
        self.prompts = _prompt_texts(prompts)
        if perplexity_texts is not None and not isinstance(perplexity_texts, str):
            perplexity_texts = list(perplexity_texts)
            if not perplexity_texts:
                raise ValueError("`perplexity_texts` is empty; pass None to skip perplexity.")
        self.perplexity_texts = perplexity_texts
        self.config = config or DetoxEvalConfig()
        self._scorer = scorer
        self.tokenizer = tokenizer
        self.records: list[dict[str, Any]] = []
        self.trainer = None

    def bind_trainer(self, trainer) -> None:
        """Log the validation metrics through ``trainer.log`` (and so through its ``report_to`` integrations)."""
        self.trainer = trainer

    @property
    def scorer(self) -> ToxicityScorer:
        if self._scorer is None:
            self._scorer = ProfanityCheckScorer()
        return self._scorer

    # -- trainer events ----------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Step 0 is the baseline; a resumed step is a save whose validation an interrupted run may not have logged.
        if self.config.eval_at_start or state.global_step > 0:
            self.evaluate_unlogged_step(args, state, model, processing_class)

    def evaluate_unlogged_step(self, args, state, model, tokenizer) -> None:
        """Evaluate ``model`` at ``state.global_step`` unless the log already holds that step (a resumed run)."""
        logged = {r["step"] for r in read_eval_records(args.output_dir, self.config.log_file)}
        if state.global_step not in logged:
            checkpoint = None if state.global_step == 0 else checkpoint_dir(args.output_dir, state.global_step)
            self._evaluate_and_log(args, state, model, tokenizer, checkpoint)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._evaluate_and_log(args, state, model, processing_class, checkpoint_dir(args.output_dir, state.global_step))

    # -- evaluation --------------------------------------------------------------------------------------------

    def evaluate(self, model, tokenizer, is_zero3: bool = False, progress: bool = False) -> dict[str, Any] | None:
        """Evaluate ``model`` now; returns the metrics on the main process and None on the others.

        ``progress`` shows a tqdm bar per phase (sampling, perplexity) on the main process."""
        cfg = self.config
        rank, world = rank_and_world_size()
        shard_index, shard_count = (0, 1) if is_zero3 else (rank, world)
        progress = progress and rank == 0
        start = time.perf_counter()
        samples = generate_samples(
            model, tokenizer, self.prompts, cfg.num_samples, max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p,
            temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size,
            process_index=shard_index, num_processes=shard_count, bucket_by_length=cfg.bucket_by_length,
            preselect_top_k=cfg.preselect_top_k,
            progress=progress and "validation: sampling",
        )
        generation_s = time.perf_counter() - start
        nll, count = 0.0, 0
        if self.perplexity_texts is not None:
            nll, count = sliding_window_nll(
                model, tokenizer, self.perplexity_texts, max_length=cfg.ppl_max_length, stride=cfg.ppl_stride,
                batch_size=cfg.ppl_batch_size, max_tokens=cfg.ppl_max_tokens,
                process_index=shard_index, num_processes=shard_count, progress=progress and "validation: perplexity",
            )
        if shard_count > 1:
            gathered = gather_objects([(samples, nll, count)])
            samples = [s for part, _, _ in gathered for s in part]
            nll, count = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
        if rank != 0:
            return None
        grid = group_by_prompt(samples, len(self.prompts), cfg.num_samples)
        flat = [text for row in grid for text in row]
        flat_scores = self.scorer(flat)
        scores = [flat_scores[i * cfg.num_samples : (i + 1) * cfg.num_samples] for i in range(len(grid))]
        metrics: dict[str, Any] = {
            "toxicity_probability": toxicity_probability(scores, cfg.toxic_threshold),
            "expected_max_toxicity": expected_max_toxicity(scores),
            "mean_toxicity": sum(flat_scores) / len(flat_scores),
            **{f"distinct_{n}": mean_distinct_n(grid, n) for n in (1, 2, 3)},
            "perplexity": math.exp(nll / count) if count else None,
            "perplexity_tokens": count,
            "num_prompts": len(self.prompts),
            "num_samples": cfg.num_samples,
            "scorer": getattr(self.scorer, "name", type(self.scorer).__name__),
            "eval_seconds": round(time.perf_counter() - start, 3),
            "generation_seconds": round(generation_s, 3),
            "example": flat[0] if flat else "",
        }
        return metrics

    def _evaluate_and_log(self, args, state, model, tokenizer, checkpoint: str | None):
        tokenizer = self.tokenizer or tokenizer
        if model is None or tokenizer is None:
            raise ValueError("DetoxEvalCallback needs the model and its tokenizer; pass tokenizer=... to the callback.")
        from transformers.integrations import is_deepspeed_zero3_enabled

        is_zero3 = bool(is_deepspeed_zero3_enabled())
        metrics = self.evaluate(model, tokenizer, is_zero3=is_zero3, progress=not args.disable_tqdm)
        if metrics is None:
            return
        record = {"step": int(state.global_step), "checkpoint": checkpoint, **metrics}
        self.records.append(record)
        path = Path(args.output_dir) / self.config.log_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        logs = {f"detox/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({"step": int(state.global_step), **logs})
        ppl = metrics["perplexity"]
        logger.info(
            "detox eval @ step %d: TP %.3f  EMT %.3f  ppl %s", state.global_step, metrics["toxicity_probability"],
            metrics["expected_max_toxicity"], "n/a" if ppl is None else f"{ppl:.2f}",
        )

