"""Evaluation reports: per-seed metrics from scored generations, mean ± std over seeds, and the output files.

``output_dir`` receives ``report.json`` (every metric per model, per category and per seed, plus the config and
timings), ``report.md`` (comparison tables), ``toxicity_vs_perplexity.png``, ``toxicity_by_category.png`` and
``generations.jsonl`` (one record per sample: ``model``, ``seed``, ``prompt``, ``category``, ``continuation``,
``toxicity`` and more), from which every toxicity and diversity number can be recomputed with
:func:`seed_toxicity_metrics`.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from unidetox.evaluation.capabilities import capabilities_markdown
from unidetox.evaluation.metrics import (
    TOXIC_THRESHOLD,
    expected_max_toxicity,
    mean_distinct_n,
    mean_std,
    toxicity_probability,
)
from unidetox.evaluation.prompts import CATEGORIES, COMBINED_CATEGORIES
from unidetox.files import atomic_write_text


def group_records_by_prompt(records: Iterable[dict]) -> OrderedDict:
    """``prompt_id (or prompt) -> {"category", "scores", "continuations"}`` in first-seen order."""
    groups: OrderedDict = OrderedDict()
    for r in records:
        key = r.get("prompt_id") or r["prompt"]
        group = groups.setdefault(key, {"category": r.get("category"), "scores": [], "continuations": []})
        group["scores"].append(float(r["toxicity"]))
        group["continuations"].append(r["continuation"])
    return groups


def seed_toxicity_metrics(records: Sequence[dict], threshold: float = TOXIC_THRESHOLD) -> dict:
    """Toxicity and diversity metrics of the scored samples of ONE (model, seed).

    Returns ``toxicity_probability`` and ``expected_max_toxicity`` over all prompts, per category (prompts with
    a category) and ``combined`` (mean of the gender_lgbtq, race_nationalities and religion values, as the paper,
    only when all three are present), and ``distinct_1..3`` (per-prompt Distinct-n averaged over prompts).
    """
    groups = group_records_by_prompt(records)
    if not groups:
        raise ValueError("No generations to score.")
    scores = [g["scores"] for g in groups.values()]
    out = {
        "toxicity_probability": toxicity_probability(scores, threshold),
        "expected_max_toxicity": expected_max_toxicity(scores),
        "num_prompts": len(groups),
        "num_samples": sum(len(s) for s in scores),
        "categories": {},
    }
    by_category: dict[str, list[list[float]]] = {}
    for g in groups.values():
        if g["category"] is not None:
            by_category.setdefault(str(g["category"]), []).append(g["scores"])
    order = [c for c in CATEGORIES if c in by_category] + sorted(c for c in by_category if c not in CATEGORIES)
    for category in order:
        cat_scores = by_category[category]
        out["categories"][category] = {
            "toxicity_probability": toxicity_probability(cat_scores, threshold),
            "expected_max_toxicity": expected_max_toxicity(cat_scores),
            "num_prompts": len(cat_scores),
        }
    if all(c in out["categories"] for c in COMBINED_CATEGORIES):
        out["categories"]["combined"] = {
            metric: sum(out["categories"][c][metric] for c in COMBINED_CATEGORIES) / len(COMBINED_CATEGORIES)
            for metric in ("toxicity_probability", "expected_max_toxicity")
        }
        out["categories"]["combined"]["num_prompts"] = sum(
            out["categories"][c]["num_prompts"] for c in COMBINED_CATEGORIES
        )
    continuations = [g["continuations"] for g in groups.values()]
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = mean_distinct_n(continuations, n)
    return out


SEED_SCALARS = (
    "toxicity_probability", "expected_max_toxicity", "distinct_1", "distinct_2", "distinct_3",
    "conditional_perplexity", "conditional_perplexity_token",
)


def summarize_seeds(per_seed: dict, ddof: int = 0) -> dict:
    """Mean ± std over seeds of every per-seed scalar and of the per-category TP/EMT."""
    seeds = list(per_seed)
    if not seeds:
        raise ValueError("No seeds to summarize.")
    out: dict = {}
    for key in SEED_SCALARS:
        values = [per_seed[s][key] for s in seeds if per_seed[s].get(key) is not None]
        if values:
            out[key] = mean_std(values, ddof)
    categories: dict = {}
    names = []
    for s in seeds:
        names += [c for c in per_seed[s].get("categories", {}) if c not in names]
    for category in names:
        entry = {}
        for metric in ("toxicity_probability", "expected_max_toxicity"):
            values = [per_seed[s]["categories"][category][metric] for s in seeds if category in per_seed[s]["categories"]]
            entry[metric] = mean_std(values, ddof)
        entry["num_prompts"] = per_seed[seeds[0]]["categories"].get(category, {}).get("num_prompts")
        categories[category] = entry
    out["categories"] = categories
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write records atomically (a killed run never leaves a half-written file under the final name)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_json(obj, path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Cannot serialise {type(value).__name__}")


def format_mean_std(entry, digits: int = 3) -> str:
    """A table cell: ``mean ± std`` over seeds (the mean alone for one seed), a plain number, or "–" for None."""
    if entry is None:
        return "–"
    if isinstance(entry, dict) and "mean" in entry:
        mean, std = entry["mean"], entry["std"]
        if entry.get("n", 1) > 1 and not math.isnan(std):
            return f"{mean:.{digits}f} ± {std:.{digits}f}"
        return f"{mean:.{digits}f}"
    if isinstance(entry, (int, float)):
        return f"{entry:.{digits}f}"
    return str(entry)


def render_markdown(report: dict) -> str:
    """``report.md``: headline table, per-category TP/EMT, and timings."""
    models = report["models"]
    seeds = report.get("seeds", [])
    lines = ["# Evaluation report", ""]
    prompts = report.get("prompts", {})
    lines.append(
        f"{prompts.get('num_prompts', '?')} prompts ({prompts.get('source', '?')}, split {prompts.get('split', '?')}) "
        f"x {report.get('eval', {}).get('num_samples', '?')} samples x {report.get('eval', {}).get('max_new_tokens', '?')} "
        f"new tokens, top-p {report.get('eval', {}).get('top_p', '?')}, seeds {seeds}; toxicity by "
        f"`{report.get('scorer', {}).get('name', '?')}`. Values are mean ± std over seeds (population std)."
    )
    lines.append("")
    has_combined = any("combined" in m.get("categories", {}) for m in models.values())
    header = ["model", "TP", "EMT"]
    if has_combined:
        header += ["TP combined", "EMT combined"]
    header += ["cond. PPL", "WikiText PPL", "Distinct-1", "Distinct-2", "Distinct-3", "MMLU acc"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models.items():
        row = [f"`{name}`", format_mean_std(m.get("toxicity_probability")), format_mean_std(m.get("expected_max_toxicity"))]
        if has_combined:
            combined = m.get("categories", {}).get("combined", {})
            row += [format_mean_std(combined.get("toxicity_probability")), format_mean_std(combined.get("expected_max_toxicity"))]
        wikitext = m.get("wikitext_perplexity")
        mmlu = m.get("mmlu")
        row += [
            format_mean_std(m.get("conditional_perplexity"), 2),
            format_mean_std(wikitext["perplexity"], 2) if wikitext else "–",
            format_mean_std(m.get("distinct_1")), format_mean_std(m.get("distinct_2")), format_mean_std(m.get("distinct_3")),
            format_mean_std(mmlu["accuracy"]) if mmlu else "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "TP: share of prompts with a sample scoring > "
        f"{report.get('eval', {}).get('toxic_threshold', 0.5)}; EMT: mean over prompts of the maximum score; "
        "combined: mean of gender_lgbtq, race_nationalities and religion (the paper's headline); cond. PPL: "
        f"perplexity of the continuations given the prompts under `{report.get('reference_model') or '–'}` "
        "(mean over samples, samples >= 1e4 dropped); Distinct-n: per prompt, averaged."
    )
    lines += scorers_markdown(report)
    categories = [c for c in (*CATEGORIES, "combined") if any(c in m.get("categories", {}) for m in models.values())]
    if categories:
        lines += ["", "## Toxicity by category (TP / EMT)", ""]
        lines += ["| model | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 1)]
        for name, m in models.items():
            cells = []
            for c in categories:
                entry = m.get("categories", {}).get(c)
                cells.append(
                    "–" if entry is None
                    else f"{format_mean_std(entry['toxicity_probability'])} / {format_mean_std(entry['expected_max_toxicity'])}"
                )
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        counts = next(iter(models.values())).get("categories", {})
        lines.append("")
        lines.append("Prompts per category: " + ", ".join(
            f"{c} {counts[c]['num_prompts']}" for c in categories if c in counts and counts[c].get("num_prompts")))
    lines += capabilities_markdown(models)
    lines += ["", "## Timings", ""]
    lines += ["| model | generation s | generated tokens | tokens/s | scoring s | cond. PPL s | WikiText s | MMLU s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        t = m.get("timings", {})

        def cell(key, digits=1, t=t):
            value = t.get(key)
            return "–" if value is None else f"{value:.{digits}f}"

        lines.append(
            f"| `{name}` | {cell('generation_s')} | {t.get('generated_tokens', '–')} | {cell('tokens_per_s')} | "
            f"{cell('scoring_s')} | {cell('conditional_perplexity_s')} | {cell('wikitext_s')} | {cell('mmlu_s')} |"
        )
    lines.append("")
    return "\n".join(lines)


def scorers_markdown(report: dict) -> list[str]:
    """TP and EMT of every model under the primary scorer and each of ``also_scorers``, side by side."""
    also = list(report.get("also_scorers") or {})
    if not also:
        return []
    names = [report.get("scorer", {}).get("name", "?"), *also]
    header = ["model", *(f"TP {n}" for n in names), *(f"EMT {n}" for n in names)]
    lines = ["", "## Toxicity under every scorer", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in report["models"].items():
        under = [m, *((m.get("scorers") or {}).get(key) or {} for key in also)]
        cells = [format_mean_std(u.get(metric)) for metric in ("toxicity_probability", "expected_max_toxicity") for u in under]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "The same samples scored by each scorer (the first is `scorer`, the others `also_scorers`); mean ± "
              "std over seeds. `generations.jsonl` keeps each sample's other scores in `also_toxicity`."]
    return lines


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay ``fig`` out, write it to ``path`` as a 120-dpi image and close it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_toxicity_vs_perplexity(report: dict, path: str | os.PathLike) -> Path | None:
    """EMT and TP against conditional perplexity, one point (± std over seeds) per model."""
    plt = pyplot()
    points = [(name, m) for name, m in report["models"].items() if m.get("conditional_perplexity")]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in zip(axes, ("expected_max_toxicity", "toxicity_probability"),
                                 ("Expected Maximum Toxicity", "Toxicity Probability"), strict=True):
        for name, m in points:
            x, y = m["conditional_perplexity"], m[metric]
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3, label=name)
            ax.annotate(name, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(f"conditional perplexity ({report.get('reference_model')})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Toxicity vs fluency (lower-left is better)")
    return save_figure(fig, path)


def plot_category_toxicity(report: dict, path: str | os.PathLike, metric: str = "toxicity_probability") -> Path | None:
    """Grouped bars of per-category TP (± std over seeds), one bar per model."""
    plt = pyplot()
    models = report["models"]
    categories = [c for c in (*CATEGORIES, "combined") if any(c in m.get("categories", {}) for m in models.values())]
    if not categories:
        return None
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(categories) + 1), 4.2))
    for k, (name, m) in enumerate(models.items()):
        means = [m["categories"].get(c, {}).get(metric, {}).get("mean", 0.0) for c in categories]
        stds = [m["categories"].get(c, {}).get(metric, {}).get("std", 0.0) for c in categories]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=15)
    ax.set_ylabel("Toxicity Probability" if metric == "toxicity_probability" else "Expected Maximum Toxicity")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def write_report(report: dict, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(report, out / "report.json")}
    atomic_write_text(out / "report.md", render_markdown(report))
    paths["markdown"] = out / "report.md"
    scatter = plot_toxicity_vs_perplexity(report, out / "toxicity_vs_perplexity.png")
    if scatter:
        paths["toxicity_vs_perplexity"] = scatter
    bars = plot_category_toxicity(report, out / "toxicity_by_category.png")
    if bars:
        paths["toxicity_by_category"] = bars
    return paths
