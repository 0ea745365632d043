"""The distilled text: where it comes from and what it looks like (the report's source study): the share of
code-like texts, the common openings, the toxicity against the base's plain samples and the political-topic shares."""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unidetox.distill.shards import SUMMARY_SAMPLES_FILE
from unidetox.intervals import DEFAULT_RESAMPLES
from unidetox.replication.political_topics import political_topic_study

# Characters and keywords of program text; the share of such texts is how far the contrast drifts away from prose.
_CODE_PATTERN = re.compile(r"[{};=\[\]]|\bdef\s|\bimport\s|\breturn\b|</?[a-z]+>|\bfunction\b")


def looks_like_code(text: str, window: int = 200) -> bool:
    """True when the first ``window`` characters hold program syntax (braces, ``;``, ``=``, brackets, ``def``,
    ``import``, ``return``, tags).

    Example:
        >>> from unidetox.replication.source_study import looks_like_code
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
