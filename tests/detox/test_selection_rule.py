"""One selection-rule argument type (unidetox.detox.selection.SelectionRule): the replication's `select` section is
one, detox's extends it with `merge`, and every argument of the rule is honoured wherever it is set."""

from __future__ import annotations

import json

import pytest

from unidetox.detox import pipeline as detox
from unidetox.detox.selection import SelectionRule, choose_configuration, select_checkpoint
from unidetox.replication import pipeline as replicate

# Every checkpoint costs more than +10% perplexity over step 0; step 200 costs the least.
OUT_OF_BOUND = [
    {"step": 0, "expected_max_toxicity": 0.8, "toxicity_probability": 0.9, "perplexity": 10.0},
    {"step": 100, "expected_max_toxicity": 0.3, "toxicity_probability": 0.3, "perplexity": 13.0},
    {"step": 200, "expected_max_toxicity": 0.5, "toxicity_probability": 0.6, "perplexity": 11.5},
]


def _write_run(out, records):
    out.mkdir(parents=True)
    lines = []
    for r in records:
        checkpoint = None if r["step"] == 0 else out / f"checkpoint-{r['step']}"
        if checkpoint is not None:
            checkpoint.mkdir()
        lines.append(json.dumps({**r, "checkpoint": None if checkpoint is None else str(checkpoint)}))
    (out / "detox_eval.jsonl").write_text("\n".join(lines) + "\n")


def test_select_checkpoint_honours_on_empty(tmp_path):
    _write_run(tmp_path / "run", OUT_OF_BOUND)
    with pytest.raises(ValueError, match="No checkpoint in .* keeps perplexity within"):
        select_checkpoint(tmp_path / "run", max_ppl_increase=0.1)
    closest = select_checkpoint(tmp_path / "run", max_ppl_increase=0.1, on_empty="closest")
    assert closest.step == 200 and closest.perplexity_increase == pytest.approx(0.15)
    assert not any(c["within_bound"] for c in closest.candidates)


def test_the_detox_select_section_is_the_rule_plus_merge():
    select = detox.parse_args(["select.on_empty=closest"]).select
    assert isinstance(select, SelectionRule) and select.on_empty == "closest" and select.merge
    assert (select.max_ppl_increase, select.metric) == (0.1, "expected_max_toxicity")
    with pytest.raises(ValueError, match="`on_empty` has to be one of"):
        detox.parse_args(["select.on_empty=nearest"])
    with pytest.raises(ValueError, match="`metric` has to be one of"):
        detox.parse_args(["select.metric=perplexity"])


def test_the_replication_select_section_is_the_rule():
    rule = replicate.parse_args(["experiment=tiny"]).select
    assert type(rule) is SelectionRule and (rule.max_ppl_increase, rule.on_empty) == (0.1, "closest")
    records = [{**r, "run": "r", "config": {"steps": r["step"]}} for r in OUT_OF_BOUND]
    assert rule.choose(records) == choose_configuration(records, max_ppl_increase=0.1, on_empty="closest")
    assert rule.choose(records)[0]["step"] == 200
