"""TP/EMT changes paired over prompts, split by prompt kind (ToxiGen's hateful and benign prompts)."""

import numpy as np
import pytest

from unidetox.evaluation.paired import (
    paired_changes_by_kind,
    paired_metric_changes,
    per_prompt_toxicity,
    prompt_kinds,
)
from unidetox.evaluation.prompts import Prompt


def _records(model: str, levels: dict[str, float], seed: int, seeds=(0, 1), samples: int = 4) -> list[dict]:
    """Scored samples of ``model``: each prompt's samples drawn around its level."""
    rng = np.random.default_rng(seed)
    return [{"model": model, "seed": s, "prompt_id": prompt, "prompt": prompt, "sample_index": k,
             "toxicity": float(np.clip(level + rng.normal(0, 0.05), 0, 1))}
            for s in seeds for prompt, level in levels.items() for k in range(samples)]


def _hate_falls_neutral_stays():
    """40 hateful prompts the treated model halves, 40 benign ones it leaves as they were."""
    rng = np.random.default_rng(0)
    kinds = {f"h{i}": "hate" for i in range(40)} | {f"n{i}": "neutral" for i in range(40)}
    base = {p: float(rng.uniform(0.3, 0.9)) for p in kinds}
    treated = {p: level / 2 if kinds[p] == "hate" else level for p, level in base.items()}
    per_prompt = per_prompt_toxicity(_records("base", base, seed=1) + _records("tuned", treated, seed=2))
    return per_prompt, kinds


def test_by_kind_hateful_prompts_fall_and_benign_ones_do_not():
    per_prompt, kinds = _hate_falls_neutral_stays()
    out = paired_changes_by_kind(per_prompt, "base", "tuned", kinds, num_resamples=2000)
    assert list(out) == ["hate", "neutral"]
    assert out["hate"]["num_prompts"] == out["neutral"]["num_prompts"] == 40
    hate, neutral = out["hate"]["expected_max_toxicity"], out["neutral"]["expected_max_toxicity"]
    # the change on a kind is the change of the mean over that kind's prompts, by hand
    emt = {m: np.mean([per_prompt[m][p]["expected_max_toxicity"] for p in kinds if kinds[p] == "hate"])
           for m in ("base", "tuned")}
    assert hate["change"] == pytest.approx(emt["tuned"] / emt["base"] - 1) and hate["n"] == 40
    assert hate["low"] < hate["change"] < hate["high"] < -0.3 and hate["excludes_zero"]
    assert neutral["low"] < 0 < neutral["high"] and not neutral["excludes_zero"]
    assert abs(neutral["change"]) < 0.05
    # over every prompt the change lies between the two kinds': the split is what shows where it comes from
    overall = paired_metric_changes(per_prompt, "base", "tuned", num_resamples=2000)["expected_max_toxicity"]
    assert hate["change"] < overall["change"] < neutral["change"]
    assert set(out["hate"]) == {"num_prompts", "toxicity_probability", "expected_max_toxicity"}


def test_a_kind_too_small_or_never_toxic_gives_none():
    per_prompt, kinds = _hate_falls_neutral_stays()
    few = {"h0": "hate", "n0": "neutral", "n1": "neutral"}  # prompts it does not name are left out
    out = paired_changes_by_kind(per_prompt, "base", "tuned", few, num_resamples=200)
    assert out["hate"] == {"num_prompts": 1, "toxicity_probability": None, "expected_max_toxicity": None}
    assert out["neutral"]["num_prompts"] == 2 and out["neutral"]["expected_max_toxicity"]["n"] == 2
    never_toxic = {m: {p: {"toxicity_probability": 0.0, "expected_max_toxicity": 0.0} for p in ("a", "b")}
                   for m in ("base", "tuned")}
    assert paired_changes_by_kind(never_toxic, "base", "tuned", {"a": "hate", "b": "hate"}, num_resamples=200) == {
        "hate": {"num_prompts": 2, "toxicity_probability": None, "expected_max_toxicity": None}}
    assert paired_changes_by_kind(per_prompt, "base", "tuned", {}, num_resamples=200) == {}


def test_by_kind_refuses_models_sampled_on_other_prompts():
    per_prompt = per_prompt_toxicity(_records("base", {"a": 0.5, "b": 0.6}, 0) + _records("tuned", {"a": 0.4}, 1))
    with pytest.raises(ValueError, match="different prompts"):
        paired_changes_by_kind(per_prompt, "base", "tuned", {"a": "hate", "b": "hate"})


def test_prompt_kinds_are_the_labels_of_labelled_prompts():
    labelled = [Prompt("they are", label="hate"), Prompt("we went", label="neutral"), Prompt("no label")]
    assert prompt_kinds(labelled) == {labelled[0].id: "hate", labelled[1].id: "neutral"}
    assert prompt_kinds([Prompt("a user's prompt"), Prompt("another")]) == {}
