"""No stale or partial cache is accepted, and a bad file is refused with an error naming it."""

import json
import logging

import pytest
from tiny import char_tokenizer, tiny_gemma3, tiny_llama, word_tokenizer
from transformers import LogitsProcessorList

import unidetox.distill.distiller as dataset_module
from unidetox import DistilledDetoxDataset
from unidetox.cards import CARD_MARKER
from unidetox.decoding.logits_process import ContrastiveDetoxSampler
from unidetox.decoding.protocol import ToxicityEvalConfig
from unidetox.distill.config import DistillConfig
from unidetox.distill.shards import METADATA_FILE, SHARD_CONFIG_FILE, SHARDS_DIR
from unidetox.evaluation.config import DecodingConfig, EvaluateArguments, PerplexityConfig
from unidetox.evaluation.harness import run_evaluation
from unidetox.evaluation.mmlu import MMLUConfig
from unidetox.evaluation.model_card import update_model_cards
from unidetox.evaluation.plan import model_slug
from unidetox.evaluation.prompts import Prompt, read_prompt_file, read_toxigen_fewshot
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
    return run_evaluation(EvaluateArguments(
        [str(model)], [0], out, eval=ToxicityEvalConfig(num_samples=NUM_SAMPLES, max_new_tokens=4, batch_size=4),
        also_scorers=[], perplexity=PerplexityConfig(reference_model=reference, wikitext=False),
        mmlu=MMLUConfig(enabled=False), progress=False,
    ), [Prompt(s) for s in STATEMENTS])


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
        run_evaluation(EvaluateArguments(
            [str(model)], [0], tmp_path / "eval", eval=ToxicityEvalConfig(num_samples=1, max_new_tokens=2, batch_size=4),
            also_scorers=[], perplexity=PerplexityConfig(reference_model=None, wikitext=False),
            mmlu=MMLUConfig(enabled=False), decoding=DecodingConfig(anti_expert=str(anti)), progress=False,
        ), [Prompt(s) for s in STATEMENTS])
    assert not list((tmp_path / "eval" / "parts").rglob("seed*.jsonl"))  # refused before the plain samples too


# ---- distill shards and metadata -------------------------------------------------------------------------------
DISTILL = dict(max_length=4, batch_size=2, summary_num_samples=0)


@pytest.fixture(scope="module")
def distill_models():
    tokenizer = word_tokenizer()
    return tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), seed=1), tokenizer


def build(distill_models, out, num_samples=16, seed=0, **settings):
    base, anti, tokenizer = distill_models
    distill = DistillConfig(num_samples=num_samples, **{**DISTILL, **settings})
    return DistilledDetoxDataset.build(base, anti, tokenizer, distill=distill, output_dir=out, seed=seed,
                                       show_progress=False)


class FirstBatchSampled(Exception):
    pass


def test_a_huge_build_plans_its_batches_lazily(tmp_path, distill_models, monkeypatch):
    """The batch list is not made up front: the first batch is sampled before the other shards are looked up,
    so a build of any size starts at once (the old plan listed and checked every batch first)."""
    looked_up = []
    read_shard = dataset_module.read_shard
    monkeypatch.setattr(dataset_module, "read_shard", lambda path, *a: looked_up.append(path) or read_shard(path, *a))

    def sample_batch(*args, **kwargs):
        raise FirstBatchSampled

    monkeypatch.setattr(dataset_module, "sample_batch", sample_batch)
    for num_samples in (10_000, 10**12):
        with pytest.raises(FirstBatchSampled):
            build(distill_models, tmp_path / str(num_samples), num_samples=num_samples, batch_size=1)
        assert len(looked_up) == 1
        looked_up.clear()


def test_lazy_planning_keeps_the_texts(tmp_path, distill_models):
    """An odd last batch: the merged texts are exactly num_samples, the same in memory and resumed from shards."""
    in_memory = DistilledDetoxDataset.build(*distill_models, distill=DistillConfig(num_samples=7, **{**DISTILL, "batch_size": 3}),
                                            show_progress=False)
    out = tmp_path / "d"
    build(distill_models, out, num_samples=7, batch_size=3)
    (out / "metadata.json").unlink()
    (out / "shards" / "batch-000001.json").unlink()
    assert build(distill_models, out, num_samples=7, batch_size=3).texts == in_memory.texts
    assert len(in_memory) == 7


def test_a_shard_copied_over_another_is_refused_naming_it(tmp_path, distill_models):
    out = tmp_path / "d"
    build(distill_models, out)
    shards = out / SHARDS_DIR
    copied = shards / "batch-000006.json"
    copied.write_text((shards / "batch-000000.json").read_text())
    (out / "metadata.json").unlink()  # the next build merges the shards again
    with pytest.raises(ValueError, match=rf"{copied} holds batch 0 .*not batch 6 .*Delete it"):
        build(distill_models, out)
    copied.unlink()
    assert build(distill_models, out).texts == build(distill_models, tmp_path / "fresh").texts


def test_a_shard_of_another_seed_is_refused(tmp_path, distill_models):
    build(distill_models, tmp_path / "a", seed=1)
    out = tmp_path / "b"
    build(distill_models, out)
    (out / "metadata.json").unlink()
    victim = out / SHARDS_DIR / "batch-000003.json"
    victim.write_text((tmp_path / "a" / SHARDS_DIR / "batch-000003.json").read_text())
    with pytest.raises(ValueError, match=rf"{victim} holds batch 3 \(seed \d+\), not batch 3"):
        build(distill_models, out)


def test_a_truncated_metadata_file_is_named(tmp_path, distill_models):
    out = tmp_path / "d"
    build(distill_models, out, num_samples=4)
    meta = out / METADATA_FILE
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{meta} is not valid JSON \(line \d+, column \d+.*Delete it and rerun"):
        build(distill_models, out, num_samples=4)
    with pytest.raises(ValueError, match=rf"{meta} is not valid JSON"):
        DistilledDetoxDataset.load(out)
    meta.unlink()
    assert len(build(distill_models, out, num_samples=4)) == 4


def test_an_empty_shard_config_is_named(tmp_path, distill_models):
    out = tmp_path / "d"
    build(distill_models, out, num_samples=4)
    (out / METADATA_FILE).unlink()
    config = out / SHARDS_DIR / SHARD_CONFIG_FILE
    config.write_text("")
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON \(it is empty\).*overwrite=True"):
        build(distill_models, out, num_samples=4)
    assert len(build(distill_models, out, num_samples=4, overwrite=True)) == 4


# ---- bad prompt files and model cards --------------------------------------------------------------------------
def test_a_corrupt_jsonl_prompt_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the cat"}\n\n{"prompt": "a good\n{"prompt": "music"}\n')
    with pytest.raises(ValueError, match=rf"{path}, line 3 is not valid JSON"):
        read_prompt_file(path)


def test_a_corrupt_json_prompt_file_names_the_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('[{"prompt": "the cat"},\n {"prompt": ')
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON \(line 2, column"):
        read_prompt_file(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_a_latin1_prompt_file_names_the_file_and_line(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    lines = {".txt": ["the cat", "a good friend", "caf\u00e9 au lait"],
             ".jsonl": ['{"prompt": "the cat"}', '{"prompt": "a good friend"}', '{"prompt": "caf\u00e9"}'],
             ".csv": ["prompt", "the cat", "caf\u00e9"]}[suffix]
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    line = len(lines)
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text \(line {line}: .*iconv"):
        read_prompt_file(path)


def test_a_latin1_fewshot_prompt_file_is_named(tmp_path):
    (tmp_path / "hate_women_1k.txt").write_bytes("- good\\n- caf\u00e9\\n-\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'hate_women_1k.txt'} is not UTF-8 text \(line 1"):
        read_toxigen_fewshot(tmp_path)


def card_report(models):
    return {
        "models": {str(m): {"name_or_path": str(m), "decoding": {"method": "sampling"},
                            "toxicity_probability": {"mean": 0.25}, "expected_max_toxicity": {"mean": 0.5}}
                   for m in models},
        "prompts": {"source": "toxigen_local", "split": "test"}, "perplexity": {}, "mmlu": {},
    }


def test_a_malformed_model_card_is_reported_and_the_other_cards_are_written(tmp_path, caplog):
    models = [tmp_path / name for name in ("a", "b", "c")]
    for model in models:
        model.mkdir()
        (model / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n{CARD_MARKER}\n# A model\n")
    broken = models[1] / "README.md"
    broken.write_text(f"---\nlicense: [apache-2.0\ntags: {{\n---\n{CARD_MARKER}\n# A broken header\n")
    with caplog.at_level(logging.WARNING, logger="unidetox.evaluation.model_card"):
        updated = update_model_cards(card_report(models))
    assert updated == [models[0] / "README.md", models[2] / "README.md"]
    assert all("expected_max_toxicity" in (m / "README.md").read_text() for m in (models[0], models[2]))
    assert broken.read_text().endswith("# A broken header\n") and "model-index" not in broken.read_text()
    assert any(str(broken) in r.getMessage() and "not valid YAML" in r.getMessage() for r in caplog.records)
