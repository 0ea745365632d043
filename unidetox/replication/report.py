"""The replication's report: the table (method x target), relative changes against the base, the bar verdict, the
validation grid, example continuations and a toxicity-vs-perplexity plot (:func:`assemble_report`,
:func:`write_replication_report`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unidetox.detox.selection import METRICS
from unidetox.distill.dataset import SUMMARY_SAMPLES_FILE
from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.paired import paired_metric_changes, per_prompt_toxicity
from unidetox.evaluation.report import write_json
from unidetox.files import atomic_write_text
from unidetox.intervals import DEFAULT_RESAMPLES
from unidetox.replication.political_topics import POLITICAL_LEXICON, political_topic_study

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


def format_number(value: float) -> str:
    """Compact, stable text for a hyperparameter in a directory name: ``0.0005 -> "5e-4"``, ``0.1 -> "0.1"``.

    Example:
        >>> from unidetox.replication.report import format_number
        >>> [format_number(v) for v in (5e-4, 2.5e-4, 0.1, 1.0, 2)]
        ['5e-4', '2.5e-4', '0.1', '1', '2']
    """
    value = float(value)
    if value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.6g}"


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


def grid_table_markdown(table: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """The validation grid as Markdown: one row per (run, checkpoint), the chosen row in bold."""
    if not table:
        return "(empty grid)\n"
    keys = list(keys) if keys is not None else list(dict.fromkeys(k for r in table for k in r.get("config", {})))
    header = ["run", *keys, "TP", "EMT", "WikiText ppl", "ppl vs base", "within bound", "chosen"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cfg = r.get("config", {})
        cells = [str(r.get("run")), *[_plain(cfg.get(k)) for k in keys], _plain(r.get("toxicity_probability")),
                 _plain(r.get("expected_max_toxicity")), _plain(r.get("perplexity"), 2),
                 "base" if r.get("baseline") else f"{r['perplexity_increase']:+.1%}",
                 "–" if r.get("baseline") else ("yes" if r.get("within_bound") else "no"),
                 "**chosen**" if r.get("chosen") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plain(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format_number(value) if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


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
    by_key = {(r["method"], r["target"]): r for r in rows}
    for r in rows:
        base = by_key.get(("base", r["target"]))
        if r["method"] != "base" and base is not None and r["model"] in per_prompt and base["model"] in per_prompt:
            r["paired_vs_base"] = paired_metric_changes(per_prompt, base["model"], r["model"], num_resamples, seed)
    versus_control = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        ud, control = by_key.get(("unidetox", target)), by_key.get(("control", target))
        if ud and control and ud["model"] in per_prompt and control["model"] in per_prompt:
            versus_control[target] = paired_metric_changes(per_prompt, control["model"], ud["model"], num_resamples,
                                                           seed)
    return versus_control


# ================================================================================================================
# The distilled text: where it comes from and what it looks like
# ================================================================================================================
# Characters and keywords of program text; the share of such texts is how far the contrast drifts away from prose.
_CODE_PATTERN = re.compile(r"[{};=\[\]]|\bdef\s|\bimport\s|\breturn\b|</?[a-z]+>|\bfunction\b")


def looks_like_code(text: str, window: int = 200) -> bool:
    """True when the first ``window`` characters hold program syntax (braces, ``;``, ``=``, brackets, ``def``,
    ``import``, ``return``, tags).

    Example:
        >>> from unidetox.replication.report import looks_like_code
        >>> looks_like_code("def f(x):\\n    return x"), looks_like_code("The weather was fine, and we walked home.")
        (True, False)
    """
    return bool(_CODE_PATTERN.search(text[:window]))


def text_profile(texts: Sequence[str], num_tokens: Sequence[int] | None = None, opening_chars: int = 12,
                 top: int = 5) -> dict[str, Any]:
    """The share of code-like texts, the most common openings (first ``opening_chars`` characters, whitespace
    collapsed) and the mean tokens per text (when ``num_tokens`` is given)."""
    if not texts:
        raise ValueError("No texts to profile.")
    openings = Counter(" ".join(t.split())[:opening_chars] for t in texts)
    return {
        "num_texts": len(texts),
        "code_like": sum(looks_like_code(t) for t in texts) / len(texts),
        "top_openings": [{"opening": o, "count": c} for o, c in openings.most_common(top)],
        "mean_tokens": (sum(num_tokens) / len(num_tokens)) if num_tokens else None,
    }


def read_plain_samples(distilled_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``{"base": [...], "anti_expert": [...]}``: the plain samples a distill run scored next to its text
    (``summary_samples.jsonl`` beside the dataset); ``{}`` when the run wrote none."""
    path = Path(distilled_dir) / SUMMARY_SAMPLES_FILE
    if not path.is_file():
        return {}
    out: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["source"]].append(record["text"])
    return dict(out)


def source_study(corpora: Mapping[str, Mapping[str, Any]],
                 num_resamples: int = DEFAULT_RESAMPLES) -> dict[str, dict[str, Any]]:
    """One entry per distilled corpus: ``{name: {"source", "alpha", "texts", "num_tokens", "summary",
    "plain_samples"}}`` -> its :func:`text_profile`, the distill summary's toxicity against the base's plain
    samples (``summary["distilled_vs_base"]``: the difference of mean toxicity with its bootstrap interval), and
    ``political_topics``: the share of its texts, of the base's plain samples and of the anti-expert's samples
    (``plain_samples``, :func:`read_plain_samples`) that mention political topics
    (:func:`~unidetox.replication.political_topics.political_topic_study`)."""
    out = {}
    for name, corpus in corpora.items():
        plain = corpus.get("plain_samples") or {}
        summary = corpus.get("summary") or {}
        entry = {"source": corpus.get("source"), "alpha": corpus.get("alpha"),
                 **text_profile(corpus["texts"], corpus.get("num_tokens"))}
        diff = summary.get("distilled_vs_base")
        entry["mean_toxicity"] = (summary.get("distilled") or {}).get("mean_toxicity")
        entry["base_mean_toxicity"] = (summary.get("base") or {}).get("mean_toxicity")
        entry["versus_base"] = dict(diff) if diff else None
        entry["political_topics"] = political_topic_study(
            {"texts": corpus["texts"], "base_samples": plain.get("base"), "anti_expert_samples": plain.get("anti_expert")},
            num_resamples=num_resamples)
        out[name] = entry
    return out


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
            f"{t}: TP {_pct(c['tp_change'])}, EMT {_pct(c['emt_change'])} (need <= -{min_toxicity_drop:.0%}"
            f"{intervals}), WikiText ppl {_pct(c['ppl_change'])} (need <= +{max_ppl_increase:.0%}), MMLU {mmlu}, "
            f"beats control: {control}"
        )
    verdict = ("Bar MET" if met else "Bar NOT met") + ": " + "; ".join(parts) + "."
    return {"met": met, "checks": checks, "min_toxicity_drop": min_toxicity_drop,
            "max_ppl_increase": max_ppl_increase, "verdict": verdict}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def _pct_interval(change: Mapping[str, Any] | None) -> str:
    """``-47.0 % [-60.1 %, -31.2 %]``: a paired change with its 95 % interval."""
    if not change:
        return "–"
    text = f"{change['change']:+.1%} [{change['low']:+.1%}, {change['high']:+.1%}]"
    undefined = change.get("undefined_resamples") or 0.0
    # Resamples that drew no prompt the reference found toxic have no relative change: say how many were dropped.
    return text + (f" ({undefined:.0%} of resamples undefined)" if undefined >= 0.005 else "")


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
    versus_control, bar_result = _compare_and_judge(rows, targets, generations, bar, toxic_threshold,
                                                    interval_resamples)
    under_scorers = {}
    for key in dict.fromkeys(k for m in test_models.values() for k in m.get("scorers") or {}):
        scored = None if generations is None else [{**g, "toxicity": g["also_toxicity"][key]} for g in generations
                                                   if key in (g.get("also_toxicity") or {})]
        key_rows = scorer_rows(rows, test_models, key)
        key_control, key_bar = _compare_and_judge(key_rows, targets, scored, bar, toxic_threshold, interval_resamples)
        under_scorers[key] = {"rows": key_rows, "unidetox_vs_control": key_control or {}, "bar": key_bar}
    if under_scorers:
        bar_result = bar_under_every_scorer(bar_result, scorer_name, {k: v["bar"] for k, v in under_scorers.items()})
    return {"rows": rows, "targets": list(targets), "bar": bar_result, "unidetox_vs_control": versus_control or {},
            "scorers": under_scorers, "grid": dict(grid or {}),
            "taskvec": dict(taskvec or {}), "examples": dict(examples or {}), **dict(extra or {}),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _compare_and_judge(rows: Sequence[dict[str, Any]], targets: Sequence[str],
                       generations: Sequence[Mapping[str, Any]] | None, bar: Mapping[str, float] | None,
                       toxic_threshold: float, interval_resamples: int) -> tuple[dict | None, dict[str, Any]]:
    """Set each row's ``relative_to_base`` (and, with ``generations``, ``paired_vs_base``); return UniDetox against
    the control (``None`` without generations) and the bar judged on the rows."""
    bases = {r["target"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        base = bases.get(r["target"])
        r["relative_to_base"] = relative_changes(r, base) if base is not None and r is not base else None
    versus_control = None
    if generations is not None:
        versus_control = add_paired_intervals(rows, generations, toxic_threshold, interval_resamples)
    return versus_control, judge_success(rows, targets, **dict(bar or {}), versus_control=versus_control)


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


def _ms(entry, digits: int = 3) -> str:
    if entry is None:
        return "–"
    if isinstance(entry, Mapping):
        mean, std = entry.get("mean"), entry.get("std")
        if mean is None:
            return "–"
        if entry.get("n", 1) > 1 and std is not None and not math.isnan(std):
            return f"{mean:.{digits}f} ± {std:.{digits}f}"
        return f"{mean:.{digits}f}"
    return f"{float(entry):.{digits}f}"


def _share_cell(share: Mapping[str, Any] | None) -> str:
    if not share:
        return "–"
    return f"{share['share']:.1%} [{share['low']:.1%}, {share['high']:.1%}] (n={share['n']})"


def political_topics_markdown(study: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The source study's political-topic shares as a Markdown section (no lines when none were measured)."""
    rows = {name: e["political_topics"] for name, e in study.items() if e.get("political_topics")}
    if not rows:
        return []
    lines = ["## Political topics (lexicon)", "",
             "| corpus | its texts | base, plain samples | anti-expert, plain samples | texts - base samples "
             "[95 % interval] |", "|---|---|---|---|---|"]
    for name, topics in rows.items():
        shares, diff = topics["shares"], (topics.get("versus_reference") or {}).get("texts")
        diff_text = "–" if not diff else f"{diff['difference']:+.1%} [{diff['ci95_low']:+.1%}, {diff['ci95_high']:+.1%}]"
        lines.append(f"| {name} | {_share_cell(shares.get('texts'))} | {_share_cell(shares.get('base_samples'))} | "
                     f"{_share_cell(shares.get('anti_expert_samples'))} | {diff_text} |")
    lines += ["", f"Share of texts that mention a political topic: a term of the lexicon in "
              f"`unidetox/replication/political_topics.py` ({', '.join(POLITICAL_LEXICON)}), matched on word "
              "boundaries [bootstrap 95 % interval over texts]. What a lexicon can and cannot say: it counts "
              "mentions, so it shows whether the contrast shifts the text toward politics compared with the base "
              "model's own samples drawn the same way; it cannot say which side a text takes, whether it praises or "
              "attacks, or whether a model fine-tuned on the text leans one way: that needs stance annotation or "
              "probes of the fine-tuned model. It misses paraphrase and misspelling and also counts other senses of "
              "its words (\"a liberal amount\"), so compare shares between text sets, not against zero.", ""]
    return lines


def under_scorers_markdown(under_scorers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One section per further scorer: each row's TP/EMT and change against the base, UniDetox against the
    control, and the bar's verdict under that scorer."""
    lines = []
    for name, under in under_scorers.items():
        lines += ["", f"## Under `{name}` (the same test samples, scored by it)", "",
                  "| method | target | TP | EMT | TP vs base | EMT vs base |", "|---|---|---|---|---|---|"]
        for r in under["rows"]:
            rel, intervals = r.get("relative_to_base") or {}, r.get("paired_vs_base") or {}
            changes = [_pct_interval(intervals.get(m)) if intervals else _pct(rel.get(m)) if rel else "–"
                       for m in METRICS]
            lines.append(f"| {r['label']} | {r['target']} | {_ms(r['toxicity_probability'])} | "
                         f"{_ms(r['expected_max_toxicity'])} | " + " | ".join(changes) + " |")
        for target, changes in (under.get("unidetox_vs_control") or {}).items():
            lines += ["", f"UniDetox against the control, {target}: TP "
                      f"{_pct_interval(changes.get('toxicity_probability'))}, EMT "
                      f"{_pct_interval(changes.get('expected_max_toxicity'))} (paired)."]
        lines += ["", f"Under `{name}`: {under['bar']['verdict']}"]
    return lines


def render_replication_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the table, relative changes + the bar verdict, the validation grid, examples."""
    lines = ["# UniDetox replication", ""]
    if report.get("command"):
        lines += ["```bash", str(report["command"]), "```", ""]
    if report.get("description"):
        lines += [str(report["description"]), ""]
    lines += _test_table_markdown(report["rows"])
    lines += _relative_table_markdown(report["rows"], report.get("unidetox_vs_control") or {})
    lines += under_scorers_markdown(report.get("scorers") or {})
    lines += ["", f"**{report['bar']['verdict']}**", ""]
    lines += _grid_markdown(report.get("grid") or {})
    lines += _source_study_markdown(report.get("source_study") or {})
    lines += _stage_times_markdown(report.get("stage_times") or [])
    lines += _taskvec_markdown(report.get("taskvec") or {})
    lines += _examples_markdown(report.get("examples") or {})
    return "\n".join(lines)


def _test_table_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["method", "target", "TP", "EMT", "WikiText-2 ppl", "cond. ppl", "Distinct-1", "Distinct-2",
              "Distinct-3", "MMLU acc", "method wall time (s)"]
    lines = ["## Test prompts", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        wall = r.get("wall_time", {}).get("total_s")
        lines.append("| " + " | ".join([
            r["label"], r["target"], _ms(r["toxicity_probability"]), _ms(r["expected_max_toxicity"]),
            _ms(r["wikitext_perplexity"], 2), _ms(r["conditional_perplexity"], 2), _ms(r["distinct_1"]),
            _ms(r["distinct_2"]), _ms(r["distinct_3"]), _ms(r["mmlu_accuracy"]),
            "–" if wall is None else f"{wall:.0f}",
        ]) + " |")
    return lines + ["", "TP / EMT / cond. ppl / Distinct: mean ± std over seeds. Method wall time: making the data + "
                    "fine-tuning on this machine (task vectors and inference-time decoding: training the anti-expert, "
                    "+ negating); decoding also pays per generated token: see tokens/s below.", ""]


def _relative_table_markdown(rows: Sequence[Mapping[str, Any]],
                             versus_control: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each row against its base (paired intervals when the rows carry them), then UniDetox against the control."""
    lines = ["## Relative to the base model", "",
             "| method | target | TP | EMT | WikiText-2 ppl | cond. ppl | MMLU (diff) | generation tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r.get("relative_to_base") or {}
        tps = r.get("generation_tokens_per_s")
        intervals = r.get("paired_vs_base") or {}
        tp = _pct_interval(intervals.get("toxicity_probability")) if intervals else _pct(rel.get("toxicity_probability"))
        emt = (_pct_interval(intervals.get("expected_max_toxicity")) if intervals
               else _pct(rel.get("expected_max_toxicity")))
        lines.append(
            f"| {r['label']} | {r['target']} | {tp} | {emt} | {_pct(rel.get('wikitext_perplexity'))} | "
            f"{_pct(rel.get('conditional_perplexity'))} | "
            f"{'–' if rel.get('mmlu_accuracy_diff') is None else format(rel['mmlu_accuracy_diff'], '+.3f')} | "
            f"{'–' if tps is None else f'{tps:.1f}'} |")
    if any(r.get("paired_vs_base") for r in rows):
        lines += ["", "TP / EMT: relative change of the mean over prompts [paired bootstrap 95 % interval over test "
                  "prompts, each prompt's value averaged over seeds]."]
    if versus_control:
        lines += ["", "### UniDetox against the control (same prompts, paired)", "", "| target | TP | EMT |",
                  "|---|---|---|"]
        for target, changes in versus_control.items():
            lines.append(f"| {target} | {_pct_interval(changes.get('toxicity_probability'))} | "
                         f"{_pct_interval(changes.get('expected_max_toxicity'))} |")
    return lines


def _grid_markdown(grid: Mapping[str, Any]) -> list[str]:
    if not grid.get("table"):
        return []
    choice = grid.get("choice") or {}
    return ["## Validation grid (smallest toxicity within the perplexity bound)", "",
            grid_table_markdown(grid["table"]),
            f"Chosen: `{choice.get('run')}` at step {choice.get('step')} ({choice.get('metric')}; perplexity "
            f"{_pct(choice.get('perplexity_increase'))} vs the base, bound +{choice.get('max_ppl_increase', 0):.0%}"
            f"{'' if choice.get('within_bound', True) else '; NO candidate was within the bound: the closest was taken'}).",
            ""]


def _source_study_markdown(study: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not study:
        return []
    lines = ["## The distilled text of each source", "",
             "| corpus | source | alpha | texts | code-like | mean tokens | mean toxicity (base samples) | "
             "distilled - base [95 % interval] | most common openings |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in study.items():
        diff = e.get("versus_base")
        diff_text = "–" if not diff else (f"{diff['difference']:+.4f} [{diff['ci95_low']:+.4f}, "
                                          f"{diff['ci95_high']:+.4f}]")
        tox = "–" if e.get("mean_toxicity") is None else (
            f"{e['mean_toxicity']:.4f}" + ("" if e.get("base_mean_toxicity") is None
                                           else f" ({e['base_mean_toxicity']:.4f})"))
        openings = ", ".join(f"`{o['opening']}` ({o['count']})".replace("|", "\\|") for o in e["top_openings"][:3])
        lines.append(f"| {name} | {e.get('source') or '–'} | {_plain(e.get('alpha'))} | {e['num_texts']} | "
                     f"{e['code_like']:.0%} | {_plain(e.get('mean_tokens'), 1)} | {tox} | {diff_text} | {openings} |")
    lines.append("")
    return lines + political_topics_markdown(study)


def _stage_times_markdown(times: Sequence[Mapping[str, Any]]) -> list[str]:
    if not times:
        return []
    return ["## Stage wall times (this output directory, every sitting)", "", "| stage | wall time (s) |",
            "|---|---|", *[f"| {t['stage']} | {t['wall_time_s']:.0f} |" for t in times],
            f"| **all stages** | **{sum(t['wall_time_s'] for t in times):.0f}** |", ""]


def _taskvec_markdown(taskvec: Mapping[str, Any]) -> list[str]:
    if not taskvec.get("table"):
        return []
    choice = taskvec.get("choice") or {}
    return ["## Task-vector lambda on the validation prompts", "", grid_table_markdown(taskvec["table"]),
            f"Chosen: lambda = {choice.get('config', {}).get('lambda')}.", ""]


def _examples_markdown(ex: Mapping[str, Any]) -> list[str]:
    if not ex.get("examples"):
        return []
    lines = ["## Example continuations (one test prompt, seed " + str(ex.get("seed")) + ")", "",
             f"Prompt: `{(ex.get('prompt') or '').strip()}`", ""]
    for label, items in ex["examples"].items():
        lines.append(f"- **{label}**")
        for item in items:
            text = " ".join(str(item["continuation"]).split()).replace("|", "\\|")
            score = item.get("toxicity")
            lines.append(f"  - {text!r}" + ("" if score is None else f" (toxicity {score:.2f})"))
    lines.append("")
    return lines


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


def write_replication_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``toxicity_vs_perplexity.png`` into ``output_dir``."""

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
    return paths


