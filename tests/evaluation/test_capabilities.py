"""Capability benchmarks through lm-eval (unidetox.evaluation.capabilities) and as the evaluate stage's option,
offline on tiny models with a tiny copy of the local MMLU and WikiText layout."""

import json

import pytest
from tiny import tiny_llama, word_tokenizer

from unidetox.evaluation import pipeline
from unidetox.evaluation.capabilities import CapabilitiesConfig, run_lm_eval
from unidetox.models import load_model_and_tokenizer

SUBJECTS = ["anatomy", "virology"]
QUESTIONS = ["the cat sat on,the mat,the door,music,art,0", "a good friend,helps people,hate,awful,ugly,1",
             "science helps,us understand,kill,stupid,ugly,2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capabilities")
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root / "m0")
    tok.save_pretrained(root / "m0")
    data = root / "data"
    for split in ("test", "dev"):
        (data / "mmlu" / split).mkdir(parents=True)
        for i, subject in enumerate(SUBJECTS):
            rows = QUESTIONS[i:] + QUESTIONS[:i]
            (data / "mmlu" / split / f"{subject}_{split}.csv").write_text(
                "question,choice0,choice1,choice2,choice3,answer\n" + "\n".join(rows) + "\n")
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "wiki.test.raw").write_bytes(
        b" = Cats = \r\n the cat sat on the mat \r\n = Friends = \r\n a good friend helps people \r\n")
    (data / "toxigen" / "annotated_train").mkdir(parents=True)
    (data / "toxigen" / "annotated_train" / "toxigen_annotated_train.csv").write_text(
        "text,target_group,label\n\"b'the cat sat on the mat'\",women,neutral\n\"b'people deserve dignity'\",black,neutral\n")
    return root


def lm_eval_config(**changes):
    return CapabilitiesConfig(**{"backend": "lm_eval", "limit": 2, "mmlu_subjects": SUBJECTS, "max_length": 64,
                                 "batch_size": 8, **changes})


@pytest.mark.parametrize("changes, message", [
    ({"backend": "harness"}, "'harness'"), ({"limit": 0}, "`limit`"), ({"num_fewshot": -1}, "`num_fewshot`"),
    ({"tasks": ["mmlu", "mmlu"]}, "repeats"), ({"tasks": ["wikitext"], "mmlu_subjects": ["anatomy"]}, "no mmlu"),
    ({"batch_size": 0}, "`batch_size`"), ({"max_length": 1}, "`max_length`"),
])
def test_bad_settings_are_refused_naming_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        CapabilitiesConfig(**changes)


def test_user_names_map_to_the_local_data_tasks():
    assert CapabilitiesConfig().task_names() == {"mmlu": ["unidetox_mmlu"], "wikitext": ["unidetox_wikitext"]}
    assert lm_eval_config(tasks=["mmlu"]).task_names() == {"mmlu": ["unidetox_mmlu_anatomy", "unidetox_mmlu_virology"]}


def test_mmlu_on_chosen_subjects_is_the_size_weighted_mean_of_their_accuracies(setup):
    model, tokenizer = load_model_and_tokenizer(setup / "m0")
    data_dir = setup / "data"
    numbers = run_lm_eval(model, tokenizer, lm_eval_config(), data_dir)
    assert set(numbers) >= {"mmlu/acc", "mmlu/num_docs", "wikitext/word_perplexity", "wikitext/byte_perplexity",
                            "wikitext/bits_per_byte", "wikitext/num_docs"}
    assert numbers["mmlu/num_docs"] == 2 * len(SUBJECTS) and numbers["wikitext/num_docs"] == 2
    per_subject = run_lm_eval(model, tokenizer, lm_eval_config(tasks=[f"unidetox_mmlu_{s}" for s in SUBJECTS],
                                                               mmlu_subjects=None), data_dir)
    accuracies = [per_subject[f"unidetox_mmlu_{s}/acc"] for s in SUBJECTS]
    assert numbers["mmlu/acc"] == pytest.approx(sum(accuracies) / len(accuracies))  # 2 questions each
    with pytest.raises(ValueError, match="Unknown lm-eval tasks \\['hellaswag'\\]"):
        run_lm_eval(model, tokenizer, lm_eval_config(tasks=["hellaswag"], mmlu_subjects=None), data_dir)


def test_evaluate_stage_reports_lm_eval_capabilities_in_place_of_the_papers(setup):
    out = setup / "out"
    overrides = [f"models=[{setup / 'm0'}]", f"data_dir={setup / 'data'}", "eval.num_samples=2", "eval.max_new_tokens=3",
                 "seeds=[0]", "perplexity.reference_model=null", "progress=false", f"output_dir={out}",
                 "capabilities.backend=lm_eval", "capabilities.limit=2", "capabilities.max_length=64",
                 "capabilities.batch_size=8", f"capabilities.mmlu_subjects=[{','.join(SUBJECTS)}]", "also_scorers=[]"]
    report = pipeline.run(pipeline.parse_args(overrides)).report
    entry = report["models"][str(setup / "m0")]
    model, tokenizer = load_model_and_tokenizer(setup / "m0")
    assert entry["capabilities"] == pytest.approx(run_lm_eval(model, tokenizer, lm_eval_config(), setup / "data"))
    assert entry["mmlu"] is None and entry["wikitext_perplexity"] is None  # replaced, not measured twice
    assert report["capabilities"]["backend"] == "lm_eval" and report["capabilities"]["lm_eval"]
    assert json.loads((out / "report.json").read_text())["models"][str(setup / "m0")]["capabilities"] == entry[
        "capabilities"]
    assert "## Capabilities (lm-evaluation-harness)" in (out / "report.md").read_text()
    part = next((out / "parts").rglob("capabilities.json"))
    written = part.stat().st_mtime_ns
    again = pipeline.run(pipeline.parse_args(overrides)).report
    assert part.stat().st_mtime_ns == written  # a finished part is reused
    assert again["models"][str(setup / "m0")]["capabilities"] == entry["capabilities"]


def test_the_lm_eval_backend_without_lm_eval_installed_is_refused_when_configured(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"unidetox\[lm_eval\]"):
        CapabilitiesConfig(backend="lm_eval")
    assert CapabilitiesConfig(backend="paper").backend == "paper"
