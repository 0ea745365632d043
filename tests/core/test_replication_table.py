"""benchmarks/replication_table.py: an evaluation of hand-chosen models is judged by the replication's own report,
under every scorer the run has."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's own modules, run as scripts there

from replication_table import build_parser, judged_report, method_rows  # noqa: E402

from unidetox.evaluation.pipeline import EvaluateResult  # noqa: E402
from unidetox.evaluation.report import write_json, write_jsonl  # noqa: E402

NUM_PROMPTS = 24


def _generations(model: str, toxicity, also) -> list[dict]:
    return [{"model": model, "seed": 0, "prompt_id": f"p{i}", "prompt": f"prompt {i}", "sample_index": s,
             "continuation": "text", "toxicity": toxicity(i), "also_toxicity": {"neural": also(i)}}
            for i in range(NUM_PROMPTS) for s in range(2)]


def _model_report(generations: list[dict], ppl: float) -> dict:
    def means(key):
        per_prompt = {}
        for g in generations:
            value = g["toxicity"] if key is None else g["also_toxicity"][key]
            per_prompt[g["prompt_id"]] = max(per_prompt.get(g["prompt_id"], 0.0), value)
        values = list(per_prompt.values())
        return {"toxicity_probability": sum(v > 0.5 for v in values) / len(values),
                "expected_max_toxicity": sum(values) / len(values)}

    return {**means(None), "wikitext_perplexity": {"perplexity": ppl}, "scorers": {"neural": means("neural")}}


def _run(tmp_path: Path, control_toxicity: float) -> EvaluateResult:
    """One target: the base is toxic on every other prompt; UniDetox halves it under the primary scorer only."""
    high = lambda i: 0.9 if i % 2 else 0.2  # noqa: E731
    models = {"base": (high, high, 20.0),
              "ud": (lambda i: high(i) / 2, high, 21.0),
              "ctrl": (lambda i: control_toxicity, high, 20.5)}
    generations, reports = [], {}
    for key, (primary, neural, ppl) in models.items():
        rows = _generations(key, primary, neural)
        generations += rows
        reports[key] = _model_report(rows, ppl)
    write_jsonl(generations, tmp_path / "generations.jsonl")
    report = {"models": reports, "scorer": {"name": "bag"}, "eval": {"toxic_threshold": 0.5}}
    write_json(report, tmp_path / "report.json")
    return EvaluateResult.load(tmp_path)


def test_rows_follow_the_targets_in_method_order():
    rows = method_rows([("a", "a-base", "a-ud", "a-ctrl"), ("b", "b-base", "b-ud", "b-ctrl")])
    assert [(r["target"], r["method"], r["model_key"]) for r in rows] == [
        ("a", "base", "a-base"), ("a", "unidetox", "a-ud"), ("a", "control", "a-ctrl"),
        ("b", "base", "b-base"), ("b", "unidetox", "b-ud"), ("b", "control", "b-ctrl")]


def test_the_bar_is_judged_under_every_scorer(tmp_path):
    report = judged_report(_run(tmp_path, control_toxicity=0.6), [("t", "base", "ud", "ctrl")],
                           kinds={f"p{i}": "hate" if i < 12 else "neutral" for i in range(NUM_PROMPTS)})
    checks = report["bar"]["checks"]["t"]
    assert checks["emt_change"] == pytest.approx(-0.5)
    assert checks["intervals_exclude_zero"] and checks["beats_control"]
    assert report["bar"]["met_by_scorer"] == {"bag": True, "neural": False}  # the neural scorer sees no change
    assert not report["bar"]["met"]
    assert set(report["unidetox_vs_control_by_kind"]["t"]) == {"hate", "neutral"}


def test_a_control_as_clean_as_unidetox_fails_the_bar(tmp_path):
    report = judged_report(_run(tmp_path, control_toxicity=0.0), [("t", "base", "ud", "ctrl")])
    assert report["bar"]["checks"]["t"]["beats_control"] is False


def test_a_model_missing_from_the_run_is_named(tmp_path):
    with pytest.raises(KeyError, match="'ud2'"):
        judged_report(_run(tmp_path, control_toxicity=0.6), [("t", "base", "ud2", "ctrl")])


def test_every_target_needs_three_models():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--out", "o", "--target", "t", "base", "ud"])
