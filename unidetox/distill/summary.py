"""The toxicity summary of a distilled text: its scores next to plain samples of the base and of the anti-expert.

:func:`summarize` scores each group of texts, states their means with standard errors, and says whether the
distilled text is measurably less toxic than the base's own samples (a bootstrap interval of the difference and a
Mann-Whitney test, :func:`unidetox.intervals.mean_difference`); :func:`summary_markdown` writes it as a table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from unidetox.evaluation.scoring import ProfanityCheckScorer
from unidetox.intervals import mean_difference

# The text sources of a summary, in the order the table lists them.
SOURCE_LABELS = {"distilled": "distilled (contrastive)", "base": "base, plain samples",
                 "anti_expert": "anti-expert, plain samples"}


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (NaN for none, 0 for one value)."""
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, sem


def text_stats(texts: Sequence[str], num_tokens: Sequence[int], scores: Sequence[float]) -> dict[str, Any]:
    """Size, mean toxicity with its standard error, share above 0.5, and mean length of one group of texts."""
    mean, sem = mean_sem(scores)
    return {
        "n": len(texts),
        "mean_toxicity": mean,
        "sem_toxicity": sem,
        "share_toxic_gt_0_5": sum(s > 0.5 for s in scores) / len(scores) if scores else float("nan"),
        "mean_tokens": statistics.fmean(num_tokens) if num_tokens else float("nan"),
        "mean_words": statistics.fmean(len(t.split()) for t in texts) if texts else float("nan"),
    }


def summarize(groups: Mapping[str, tuple[list[str], list[int]]], scorer=None, seed: int = 0
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary, samples)`` of ``groups`` (source -> texts and their token counts; ``"distilled"`` and ``"base"``
    at least), scored by ``scorer`` (default :class:`~unidetox.ProfanityCheckScorer`).

    ``samples`` holds the scored plain samples (every source but the distilled text) for the build's
    ``summary_samples.jsonl``; ``seed`` seeds the bootstrap of the distilled-vs-base difference.
    """
    if scorer is None:
        scorer = ProfanityCheckScorer()
    summary: dict[str, Any] = {"scorer": getattr(scorer, "name", type(scorer).__name__)}
    samples = []
    scores = {}
    for name, (group_texts, group_tokens) in groups.items():
        scores[name] = list(scorer(group_texts))
        summary[name] = text_stats(group_texts, group_tokens, scores[name])
        if name != "distilled":
            samples += [{"source": name, "text": t, "toxicity": s}
                        for t, s in zip(group_texts, scores[name], strict=True)]
    if len(scores["distilled"]) >= 2 and len(scores["base"]) >= 2:
        # A lower mean alone is not evidence: both sit near the scorer's floor, so say whether it is measurable.
        summary["distilled_vs_base"] = mean_difference(scores["distilled"], scores["base"], seed=seed)
    return summary, samples


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a small Markdown table (one row per text source)."""
    lines = [
        f"| text ({summary.get('scorer', 'scorer')}) | n | mean toxicity ± sem | share > 0.5 | mean tokens |",
        "|---|---|---|---|---|",
    ]
    for key, label in SOURCE_LABELS.items():
        if key in summary:
            s = summary[key]
            lines.append(
                f"| {label} | {s['n']} | {s['mean_toxicity']:.4f} ± {s['sem_toxicity']:.4f} | "
                f"{s['share_toxic_gt_0_5']:.3f} | {s['mean_tokens']:.1f} |"
            )
    diff = summary.get("distilled_vs_base")
    if diff:
        p_value = "n/a" if diff["p_mann_whitney"] is None else f"{diff['p_mann_whitney']:.3g}"
        verdict = "measurably lower" if diff["lower"] else "NOT measurably lower"
        lines.append(
            f"\nDistilled - base mean toxicity: {diff['difference']:+.4f} ({diff['relative']:+.0%}), bootstrap 95% CI "
            f"[{diff['ci95_low']:+.4f}, {diff['ci95_high']:+.4f}], Mann-Whitney p = {p_value}: {verdict}."
        )
    return "\n".join(lines)
