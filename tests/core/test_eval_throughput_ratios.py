"""benchmarks/eval_throughput.py: the evaluation-speed goals' ratios come from the measured seconds, and a run
prints them (with --no-scoring, the sampling ratios only)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import subprocesses

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's own modules, run as scripts there

from eval_throughput import ratios  # noqa: E402

TINY = ["num_hidden_layers=1", "hidden_size=64", "intermediate_size=64", "num_attention_heads=2",
        "num_key_value_heads=1", "head_dim=32", "vocab_size=4096"]


def test_ratios_follow_the_goals_definitions():
    seconds = {"authors": 30.0, "mixed": 12.0, "shared": 10.0, "preselected": 8.0}
    r = ratios(seconds, {"unshared": 12.0, "shared": 6.0})
    assert r["authors_over"] == {"mixed": 2.5, "shared": 3.0, "preselected": 3.75}
    assert r["best_mode"] == "preselected"
    assert r["cond_ppl_over_sampling"] == 6.0 / 8.0
    assert r["test_stage_today_over_best"] == (10.0 + 12.0) / (8.0 + 6.0)
    assert r["ratio_to_mixed"]["shared"] == 1.2 and r["ratio_cond_ppl_shared"] == 2.0


def test_ratios_leave_out_what_was_not_measured():
    r = ratios({"shared": 10.0, "bucketed": 9.0}, None)
    assert r == {"ratio_to_mixed": {}, "authors_over": {}, "best_mode": "bucketed"}
    scored = ratios({"authors": 20.0, "shared": 10.0}, {"unshared": 5.0, "shared": 4.0})
    assert scored["best_mode"] == "shared" and scored["cond_ppl_over_sampling"] == 0.4
    assert "test_stage_today_over_best" not in scored  # needs the preselected sampling


def run_benchmark(tmp_path, *extra):
    out = tmp_path / "report.json"
    overrides = [arg for pair in TINY for arg in ("--override", pair)]
    proc = subprocesses.run(
        [sys.executable, str(REPO / "benchmarks" / "eval_throughput.py"), "--random-init", "--models", "smollm2-135m",
         *overrides, "--num-prompts", "3", "--num-samples", "2", "--max-new-tokens", "3", "--repeats", "1",
         "--threads", "1", "--modes", "authors,shared,preselected", "--json", str(out), *extra],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")])},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {" ".join(line.split()[:3]) for line in proc.stdout.splitlines() if line.startswith("ratio ")}
    return json.loads(out.read_text())[0], lines


@pytest.mark.slow
def test_a_run_prints_the_goals_ratios(tmp_path):
    report, lines = run_benchmark(tmp_path)
    assert {"ratio smollm2-135m authors_over_shared", "ratio smollm2-135m authors_over_preselected",
            "ratio smollm2-135m cond_ppl_over_sampling", "ratio smollm2-135m test_stage_today_over_best"} <= lines
    assert "mixed" not in report["seconds"]  # run only when named
    seconds, scoring = report["seconds"], report["cond_ppl_seconds"]
    assert report["test_stage_today_over_best"] == pytest.approx(
        (seconds["shared"] + scoring["unshared"]) / (seconds["preselected"] + scoring["shared"]))

    report, lines = run_benchmark(tmp_path, "--no-scoring")
    assert "ratio smollm2-135m authors_over_preselected" in lines
    assert not any("cond_ppl" in line or "test_stage" in line for line in lines)
    assert report["cond_ppl_seconds"] is None and report["reference"] is None
