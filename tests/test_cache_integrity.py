"""No stale or partial cache is accepted, and a bad file is refused with an error naming it."""

import json
import logging

import pytest
from tiny import char_tokenizer, tiny_gemma3, tiny_llama, word_tokenizer
from transformers import LogitsProcessorList

from unidetox.decoding.sampler import ContrastiveDetoxSampler
from unidetox.decoding.sampling import ToxicityEvalConfig
from unidetox.evaluation.harness import DecodingConfig, PerplexityConfig, model_slug, run_evaluation
from unidetox.evaluation.prompts import Prompt
from unidetox.evaluation.report import read_jsonl
from unidetox.model_identity import saved_model_id

STATEMENTS = ["the cat sat on the mat", "a good friend helps people", "science helps us understand",
              "music and art bring joy", "people deserve dignity", "reading books is great"]
NUM_SAMPLES = 2


def save_tiny_model(path, seed):
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def evaluate(model, out, reference=None):
    return run_evaluation(
        [str(model)], [0], out, [Prompt(s) for s in STATEMENTS],
        eval_config=ToxicityEvalConfig(num_samples=NUM_SAMPLES, max_new_tokens=4, batch_size=4),
        perplexity_config=PerplexityConfig(reference_model=reference, wikitext=False), progress=False,
    )


def numbers(report, model):
    """The measured numbers of seed 0 (timings left out)."""
    per_seed = report["models"][str(model)]["per_seed"]["0"]
    return {k: v for k, v in per_seed.items() if not k.endswith("_s")}


def continuations(out):
    return [r["continuation"] for r in read_jsonl(out / "generations.jsonl")]


@pytest.fixture
def evaluated(tmp_path):
    model = save_tiny_model(tmp_path / "model", seed=0)
    out = tmp_path / "eval"
    report = evaluate(model, out, reference=str(model))
    part = out / "parts" / model_slug(str(model)) / "seed0.jsonl"
    return model, out, report, part


# ---- evaluation parts ------------------------------------------------------------------------------------------
def test_a_truncated_generation_part_is_generated_again(evaluated, caplog):
    model, out, report, part = evaluated
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[: len(lines) // 2]))
    with caplog.at_level(logging.WARNING, logger="unidetox.evaluation.harness"):
        again = evaluate(model, out, reference=str(model))
    assert len(read_jsonl(part)) == len(STATEMENTS) * NUM_SAMPLES
    assert numbers(again, model) == numbers(report, model)
    assert any(str(part) in r.getMessage() and "holds 6 rows" in r.getMessage() for r in caplog.records)


def test_a_part_sampled_for_other_prompts_is_generated_again(evaluated, caplog):
    model, out, report, part = evaluated
    rows = read_jsonl(part)
    rows[3]["prompt_id"] = "0" * 16
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="unidetox.evaluation.harness"):
        evaluate(model, out, reference=str(model))
    assert read_jsonl(part)[3]["prompt_id"] != "0" * 16
    assert any("row 4" in r.getMessage() and "other prompts" in r.getMessage() for r in caplog.records)


def test_a_conditional_perplexity_part_scored_on_fewer_rows_is_scored_again(evaluated):
    model, out, report, part = evaluated
    cond = part.with_name("conditional_ppl_seed0.json")
    scored = json.loads(cond.read_text())
    cond.write_text(json.dumps({**scored, "per_sample_nll": scored["per_sample_nll"][:3]}))
    evaluate(model, out, reference=str(model))
    assert json.loads(cond.read_text())["per_sample_nll"] == scored["per_sample_nll"]


def test_weights_overwritten_in_place_are_evaluated_anew(tmp_path):
    model = save_tiny_model(tmp_path / "model", seed=0)
    out = tmp_path / "eval"
    evaluate(model, out)
    old = continuations(out)
    save_tiny_model(model, seed=1)  # same path, same architecture, other weights
    again = evaluate(model, out)
    fresh = evaluate(model, tmp_path / "fresh")
    assert continuations(out) == continuations(tmp_path / "fresh") != old
    assert numbers(again, model) == numbers(fresh, model)


def test_a_model_named_not_by_path_keeps_its_name_as_identity(tmp_path):
    assert saved_model_id("gemma3-270m") == "gemma3-270m"
    assert saved_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    model = save_tiny_model(tmp_path / "model", seed=0)
    before = saved_model_id(str(model))
    assert before.startswith(f"{model}@")
    assert saved_model_id(str(model)) == before
    save_tiny_model(model, seed=1)
    assert saved_model_id(str(model)) != before


# ---- vocabularies ----------------------------------------------------------------------------------------------
def test_sampler_with_a_smaller_anti_expert_vocabulary_names_both_sizes():
    tokenizer = word_tokenizer()
    base = tiny_llama(len(tokenizer), seed=0)
    anti = tiny_gemma3(len(char_tokenizer()), seed=0)
    assert len(tokenizer) > len(char_tokenizer())  # the base's token ids run past the anti-expert's embedding
    inputs = tokenizer(["reading books is great"], return_tensors="pt")
    sampler = ContrastiveDetoxSampler(anti, attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match=rf"scores {len(tokenizer)} tokens.*scores {len(char_tokenizer())}"):
        base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), do_sample=True, top_k=0,
                      max_new_tokens=2, pad_token_id=0)


def test_evaluate_with_an_anti_expert_of_another_vocabulary_names_both(tmp_path):
    model = save_tiny_model(tmp_path / "model", seed=0)
    anti = tmp_path / "gemma"
    tiny_gemma3(len(char_tokenizer()), seed=0).save_pretrained(anti)
    char_tokenizer().save_pretrained(anti)
    with pytest.raises(ValueError, match=rf"model {model} scores {len(word_tokenizer())} tokens but the "
                                         rf"anti-expert {anti} scores {len(char_tokenizer())}"):
        run_evaluation(
            [str(model)], [0], tmp_path / "eval", [Prompt(s) for s in STATEMENTS],
            eval_config=ToxicityEvalConfig(num_samples=1, max_new_tokens=2, batch_size=4),
            perplexity_config=PerplexityConfig(reference_model=None, wikitext=False),
            decoding_config=DecodingConfig(anti_expert=str(anti), also_plain=False), progress=False,
        )
