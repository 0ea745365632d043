"""The paper's rule for choosing a checkpoint: the least toxic one whose perplexity rose by at most a bound.

:func:`select_checkpoint` reads the evaluations :class:`~unidetox.detox.callbacks.DetoxEvalCallback` logged during
training; how UniDetox fixes its single configuration on validation prompts before testing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EVAL_LOG_FILE = "detox_eval.jsonl"
METRICS = ("toxicity_probability", "expected_max_toxicity")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> str:
    return str(Path(output_dir) / f"checkpoint-{step}")


def read_eval_records(output_dir: str | os.PathLike, log_file: str = EVAL_LOG_FILE) -> list[dict[str, Any]]:
    """Evaluation records of a run, one per step (a step evaluated twice, e.g. after a restart, keeps the last).

    Reads ``<output_dir>/detox_eval.jsonl``; without it, the ``detox/*`` entries of the newest
    ``checkpoint-*/trainer_state.json`` (or ``<output_dir>/trainer_state.json``) ``log_history``.
    """
    output_dir = Path(output_dir)
    by_step: dict[int, dict[str, Any]] = {}
    path = output_dir / log_file
    if path.is_file():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("Skipping unreadable line %d of %s (an interrupted write?)", line_no, path)
                continue
            by_step[int(record["step"])] = record
        return [by_step[s] for s in sorted(by_step)]
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: _step_of(p.parent))
    if (output_dir / "trainer_state.json").is_file():
        states.append(output_dir / "trainer_state.json")
    if not states:
        return []
    history = json.loads(states[-1].read_text()).get("log_history", [])
    for entry in history:
        metrics = {k[len("detox/") :]: v for k, v in entry.items() if k.startswith("detox/")}
        if metrics:
            step = int(entry["step"])
            checkpoint = None if step == 0 else checkpoint_dir(output_dir, step)
            by_step[step] = {"step": step, "checkpoint": checkpoint, **metrics}
    return [by_step[s] for s in sorted(by_step)]


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


@dataclass
class CheckpointSelection:
    """The checkpoint :func:`select_checkpoint` chose, its metrics, the baseline and every candidate considered."""

    path: str
    step: int
    metrics: dict[str, Any]
    baseline: dict[str, Any]
    max_ppl_increase: float
    metric: str
    candidates: list[dict[str, Any]]

    @property
    def perplexity_increase(self) -> float:
        return self.metrics["perplexity"] / self.baseline["perplexity"] - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity_increase": self.perplexity_increase}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def select_checkpoint(
    output_dir: str | os.PathLike,
    max_ppl_increase: float = 0.1,
    metric: str = "expected_max_toxicity",
    log_file: str = EVAL_LOG_FILE,
    require_exists: bool = True,
) -> CheckpointSelection:
    """The least toxic checkpoint whose perplexity is at most ``(1 + max_ppl_increase)`` x the baseline's.

    The baseline is the step-0 evaluation (the model before fine-tuning), which :class:`DetoxEvalCallback` logs
    when ``eval_at_start`` is on. Checkpoints are ranked by ``metric`` (``"expected_max_toxicity"`` or
    ``"toxicity_probability"``), ties broken by the other toxicity metric, then by lower perplexity, then by the
    earlier step.

    Args:
        output_dir: the training run's output directory.
        max_ppl_increase: the allowed *relative* perplexity increase over the baseline (0.1 = +10%).
        metric: the toxicity metric to minimise.
        require_exists: skip records whose checkpoint directory no longer exists.

    Example:
        >>> from unidetox.callbacks import select_checkpoint
        >>> choice = select_checkpoint("runs/detox-smollm2", max_ppl_increase=0.1)  # doctest: +SKIP
        >>> choice.path, choice.metrics["expected_max_toxicity"], choice.perplexity_increase  # doctest: +SKIP
    """
    if metric not in METRICS:
        raise ValueError(f"`metric` has to be one of {METRICS}, but is {metric!r}.")
    if not (isinstance(max_ppl_increase, (int, float)) and max_ppl_increase >= 0 and math.isfinite(max_ppl_increase)):
        raise ValueError(
            f"`max_ppl_increase` is the allowed relative perplexity increase (0.1 = +10%) and has to be a finite "
            f"number >= 0, but is {max_ppl_increase!r}."
        )
    records = read_eval_records(output_dir, log_file)
    if not records:
        raise FileNotFoundError(
            f"No detox evaluations found in {output_dir} (no {log_file} and no detox/* entries in trainer_state.json); "
            "train with DetoxEvalCallback."
        )
    baseline = next((r for r in records if r["step"] == 0), None)
    if baseline is None:
        raise ValueError(
            f"{output_dir} has no step-0 (pre-training) evaluation to compare perplexity against; train with "
            "DetoxEvalCallback(config=DetoxEvalConfig(eval_at_start=True))."
        )
    if baseline.get("perplexity") is None:
        raise ValueError("The baseline evaluation has no perplexity; give DetoxEvalCallback `perplexity_texts`.")
    other = next(m for m in METRICS if m != metric)
    bound = baseline["perplexity"] * (1.0 + max_ppl_increase)
    candidates, within = [], []
    for record in records:
        if record["step"] == 0:
            continue
        checkpoint = record.get("checkpoint")
        exists = bool(checkpoint) and Path(checkpoint).is_dir()
        if require_exists and not exists:
            continue
        ok = record.get("perplexity") is not None and record["perplexity"] <= bound
        candidates.append({"step": record["step"], "checkpoint": checkpoint, metric: record[metric],
                           "perplexity": record.get("perplexity"), "within_bound": ok})
        if ok:
            within.append(record)
    if not within:
        table = ", ".join(
            f"step {c['step']}: ppl {c['perplexity']}" for c in candidates
        ) or "no checkpoints on disk"
        raise ValueError(
            f"No checkpoint in {output_dir} keeps perplexity within +{max_ppl_increase:.1%} of the baseline "
            f"{baseline['perplexity']:.3f} (bound {bound:.3f}); {table}. Raise max_ppl_increase, or lower the "
            "learning rate / steps."
        )
    best = min(within, key=lambda r: (r[metric], r[other], r["perplexity"], r["step"]))
    return CheckpointSelection(
        path=best["checkpoint"], step=best["step"], metrics=best, baseline=baseline,
        max_ppl_increase=float(max_ppl_increase), metric=metric, candidates=candidates,
    )
