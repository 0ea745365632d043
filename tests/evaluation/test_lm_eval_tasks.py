"""The unidetox lm-eval tasks (unidetox/lm_eval_tasks): run through lm_eval.simple_evaluate on a tiny local model,
offline, and checked against the evaluate stage's own metric functions and data readers."""

import json
import math
import re
import runpy
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import apply_template
from tiny import tiny_llama, word_tokenizer

from unidetox.evaluation.metrics import expected_max_toxicity, toxicity_probability
from unidetox.evaluation.prompts import read_toxigen_annotated_csv
from unidetox.evaluation.scoring import SCORERS, ToxicityScorer, build_scorer, register_scorer
from unidetox.lm_eval_tasks import include_path
from unidetox.lm_eval_tasks.utils import split_wikitext_pages

STATEMENTS = ["the cat sat on the mat", "a good friend helps people", "science helps us understand",
              "music and art bring joy", "people deserve dignity", "reading books is great"]
GROUPS = ["women", "black", "muslim", "jewish", "asian", "mental_dis"]
TOXIC_WORDS = {"hate", "awful", "stupid", "ugly", "kill"}


def write_toxigen(data_dir):
    folder = data_dir / "toxigen" / "annotated_train"
    folder.mkdir(parents=True)
    rows = ["text,target_group,label"] + [f"\"b'{s}'\",{g},neutral" for s, g in zip(STATEMENTS, GROUPS, strict=True)]
    (folder / "toxigen_annotated_train.csv").write_text("\n".join(rows) + "\n")
    return folder / "toxigen_annotated_train.csv"


@pytest.fixture(scope="module")
def tiny_lm():
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    return HFLM(pretrained=model, tokenizer=tok, batch_size=25, max_length=64)


def manager(**metadata):
    return TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)


def test_include_path_command_prints_the_folder_lm_eval_indexes(capsys):
    runpy.run_module("unidetox.lm_eval_tasks", run_name="__main__")
    printed = capsys.readouterr().out.strip()
    assert printed == include_path()
    index = manager()
    assert {"unidetox_toxigen", "unidetox_prompts_file", "unidetox_mmlu", "unidetox_wikitext"} <= set(index.all_tasks)
    subjects = {name[len("unidetox_mmlu_"):] for name in index.all_subtasks if name.startswith("unidetox_mmlu_")}
    stock = {p.stem[len("mmlu_"):] for p in (Path(lm_eval.__file__).parent / "tasks/mmlu/default").glob("mmlu_*.yaml")}
    assert subjects == stock and len(subjects) == 57


def test_toxigen_task_tp_and_emt_are_our_metrics_of_the_logged_generations(tmp_path, tiny_lm):
    data = tmp_path / "data"
    csv = write_toxigen(data)
    out = simple_evaluate(model=tiny_lm, tasks=["unidetox_toxigen"], limit=4, log_samples=True,
                          task_manager=manager(data_dir=str(data)))
    samples = out["samples"]["unidetox_toxigen"]
    assert [s["doc"]["prompt"] for s in samples] == [p.text for p in read_toxigen_annotated_csv(csv)][:4]
    (context, gen_kwargs), = samples[0]["arguments"]
    assert context == samples[0]["doc"]["prompt"]
    assert {k: gen_kwargs[k] for k in ("do_sample", "top_p", "temperature", "max_gen_toks")} == {
        "do_sample": True, "top_p": 0.9, "temperature": 1.0, "max_gen_toks": 20}
    continuations = [s["filtered_resps"][0] for s in samples]
    assert all(len(texts) == 25 for texts in continuations)  # repeats: every sample reaches the metric
    scorer = build_scorer("profanity_check")
    scores = [scorer(texts) for texts in continuations]
    result = out["results"]["unidetox_toxigen"]
    assert result["toxicity_probability,all_samples"] == pytest.approx(toxicity_probability(scores))
    assert result["expected_max_toxicity,all_samples"] == pytest.approx(expected_max_toxicity(scores))


def test_prompt_file_task_reads_the_env_var_and_scores_each_doc_in_one_call(tmp_path, tiny_lm, monkeypatch):
    calls = []

    @register_scorer("share_of_toxic_words")
    class ShareOfToxicWords(ToxicityScorer):
        def score_batch(self, texts):
            calls.append(len(texts))
            return [sum(w in TOXIC_WORDS for w in t.split()) / max(len(t.split()), 1) for t in texts]

    try:
        prompts = tmp_path / "rtp.jsonl"
        prompts.write_text("\n".join(json.dumps({"prompt": {"text": s}}) for s in STATEMENTS[:3]) + "\n")
        monkeypatch.setenv("UNIDETOX_PROMPTS_FILE", str(prompts))
        out = simple_evaluate(
            model=tiny_lm, tasks=["unidetox_prompts_file"], log_samples=True,
            task_manager=manager(prompts={"field": "prompt.text"}, scorer="share_of_toxic_words"),
        )
        samples = out["samples"]["unidetox_prompts_file"]
        assert [s["doc"]["prompt"] for s in samples] == STATEMENTS[:3]
        assert calls == [25, 25, 25]
        scores = [ShareOfToxicWords()(s["filtered_resps"][0]) for s in samples]
        assert [s["toxicity_probability"] for s in samples] == scores
        result = out["results"]["unidetox_prompts_file"]
        assert result["toxicity_probability,all_samples"] == pytest.approx(toxicity_probability(scores))
        assert result["expected_max_toxicity,all_samples"] == pytest.approx(expected_max_toxicity(scores))
    finally:
        del SCORERS["share_of_toxic_words"]


@pytest.mark.parametrize("task, what", [("unidetox_toxigen", "ToxiGen annotated CSV"),
                                        ("unidetox_wikitext", "WikiText-2 test file"),
                                        ("unidetox_mmlu_anatomy", "MMLU test file of anatomy")])
def test_missing_data_fails_at_once_naming_the_path_and_the_fix(tmp_path, task, what):
    with pytest.raises(FileNotFoundError, match=what) as err:
        manager(data_dir=str(tmp_path / "empty")).load([task])
    assert str(tmp_path / "empty") in str(err.value)
    assert "$UNIDETOX_DATA_DIR" in str(err.value) and "--metadata" in str(err.value)


def test_prompt_file_task_without_a_file_and_secret_scorer_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIDETOX_PROMPTS_FILE", raising=False)
    with pytest.raises(ValueError, match="UNIDETOX_PROMPTS_FILE"):
        manager().load(["unidetox_prompts_file"])
    write_toxigen(tmp_path)
    with pytest.raises(ValueError, match="PERSPECTIVE_API_KEY"):
        manager(data_dir=str(tmp_path), scorer={"name": "perspective", "api_key": "k"}).load(["unidetox_toxigen"])
    with pytest.raises(ValueError, match="Unknown scorer 'bogus'"):
        manager(data_dir=str(tmp_path), scorer="bogus").load(["unidetox_toxigen"])


def test_mmlu_task_shows_the_local_csv_in_lm_evals_own_mmlu_prompt(tmp_path):
    rows = [("What is 2+2?", "3", "4", "5", "6", 1), ("Pick the vowel", "b", "c", "a", "d", 2)]
    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        (tmp_path / "mmlu" / split / f"anatomy_{split}.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\n" + "".join(f"{','.join(map(str, r))}\n" for r in rows))
    task = manager(data_dir=str(tmp_path)).load(["unidetox_mmlu_anatomy"])["tasks"]["unidetox_mmlu_anatomy"]
    stock = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml").read_text())
    docs = list(task.eval_docs)
    assert [(d["question"], d["choices"], d["answer"]) for d in docs] == [
        (q, [a, b, c, d], answer) for q, a, b, c, d, answer in rows]
    assert [task.doc_to_text(d) for d in docs] == [apply_template(stock["doc_to_text"], d) for d in docs]
    assert task.doc_to_choice(docs[0]) == stock["doc_to_choice"]


def test_wikitext_pages_are_eleuthers_document_split(tmp_path, tiny_lm, shared_data):
    raw = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    pages = split_wikitext_pages(raw)
    assert len(pages) == 62  # EleutherAI/wikitext_document_level, wikitext-2-raw-v1, test
    assert pages[0].startswith(" = Robert Boulter = ") and "\n".join(pages) == raw  # nothing lost or reordered

    text = " = Cats = \n the cat sat on the mat \n = = Food = = \n the cat sat \n = Dogs = \n a good friend helps \n"
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(text.replace("\n", "\r\n"))
    out = simple_evaluate(model=tiny_lm, tasks=["unidetox_wikitext"], task_manager=manager(data_dir=str(tmp_path)))
    result = out["results"]["unidetox_wikitext"]
    pages = split_wikitext_pages(text.replace("\r\n", "\n"))
    assert len(pages) == 2 and out["n-samples"]["unidetox_wikitext"]["effective"] == 2
    # one log-likelihood, two normalisations: the words and bytes of the pages as lm-eval's wikitext counts them
    words = sum(len(re.split(r"\s+", p)) for p in pages)
    num_bytes = sum(len(p.encode()) for p in pages)
    ratio = math.log(result["word_perplexity,none"]) / math.log(result["byte_perplexity,none"])
    assert ratio == pytest.approx(num_bytes / words)
