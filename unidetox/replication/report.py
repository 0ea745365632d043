"""The replication's report: the table (method x target), relative changes against the base, the bar verdict, the
validation grid, example continuations and a toxicity-vs-perplexity plot (:func:`assemble_report`,
:func:`write_replication_report`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from unidetox.detox.selection import METRICS
from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.paired import paired_changes_by_kind, paired_metric_changes, per_prompt_toxicity
from unidetox.evaluation.report import write_json
from unidetox.files import atomic_write_text
from unidetox.intervals import DEFAULT_RESAMPLES
from unidetox.replication.formatting import percent_change
from unidetox.replication.report_markdown import render_replication_markdown

logger = logging.getLogger(__name__)

# Rows of the replication table, in this order; a method's "target" is the detoxified model.
METHOD_ORDER = ("base", "unidetox", "control", "nothate", "authors", "decoding", "taskvec")
METHOD_LABELS = {
    "base": "base model",
    "unidetox": "UniDetox (distilled text, chosen config)",
    "control": "control: plain base samples",
    "nothate": "SFT on DGHS nothate",
    "authors": "UniDetox, authors' GPT-2 XL text",
    "decoding": "inference-time contrastive decoding",
    "taskvec": "task-vector negation",
}


# ================================================================================================================
# The validation grid
# ================================================================================================================
def grid_records(runs: Mapping[str, tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]]) -> list[dict[str, Any]]:
    """Flatten the validation evaluations of several detox runs into :func:`~unidetox.detox.selection.choose_configuration`
    records.

    ``runs``: ``{run name: (its hyperparameters, e.g. {"alpha": 0.1, "learning_rate": 5e-4}, its evaluation records
    (:attr:`unidetox.detox.pipeline.DetoxResult.eval_records`))}``. Each record becomes ``{"run", "config": {...,
    "steps": step}, "step", "checkpoint", "baseline": step == 0, <metrics>}``.
    """
    records = []
    for run, (config, evals) in runs.items():
        if not evals:
            raise ValueError(f"Grid run {run} has no validation evaluations; train it with validation enabled.")
        for r in evals:
            records.append({
                "run": run, "step": int(r["step"]), "checkpoint": r.get("checkpoint"), "baseline": int(r["step"]) == 0,
                "config": {**dict(config), "steps": int(r["step"])},
                **{k: r.get(k) for k in (*METRICS, "perplexity", "distinct_1", "distinct_2", "distinct_3",
                                          "mean_toxicity")},
            })
    return records


# ================================================================================================================
# Paired intervals over the test prompts
# ================================================================================================================
def add_paired_intervals(
    rows: Sequence[dict[str, Any]], generations: Iterable[Mapping[str, Any]], threshold: float = TOXIC_THRESHOLD,
    num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Set each row's ``paired_vs_base`` (its TP/EMT change against its target's base, paired over prompts) and
    return ``{target: UniDetox vs the control}`` the same way. Rows whose model has no generations are skipped."""
    per_prompt = per_prompt_toxicity(generations, threshold)
    versus_base, versus_control = _comparisons(rows, per_prompt)
    for row, base in versus_base:
        row["paired_vs_base"] = paired_metric_changes(per_prompt, base, row["model"], num_resamples, seed)
    return {target: paired_metric_changes(per_prompt, control, unidetox, num_resamples, seed)
            for target, (control, unidetox) in versus_control.items()}


def add_changes_by_kind(
    rows: Sequence[dict[str, Any]], generations: Iterable[Mapping[str, Any]], kinds: Mapping[str, str],
    threshold: float = TOXIC_THRESHOLD, num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`add_paired_intervals` for each prompt kind (``kinds``: prompt id -> kind, e.g. ToxiGen's hate /
    neutral): set each row's ``paired_vs_base_by_kind`` and return ``{target: {kind: UniDetox vs the control}}``
    (:func:`~unidetox.evaluation.paired.paired_changes_by_kind`)."""
    per_prompt = per_prompt_toxicity(generations, threshold)
    versus_base, versus_control = _comparisons(rows, per_prompt)
    for row, base in versus_base:
        row["paired_vs_base_by_kind"] = paired_changes_by_kind(per_prompt, base, row["model"], kinds, num_resamples,
                                                               seed)
    return {target: paired_changes_by_kind(per_prompt, control, unidetox, kinds, num_resamples, seed)
            for target, (control, unidetox) in versus_control.items()}


def _comparisons(rows: Sequence[dict[str, Any]], per_prompt: Mapping[str, Any]
                 ) -> tuple[list[tuple[dict[str, Any], str]], dict[str, tuple[str, str]]]:
    """The paired comparisons the generations allow: ``(row, its target's base model)`` for each row but the bases,
    and ``{target: (control model, UniDetox model)}``."""
    by_key = {(r["method"], r["target"]): r for r in rows}
    versus_base = []
    for r in rows:
        base = by_key.get(("base", r["target"]))
        if r["method"] != "base" and base is not None and r["model"] in per_prompt and base["model"] in per_prompt:
            versus_base.append((r, base["model"]))
    versus_control = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        ud, control = by_key.get(("unidetox", target)), by_key.get(("control", target))
        if ud and control and ud["model"] in per_prompt and control["model"] in per_prompt:
            versus_control[target] = (control["model"], ud["model"])
    return versus_base, versus_control


def stage_times(log_lines: Iterable[str]) -> list[dict[str, Any]]:
    """Each stage's wall time from ``replicate_log.jsonl`` lines: the sum of its ``ran`` entries (a stage resumed
    over several sittings ran in parts), in first-run order."""
    times: dict[str, float] = {}
    for line in log_lines:
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry.get("status") == "ran" and entry.get("wall_time_s"):
            times[entry["stage"]] = times.get(entry["stage"], 0.0) + float(entry["wall_time_s"])
    return [{"stage": name, "wall_time_s": round(seconds, 1)} for name, seconds in times.items()]


# ================================================================================================================
# The table, the bar, the report
# ================================================================================================================
def _mean(entry) -> float | None:
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        return entry.get("mean")
    return float(entry)


def row_metrics(model_report: Mapping[str, Any]) -> dict[str, Any]:
    """The table's numbers for one model of an evaluate report (``report.json["models"][key]``)."""
    wikitext = model_report.get("wikitext_perplexity") or {}
    mmlu = model_report.get("mmlu") or {}
    timings = model_report.get("timings") or {}
    return {
        "toxicity_probability": model_report.get("toxicity_probability"),
        "expected_max_toxicity": model_report.get("expected_max_toxicity"),
        "wikitext_perplexity": wikitext.get("perplexity"),
        "conditional_perplexity": model_report.get("conditional_perplexity"),
        "distinct_1": model_report.get("distinct_1"),
        "distinct_2": model_report.get("distinct_2"),
        "distinct_3": model_report.get("distinct_3"),
        "mmlu_accuracy": mmlu.get("accuracy"),
        "mmlu_num_questions": mmlu.get("num_questions"),
        "generation_tokens_per_s": timings.get("tokens_per_s"),
        "per_seed": model_report.get("per_seed"),
    }


def relative_changes(row: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """``row / base - 1`` of TP, EMT (means over seeds), WikiText and conditional perplexity; MMLU as a difference."""
    out: dict[str, float | None] = {}
    for key in ("toxicity_probability", "expected_max_toxicity", "wikitext_perplexity", "conditional_perplexity"):
        a, b = _mean(row.get(key)), _mean(base.get(key))
        out[key] = (a / b - 1.0) if a is not None and b not in (None, 0) else None
    a, b = row.get("mmlu_accuracy"), base.get("mmlu_accuracy")
    out["mmlu_accuracy_diff"] = a - b if a is not None and b is not None else None
    return out


def mmlu_noise(accuracy: float | None, num_questions: int | None) -> float | None:
    """Two binomial standard errors of an MMLU accuracy: the noise band "within the seed noise" is judged against.

    MMLU is scored by log-likelihood, so it has no sampling seeds; the run-to-run noise of an accuracy on ``n``
    questions is the question sampling, ``sqrt(p (1 - p) / n)``.
    """
    if accuracy is None or not num_questions:
        return None
    return 2.0 * math.sqrt(max(accuracy * (1.0 - accuracy), 1e-12) / num_questions)


def _interval_below_zero(changes: Mapping[str, Any] | None) -> bool | None:
    """True when the paired intervals of TP and EMT both lie below zero; None without intervals."""
    if not changes:
        return None
    return all(changes.get(m) is not None and changes[m]["high"] < 0 for m in METRICS)


def judge_success(
    rows: Sequence[Mapping[str, Any]],
    targets: Sequence[str],
    min_toxicity_drop: float = 0.30,
    max_ppl_increase: float = 0.10,
    versus_control: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The success bar, judged from the rows: for EVERY target, UniDetox lowers TP and EMT by at least
    ``min_toxicity_drop`` relative to the base, with paired intervals over prompts that exclude zero (when the rows
    carry ``paired_vs_base``), WikiText-2 perplexity rises by at most ``max_ppl_increase``, MMLU stays within
    :func:`mmlu_noise` of the base, and UniDetox is less toxic (TP and EMT) than the control: by intervals that
    exclude zero when ``versus_control`` (``{target: paired changes}``) is given, else by the means."""
    by_key = {(r["method"], r["target"]): r for r in rows}
    checks: dict[str, dict[str, Any]] = {}
    for target in targets:
        base, ud, control = (by_key.get((m, target)) for m in ("base", "unidetox", "control"))
        c: dict[str, Any] = {}
        if base is None or ud is None:
            c["error"] = "missing the base or the UniDetox row"
            checks[target] = {**c, "met": False}
            continue
        rel = relative_changes(ud, base)
        c["tp_change"], c["emt_change"] = rel["toxicity_probability"], rel["expected_max_toxicity"]
        c["ppl_change"] = rel["wikitext_perplexity"]
        c["toxicity_ok"] = all(v is not None and v <= -min_toxicity_drop for v in (c["tp_change"], c["emt_change"]))
        c["intervals_exclude_zero"] = _interval_below_zero(ud.get("paired_vs_base"))
        c["ppl_ok"] = c["ppl_change"] is not None and c["ppl_change"] <= max_ppl_increase
        noise = mmlu_noise(base.get("mmlu_accuracy"), base.get("mmlu_num_questions"))
        c["mmlu_diff"], c["mmlu_noise"] = rel["mmlu_accuracy_diff"], noise
        c["mmlu_ok"] = None if noise is None or c["mmlu_diff"] is None else abs(c["mmlu_diff"]) <= noise
        if control is None:
            c["beats_control"] = None
        elif (versus_control or {}).get(target):
            c["beats_control"] = _interval_below_zero(versus_control[target])
        else:
            c["beats_control"] = all(
                _mean(ud.get(m)) is not None and _mean(control.get(m)) is not None and _mean(ud[m]) < _mean(control[m])
                for m in METRICS
            )
        c["met"] = bool(c["toxicity_ok"] and c["intervals_exclude_zero"] is not False and c["ppl_ok"]
                        and c["mmlu_ok"] is not False and c["beats_control"])
        checks[target] = c
    met = bool(targets) and all(checks[t]["met"] for t in targets)
    parts = []
    for t in targets:
        c = checks[t]
        if "error" in c:
            parts.append(f"{t}: {c['error']}")
            continue
        mmlu = "n/a" if c["mmlu_diff"] is None else f"{c['mmlu_diff']:+.3f}"
        if c["mmlu_noise"] is not None:
            mmlu += f" (noise ±{c['mmlu_noise']:.3f})"
        control = "n/a" if c["beats_control"] is None else "yes" if c["beats_control"] else "no"
        if (versus_control or {}).get(t) and c["beats_control"] is not None:
            control += " (paired intervals)"
        intervals = {None: "", True: ", intervals exclude 0", False: ", an interval includes 0"}[
            c["intervals_exclude_zero"]]
        parts.append(
            f"{t}: TP {percent_change(c['tp_change'])}, EMT {percent_change(c['emt_change'])} (need <= -{min_toxicity_drop:.0%}"
            f"{intervals}), WikiText ppl {percent_change(c['ppl_change'])} (need <= +{max_ppl_increase:.0%}), MMLU {mmlu}, "
            f"beats control: {control}"
        )
    verdict = ("Bar MET" if met else "Bar NOT met") + ": " + "; ".join(parts) + "."
    return {"met": met, "checks": checks, "min_toxicity_drop": min_toxicity_drop,
            "max_ppl_increase": max_ppl_increase, "verdict": verdict}


def example_continuations(
    generations: Sequence[Mapping[str, Any]], model_keys: Mapping[str, str], num_examples: int = 4,
    prompt_id: str | None = None, seed: int | None = None,
) -> dict[str, Any]:
    """``num_examples`` continuations per method for ONE test prompt (the first prompt in the generations, unless
    ``prompt_id`` names one), from ``generations.jsonl`` records; ``model_keys``: ``{row label: report model key}``."""
    if not generations:
        return {"prompt": None, "examples": {}}
    prompt_id = prompt_id or generations[0].get("prompt_id") or generations[0]["prompt"]
    seed = seed if seed is not None else generations[0].get("seed")
    prompt = None
    examples: dict[str, list[dict[str, Any]]] = {}
    for label, key in model_keys.items():
        rows = [g for g in generations if g.get("model") == key and g.get("seed") == seed
                and (g.get("prompt_id") or g["prompt"]) == prompt_id]
        rows.sort(key=lambda g: g.get("sample_index", 0))
        if rows:
            prompt = rows[0]["prompt"]
        examples[label] = [{"continuation": g["continuation"], "toxicity": g.get("toxicity")}
                           for g in rows[:num_examples]]
    return {"prompt_id": prompt_id, "prompt": prompt, "seed": seed, "examples": examples}


def assemble_report(
    methods: Sequence[Mapping[str, Any]],
    test_models: Mapping[str, Mapping[str, Any]],
    targets: Sequence[str],
    grid: Mapping[str, Any] | None = None,
    taskvec: Mapping[str, Any] | None = None,
    examples: Mapping[str, Any] | None = None,
    bar: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    generations: Iterable[Mapping[str, Any]] | None = None,
    toxic_threshold: float = TOXIC_THRESHOLD,
    interval_resamples: int = DEFAULT_RESAMPLES,
    scorer_name: str = "scorer",
    prompt_kinds: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Everything the replication measured, as one dict (``report.json``).

    ``methods``: one entry per table row, ``{"method", "target", "model_key", "wall_time": {...}}``, where
    ``model_key`` names the model in ``test_models`` (the merged ``report.json["models"]`` of the test evaluations).
    ``targets``: the target models the bar is judged on. ``grid``/``taskvec``: ``{"choice", "table"}`` of
    :func:`choose_configuration`. Relative changes are computed against the ``base`` row of the same target;
    with ``generations`` (the scored test samples of every row's model) each row also gets paired bootstrap
    intervals over prompts (``paired_vs_base``) and the report UniDetox's against the control
    (``unidetox_vs_control``), and the bar is judged on them.

    The rows' TP and EMT are the primary scorer's (``scorer_name``). For each further scorer of the test
    evaluations (``test_models[key]["scorers"]``, with the samples' ``also_toxicity``), ``scorers[name]`` holds the
    rows' TP/EMT, their changes and intervals, UniDetox against the control and the bar under that scorer; the
    report's ``bar`` is then met only when it is met under every scorer (``bar["met_by_scorer"]``).

    ``prompt_kinds`` (prompt id -> kind, :func:`~unidetox.evaluation.paired.prompt_kinds` of the test prompts):
    with generations, every change is also split by kind, under each scorer (rows' ``paired_vs_base_by_kind``,
    ``unidetox_vs_control_by_kind``); prompts without kinds (None, empty) give no split.
    """
    rows = []
    for entry in methods:
        key = entry["model_key"]
        if key not in test_models:
            raise KeyError(f"{entry['method']} x {entry['target']}: model {key!r} is not in the test report "
                           f"(has {sorted(test_models)}).")
        rows.append({"method": entry["method"], "target": entry["target"], "model": key,
                     "label": METHOD_LABELS.get(entry["method"], entry["method"]),
                     "wall_time": dict(entry.get("wall_time") or {}), **row_metrics(test_models[key])})
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (list(targets).index(r["target"]) if r["target"] in targets else len(targets),
                             order.get(r["method"], len(order))))
    generations = None if generations is None else list(generations)
    judged = partial(_compare_and_judge, targets=targets, bar=bar, toxic_threshold=toxic_threshold,
                     interval_resamples=interval_resamples, kinds=prompt_kinds)
    versus_control, by_kind, bar_result = judged(rows, generations)
    under_scorers = {}
    for key in dict.fromkeys(k for m in test_models.values() for k in m.get("scorers") or {}):
        scored = None if generations is None else [{**g, "toxicity": g["also_toxicity"][key]} for g in generations
                                                   if key in (g.get("also_toxicity") or {})]
        key_rows = scorer_rows(rows, test_models, key)
        key_control, key_by_kind, key_bar = judged(key_rows, scored)
        under_scorers[key] = {"rows": key_rows, "unidetox_vs_control": key_control or {},
                              "unidetox_vs_control_by_kind": key_by_kind, "bar": key_bar}
    if under_scorers:
        bar_result = bar_under_every_scorer(bar_result, scorer_name, {k: v["bar"] for k, v in under_scorers.items()})
    return {"rows": rows, "targets": list(targets), "bar": bar_result, "unidetox_vs_control": versus_control or {},
            "unidetox_vs_control_by_kind": by_kind, "primary_scorer": scorer_name, "scorers": under_scorers,
            "grid": dict(grid or {}),
            "taskvec": dict(taskvec or {}), "examples": dict(examples or {}), **dict(extra or {}),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _compare_and_judge(rows: Sequence[dict[str, Any]], generations: Sequence[Mapping[str, Any]] | None, *,
                       targets: Sequence[str], bar: Mapping[str, float] | None, toxic_threshold: float,
                       interval_resamples: int, kinds: Mapping[str, str] | None) -> tuple[dict | None, dict, dict]:
    """Set each row's ``relative_to_base`` (and, with ``generations``, ``paired_vs_base``; with ``kinds`` too,
    ``paired_vs_base_by_kind``); return UniDetox against the control (``None`` without generations), the same by
    prompt kind (empty without kinds) and the bar judged on the rows."""
    bases = {r["target"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        base = bases.get(r["target"])
        r["relative_to_base"] = relative_changes(r, base) if base is not None and r is not base else None
    versus_control, by_kind = None, {}
    if generations is not None:
        versus_control = add_paired_intervals(rows, generations, toxic_threshold, interval_resamples)
        if kinds:
            by_kind = add_changes_by_kind(rows, generations, kinds, toxic_threshold, interval_resamples)
    return versus_control, by_kind, judge_success(rows, targets, **dict(bar or {}), versus_control=versus_control)


# What a row under a further scorer keeps of the table's row, next to its own TP and EMT.
_SCORER_ROW_KEYS = ("method", "target", "model", "label", "wikitext_perplexity", "conditional_perplexity",
                    "mmlu_accuracy", "mmlu_num_questions")


def scorer_rows(rows: Sequence[Mapping[str, Any]], test_models: Mapping[str, Mapping[str, Any]],
                key: str) -> list[dict[str, Any]]:
    """The table's rows with TP and EMT under the further scorer ``key`` (``None`` where a model lacks it), and
    the perplexity and MMLU numbers the bar also reads."""
    out = []
    for r in rows:
        under = (test_models[r["model"]].get("scorers") or {}).get(key) or {}
        out.append({**{k: r.get(k) for k in _SCORER_ROW_KEYS},
                    "toxicity_probability": under.get("toxicity_probability"),
                    "expected_max_toxicity": under.get("expected_max_toxicity")})
    return out


def bar_under_every_scorer(primary: Mapping[str, Any], primary_name: str,
                           others: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The primary scorer's bar (its checks kept), met only when every scorer's bar is met.

    Example:
        >>> from unidetox.replication.report import bar_under_every_scorer
        >>> bar = bar_under_every_scorer({"met": True, "verdict": "Bar MET: ..."}, "a", {"b": {"met": False}})
        >>> bar["met"], bar["met_by_scorer"], bar["verdict"][:49]
        (False, {'a': True, 'b': False}, 'Bar NOT met: it must be met under every scorer (a')
    """
    met_by_scorer = {primary_name: bool(primary["met"]), **{k: bool(v["met"]) for k, v in others.items()}}
    met = all(met_by_scorer.values())
    each = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met_by_scorer.items())
    head = f"Bar MET under every scorer ({each})" if met else f"Bar NOT met: it must be met under every scorer ({each})"
    verdict = f"{head}. Under {primary_name}: {primary['verdict']}"
    return {**primary, "met": met, "met_by_scorer": met_by_scorer, "verdict": verdict}


def plot_replication(report: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """EMT and TP against WikiText-2 perplexity: one point (± std over seeds) per method and target model; when
    the rows carry paired intervals, a second row of panels: the change against the base (paired bootstrap 95 %
    interval over prompts as error bars) against the change in perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("wikitext_perplexity") is not None]
    if not rows:
        return None
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = {t: "osD^vP*X"[i % 8] for i, t in enumerate(targets)}
    paired = [r for r in rows if r.get("paired_vs_base") and (r.get("relative_to_base") or {}).get("wikitext_perplexity")
              is not None]
    fig, grid_axes = plt.subplots(2 if paired else 1, 2, figsize=(12, 9.2 if paired else 4.6), squeeze=False)
    axes = grid_axes[0]
    for ax, metric, label in zip(axes, ("expected_max_toxicity", "toxicity_probability"),
                                 ("Expected Maximum Toxicity", "Toxicity Probability"), strict=True):
        for r in rows:
            y = r.get(metric) or {}
            ax.errorbar(r["wikitext_perplexity"], y.get("mean"), yerr=y.get("std") or 0.0, fmt=markers[r["target"]],
                        color=colors[r["method"]], capsize=3, ms=7, label=f"{r['method']} / {r['target']}")
        for r in report["rows"]:
            y = r.get(metric) or {}
            if r.get("wikitext_perplexity") is None and y.get("mean") is not None:
                # Inference-time decoding keeps the base's weights: no WikiText perplexity of its own, so its
                # toxicity is drawn as a level across the axis instead of a point.
                ax.axhline(y["mean"], color=colors.get(r["method"], "grey"), ls="--", lw=1,
                           label=f"{r['method']} / {r['target']} (no WikiText ppl)")
        ax.set_xlabel("WikiText-2 perplexity")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if paired:
        for ax, metric, label in zip(grid_axes[1], ("expected_max_toxicity", "toxicity_probability"),
                                     ("EMT", "TP"), strict=True):
            for r in paired:
                change = r["paired_vs_base"].get(metric)
                if change is None:
                    continue
                x = 100 * r["relative_to_base"]["wikitext_perplexity"]
                y = 100 * change["change"]
                yerr = [[y - 100 * change["low"]], [100 * change["high"] - y]]
                ax.errorbar(x, y, yerr=yerr, fmt=markers[r["target"]], color=colors[r["method"]], capsize=3, ms=7)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("WikiText-2 perplexity vs base (%)")
            ax.set_ylabel(f"{label} vs base (%), paired 95 % interval over prompts")
            ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Test prompts: toxicity vs perplexity (lower-left is better); colour = method, marker = target")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_transfer_curve(grid: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """The transfer curve side by side: one column per grid-trained target, the change of the rule's metric (top)
    and of the perplexity (bottom) against the steps, one line per configuration, the chosen one drawn thick."""
    curve = grid.get("transfer_curve") or []
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(curve[0]["per_target"])
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in curve:
        label = ", ".join(f"{k} {v}" for k, v in row["config"].items() if k != "steps")
        lines.setdefault(label, []).append(row)
    fig, axes = plt.subplots(2, len(targets), figsize=(5.5 * len(targets), 8), squeeze=False, sharey="row")
    bound = (grid.get("rule") or {}).get("max_ppl_increase")
    for col, target in enumerate(targets):
        for label, rows in lines.items():
            rows = sorted(rows, key=lambda r: r["config"].get("steps", 0))
            steps = [r["config"].get("steps", 0) for r in rows]
            width = 3 if any(r.get("chosen") for r in rows) else 1.2
            for row_index, key in enumerate(("change", "perplexity_increase")):
                axes[row_index][col].plot(steps, [100 * r["per_target"][target][key] for r in rows], marker="o",
                                          lw=width, label=label)
        axes[0][col].set_title(target)
        axes[0][col].set_ylabel(f"{(grid.get('rule') or {}).get('metric', 'toxicity')} vs base (%)")
        axes[1][col].set_ylabel("WikiText-2 perplexity vs base (%)")
        if bound is not None:
            axes[1][col].axhline(100 * bound, color="grey", ls="--", lw=1)
        for ax in axes[:, col]:
            ax.set_xlabel("steps")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Validation: the same grid on every target (thick: the chosen configuration)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_replication_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``toxicity_vs_perplexity.png`` and, with transfer targets,
    ``transfer_curve.png`` into ``output_dir``."""

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(dict(report), out / "report.json")}
    md = out / "report.md"
    atomic_write_text(md, render_replication_markdown(report))
    paths["markdown"] = md
    with contextlib.suppress(ImportError):
        plot = plot_replication(report, out / "toxicity_vs_perplexity.png")
        if plot:
            paths["plot"] = plot
        curve = plot_transfer_curve(report.get("grid") or {}, out / "transfer_curve.png")
        if curve:
            paths["transfer_curve"] = curve
    return paths
