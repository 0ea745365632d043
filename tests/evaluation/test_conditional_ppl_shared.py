"""Conditional NLL with each prompt run once and its KV cache shared by its samples equals the unshared scoring."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import char_tokenizer, tiny_gemma3, tiny_llama, word_tokenizer
from unidetox.evaluation import likelihood
from unidetox.evaluation.likelihood import conditional_nll

# Prompts of 1 to 40 characters and 1 to 11 words: longer than the tiny gemma3's sliding window (8 tokens) under
# either tokenizer, and an empty prompt (only BOS, or no prompt token at all under the BOS-less char tokenizer).
PROMPTS = ["the cat sat on the mat near the door and", "hate", "", "a good friend helps people in need"]
CONTINUATIONS = [
    [" the sun is bright", "", " kill", " we should treat everyone with respect and kindness", " the"],
    [" awful stupid ugly", " is", "", " music and art bring joy", " people"],
    ["science helps us", "the", " reading books is a great way", "", " cat"],
    [" and", " the weather is nice today", "", " a", " every country deserve dignity"],
]

MODELS = {
    "llama_words": (lambda: word_tokenizer(), lambda n: tiny_llama(n, seed=1)),
    "gemma3_words": (lambda: word_tokenizer(), lambda n: tiny_gemma3(n, seed=1)),
    "gemma3_chars": (lambda: char_tokenizer(), lambda n: tiny_gemma3(n, seed=1, final_logit_softcapping=3.0)),
    "llama_chars": (lambda: char_tokenizer(), lambda n: tiny_llama(n, seed=1)),
}


def tiny(name):
    make_tokenizer, make_model = MODELS[name]
    tokenizer = make_tokenizer()
    return make_model(len(tokenizer)), tokenizer


def assert_same(shared, unshared):
    assert [n for _, n in shared] == [n for _, n in unshared]
    assert [x for x, _ in shared] == pytest.approx([x for x, _ in unshared], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_shared_prompts_match_unshared_scoring(name, batch_size):
    model, tokenizer = tiny(name)
    shared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=batch_size)
    unshared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=batch_size,
                               share_prompts=False)
    assert_same(shared, unshared)
    assert all(n == 0 for (_, n), cont in zip(shared, sum(CONTINUATIONS, []), strict=True) if cont == "")
    assert sum(n > 0 for _, n in shared) >= 15


@pytest.mark.parametrize("name", ["llama_chars", "gemma3_chars"])
def test_shared_prompts_match_when_sequences_lose_prompt_tokens(name):
    model, tokenizer = tiny(name)  # samples of one prompt lose different numbers of its tokens
    shared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=5, max_length=24)
    unshared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=5, max_length=24,
                               share_prompts=False)
    assert_same(shared, unshared)


@pytest.mark.parametrize("name", ["llama_words", "gemma3_chars"])
def test_each_prompt_runs_once_per_batch(name):
    model, tokenizer = tiny(name)
    decoder = likelihood._lm_head_split(model)[0]
    calls = []
    decoder.register_forward_hook(lambda _m, _args, kwargs, _out: calls.append(kwargs["input_ids"].shape),
                                  with_kwargs=True)
    conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=64)
    prefill, continuations = calls
    scored_prompts = sum(any(c for c in conts) for conts in CONTINUATIONS)
    # One prefill row per distinct prompt (as tokens: a prompt's last token may start its continuation's word
    # under the char tokenizer); one scoring row per non-empty continuation, as wide as the longest one.
    assert scored_prompts <= prefill[0] <= scored_prompts + 3
    assert continuations[0] == sum(bool(c) for c in sum(CONTINUATIONS, []))
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in sum(CONTINUATIONS, []))
    assert continuations[1] <= longest + 1


def test_lora_model_shares_prompts_with_its_adapters():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny("llama_words")
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    assert likelihood._shares_prefixes(model, likelihood._lm_head_split(model))
    shared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=6)
    unshared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=6, share_prompts=False)
    assert_same(shared, unshared)
    with model.disable_adapter():
        plain = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, batch_size=6)
    assert [x for x, _ in shared] != pytest.approx([x for x, _ in plain], rel=1e-3)


def test_models_without_a_known_decoder_score_each_sequence(monkeypatch):
    model, tokenizer = tiny("llama_words")
    monkeypatch.setattr(likelihood, "_shared_prefix_nll", None)  # would raise if called
    shared = conditional_nll(model, tokenizer, PROMPTS, CONTINUATIONS, chunked_head=False)
    assert sum(n > 0 for _, n in shared) >= 15


@pytest.mark.slow
def test_shared_prompts_match_on_smollm2():
    from unidetox import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=torch.float32)
    prompts = ["The weather in Paris is", "Many people believe that immigrants", "Why do"]
    continuations = [[" nice today.", " cold and rainy in the winter months", ""],
                     [" are a burden", " work hard and contribute to society.", " bring"],
                     [" cats purr?", " we", " people always say that the sky is blue?"]]
    shared = conditional_nll(model, tokenizer, prompts, continuations, batch_size=4)
    unshared = conditional_nll(model, tokenizer, prompts, continuations, batch_size=4, share_prompts=False)
    assert_same(shared, unshared)
    assert sum(n > 0 for _, n in shared) == 8
