"""The replication report's statistics: paired intervals over test prompts, the source study, the stage times."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unidetox.replication.report import (
    add_paired_intervals,
    assemble_report,
    per_prompt_toxicity,
    stage_times,
    write_replication_report,
)
from unidetox.replication.report_markdown import render_replication_markdown
from unidetox.replication.source_study import looks_like_code, source_study, text_profile


def _generations(model: str, levels: np.ndarray, seeds=(0, 1), samples: int = 4, seed: int = 0):
    """Scored samples of ``model``: prompt i's samples are drawn around ``levels[i]``."""
    rng = np.random.default_rng(seed)
    out = []
    for s in seeds:
        for i, level in enumerate(levels):
            for k in range(samples):
                out.append({"model": model, "seed": s, "prompt_id": f"p{i}", "prompt": f"prompt {i}",
                            "sample_index": k, "continuation": "x",
                            "toxicity": float(np.clip(level + rng.normal(0, 0.05), 0, 1))})
    return out


def test_per_prompt_toxicity_against_a_hand_computation():
    gens = [{"model": "m", "seed": s, "prompt_id": p, "prompt": p, "toxicity": t}
            for s, p, t in [(0, "a", 0.2), (0, "a", 0.7), (1, "a", 0.1), (1, "a", 0.3), (0, "b", 0.4), (1, "b", 0.6)]]
    out = per_prompt_toxicity(gens)["m"]
    assert out["a"] == {"toxicity_probability": 0.5, "expected_max_toxicity": pytest.approx((0.7 + 0.3) / 2)}
    assert out["b"] == {"toxicity_probability": 0.5, "expected_max_toxicity": pytest.approx((0.4 + 0.6) / 2)}
    # the means over prompts are the report's per-seed TP / EMT averaged over seeds
    assert np.mean([v["expected_max_toxicity"] for v in out.values()]) == pytest.approx(((0.7 + 0.4) / 2 + (0.3 + 0.6) / 2) / 2)


def _rows():
    return [{"method": m, "target": "t", "model": m} for m in ("base", "unidetox", "control")]


def test_paired_intervals_decide_the_bar_and_the_control_comparison(tmp_path):
    rng = np.random.default_rng(0)
    levels = rng.uniform(0.2, 0.9, 150)
    gens = (_generations("base", levels) + _generations("unidetox", 0.5 * levels, seed=1)
            + _generations("control", 0.95 * levels, seed=2))
    rows = _rows()
    versus_control = add_paired_intervals(rows, gens, num_resamples=2000)
    ud = {r["method"]: r for r in rows}["unidetox"]["paired_vs_base"]
    emt = ud["expected_max_toxicity"]
    base_emt = np.mean([v["expected_max_toxicity"] for v in per_prompt_toxicity(gens)["base"].values()])
    ud_emt = np.mean([v["expected_max_toxicity"] for v in per_prompt_toxicity(gens)["unidetox"].values()])
    assert emt["change"] == pytest.approx(ud_emt / base_emt - 1) and emt["n"] == 150
    assert emt["low"] < emt["change"] < emt["high"] < -0.3 and emt["excludes_zero"]
    vs = versus_control["t"]["expected_max_toxicity"]
    c_emt = np.mean([v["expected_max_toxicity"] for v in per_prompt_toxicity(gens)["control"].values()])
    assert vs["high"] < 0 and vs["change"] == pytest.approx(ud_emt / c_emt - 1)
    # same means, but a control indistinguishable from UniDetox: the interval against it includes zero
    close = _generations("base", levels) + _generations("unidetox", 0.5 * levels, seed=1) + \
        _generations("control", 0.5 * levels, seed=3)
    rows2 = _rows()
    vs2 = add_paired_intervals(rows2, close, num_resamples=2000)["t"]["expected_max_toxicity"]
    assert vs2["low"] < 0 < vs2["high"] and not vs2["excludes_zero"]


def test_report_judges_the_bar_on_intervals_and_shows_them(tmp_path):
    rng = np.random.default_rng(1)
    levels = rng.uniform(0.3, 0.9, 60)
    keys = {"base": "b", "unidetox": "u", "control": "c"}
    gens = (_generations("b", levels) + _generations("u", 0.4 * levels, seed=1) + _generations("c", 0.9 * levels, seed=2))
    per_prompt = per_prompt_toxicity(gens)

    def model_report(key, ppl):
        vals = per_prompt[key].values()
        m = {metric: {"mean": float(np.mean([v[metric] for v in vals])), "std": 0.0, "n": 2}
             for metric in ("toxicity_probability", "expected_max_toxicity")}
        return {**m, "wikitext_perplexity": {"perplexity": ppl}, "mmlu": {"accuracy": 0.4, "num_questions": 57}}

    test_models = {"b": model_report("b", 30.0), "u": model_report("u", 31.0), "c": model_report("c", 30.5)}
    methods = [{"method": m, "target": "t", "model_key": k} for m, k in keys.items()]
    report = assemble_report(methods, test_models, ["t"], generations=gens, interval_resamples=2000,
                             extra={"source_study": source_study({"distill-x-a0.1": {
                                 "source": "x", "alpha": 0.1, "texts": ["def f(): pass", "Hello there."],
                                 "num_tokens": [5, 3], "summary": None}}),
                                 "stage_times": [{"stage": "grid/r", "wall_time_s": 12.0}]})
    check = report["bar"]["checks"]["t"]
    assert check["intervals_exclude_zero"] and check["beats_control"] and check["met"]
    assert "paired intervals" in report["bar"]["verdict"]
    paths = write_replication_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "UniDetox against the control" in md and "paired bootstrap 95 % interval" in md
    assert "The distilled text of each source" in md and "| distill-x-a0.1 | x | 0.100 | 2 | 50% |" in md
    assert "| grid/r | 12 |" in md and paths["plot"].stat().st_size > 0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["unidetox_vs_control"]["t"]["toxicity_probability"]["high"] < 0

    # Without generations the bar falls back to the means (no interval condition).
    plain = assemble_report(methods, test_models, ["t"])
    assert plain["bar"]["checks"]["t"]["intervals_exclude_zero"] is None and "paired" not in render_replication_markdown(plain)


def test_paired_intervals_refuse_rows_sampled_on_other_prompts():
    gens = _generations("base", np.array([0.5, 0.6, 0.7])) + _generations("unidetox", np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="different prompts"):
        add_paired_intervals(_rows()[:2], gens)


def test_text_profile_and_code_heuristic():
    texts = ["import os\nprint(os.getcwd())", "x = [1, 2]", "The weather was fine today.", "The weather turned."]
    profile = text_profile(texts, [4, 6, 6, 4], opening_chars=11)
    assert profile["code_like"] == 0.5 and profile["mean_tokens"] == 5.0 and profile["num_texts"] == 4
    assert profile["top_openings"][0] == {"opening": "The weather", "count": 2}
    assert looks_like_code("function f() { return 1 }") and not looks_like_code("A sentence, with a comma.")
    with pytest.raises(ValueError, match="No texts"):
        text_profile([])


def test_source_study_reads_the_distill_summary():
    summary = {"distilled": {"mean_toxicity": 0.01}, "base": {"mean_toxicity": 0.03},
               "distilled_vs_base": {"difference": -0.02, "ci95_low": -0.03, "ci95_high": -0.01}}
    study = source_study({"a": {"source": "m", "alpha": 0.1, "texts": ["Hi."], "summary": summary}})["a"]
    assert study["mean_toxicity"] == 0.01 and study["base_mean_toxicity"] == 0.03
    assert study["versus_base"]["ci95_high"] == -0.01 and study["mean_tokens"] is None


def test_stage_times_add_up_sittings_and_skip_cached_entries():
    lines = [json.dumps(e) for e in (
        {"stage": "grid/a", "status": "ran", "wall_time_s": 100.0},
        {"stage": "test/x", "status": "cached", "wall_time_s": 0.0},
        {"stage": "grid/a", "status": "ran", "wall_time_s": 50.5},  # resumed in a second sitting
        {"stage": "test/x", "status": "ran", "wall_time_s": 20.0},
    )] + [""]
    assert stage_times(lines) == [{"stage": "grid/a", "wall_time_s": 150.5}, {"stage": "test/x", "wall_time_s": 20.0}]


def _two_scorer_report(second_levels: dict[str, float]):
    """Base, UniDetox and control on 60 prompts, scored by the primary scorer (UniDetox at 0.4 x the base, the
    control at 0.9 x) and by a second one, `other`, where each model's levels are ``second_levels[key]`` x the base."""
    levels = np.random.default_rng(2).uniform(0.3, 0.9, 60)
    primary = {"b": 1.0, "u": 0.4, "c": 0.9}
    gens = []
    for k, (key, factor) in enumerate(primary.items()):
        other = {(g["seed"], g["prompt_id"], g["sample_index"]): g["toxicity"]
                 for g in _generations(key, second_levels[key] * levels, seed=10 + k)}
        gens += [{**g, "also_toxicity": {"other": other[(g["seed"], g["prompt_id"], g["sample_index"])]}}
                 for g in _generations(key, factor * levels, seed=k)]

    def model_report(key, ppl):
        summary = {}
        for name, scored in (("primary", gens), ("other", [{**g, "toxicity": g["also_toxicity"]["other"]} for g in gens])):
            vals = per_prompt_toxicity(scored)[key].values()
            summary[name] = {m: {"mean": float(np.mean([v[m] for v in vals])), "std": 0.0, "n": 2}
                             for m in ("toxicity_probability", "expected_max_toxicity")}
        return {**summary["primary"], "scorers": {"other": summary["other"]},
                "wikitext_perplexity": {"perplexity": ppl}, "mmlu": {"accuracy": 0.4, "num_questions": 57}}

    test_models = {"b": model_report("b", 30.0), "u": model_report("u", 31.0), "c": model_report("c", 30.5)}
    methods = [{"method": m, "target": "t", "model_key": k} for m, k in (("base", "b"), ("unidetox", "u"),
                                                                         ("control", "c"))]
    return assemble_report(methods, test_models, ["t"], generations=gens, interval_resamples=500,
                           scorer_name="primary")


def test_the_bar_is_met_only_when_met_under_every_scorer(tmp_path):
    # Under `other` UniDetox is no less toxic than the base: met under the primary scorer only -> not met.
    report = _two_scorer_report({"b": 1.0, "u": 1.0, "c": 0.9})
    assert report["bar"]["met_by_scorer"] == {"primary": True, "other": False} and report["bar"]["met"] is False
    # the primary scorer's own fields stay as they were: its checks, its rows, its intervals
    assert report["bar"]["checks"]["t"]["met"] and report["rows"][1]["paired_vs_base"]["expected_max_toxicity"]["high"] < 0
    other = report["scorers"]["other"]
    assert not other["bar"]["met"] and not other["bar"]["checks"]["t"]["toxicity_ok"]
    ud = other["rows"][1]
    assert ud["method"] == "unidetox" and ud["paired_vs_base"]["expected_max_toxicity"]["low"] < 0.05
    assert ud["expected_max_toxicity"]["mean"] > 0.9 * other["rows"][0]["expected_max_toxicity"]["mean"]
    assert other["unidetox_vs_control"]["t"]["expected_max_toxicity"]["change"] > 0
    assert report["bar"]["verdict"].startswith("Bar NOT met: it must be met under every scorer (primary: met, other: NOT")
    write_replication_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Under `other`" in md and "| UniDetox (distilled text, chosen config) | t |" in md
    assert "Under `other`: Bar NOT met: t: TP" in md and "UniDetox against the control, t: TP" in md
    assert "Bar NOT met: it must be met under every scorer" in md
    assert json.loads((tmp_path / "report.json").read_text())["scorers"]["other"]["bar"]["met"] is False

    # Met under both: met.
    both = _two_scorer_report({"b": 1.0, "u": 0.5, "c": 0.95})
    assert both["bar"]["met_by_scorer"] == {"primary": True, "other": True} and both["bar"]["met"] is True
    assert both["bar"]["verdict"].startswith("Bar MET under every scorer")


def _kind_report(prompt_kinds):
    """Base, UniDetox and control on 30 hateful and 30 benign prompts: under the primary scorer UniDetox falls to
    0.4 x the base on the hateful ones and stays at the base on the benign ones, the control stays at 0.9 x; under
    `other` UniDetox falls to 0.5 x on both kinds."""
    levels = np.random.default_rng(3).uniform(0.3, 0.9, 60)
    hate = np.arange(60) < 30
    primary = {"b": np.ones(60), "u": np.where(hate, 0.4, 1.0), "c": np.full(60, 0.9)}
    other = {"b": np.ones(60), "u": np.full(60, 0.5), "c": np.full(60, 0.9)}
    gens = []
    for k, key in enumerate(primary):
        also = {(g["seed"], g["prompt_id"], g["sample_index"]): g["toxicity"]
                for g in _generations(key, other[key] * levels, seed=10 + k)}
        gens += [{**g, "also_toxicity": {"other": also[(g["seed"], g["prompt_id"], g["sample_index"])]}}
                 for g in _generations(key, primary[key] * levels, seed=k)]
    means = {"mean": 0.5, "std": 0.0, "n": 2}
    test_models = {key: {"toxicity_probability": means, "expected_max_toxicity": means,
                         "scorers": {"other": {"toxicity_probability": means, "expected_max_toxicity": means}},
                         "wikitext_perplexity": {"perplexity": 30.0}} for key in primary}
    methods = [{"method": m, "target": "t", "model_key": k} for m, k in (("base", "b"), ("unidetox", "u"),
                                                                         ("control", "c"))]
    return assemble_report(methods, test_models, ["t"], generations=gens, interval_resamples=1000,
                           scorer_name="primary", prompt_kinds=prompt_kinds)


def test_every_change_is_split_by_prompt_kind_under_each_scorer(tmp_path):
    kinds = {f"p{i}": "hate" if i < 30 else "neutral" for i in range(60)}
    report = _kind_report(kinds)
    ud = {r["method"]: r for r in report["rows"]}["unidetox"]
    hate, neutral = (ud["paired_vs_base_by_kind"][k]["expected_max_toxicity"] for k in ("hate", "neutral"))
    assert ud["paired_vs_base_by_kind"]["hate"]["num_prompts"] == 30 and hate["n"] == 30
    assert hate["high"] < -0.3 and neutral["low"] < 0 < neutral["high"]
    # over every prompt the change is in between, and the bar still reads the overall intervals
    assert hate["change"] < ud["paired_vs_base"]["expected_max_toxicity"]["change"] < neutral["change"]
    versus_control = report["unidetox_vs_control_by_kind"]["t"]
    assert versus_control["hate"]["expected_max_toxicity"]["high"] < 0
    assert versus_control["neutral"]["expected_max_toxicity"]["low"] > 0  # 1.0 x the base against the control's 0.9 x
    other = report["scorers"]["other"]
    other_ud = {r["method"]: r for r in other["rows"]}["unidetox"]["paired_vs_base_by_kind"]
    assert all(other_ud[k]["expected_max_toxicity"]["high"] < -0.3 for k in ("hate", "neutral"))
    assert set(other["unidetox_vs_control_by_kind"]["t"]) == {"hate", "neutral"}

    write_replication_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"][1]["paired_vs_base_by_kind"]["neutral"]["toxicity_probability"]["n"] == 30
    assert saved["unidetox_vs_control_by_kind"]["t"]["hate"]["num_prompts"] == 30
    assert saved["scorers"]["other"]["rows"][1]["paired_vs_base_by_kind"]["hate"]["expected_max_toxicity"]["high"] < 0
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## By prompt kind"):]
    assert section.index("### Under `primary`") < section.index("### Under `other`")
    primary_table = section[:section.index("### Under `other`")]
    assert "| UniDetox (distilled text, chosen config) vs base | t | hate | 30 | " in primary_table
    assert "| control: plain base samples vs base | t | neutral | 30 | " in primary_table
    assert "| UniDetox vs control | t | neutral | 30 | " in primary_table
    assert md.count("| UniDetox vs control | t | hate | 30 | ") == 2  # one table under each scorer


def test_prompts_without_kinds_give_no_split():
    for kinds in (None, {}):
        report = _kind_report(kinds)
        assert all("paired_vs_base_by_kind" not in r for r in report["rows"])
        assert report["unidetox_vs_control_by_kind"] == {} and report["scorers"]["other"]["unidetox_vs_control_by_kind"] == {}
        md = render_replication_markdown(report)
        assert "By prompt kind" not in md and "## Under `other`" in md
