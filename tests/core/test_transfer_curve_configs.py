"""benchmarks/transfer_curve.py: one call reads a whole grid; each --run belongs to the last --config before it, and
the rule chooses across the configurations."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's own modules, run as scripts there

from transfer_curve import build_parser, selection_records  # noqa: E402

from unidetox.detox.selection import SelectionRule  # noqa: E402


def _point(base_ppl, ppl, base_emt, emt, treated):
    return {"models": ("base", treated), "perplexity": {"base": base_ppl, treated: ppl},
            "mean": {"base": {"expected_max_toxicity": base_emt, "toxicity_probability": 0.2},
                     treated: {"expected_max_toxicity": emt, "toxicity_probability": 0.1}}}


def test_each_run_belongs_to_the_last_config_before_it():
    args = build_parser().parse_args([
        "--run", "a", "25", "d1", "base", "c25",
        "--config", "lr 2e-4", "--run", "a", "50", "d2", "base", "c50", "--run", "b", "50", "d3", "base", "c50",
        "--config", "lr 5e-4", "--run", "a", "25", "d4", "base", "c25"])
    assert [run[:3] for run in args.run] == [("the configuration", "a", "25"), ("lr 2e-4", "a", "50"),
                                             ("lr 2e-4", "b", "50"), ("lr 5e-4", "a", "25")]


def test_the_rule_chooses_across_configurations_and_each_has_its_base():
    points = {("lr 2e-4", "a", 25): _point(10.0, 10.3, 0.30, 0.24, "a-2-25"),
              ("lr 2e-4", "a", 50): _point(10.0, 11.5, 0.30, 0.15, "a-2-50"),  # over the +10 % bound
              ("lr 5e-4", "a", 25): _point(10.0, 10.8, 0.30, 0.20, "a-5-25"),
              ("lr 2e-4", "b", 25): _point(20.0, 20.2, 0.40, 0.36, "b-2-25"),
              ("lr 5e-4", "b", 25): _point(20.0, 23.0, 0.40, 0.20, "b-5-25")}  # over b's bound
    records = selection_records(points)
    assert list(records) == ["a", "b"]
    bases = [r for r in records["a"] if r["step"] == 0]
    assert [r["config"]["configuration"] for r in bases] == ["lr 2e-4", "lr 5e-4"]
    rule = SelectionRule(max_ppl_increase=0.1, on_empty="closest")
    paper, _ = rule.choose(records["a"])
    assert (paper["config"]["configuration"], paper["step"]) == ("lr 5e-4", 25)
    variant, curve = rule.choose_on_every_target(records)
    assert (variant["config"]["configuration"], variant["step"]) == ("lr 2e-4", 25)  # lr 5e-4 breaks b's bound
    assert len([row for row in curve if row["config"]["steps"]]) == 2  # only configurations run on both targets
