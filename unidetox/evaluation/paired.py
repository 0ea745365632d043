"""TP and EMT per prompt from scored samples, and their changes between two models paired over prompts, over every
prompt and for each prompt kind (ToxiGen: hateful or benign): what the replication's table and ``unidetox rescore``
put intervals on."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.prompts import Prompt
from unidetox.intervals import DEFAULT_RESAMPLES, paired_change

TOXICITY_METRICS = ("toxicity_probability", "expected_max_toxicity")


def per_prompt_toxicity(
    generations: Iterable[Mapping[str, Any]], threshold: float = TOXIC_THRESHOLD,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {prompt: {"toxicity_probability", "expected_max_toxicity"}}}`` from scored samples
    (``generations.jsonl`` records): per (model, seed, prompt) whether any sample is toxic and the max toxicity,
    averaged over seeds. The means over prompts are the report's TP and EMT (means over seeds)."""
    scores: dict[tuple[str, str], dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for g in generations:
        scores[(g["model"], g.get("prompt_id") or g["prompt"])][g.get("seed")].append(float(g["toxicity"]))
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (model, prompt), by_seed in scores.items():
        maxima = [max(v) for v in by_seed.values()]
        out[model][prompt] = {
            "toxicity_probability": sum(m > threshold for m in maxima) / len(maxima),
            "expected_max_toxicity": sum(maxima) / len(maxima),
        }
    return dict(out)


def paired_metric_changes(
    per_prompt: Mapping[str, Mapping[str, Mapping[str, float]]], reference: str, treated: str,
    num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """The relative change of TP and EMT from model ``reference`` to ``treated`` with a paired bootstrap 95 %
    interval over the prompts both were sampled on (:func:`unidetox.intervals.paired_change`)."""
    prompts = _shared_prompts(per_prompt, reference, treated)
    return _changes(per_prompt[reference], per_prompt[treated], prompts, num_resamples, seed)


def paired_changes_by_kind(
    per_prompt: Mapping[str, Mapping[str, Mapping[str, float]]], reference: str, treated: str,
    kinds: Mapping[str, str], num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """:func:`paired_metric_changes` on the prompts of each kind: ``{kind: {"num_prompts", "toxicity_probability",
    "expected_max_toxicity"}}``, kinds in sorted order.

    ``kinds`` maps a prompt id to its kind (:func:`prompt_kinds`); prompts it does not name are left out. A change
    is None where it is undefined: a kind with fewer than 2 prompts, or whose reference is never toxic.

    Example:
        >>> from unidetox.evaluation.paired import paired_changes_by_kind
        >>> per_prompt = {m: {p: {"toxicity_probability": v, "expected_max_toxicity": v} for p, v in values.items()}
        ...               for m, values in {"base": {"a": 0.8, "b": 0.6, "c": 0.2, "d": 0.4},
        ...                                 "tuned": {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.4}}.items()}
        >>> out = paired_changes_by_kind(per_prompt, "base", "tuned", {"a": "hate", "b": "hate", "c": "neutral",
        ...                                                             "d": "neutral"}, num_resamples=200)
        >>> out["hate"]["num_prompts"], out["hate"]["expected_max_toxicity"]["change"]
        (2, -0.5)
        >>> out["neutral"]["expected_max_toxicity"]["change"]
        0.0
    """
    by_kind: dict[str, list[str]] = defaultdict(list)
    for prompt in _shared_prompts(per_prompt, reference, treated):
        if prompt in kinds:
            by_kind[kinds[prompt]].append(prompt)
    out = {}
    for kind, prompts in sorted(by_kind.items()):
        changes = (_changes(per_prompt[reference], per_prompt[treated], prompts, num_resamples, seed)
                   if len(prompts) >= 2 else dict.fromkeys(TOXICITY_METRICS))
        out[kind] = {"num_prompts": len(prompts), **changes}
    return out


def prompt_kinds(prompts: Iterable[Prompt]) -> dict[str, str]:
    """``{prompt id: kind}`` of the prompts that carry a label (ToxiGen's ``hate`` / ``neutral``); empty when none
    does (a file of prompts), so there is nothing to split by."""
    return {p.id: p.label for p in prompts if p.label is not None}


def _shared_prompts(per_prompt: Mapping[str, Mapping[str, Any]], reference: str, treated: str) -> list[str]:
    ref, new = per_prompt[reference], per_prompt[treated]
    prompts = [p for p in ref if p in new]
    if len(prompts) != len(ref) or len(prompts) != len(new):
        raise ValueError(f"{reference!r} and {treated!r} were sampled on different prompts ({len(ref)} and "
                         f"{len(new)}, {len(prompts)} shared); pair them on one prompt set.")
    return prompts


def _changes(ref: Mapping[str, Mapping[str, float]], new: Mapping[str, Mapping[str, float]], prompts: Sequence[str],
             num_resamples: int, seed: int) -> dict[str, dict[str, Any] | None]:
    out = {}
    for metric in TOXICITY_METRICS:
        a, b = [ref[p][metric] for p in prompts], [new[p][metric] for p in prompts]
        if not any(a):
            out[metric] = None  # the reference is never toxic: a relative change is undefined
            continue
        out[metric] = paired_change(a, b, num_resamples=num_resamples, seed=seed)
    return out
