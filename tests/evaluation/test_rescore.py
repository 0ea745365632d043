"""`unidetox rescore`: a finished tiny evaluation run re-scored with another scorer, side by side with paired intervals."""

import json
import shutil
from collections import defaultdict

import pytest

from tests.evaluation.test_evaluate_recipe import overrides, write_tiny_models_and_data
from unidetox.cli import main
from unidetox.evaluation import pipeline, rescore
from unidetox.evaluation.metrics import mean_std
from unidetox.evaluation.paired import per_prompt_toxicity
from unidetox.evaluation.report import read_jsonl, seed_toxicity_metrics
from unidetox.evaluation.scoring import SCORERS, ToxicityScorer, register_scorer
from unidetox.run_dir import OutputDirConflict

pytestmark = pytest.mark.integration
STUB = "words_over_four"


def words_over_four(text: str) -> float:
    """The stub scorer's rule: more words, more "toxic" (deterministic, spreads scores over [0, 1])."""
    return min(1.0, len(text.split()) / 4)


@pytest.fixture(scope="module")
def stub_scorer():
    @register_scorer(STUB)
    class WordsOverFour(ToxicityScorer):
        name = STUB

        def score_batch(self, texts):
            return [words_over_four(t) for t in texts]

    yield WordsOverFour
    del SCORERS[STUB]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    root = write_tiny_models_and_data(tmp_path_factory.mktemp("rescore"))
    out = root / "eval"
    pipeline.run(pipeline.parse_args(overrides(root, out, "mmlu.enabled=false", "perplexity.wikitext=false",
                                               "perplexity.reference_model=null", "eval.num_samples=4")))
    return out


def _rescore(*argv):
    return rescore.run(rescore.parse_args([str(a) for a in argv]))


def test_both_scorers_side_by_side_with_paired_intervals(eval_run, stub_scorer, tmp_path):
    result = _rescore(eval_run, f"scorer={STUB}", f"output_dir={tmp_path / 'out'}", "num_resamples=200")
    run_report = json.loads((eval_run / "report.json").read_text())
    generations = read_jsonl(eval_run / "generations.jsonl")
    models = list(run_report["models"])
    assert list(result.report["models"]) == models and len(models) == 2
    for model in models:
        entry = result.report["models"][model]
        for metric in rescore.TOXICITY_METRICS:
            # the run's own scorer: exactly the numbers of its report
            assert entry["original"][metric]["mean"] == pytest.approx(run_report["models"][model][metric]["mean"])
            # the new scorer: the same metric over the stub's scores, recomputed here per seed
            by_seed = defaultdict(list)
            for g in generations:
                if g["model"] == model:
                    by_seed[g["seed"]].append({**g, "toxicity": words_over_four(g["continuation"])})
            expected = mean_std([seed_toxicity_metrics(rs)[metric] for rs in by_seed.values()])
            assert entry["rescored"][metric]["mean"] == pytest.approx(expected["mean"])
    (pair,) = result.report["paired"]
    assert (pair["reference"], pair["treated"]) == (models[0], models[1])
    emt = pair["rescored"]["expected_max_toxicity"]
    assert emt["low"] <= emt["change"] <= emt["high"] and emt["n"] == run_report["prompts"]["num_prompts"]
    assert result.report["scorers"]["original"]["name"] == "profanity_check"
    assert result.report["scorers"]["rescored"]["name"] == STUB
    stored = read_jsonl(tmp_path / "out" / "generations.jsonl")
    assert [r["toxicity_original"] for r in stored] == [g["toxicity"] for g in generations]
    assert [r["toxicity"] for r in stored] == [words_over_four(g["continuation"]) for g in generations]
    markdown = (tmp_path / "out" / "rescore.md").read_text()
    assert f"TP {STUB}" in markdown and "TP profanity_check" in markdown and "paired bootstrap" in markdown


def test_through_the_cli_into_the_default_directory(eval_run, stub_scorer, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(eval_run, run_dir)
    assert main(["rescore", str(run_dir), f"scorer={STUB}", "num_resamples=200"]) == 0
    assert json.loads((run_dir / f"rescore-{STUB}" / "rescore.json").read_text())["num_samples"] > 0
    # the same directory with other settings is refused, naming the difference
    with pytest.raises(OutputDirConflict, match="seed: 0 -> 1"):
        _rescore(run_dir, f"scorer={STUB}", "num_resamples=200", "seed=1")


def test_a_replication_is_rescored_from_its_test_evaluation_row_by_row(eval_run, stub_scorer, tmp_path):
    replication = tmp_path / "replication"
    shutil.copytree(eval_run, replication / "test")
    m0, m1 = json.loads((eval_run / "report.json").read_text())["models"]
    (replication / "report.json").write_text(json.dumps({"rows": [
        {"method": "base", "target": "tiny", "model": m0}, {"method": "unidetox", "target": "tiny", "model": m1}]}))
    result = _rescore(replication, f"scorer={STUB}", "num_resamples=200")
    assert result.report["evaluations"][0]["dir"] == str(replication / "test")
    assert [(p["label"], p["reference"], p["treated"]) for p in result.report["paired"]] == [("unidetox / tiny", m0, m1)]


def _with_prompts(eval_run, run_dir, prompts_section):
    """A copy of ``eval_run`` whose report says its prompts came from ``prompts_section``."""
    shutil.copytree(eval_run, run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    report["config"]["prompts"] = prompts_section
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir


def _prompt_texts(eval_run):
    return list(dict.fromkeys(g["prompt"] for g in read_jsonl(eval_run / "generations.jsonl")))


def test_changes_by_prompt_kind_when_the_prompts_carry_labels(eval_run, stub_scorer, tmp_path):
    texts = _prompt_texts(eval_run)
    kinds = {text: "hate" if i % 2 else "neutral" for i, text in enumerate(texts)}
    csv = tmp_path / "labelled.csv"
    csv.write_text("text,target_group,label\n" + "".join(f"{t},women,{k}\n" for t, k in kinds.items()))
    run_dir = _with_prompts(eval_run, tmp_path / "run", {"source": "auto", "path": str(csv)})
    result = _rescore(run_dir, f"scorer={STUB}", "num_resamples=200")
    (pair,) = result.report["paired"]
    by_kind = pair["by_kind"]["rescored"]
    assert list(by_kind) == ["hate", "neutral"]
    assert [by_kind[k]["num_prompts"] for k in by_kind] == [len(texts) // 2, len(texts) - len(texts) // 2]
    # each kind's change is the change of the mean over its prompts, by hand, under each scorer
    stored = read_jsonl(run_dir / f"rescore-{STUB}" / "generations.jsonl")
    kind_of = {g["prompt_id"]: kinds[g["prompt"]] for g in stored}
    scored = {"rescored": stored, "original": [{**g, "toxicity": g["toxicity_original"]} for g in stored]}
    for side, records in scored.items():
        per_prompt = per_prompt_toxicity(records)
        for kind, changes in pair["by_kind"][side].items():
            emt = {m: sum(v["expected_max_toxicity"] for p, v in per_prompt[m].items() if kind_of[p] == kind)
                   for m in (pair["reference"], pair["treated"])}
            assert changes["expected_max_toxicity"]["change"] == pytest.approx(
                emt[pair["treated"]] / emt[pair["reference"]] - 1)
    markdown = (run_dir / f"rescore-{STUB}" / "rescore.md").read_text()
    assert "## By prompt kind, under each scorer" in markdown
    assert f"| {pair['label']} | `{pair['reference']}` | hate | {len(texts) // 2} |" in markdown


def test_no_changes_by_kind_for_prompts_without_labels_or_gone(eval_run, stub_scorer, tmp_path, caplog):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in _prompt_texts(eval_run)))
    unlabelled = _with_prompts(eval_run, tmp_path / "unlabelled", {"source": "file", "path": str(jsonl)})
    gone = _with_prompts(eval_run, tmp_path / "gone", {"source": "file", "path": str(tmp_path / "missing.jsonl")})
    for run_dir in (unlabelled, gone):
        result = _rescore(run_dir, f"scorer={STUB}", "num_resamples=200")
        assert result.report["paired"] and all("by_kind" not in p for p in result.report["paired"])
        assert "By prompt kind" not in (run_dir / f"rescore-{STUB}" / "rescore.md").read_text()
    assert "cannot be loaded again" in caplog.text and "missing.jsonl" in caplog.text


def test_a_directory_without_generations_is_named(tmp_path, stub_scorer):
    with pytest.raises(FileNotFoundError, match=r"no scored generations .*test/generations\.jsonl"):
        _rescore(tmp_path, f"scorer={STUB}")


def test_an_unknown_reference_is_named(eval_run, stub_scorer, tmp_path):
    with pytest.raises(ValueError, match="reference='nope' is not a model"):
        _rescore(eval_run, f"scorer={STUB}", "reference=nope", f"output_dir={tmp_path}")


@pytest.mark.slow
def test_rescored_with_jigsaw_bilstm(eval_run, tmp_path):
    from unidetox.evaluation.jigsaw_bilstm import jigsaw_bilstm_dir
    from unidetox.evaluation.scoring import JigsawBiLSTMScorer

    try:
        jigsaw_bilstm_dir()
    except RuntimeError as err:
        pytest.skip(f"tox-block could not be provisioned: {err}")
    result = _rescore(eval_run, "scorer=jigsaw_bilstm", f"output_dir={tmp_path}", "num_resamples=200")
    stored = read_jsonl(tmp_path / "generations.jsonl")
    expected = JigsawBiLSTMScorer()([r["continuation"] for r in stored])
    assert [r["toxicity"] for r in stored] == pytest.approx(expected, abs=1e-6)
    assert result.report["scorers"]["rescored"]["name"] == "jigsaw_bilstm"
