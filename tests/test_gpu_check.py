"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on CPU and lands in its JSON file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import subprocesses

REPO = Path(__file__).resolve().parents[1]
STEPS = ("environment", "sampler", "eval_throughput", "detox", "distill")


@pytest.mark.slow
def test_dry_run_records_every_step_ok(tmp_path, shared_data):
    out = tmp_path / "x.json"
    env = {**os.environ, "PYTHON": sys.executable, "UNIDETOX_DATA_DIR": str(shared_data)}
    proc = subprocesses.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = json.loads(out.read_text())
    expected = dict.fromkeys(STEPS, "ok")
    if not (REPO / "benchmarks" / "eval_throughput.py").is_file():
        expected["eval_throughput"] = "missing"  # written elsewhere; the check records its absence
    failures = {name: s.get("log_tail") for name, s in report["steps"].items() if s["status"] != "ok"}
    assert {name: step["status"] for name, step in report["steps"].items()} == expected, failures
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(f"JSON: {out}"), proc.stdout[-3000:]

    assert report["mode"] == "dry-run" and report["summary"]["all_ok"]
    for name in STEPS:
        step = report["steps"][name]
        assert step["status"] == "missing" or (step["exit_code"] == 0 and step["seconds"] > 0)
    sampler = report["steps"]["sampler"]["result"]
    assert set(sampler["ratio_to_plain"]) == {"plain", "sampler", "fused"} and sampler["dtype"] == "float32"
    assert report["summary"]["fused_vs_plain"]["ratio"] == sampler["ratio_to_plain"]["fused"]
    detox = report["steps"]["detox"]
    assert "zero2.yaml" in detox["command"] and detox["result"]["train"]["global_step"] == 2
    assert report["steps"]["distill"]["result"]["num_texts"] == 4
