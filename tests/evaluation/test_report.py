import json

import pytest

from unidetox.evaluation.report import (
    read_jsonl,
    render_markdown,
    seed_toxicity_metrics,
    summarize_seeds,
    write_jsonl,
    write_report,
)


def rec(prompt, category, cont, tox, seed=0, model="m"):
    return {"model": model, "seed": seed, "prompt": prompt, "prompt_id": prompt, "category": category,
            "continuation": cont, "toxicity": tox}


RECORDS = [
    rec("p1", "gender_lgbtq", "a b", 0.9), rec("p1", "gender_lgbtq", "a c", 0.1),
    rec("p2", "race_nationalities", "x y z", 0.5), rec("p2", "race_nationalities", "", 0.2),
    rec("p3", "religion", "q", 0.3), rec("p3", "religion", "q", 0.6),
    rec("p4", "disability", "d d", 0.0), rec("p4", "disability", "e", 0.4),
]


def test_seed_metrics_hand_computed():
    m = seed_toxicity_metrics(RECORDS)
    assert m["toxicity_probability"] == pytest.approx(2 / 4)  # p1 (0.9) and p3 (0.6); 0.5 is not toxic
    assert m["expected_max_toxicity"] == pytest.approx((0.9 + 0.5 + 0.6 + 0.4) / 4)
    assert m["num_prompts"] == 4 and m["num_samples"] == 8
    cats = m["categories"]
    assert cats["gender_lgbtq"]["toxicity_probability"] == 1.0
    assert cats["race_nationalities"]["toxicity_probability"] == 0.0
    assert cats["combined"]["toxicity_probability"] == pytest.approx((1 + 0 + 1) / 3)
    assert cats["combined"]["expected_max_toxicity"] == pytest.approx((0.9 + 0.5 + 0.6) / 3)
    assert cats["combined"]["num_prompts"] == 3
    # distinct-1 per prompt: p1 {a,b,c}/4, p2 {x,y,z}/3, p3 {q}/2, p4 {d,e}/3
    assert m["distinct_1"] == pytest.approx((3 / 4 + 3 / 3 + 1 / 2 + 2 / 3) / 4)


def test_no_combined_without_the_three_categories_and_no_categories():
    m = seed_toxicity_metrics([r for r in RECORDS if r["category"] != "religion"])
    assert "combined" not in m["categories"]
    m = seed_toxicity_metrics([{**r, "category": None} for r in RECORDS])
    assert m["categories"] == {}


def test_one_prompt_and_empty():
    m = seed_toxicity_metrics([rec("only", None, "", 0.51)])
    assert m["toxicity_probability"] == 1.0 and m["distinct_2"] == 0.0
    with pytest.raises(ValueError):
        seed_toxicity_metrics([])


def test_summarize_seeds_mean_std():
    per_seed = {"0": seed_toxicity_metrics(RECORDS),
                "1": seed_toxicity_metrics([{**r, "toxicity": 0.0} for r in RECORDS])}
    per_seed["0"]["conditional_perplexity"], per_seed["1"]["conditional_perplexity"] = 10.0, 20.0
    s = summarize_seeds(per_seed)
    assert s["toxicity_probability"] == {"mean": 0.25, "std": 0.25, "n": 2}
    assert s["conditional_perplexity"]["mean"] == 15.0
    assert s["categories"]["combined"]["toxicity_probability"]["mean"] == pytest.approx(1 / 3)
    assert s["categories"]["disability"]["num_prompts"] == 1


def make_report(with_categories=True):
    per_seed = {"0": seed_toxicity_metrics(RECORDS if with_categories else [{**r, "category": None} for r in RECORDS])}
    per_seed["0"]["conditional_perplexity"] = 12.0
    model = {**summarize_seeds(per_seed), "per_seed": per_seed, "wikitext_perplexity": {"perplexity": 30.0},
             "mmlu": {"accuracy": 0.3}, "timings": {"generation_s": 2.0, "generated_tokens": 40, "tokens_per_s": 20.0}}
    return {"models": {"m": model, "m2": model}, "seeds": [0], "reference_model": "ref",
            "prompts": {"num_prompts": 4, "source": "toxigen_local", "split": "test"},
            "eval": {"num_samples": 2, "max_new_tokens": 20, "top_p": 0.9}, "scorer": {"name": "profanity_check"}}


def test_write_report_files(tmp_path):
    paths = write_report(make_report(), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["models"]["m"]["mmlu"]["accuracy"] == 0.3
    md = (tmp_path / "report.md").read_text()
    assert "| `m` | 0.500 | 0.600 | 0.667 | 0.667 | 12.00 | 30.00 |" in md
    assert "## Toxicity by category" in md and "| `m2` |" in md
    for key in ("toxicity_vs_perplexity", "toxicity_by_category"):
        assert paths[key].stat().st_size > 5000
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_categories_or_perplexity(tmp_path):
    report = make_report(with_categories=False)
    for m in report["models"].values():
        m.pop("conditional_perplexity", None)
    paths = write_report(report, tmp_path)
    assert "toxicity_by_category" not in paths and "toxicity_vs_perplexity" not in paths
    md = render_markdown(report)
    assert "TP combined" not in md and "by category" not in md


def test_jsonl_roundtrip(tmp_path):
    path = write_jsonl(RECORDS, tmp_path / "sub" / "g.jsonl")
    assert read_jsonl(path) == RECORDS
    assert not list((tmp_path / "sub").glob("*.tmp"))
