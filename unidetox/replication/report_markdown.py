"""``report.md``: the replication's report as Markdown, one function per section (:func:`render_replication_markdown`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from unidetox.detox.selection import METRICS
from unidetox.replication.formatting import format_number, percent_change, table_head
from unidetox.replication.political_topics import POLITICAL_LEXICON


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


def _pct_interval(change: Mapping[str, Any] | None) -> str:
    """``-47.0 % [-60.1 %, -31.2 %]``: a paired change with its 95 % interval."""
    if not change:
        return "–"
    text = f"{change['change']:+.1%} [{change['low']:+.1%}, {change['high']:+.1%}]"
    undefined = change.get("undefined_resamples") or 0.0
    # Resamples that drew no prompt the reference found toxic have no relative change: say how many were dropped.
    return text + (f" ({undefined:.0%} of resamples undefined)" if undefined >= 0.005 else "")


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
             *table_head("corpus", "its texts", "base, plain samples", "anti-expert, plain samples",
                         "texts - base samples [95 % interval]")]
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
                  *table_head("method", "target", "TP", "EMT", "TP vs base", "EMT vs base")]
        for r in under["rows"]:
            rel, intervals = r.get("relative_to_base") or {}, r.get("paired_vs_base") or {}
            changes = [_pct_interval(intervals.get(m)) if intervals else percent_change(rel.get(m)) if rel else "–"
                       for m in METRICS]
            lines.append(f"| {r['label']} | {r['target']} | {_ms(r['toxicity_probability'])} | "
                         f"{_ms(r['expected_max_toxicity'])} | " + " | ".join(changes) + " |")
        for target, changes in (under.get("unidetox_vs_control") or {}).items():
            lines += ["", f"UniDetox against the control, {target}: TP "
                      f"{_pct_interval(changes.get('toxicity_probability'))}, EMT "
                      f"{_pct_interval(changes.get('expected_max_toxicity'))} (paired)."]
        lines += ["", f"Under `{name}`: {under['bar']['verdict']}"]
    return lines


def by_kind_markdown(report: Mapping[str, Any]) -> list[str]:
    """"By prompt kind": each row's change against its base and UniDetox's against the control on each kind of
    prompt, one table under each scorer (no lines when the test prompts carry no kinds)."""
    scorers = {report.get("primary_scorer", "scorer"): report, **(report.get("scorers") or {})}
    tables = []
    for name, under in scorers.items():
        rows = [(f"{r['label']} vs base", r["target"], kind, changes) for r in under["rows"]
                for kind, changes in (r.get("paired_vs_base_by_kind") or {}).items()]
        rows += [("UniDetox vs control", target, kind, changes)
                 for target, by_kind in (under.get("unidetox_vs_control_by_kind") or {}).items()
                 for kind, changes in by_kind.items()]
        if rows:
            tables += ["", f"### Under `{name}`", "", *table_head("change", "target", "prompt kind", "prompts", "TP",
                                                                  "EMT")]
            tables += [f"| {label} | {target} | {kind} | {changes['num_prompts']} | "
                       + " | ".join(_pct_interval(changes.get(m)) for m in METRICS) + " |"
                       for label, target, kind, changes in rows]
    if not tables:
        return []
    return ["", "## By prompt kind", "", "Each change above on the test prompts of one kind (the prompts' labels; "
            "ToxiGen: hate = hateful, neutral = benign): relative change of the mean over that kind's prompts "
            "[paired bootstrap 95 % interval over them]. –: undefined (fewer than 2 prompts of the kind, or the "
            "reference never toxic on them).", *tables]


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
    lines += by_kind_markdown(report)
    lines += ["", f"**{report['bar']['verdict']}**", ""]
    lines += _grid_markdown(report.get("grid") or {})
    lines += transfer_curve_markdown(report.get("grid") or {})
    lines += _source_study_markdown(report.get("source_study") or {})
    lines += _stage_times_markdown(report.get("stage_times") or [])
    lines += _taskvec_markdown(report.get("taskvec") or {})
    lines += _examples_markdown(report.get("examples") or {})
    return "\n".join(lines)


def _test_table_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["method", "target", "TP", "EMT", "WikiText-2 ppl", "cond. ppl", "Distinct-1", "Distinct-2",
              "Distinct-3", "MMLU acc", "method wall time (s)"]
    lines = ["## Test prompts", "", *table_head(*header)]
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
             *table_head("method", "target", "TP", "EMT", "WikiText-2 ppl", "cond. ppl", "MMLU (diff)",
                         "generation tokens/s")]
    for r in rows:
        rel = r.get("relative_to_base") or {}
        tps = r.get("generation_tokens_per_s")
        intervals = r.get("paired_vs_base") or {}
        tp = _pct_interval(intervals.get("toxicity_probability")) if intervals else percent_change(rel.get("toxicity_probability"))
        emt = (_pct_interval(intervals.get("expected_max_toxicity")) if intervals
               else percent_change(rel.get("expected_max_toxicity")))
        lines.append(
            f"| {r['label']} | {r['target']} | {tp} | {emt} | {percent_change(rel.get('wikitext_perplexity'))} | "
            f"{percent_change(rel.get('conditional_perplexity'))} | "
            f"{'–' if rel.get('mmlu_accuracy_diff') is None else format(rel['mmlu_accuracy_diff'], '+.3f')} | "
            f"{'–' if tps is None else f'{tps:.1f}'} |")
    if any(r.get("paired_vs_base") for r in rows):
        lines += ["", "TP / EMT: relative change of the mean over prompts [paired bootstrap 95 % interval over test "
                  "prompts, each prompt's value averaged over seeds]."]
    if versus_control:
        lines += ["", "### UniDetox against the control (same prompts, paired)", "", *table_head("target", "TP", "EMT")]
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
            f"{percent_change(choice.get('perplexity_increase'))} vs the base, bound +{choice.get('max_ppl_increase', 0):.0%}"
            f"{'' if choice.get('within_bound', True) else '; NO candidate was within the bound: the closest was taken'}).",
            ""]


def transfer_curve_markdown(grid: Mapping[str, Any]) -> list[str]:
    """Every grid configuration's validation on every grid-trained target (``grid["transfer_curve"]``): the
    change of the rule's metric against each target's base, the perplexity increase, the worst target, and which
    configuration was taken (and, under the declared variant, which the paper's rule would have taken)."""
    curve = grid.get("transfer_curve") or []
    if not curve:
        return []
    rule = grid.get("rule") or {}
    metric = rule.get("metric", METRICS[-1])
    short = "EMT" if metric == "expected_max_toxicity" else "TP"
    targets = list(curve[0]["per_target"])
    keys = [k for k in curve[0]["config"] if k != "steps"]
    columns = [*keys, "steps"]
    for target in targets:
        columns += [f"{target} {short} change", f"{target} ppl vs base"]
    lines = ["## Transfer curve (validation prompts, every grid target)", "",
             *table_head(*columns, f"worst {short} change", "every target within bound", "chosen")]
    paper = (grid.get("paper_choice") or {}).get("config")
    for row in sorted(curve, key=lambda r: (*[str(r["config"].get(k)) for k in keys], r["config"].get("steps", 0))):
        cells = [_plain(row["config"].get(k)) for k in columns[:len(keys) + 1]]
        for target in targets:
            entry = row["per_target"][target]
            cells += [percent_change(entry["change"]), percent_change(entry["perplexity_increase"])]
        marks = ["**chosen**" if row.get("chosen") else "", "paper's rule" if paper == row["config"] else ""]
        cells += [percent_change(row["worst_change"]), "yes" if row["within_bound"] else "no",
                  " / ".join(m for m in marks if m)]
        lines.append("| " + " | ".join(cells) + " |")
    claim = ("chosen on every target's validation (the declared variant), so it supports a configuration chosen on "
             f"{', '.join(targets)}, not one chosen on {targets[0]} and transferred"
             if rule.get("choose_on") == "every_target" else
             f"chosen by the paper's rule on {targets[0]} alone; the other targets' columns show how it transfers")
    return [*lines, "", f"The configuration was {claim}.", ""]


def _source_study_markdown(study: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not study:
        return []
    lines = ["## The distilled text of each source", "",
             *table_head("corpus", "source", "alpha", "texts", "code-like", "mean tokens",
                         "mean toxicity (base samples)", "distilled - base [95 % interval]", "most common openings")]
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
    return ["## Stage wall times (this output directory, every sitting)", "", *table_head("stage", "wall time (s)"),
            *[f"| {t['stage']} | {t['wall_time_s']:.0f} |" for t in times],
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
