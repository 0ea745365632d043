import pytest
import torch
from tiny import tiny_llama

from unidetox.evaluation.likelihood import conditional_nll
from unidetox.evaluation.mmlu import (
    MMLUConfig,
    MMLUQuestion,
    build_prompt,
    evaluate_mmlu,
    load_mmlu,
    score_mmlu_questions,
    summarize_mmlu,
)

HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


@pytest.fixture
def mmlu_dir(tmp_path):
    for split, rows in {
        "dev": ["the cat sat on,the mat,the door,music,art,0", "a good friend,helps people,hate,awful,ugly,1"],
        "test": [f"the weather is {w},nice,ugly,awful,stupid,{i % 4}" for i, w in enumerate(["nice", "bright", "good"])],
    }.items():
        (tmp_path / split).mkdir()
        (tmp_path / split / f"animals_{split}.csv").write_text(HEADER + "\n".join(rows) + "\n")
        (tmp_path / split / f"music_{split}.csv").write_text(HEADER + "\n".join(rows[:2]) + "\n")
    return tmp_path


def test_prompt_formats():
    q = MMLUQuestion("high_school_physics", "What falls?", ("apples", "clouds", "birds", "sound"), 0)
    shot = MMLUQuestion("high_school_physics", "What is hot?", ("ice", "fire", "snow", "air"), 1)
    context, options = build_prompt(q, [shot], "text")
    assert context == "Question: What is hot?\nAnswer: fire\n\nQuestion: What falls?\nAnswer:"
    assert options == [" apples", " clouds", " birds", " sound"]
    context, options = build_prompt(q, [shot], "letters")
    assert context.startswith("The following are multiple choice questions (with answers) about high school physics.")
    assert "What is hot?\nA. ice\nB. fire\nC. snow\nD. air\nAnswer: B\n\nWhat falls?\nA. apples" in context
    assert context.endswith("D. sound\nAnswer:") and options == [" A", " B", " C", " D"]


def test_load_local_with_limit(mmlu_dir):
    questions, dev = load_mmlu(MMLUConfig(path=str(mmlu_dir)))
    assert len(questions) == 5 and set(dev) == {"animals", "music"}
    assert questions[0] == MMLUQuestion("animals", "the weather is nice", ("nice", "ugly", "awful", "stupid"), 0)
    limited, _ = load_mmlu(MMLUConfig(path=str(mmlu_dir), limit=2))
    assert [q.subject for q in limited].count("animals") == 2 and len(limited) == 4
    assert limited == load_mmlu(MMLUConfig(path=str(mmlu_dir), limit=2))[0]
    only, _ = load_mmlu(MMLUConfig(path=str(mmlu_dir), subjects=["music"]))
    assert {q.subject for q in only} == {"music"}
    with pytest.raises(ValueError, match="Unknown MMLU subjects"):
        load_mmlu(MMLUConfig(path=str(mmlu_dir), subjects=["astrology"]))
    with pytest.raises(FileNotFoundError, match="MMLU test folder"):
        load_mmlu(MMLUConfig(path=str(mmlu_dir / "nope")))


def test_prediction_is_argmax_loglik(model, tokenizer, mmlu_dir):
    config = MMLUConfig(path=str(mmlu_dir), k_shot=1, batch_size=3)
    questions, dev = load_mmlu(config)
    records = score_mmlu_questions(model, tokenizer, questions, dev, config)
    for record, q in zip(records, questions, strict=True):
        context, options = build_prompt(q, dev[q.subject][:1], "text")
        nll = [x for x, _ in conditional_nll(model, tokenizer, [context] * 4, options)]
        assert record["prediction"] == min(range(4), key=lambda j: nll[j])
        assert record["loglik"] == pytest.approx([-x for x in nll], rel=1e-5)
        assert record["correct"] == (record["prediction"] == q.answer)


def test_always_correct_model_scores_one(tokenizer, mmlu_dir):
    """A model that puts all mass on the word 'nice' answers the questions whose option 0 is 'nice'."""
    model = tiny_llama(len(tokenizer), seed=0)
    nice = tokenizer.convert_tokens_to_ids("nice")

    class Biased(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            logits = torch.zeros_like(out.logits)
            logits[..., nice] = 50.0
            out.logits = logits
            return out

    config = MMLUConfig(path=str(mmlu_dir), k_shot=0, subjects=["animals"])
    result = evaluate_mmlu(Biased(model), tokenizer, config)
    # answers are 0, 1, 2 for the three 'animals' questions; option 0 ('nice') is always predicted
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["per_subject"] == {"animals": pytest.approx(1 / 3)}


def test_sharded_records_cover_all(model, tokenizer, mmlu_dir):
    config = MMLUConfig(path=str(mmlu_dir), format="letters", k_shot=2)
    questions, dev = load_mmlu(config)
    whole = score_mmlu_questions(model, tokenizer, questions, dev, config)
    parts = [score_mmlu_questions(model, tokenizer, questions, dev, config, r, 2) for r in range(2)]
    merged = sorted((r for p in parts for r in p), key=lambda r: r["index"])
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in whole]


def test_summary_and_errors():
    records = [{"subject": "a", "correct": True}, {"subject": "a", "correct": False}, {"subject": "b", "correct": True}]
    summary = summarize_mmlu(records)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["macro_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="k_shot"):
        MMLUConfig(k_shot=6)
    with pytest.raises(ValueError, match="format"):
        MMLUConfig(format="mc")


def test_local_mmlu_files(shared_data):
    questions, dev = load_mmlu(MMLUConfig(limit=2), data_dir=shared_data)
    assert len(questions) == 57 * 2 and len(dev) == 57 and all(len(v) == 5 for v in dev.values())
    assert all(0 <= q.answer <= 3 and len(q.choices) == 4 for q in questions)
