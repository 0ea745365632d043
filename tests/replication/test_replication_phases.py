"""The replication's phases (unidetox.replication.phases) on fake stage results: how a tested model is found, and
the lambda sweep's records."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from unidetox.replication.phases import ModelsUnderTest, _lambda_records


class FakeStages:
    """Hands out fixed stage results and counts how often each was asked for."""

    def __init__(self, results):
        self.results = results
        self.asked: list[str] = []

    def result(self, name):
        self.asked.append(name)
        return self.results[name]


def _detox_result(model_path, train_seconds=12.5):
    return SimpleNamespace(output_dir="/runs/apply/x", model_path=model_path, train_seconds=train_seconds)


def test_a_model_named_by_its_detox_stage_is_that_stage_s_full_model_asked_for_once():
    stages = FakeStages({"apply/gemma3-control": _detox_result("/runs/apply/gemma3-control/merged")})
    given = {("gemma3", "control"): "apply/gemma3-control", ("smollm2", "unidetox"): Path("/runs/apply/s/model")}
    models = ModelsUnderTest(stages, given, {("smollm2", "unidetox"): 3.0})

    assert models.path(("gemma3", "control")) == "/runs/apply/gemma3-control/merged"
    assert models.path(("gemma3", "control")) == "/runs/apply/gemma3-control/merged"
    assert models.path(("smollm2", "unidetox")) == "/runs/apply/s/model"
    assert stages.asked == ["apply/gemma3-control"]
    assert models.train_seconds == {("smollm2", "unidetox"): 3.0, ("gemma3", "control"): 12.5}
    assert given[("gemma3", "control")] == "apply/gemma3-control"  # the apply phase's result is left as it was


def test_a_lora_run_without_a_merged_model_cannot_be_tested():
    models = ModelsUnderTest(FakeStages({"apply/t-nothate": _detox_result(None)}), {("t", "nothate"): "apply/t-nothate"}, {})
    with pytest.raises(FileNotFoundError, match="save_merged_model=true"):
        models.path(("t", "nothate"))


def test_the_lambda_sweep_records_start_with_the_base_at_lambda_zero():
    def scores(tp, emt, ppl):
        return {"toxicity_probability": {"mean": tp}, "expected_max_toxicity": {"mean": emt},
                "wikitext_perplexity": {"perplexity": ppl}}

    report = {"models": {"base-model": scores(0.5, 0.4, 20.0), "/rep/taskvec/lam0.5": scores(0.3, 0.25, 21.0),
                         "/rep/taskvec/lam1": scores(0.2, 0.2, 30.0)}}
    records = _lambda_records(report, "base-model", {0.5: Path("/rep/taskvec/lam0.5"), 1.0: Path("/rep/taskvec/lam1")})

    assert [(r["run"], r["step"], r["baseline"], r["config"]["lambda"]) for r in records] == [
        ("base", 0, True, 0.0), ("lam0.5", 1, False, 0.5), ("lam1", 1, False, 1.0)]
    assert [r["checkpoint"] for r in records] == ["base-model", "/rep/taskvec/lam0.5", "/rep/taskvec/lam1"]
    assert records[1]["toxicity_probability"] == 0.3 and records[2]["perplexity"] == 30.0
