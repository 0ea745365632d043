"""Evaluations carry every configured scorer: `also_scorers` score the stored continuations next to `scorer`,
cached per (model, seed) part, and side by side in report.json / report.md."""

from collections import defaultdict

import pytest

from tests.evaluation.test_evaluate_recipe import overrides, write_tiny_models_and_data
from unidetox.evaluation import pipeline
from unidetox.evaluation.metrics import mean_std
from unidetox.evaluation.report import read_jsonl, seed_toxicity_metrics
from unidetox.evaluation.scoring import SCORERS, ToxicityScorer, register_scorer

pytestmark = pytest.mark.integration
STUB = "words_over_three"


def words_over_three(text: str) -> float:
    return min(1.0, len(text.split()) / 3)


@pytest.fixture(scope="module")
def stub_scorer():
    @register_scorer(STUB)
    class WordsOverThree(ToxicityScorer):
        name = STUB
        texts_scored = 0

        def score_batch(self, texts):
            type(self).texts_scored += len(texts)
            return [words_over_three(t) for t in texts]

    yield WordsOverThree
    del SCORERS[STUB]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_tiny_models_and_data(tmp_path_factory.mktemp("also"))


def _args(root, out, *extra):
    return pipeline.parse_args(overrides(root, out, "mmlu.enabled=false", "perplexity.wikitext=false",
                                         "perplexity.reference_model=null", *extra))


def test_the_report_carries_every_scorer_side_by_side_and_a_rerun_scores_nothing_again(root, stub_scorer):
    out = root / "eval"
    report = pipeline.run(_args(root, out, f"also_scorers=[{STUB}]")).report
    assert report["scorer"]["name"] == "profanity_check" and list(report["also_scorers"]) == [STUB]
    generations = read_jsonl(out / "generations.jsonl")
    assert [g["also_toxicity"][STUB] for g in generations] == [words_over_three(g["continuation"]) for g in generations]
    for model, entry in report["models"].items():
        by_seed = defaultdict(list)
        for g in generations:
            if g["model"] == model:
                by_seed[g["seed"]].append({**g, "toxicity": words_over_three(g["continuation"])})
        for metric in ("toxicity_probability", "expected_max_toxicity"):
            expected = mean_std([seed_toxicity_metrics(rs)[metric] for rs in by_seed.values()])
            assert entry["scorers"][STUB][metric]["mean"] == pytest.approx(expected["mean"])
            # the primary scorer's numbers keep their place
            own = mean_std([seed_toxicity_metrics([g for g in generations if g["model"] == model and g["seed"] == s])
                            [metric] for s in by_seed])
            assert entry[metric]["mean"] == pytest.approx(own["mean"])
    markdown = (out / "report.md").read_text()
    assert "## Toxicity under every scorer" in markdown and f"TP {STUB}" in markdown and "TP profanity_check" in markdown
    assert stub_scorer.texts_scored > 0

    stub_scorer.texts_scored = 0
    again = pipeline.run(_args(root, out, f"also_scorers=[{STUB}]")).report
    assert stub_scorer.texts_scored == 0  # every (model, seed) part's extra scores were cached
    assert {m: e["scorers"] for m, e in again["models"].items()} == {m: e["scorers"] for m, e in report["models"].items()}


def test_no_extra_scorer_leaves_the_report_as_before(root, tmp_path):
    report = pipeline.run(_args(root, tmp_path / "eval", "also_scorers=[]")).report
    assert report["also_scorers"] == {} and all(m["scorers"] == {} for m in report["models"].values())
    assert "also_toxicity" not in read_jsonl(tmp_path / "eval" / "generations.jsonl")[0]
    assert "under every scorer" not in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.parametrize("also", ["[profanity_check]", f"[{STUB},{STUB}]"])
def test_a_scorer_listed_twice_is_refused_before_any_model_is_loaded(root, tmp_path, stub_scorer, also):
    args = _args(root, tmp_path / "eval", f"also_scorers={also}", f"models=[{tmp_path / 'no-such-model'}]")
    with pytest.raises(ValueError, match="also_scorers repeats the scorer"):
        pipeline.run(args)
