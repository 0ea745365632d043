"""The paper's rule for choosing a checkpoint: the least toxic one whose perplexity rose by at most a bound.

:func:`select_checkpoint` reads the evaluations :class:`~unidetox.detox.callbacks.DetoxEvalCallback` logged during
training; how UniDetox fixes its single configuration on validation prompts before testing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unidetox.evaluation.paired import TOXICITY_METRICS

logger = logging.getLogger(__name__)

EVAL_LOG_FILE = "detox_eval.jsonl"
METRICS = TOXICITY_METRICS  # the metrics a checkpoint is selected on
ON_EMPTY = ("raise", "closest")  # what the rule does when no candidate is within the perplexity bound


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


@dataclass
class SelectionRule:
    """The paper's rule, the arguments of every choice it makes (the ``select`` sections of detox and of the
    replication): the least toxic candidate whose perplexity rose by at most ``max_ppl_increase`` over the model
    before any change.

    Example:
        >>> rule = SelectionRule(max_ppl_increase=0.1, metric="toxicity_probability")
        >>> rule.on_empty
        'raise'
    """

    max_ppl_increase: float = field(
        default=0.1,
        metadata={"help": "Allowed relative perplexity increase over the model before any change (0.1 = +10%)."},
    )
    metric: str = field(
        default="expected_max_toxicity", metadata={"help": f"The toxicity metric minimised: {' or '.join(METRICS)}."}
    )
    on_empty: str = field(
        default="raise",
        metadata={"help": "No candidate within the bound: 'raise', or take the 'closest' one (flagged "
                  "within_bound: false, and reported)."},
    )

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"`metric` has to be one of {METRICS}, but is {self.metric!r}.")
        if not (isinstance(self.max_ppl_increase, (int, float)) and math.isfinite(self.max_ppl_increase)
                and self.max_ppl_increase >= 0):
            raise ValueError(
                f"`max_ppl_increase` is the allowed relative perplexity increase (0.1 = +10%) and has to be a finite "
                f"number >= 0, but is {self.max_ppl_increase!r}."
            )
        if self.on_empty not in ON_EMPTY:
            raise ValueError(f"`on_empty` has to be one of {ON_EMPTY}, but is {self.on_empty!r}.")

    def choose(self, grid_records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(choice, table)`` of :func:`choose_configuration` under this rule."""
        table = _with_bounds(_checked_records(grid_records), self.max_ppl_increase)
        candidates = [r for r in table if not r["baseline"]]
        if not candidates:
            raise ValueError("The grid has only baseline records; train at least one configuration.")
        within = [r for r in candidates if r["within_bound"]]
        best = self._best(candidates, within)
        best["chosen"] = True
        choice = {**best, "metric": self.metric, "max_ppl_increase": float(self.max_ppl_increase),
                  "num_candidates": len(candidates), "num_within_bound": len(within)}
        return choice, table

    def _best(self, candidates: list[dict[str, Any]], within: list[dict[str, Any]]) -> dict[str, Any]:
        """The least toxic candidate within the bound; without one, the closest (``on_empty="closest"``) or an error."""
        other = next(m for m in METRICS if m != self.metric)

        def rank(r):
            return (r[self.metric], r[other], r["perplexity"], r.get("step") or 0, str(r.get("run")))

        if within:
            return min(within, key=rank)
        if self.on_empty == "closest":
            best = min(candidates, key=lambda r: (r["perplexity_increase"], *rank(r)))
            logger.warning("No candidate keeps perplexity within +%.1f%%; taking the closest (%+.1f%%).",
                           100 * self.max_ppl_increase, 100 * best["perplexity_increase"])
            return best
        closest = min(candidates, key=lambda r: r["perplexity_increase"])
        raise ValueError(
            f"No candidate keeps perplexity within +{self.max_ppl_increase:.1%} of its baseline; the closest is "
            f"{closest.get('run')} step {closest.get('step')} at {closest['perplexity_increase']:+.1%}. Raise "
            "max_ppl_increase, lower the learning rates / steps of the grid, or pass on_empty='closest'."
        )


    def across_targets(self, records_by_target: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """One row per configuration (its ``config``, steps included) trained on every target: each target's
        ``metric``, its relative change against that target's model before any change (``change``), its perplexity
        increase and bound, and ``worst_change`` (the largest change over the targets); ``within_bound`` when every
        target keeps its perplexity within the bound. How well a configuration transfers, before any choice.

        ``records_by_target``: each target's grid records (:meth:`choose`'s input, its baselines with ``metric``).

        Example:
            >>> base = {"step": 0, "config": {"lr": 1e-4, "steps": 0}, "perplexity": 10.0,
            ...         "toxicity_probability": 0.5, "expected_max_toxicity": 0.5}
            >>> step = {"step": 50, "config": {"lr": 1e-4, "steps": 50}, "toxicity_probability": 0.2}
            >>> rows = SelectionRule().across_targets({
            ...     "a": [{**base, "run": "a"}, {**step, "run": "a", "perplexity": 10.5, "expected_max_toxicity": 0.25}],
            ...     "b": [{**base, "run": "b"}, {**step, "run": "b", "perplexity": 10.9, "expected_max_toxicity": 0.4}]})
            >>> round(rows[0]["worst_change"], 2), rows[0]["within_bound"]
            (-0.2, True)
        """
        return [row for row, _ in self._across_targets(records_by_target)]

    def _across_targets(self, records_by_target: Mapping[str, Sequence[Mapping[str, Any]]]
                        ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """:meth:`across_targets`' rows, each with the first target's full record of that configuration."""
        if not records_by_target:
            raise ValueError("`records_by_target` is empty; give at least one target's grid records.")
        tables = {target: _with_changes(_with_bounds(_checked_records(records), self.max_ppl_increase), self.metric)
                  for target, records in records_by_target.items()}
        by_config: dict[str, dict[str, dict[str, Any]]] = {}
        for target, table in tables.items():
            for r in table:
                if not r["baseline"]:
                    by_config.setdefault(_config_key(r), {})[target] = r
        rows = []
        for per_target in by_config.values():
            if len(per_target) < len(tables):
                continue  # a configuration not trained on every target cannot be compared across them
            first = per_target[next(iter(tables))]
            rows.append(({
                "config": dict(first.get("config") or {}), "step": first.get("step"),
                "per_target": {t: {"run": r.get("run"), "checkpoint": r.get("checkpoint"), self.metric: r[self.metric],
                                   "change": r["change"], "perplexity_increase": r["perplexity_increase"],
                                   "within_bound": r["within_bound"]} for t, r in per_target.items()},
                "worst_change": max(r["change"] for r in per_target.values()),
                "within_bound": all(r["within_bound"] for r in per_target.values()), "chosen": False}, first))
        return rows

    def choose_on_every_target(
        self, records_by_target: Mapping[str, Sequence[Mapping[str, Any]]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A declared variant of the paper's rule, for one configuration meant for several models: it reads every
        target's validation; a configuration is a candidate when every target keeps its perplexity within the
        bound, and the one with the smallest worst relative change of ``metric`` (:meth:`across_targets`) is taken
        (ties: the smaller mean change, then fewer steps). Without a candidate, ``on_empty`` applies as in
        :meth:`choose`, the closest being the smallest worst perplexity increase.

        Returns ``(choice, table)``: the choice is the first target's record of that configuration (its run,
        checkpoint and metrics) with ``per_target``, ``worst_change`` and ``rule: "every_target"``; the table is
        :meth:`across_targets` with the chosen row flagged."""
        rows = self._across_targets(records_by_target)
        table = [row for row, _ in rows]
        if not table:
            raise ValueError(f"No configuration was trained and validated on every target {list(records_by_target)}; "
                             "train the same grid on each of them.")
        within = [r for r in table if r["within_bound"]]

        def rank(r):
            changes = [v["change"] for v in r["per_target"].values()]
            return (r["worst_change"], sum(changes) / len(changes), r.get("step") or 0, json.dumps(r["config"]))

        if within:
            best = min(within, key=rank)
        elif self.on_empty == "closest":
            best = min(table, key=lambda r: (max(v["perplexity_increase"] for v in r["per_target"].values()), *rank(r)))
            logger.warning("No configuration keeps every target's perplexity within +%.1f%%; taking the closest.",
                           100 * self.max_ppl_increase)
        else:
            raise ValueError(
                f"No configuration keeps the perplexity of every target {list(records_by_target)} within "
                f"+{self.max_ppl_increase:.1%} of its base; raise max_ppl_increase, lower the learning rates / steps "
                "of the grid, or pass on_empty='closest'.")
        best["chosen"] = True
        record = next(first for row, first in rows if row is best)
        choice = {**record, "rule": "every_target", "metric": self.metric,
                  "max_ppl_increase": float(self.max_ppl_increase), "per_target": best["per_target"],
                  "worst_change": best["worst_change"], "within_bound": best["within_bound"],
                  "num_candidates": len(table), "num_within_bound": len(within)}
        return choice, table


def select_checkpoint(
    output_dir: str | os.PathLike,
    max_ppl_increase: float = SelectionRule.max_ppl_increase,
    metric: str = SelectionRule.metric,
    log_file: str = EVAL_LOG_FILE,
    require_exists: bool = True,
    on_empty: str = SelectionRule.on_empty,
) -> CheckpointSelection:
    """The least toxic checkpoint whose perplexity is at most ``(1 + max_ppl_increase)`` x the baseline's.

    The baseline is the step-0 evaluation (the model before fine-tuning), which :class:`DetoxEvalCallback` logs
    when ``eval_at_start`` is on. The rule is :class:`SelectionRule`'s over this run's checkpoints: ranked by
    ``metric`` (``"expected_max_toxicity"`` or ``"toxicity_probability"``), ties broken by the other toxicity
    metric, then by lower perplexity, then by the earlier step.

    Args:
        output_dir: the training run's output directory.
        max_ppl_increase: the allowed *relative* perplexity increase over the baseline (0.1 = +10%).
        metric: the toxicity metric to minimise.
        require_exists: skip records whose checkpoint directory no longer exists.
        on_empty: no checkpoint within the bound: ``"raise"``, or take the ``"closest"`` one.

    Example:
        >>> from unidetox.detox.selection import select_checkpoint
        >>> choice = select_checkpoint("runs/detox-smollm2", max_ppl_increase=0.1)  # doctest: +SKIP
        >>> choice.path, choice.metrics["expected_max_toxicity"], choice.perplexity_increase  # doctest: +SKIP
    """
    rule = SelectionRule(max_ppl_increase, metric, on_empty)
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
    bound = baseline["perplexity"] * (1.0 + max_ppl_increase)
    checkpoints = [r for r in records if r["step"] != 0 and (
        not require_exists or (bool(r.get("checkpoint")) and Path(r["checkpoint"]).is_dir()))]
    candidates = [{"step": r["step"], "checkpoint": r.get("checkpoint"), metric: r[metric],
                   "perplexity": r.get("perplexity"),
                   "within_bound": r.get("perplexity") is not None and r["perplexity"] <= bound} for r in checkpoints]
    scored = [r for r in checkpoints if r.get("perplexity") is not None]
    try:
        if not scored:
            raise ValueError("no scored checkpoints")
        choice, _ = rule.choose(
            [{**r, "run": str(output_dir), "baseline": r["step"] == 0, "config": {"steps": r["step"]}}
             for r in (baseline, *scored)])
    except ValueError:
        table = ", ".join(f"step {c['step']}: ppl {c['perplexity']}" for c in candidates) or "no checkpoints on disk"
        raise ValueError(
            f"No checkpoint in {output_dir} keeps perplexity within +{max_ppl_increase:.1%} of the baseline "
            f"{baseline['perplexity']:.3f} (bound {bound:.3f}); {table}. Raise max_ppl_increase, or lower the "
            "learning rate / steps."
        ) from None
    best = next(r for r in scored if r["step"] == choice["step"])
    return CheckpointSelection(
        path=best["checkpoint"], step=best["step"], metrics=best, baseline=baseline,
        max_ppl_increase=float(max_ppl_increase), metric=metric, candidates=candidates,
    )


def choose_configuration(
    grid_records: Sequence[Mapping[str, Any]],
    max_ppl_increase: float = SelectionRule.max_ppl_increase,
    metric: str = SelectionRule.metric,
    on_empty: str = SelectionRule.on_empty,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The paper's rule: the least toxic candidate whose perplexity is at most ``(1 + max_ppl_increase)`` x the base's.

    ``grid_records``: one mapping per (grid run, checkpoint) with ``run``, ``config``, ``perplexity`` and both
    toxicity metrics; records with ``baseline: true`` (default: ``step == 0``) are the model before any change and
    give the perplexity bound of their ``run`` (a run without its own baseline uses the mean of all baselines, so a
    single base record serves a sweep such as the task-vector lambdas). Candidates are ranked by ``metric``, then
    the other toxicity metric, then lower perplexity, then fewer steps, then run name.

    ``on_empty``: what happens when no candidate is within the bound: ``"raise"`` (ValueError) or ``"closest"``
    (the candidate with the smallest perplexity increase, flagged ``within_bound: false`` in the choice).

    Returns ``(choice, table)``: the chosen record with ``perplexity_increase``, ``bound`` and ``within_bound``, and
    every record (baselines included) with those columns and ``chosen``. The same as
    ``SelectionRule(max_ppl_increase, metric, on_empty).choose(grid_records)``.

    Example:
        >>> from unidetox.detox.selection import choose_configuration
        >>> records = [
        ...     {"run": "a", "step": 0, "config": {"lr": 1e-4, "steps": 0}, "perplexity": 10.0,
        ...      "toxicity_probability": 0.8, "expected_max_toxicity": 0.7},
        ...     {"run": "a", "step": 50, "config": {"lr": 1e-4, "steps": 50}, "perplexity": 12.0,
        ...      "toxicity_probability": 0.2, "expected_max_toxicity": 0.2},
        ...     {"run": "a", "step": 25, "config": {"lr": 1e-4, "steps": 25}, "perplexity": 10.5,
        ...      "toxicity_probability": 0.5, "expected_max_toxicity": 0.4},
        ... ]
        >>> choice, table = choose_configuration(records, max_ppl_increase=0.1)
        >>> choice["config"]["steps"]  # step 50 is less toxic but +20% perplexity
        25
    """
    return SelectionRule(max_ppl_increase, metric, on_empty).choose(grid_records)


def _checked_records(grid_records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the records, each flagged ``baseline`` (default: ``step == 0``); raises for a missing metric."""
    records = [dict(r) for r in grid_records]
    for r in records:
        r.setdefault("baseline", r.get("step") == 0)
        missing = [k for k in (*METRICS, "perplexity") if r.get(k) is None and not (k != "perplexity" and r["baseline"])]
        if missing:
            raise ValueError(f"Grid record {r.get('run')} step {r.get('step')} lacks {missing}.")
    return records


def _with_bounds(records: list[dict[str, Any]], max_ppl_increase: float) -> list[dict[str, Any]]:
    """The records with their run's baseline perplexity, bound, ``perplexity_increase``, ``within_bound`` and
    ``chosen`` (False); a run without a baseline of its own is bounded by the mean of all baselines."""
    if not any(r["baseline"] for r in records):
        raise ValueError(
            "No baseline record (step 0 / baseline: true) to compare perplexity against; evaluate the model before "
            "any change (DetoxEvalCallback eval_at_start=True, or the base model in the lambda sweep)."
        )
    base_of = _baseline_means(records, "perplexity")
    for r in records:
        base_ppl = base_of(r)
        bound = base_ppl * (1.0 + max_ppl_increase)
        r["baseline_perplexity"] = base_ppl
        r["bound"] = bound
        r["perplexity_increase"] = float(r["perplexity"]) / base_ppl - 1.0
        r["within_bound"] = float(r["perplexity"]) <= bound
        r["chosen"] = False
    return records


def _with_changes(records: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The bounded records (:func:`_with_bounds`) with ``change``: ``metric`` relative to its run's baseline (the
    mean of all baselines for a run without one)."""
    for r in records:
        if r["baseline"] and r.get(metric) is None:
            raise ValueError(f"The baseline record of {r.get('run')} has no {metric}; evaluate the model before "
                             "any change with toxicity (DetoxEvalCallback eval_at_start=True).")
    base_of = _baseline_means(records, metric)
    for r in records:
        base = base_of(r)
        r["change"] = float(r[metric]) / base - 1.0 if base > 0 else math.nan
    return records


def _config_key(record: Mapping[str, Any]) -> str:
    """A configuration's identity across targets: its hyperparameters and steps, not the run that trained it."""
    return json.dumps(record.get("config") or {}, sort_keys=True)


def _baseline_means(records: list[dict[str, Any]], key: str):
    """``record -> float``: the mean ``key`` of the record's run's baselines, or of all baselines for a run without
    one (a single base record serves a sweep such as the task-vector lambdas)."""
    baselines: dict[Any, list[float]] = {}
    for r in records:
        if r["baseline"]:
            baselines.setdefault(r.get("run"), []).append(float(r[key]))
    pooled = [v for values in baselines.values() for v in values]

    def mean_of(record: Mapping[str, Any]) -> float:
        values = baselines.get(record.get("run")) or pooled
        return sum(values) / len(values)

    return mean_of
