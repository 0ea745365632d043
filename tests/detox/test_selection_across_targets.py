"""The grid on several targets: the transfer curve (`SelectionRule.across_targets`) and the declared variant of the
paper's rule that reads every target's validation (`SelectionRule.choose_on_every_target`)."""

from __future__ import annotations

import pytest

from unidetox.detox.selection import SelectionRule


def _run(target: str, lr: float, base: tuple[float, float], points: dict[int, tuple[float, float]]):
    """One grid run on ``target``: its step-0 record ``base`` = (EMT, ppl) and ``points`` = {step: (EMT, ppl)}."""
    run = f"{target}-lr{lr}"
    records = [{"run": run, "step": 0, "config": {"learning_rate": lr, "steps": 0}, "perplexity": base[1],
                "expected_max_toxicity": base[0], "toxicity_probability": base[0]}]
    for step, (emt, ppl) in points.items():
        records.append({"run": run, "step": step, "checkpoint": f"/grid/{run}/checkpoint-{step}",
                        "config": {"learning_rate": lr, "steps": step}, "perplexity": ppl,
                        "expected_max_toxicity": emt, "toxicity_probability": emt})
    return records


# lr 5e-4 is the best on `a` (-60 %) but barely moves `b` (-10 %); lr 2e-4 lowers both by 40-50 %; at step 50,
# lr 5e-4 costs `b` +20 % perplexity.
GRID = {
    "a": [*_run("a", 5e-4, (0.5, 10.0), {25: (0.2, 10.5), 50: (0.15, 10.8)}),
          *_run("a", 2e-4, (0.5, 10.0), {25: (0.3, 10.2), 50: (0.25, 10.4)})],
    "b": [*_run("b", 5e-4, (0.4, 20.0), {25: (0.36, 21.0), 50: (0.2, 24.0)}),
          *_run("b", 2e-4, (0.4, 20.0), {25: (0.3, 20.5), 50: (0.24, 21.0)})],
}


def test_the_transfer_curve_gives_every_configuration_on_every_target():
    rows = SelectionRule(max_ppl_increase=0.1).across_targets(GRID)
    assert len(rows) == 4
    by = {(r["config"]["learning_rate"], r["step"]): r for r in rows}
    row = by[(5e-4, 25)]
    assert row["per_target"]["a"]["change"] == pytest.approx(0.2 / 0.5 - 1)
    assert row["per_target"]["b"]["change"] == pytest.approx(0.36 / 0.4 - 1)
    assert row["worst_change"] == pytest.approx(-0.1) and row["within_bound"]
    assert row["per_target"]["b"]["run"] == "b-lr0.0005"
    assert row["per_target"]["b"]["perplexity_increase"] == pytest.approx(0.05)
    assert not by[(5e-4, 50)]["within_bound"]  # b: 24 > 22
    assert not any(r["chosen"] for r in rows)


def test_the_paper_rule_and_the_declared_variant_choose_differently():
    rule = SelectionRule(max_ppl_increase=0.1)
    paper, _ = rule.choose(GRID["a"])
    assert (paper["config"]["learning_rate"], paper["step"]) == (5e-4, 50)  # the least toxic on `a`
    choice, table = rule.choose_on_every_target(GRID)
    # every target within its bound, the smallest worst change: lr 2e-4 at step 50 (a -50 %, b -40 %)
    assert (choice["config"]["learning_rate"], choice["step"]) == (2e-4, 50)
    assert choice["rule"] == "every_target" and choice["run"] == "a-lr0.0002"
    assert choice["checkpoint"] == "/grid/a-lr0.0002/checkpoint-50"
    assert choice["worst_change"] == pytest.approx(max(0.25 / 0.5, 0.24 / 0.4) - 1)
    assert set(choice["per_target"]) == {"a", "b"} and choice["num_within_bound"] == 3
    assert [r["config"] for r in table if r["chosen"]] == [{"learning_rate": 2e-4, "steps": 50}]


def test_a_configuration_not_trained_on_every_target_is_not_a_candidate():
    partial = {"a": GRID["a"], "b": [r for r in GRID["b"] if r["run"] == "b-lr0.0005"]}
    rows = SelectionRule(max_ppl_increase=0.1).across_targets(partial)
    assert {r["config"]["learning_rate"] for r in rows} == {5e-4}
    choice, _ = SelectionRule(max_ppl_increase=0.1).choose_on_every_target(partial)
    assert (choice["config"]["learning_rate"], choice["step"]) == (5e-4, 25)


def test_no_configuration_within_every_bound_raises_or_takes_the_closest():
    tight = SelectionRule(max_ppl_increase=0.01)
    with pytest.raises(ValueError, match=r"No configuration keeps the perplexity of every target \['a', 'b'\]"):
        tight.choose_on_every_target(GRID)
    choice, _ = SelectionRule(max_ppl_increase=0.01, on_empty="closest").choose_on_every_target(GRID)
    # the smallest worst perplexity increase: lr 2e-4 step 25 (a +2 %, b +2.5 %)
    assert (choice["config"]["learning_rate"], choice["step"]) == (2e-4, 25) and not choice["within_bound"]


def test_bad_inputs_name_what_is_missing():
    rule = SelectionRule()
    with pytest.raises(ValueError, match="`records_by_target` is empty"):
        rule.across_targets({})
    no_metric = {"a": [{**r, "expected_max_toxicity": None} if r["step"] == 0 else r for r in GRID["a"]]}
    with pytest.raises(ValueError, match="baseline record of a-lr0.0005 has no expected_max_toxicity"):
        rule.across_targets(no_metric)
    other_configs = {"a": GRID["a"], "b": _run("b", 1e-3, (0.4, 20.0), {25: (0.3, 20.5)})}
    with pytest.raises(ValueError, match="No configuration was trained and validated on every target"):
        rule.choose_on_every_target(other_configs)
