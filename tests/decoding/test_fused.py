import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_gemma3, tiny_llama
from transformers import LogitsProcessorList

from unidetox import ContrastiveDetoxSampler
from unidetox.decoding.config import GenerateOptions, SamplingConfig
from unidetox.decoding.fused import (
    contrastive_generate,
    fused_contrastive_generate,
    is_lora_anti_expert,
    resolve_models,
)

VOCAB = 64
PROMPTS = ["the cat sat on", "a good", "science helps us understand the", "music"]


def lora_pair(make=tiny_llama, target_modules="all-linear", seed=0):
    """(plain base, peft model = base + random LoRA adapter as the anti-expert)."""
    base = make(VOCAB, seed=seed)
    torch.manual_seed(123)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=target_modules, init_lora_weights=False, lora_dropout=0.0)
    lora = get_peft_model(copy.deepcopy(base), config).eval()
    return base, lora


def configs(**kwargs):
    """generate()-style keyword arguments as the (SamplingConfig, GenerateOptions) the decoding functions take."""
    sampling = {key: kwargs.pop(key) for key in ("alpha", "beta", "temperature", "top_k", "top_p") if key in kwargs}
    return SamplingConfig(**sampling), GenerateOptions(**kwargs)


def two_model(base, anti, inputs, **kwargs):
    sampler = ContrastiveDetoxSampler(anti, alpha=kwargs.pop("alpha", 0.1), attention_mask=inputs["attention_mask"])
    return base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), return_dict_in_generate=True,
                         output_scores=True, **kwargs)


def assert_same_scores(fused_scores, ref_scores):
    assert len(fused_scores) == len(ref_scores)
    for f, r in zip(fused_scores, ref_scores, strict=True):
        assert torch.equal(torch.isfinite(f), torch.isfinite(r))
        finite = torch.isfinite(r)
        torch.testing.assert_close(f[finite], r[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_fused_greedy_scores_equal_two_model_sampler(make, tokenizer):
    base, lora = lora_pair(make)
    assert is_lora_anti_expert(lora)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = two_model(base, lora, inputs, **kwargs)
    fused = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                       *configs(output_scores=True, eos_token_id=[],
                                                **{k: v for k, v in kwargs.items() if k != "eos_token_id"}))
    assert torch.equal(fused.sequences, ref.sequences)
    assert_same_scores(fused.scores, ref.scores)


def test_fused_sampling_same_seed_same_tokens(tokenizer):
    base, lora = lora_pair()
    inputs = tokenizer(PROMPTS * 3, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=16, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
    torch.manual_seed(7)
    ref = two_model(base, lora, inputs, eos_token_id=None, **kwargs)
    torch.manual_seed(7)
    fused = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                       *configs(output_scores=True, eos_token_id=[], **kwargs))
    assert torch.equal(fused.sequences, ref.sequences)
    assert_same_scores(fused.scores, ref.scores)
    prompt_len = inputs["input_ids"].shape[1]
    assert len({tuple(row.tolist()) for row in fused.sequences[:, prompt_len:]}) > 1, "samples should differ"


def test_fused_with_eos_and_warpers_matches_generate(tokenizer):
    base, lora = lora_pair()
    inputs = tokenizer(PROMPTS * 2, return_tensors="pt", padding=True)
    # pick an EOS that the contrastive scores actually emit, so rows finish at different steps
    probe = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                       *configs(max_new_tokens=6, do_sample=False, eos_token_id=[], pad_token_id=0))
    eos = int(probe.sequences[0, inputs["input_ids"].shape[1] + 2])
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, pad_token_id=0,
                  eos_token_id=eos, alpha=0.05)
    torch.manual_seed(3)
    ref = two_model(base, lora, inputs, **kwargs)
    torch.manual_seed(3)
    fused = contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                 *configs(output_scores=True, **kwargs))
    assert torch.equal(fused.sequences, ref.sequences)
    assert (fused.sequences == eos).any()


def test_min_new_tokens_suppresses_eos_like_generate(tokenizer):
    base, lora = lora_pair()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    probe = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                       *configs(max_new_tokens=3, do_sample=False, eos_token_id=[], pad_token_id=0))
    eos = int(probe.sequences[0, -3])  # the first greedy token of row 0 becomes EOS
    kwargs = dict(max_new_tokens=6, min_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=eos)
    ref = two_model(base, lora, inputs, **kwargs)
    fused = contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"], *configs(**kwargs))
    assert torch.equal(fused.sequences, ref.sequences)
    assert fused.sequences[0, inputs["input_ids"].shape[1]] != eos


def test_general_lora_path_via_peft_adapter_names(tokenizer):
    """LoRA on the embedding layer cannot use the slicing hooks; peft's mixed-batch inference is used instead."""
    base, lora = lora_pair(target_modules=["embed_tokens", "q_proj", "v_proj"])
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = two_model(base, lora, inputs, eos_token_id=None, **kwargs)
    fused = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                       *configs(output_scores=True, eos_token_id=[], **kwargs))
    assert torch.equal(fused.sequences, ref.sequences)
    assert_same_scores(fused.scores, ref.scores)


def test_adapter_state_is_restored(tokenizer):
    _, lora = lora_pair()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    before = lora(**inputs).logits
    fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"], *configs(max_new_tokens=3))
    after = lora(**inputs).logits
    assert torch.equal(before, after), "the adapter must be active again and no hook left behind"
    assert all(not m._forward_hooks for m in lora.modules())


def test_contrastive_generate_dispatch_errors(tokenizer):
    base, lora = lora_pair()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="anti_expert"):
        contrastive_generate(base, inputs["input_ids"], inputs["attention_mask"])
    _, lora_on_other_weights = lora_pair(seed=5)
    with pytest.raises(ValueError, match="fused=True"):
        contrastive_generate(base, inputs["input_ids"], inputs["attention_mask"],
                             anti_expert=lora_on_other_weights, fused=True)
    with pytest.raises(ValueError, match="alpha"):
        contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"], *configs(alpha=2.0))


def test_adapter_on_the_base_itself_is_contrasted_with_the_base_without_it(tokenizer):
    """``anti_expert`` may be a peft model injected into ``base`` itself: the base side runs adapter-free."""
    base, reference = lora_pair()
    reference_base = copy.deepcopy(base)
    torch.manual_seed(123)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                        lora_dropout=0.0)
    on_base = get_peft_model(base, config).eval()  # the adapter weights of `reference`, injected into base
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = two_model(reference_base, copy.deepcopy(reference).merge_and_unload(), inputs, **kwargs)
    for fused in (None, False):
        got = contrastive_generate(base, inputs["input_ids"], inputs["attention_mask"], *configs(**kwargs),
                                   anti_expert=on_base, fused=fused)
        assert torch.equal(got.sequences, expected.sequences), fused


def test_fused_false_runs_a_lora_model_as_two_models(tokenizer):
    base, lora = lora_pair()
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    fused = contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"], *configs(**kwargs))
    separate = contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"], *configs(**kwargs),
                                    fused=False)
    assert torch.equal(fused.sequences, separate.sequences)
    assert torch.equal(fused.sequences, two_model(base, lora, inputs, **kwargs).sequences)


def test_one_dispatch_decides_fused_or_two_models(tokenizer):
    base, lora = lora_pair()
    _, lora_on_other_weights = lora_pair(seed=5)
    assert resolve_models(base, lora).decoding == "fused-lora"  # a copy of base with the same weights
    assert resolve_models(lora, None).decoding == "fused-lora"
    assert resolve_models(base, lora, fused=False).decoding == "two-model"
    assert resolve_models(base, lora_on_other_weights).decoding == "two-model"
    assert resolve_models(base, tiny_llama(VOCAB, seed=9)).decoding == "two-model"
    with pytest.raises(ValueError, match="the base model itself"):
        resolve_models(base, base)


def repeated_prompts(tokenizer, prompts, num_samples):
    """K rows per prompt, prompt-major, as the toxicity protocol lays out K samples of each prompt."""
    return tokenizer([p for p in prompts for _ in range(num_samples)], return_tensors="pt", padding=True)


def record_forward_shapes(model):
    """The ``input_ids`` shape of every forward of the plain model under ``model``'s adapter layers."""
    shapes = []
    handle = model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, handle


# A prompt longer than the tiny gemma3's sliding window (8), so copying the cache covers its sliding layers.
LONG_PROMPTS = PROMPTS + ["the weather is nice today and the sun is bright and the cat sat on the mat"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefill_samples_equal_unshared_fused_and_two_model_paths(make, tokenizer, seed):
    base, lora = lora_pair(make)
    inputs = repeated_prompts(tokenizer, LONG_PROMPTS, num_samples=3)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0, top_p=0.9, temperature=1.0, pad_token_id=0)
    runs = {}
    for share in (True, False):
        torch.manual_seed(seed)
        runs[share] = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                                 *configs(output_scores=True, eos_token_id=[], **kwargs),
                                                 share_prefill=share)
    torch.manual_seed(seed)
    ref = two_model(base, lora, inputs, eos_token_id=None, **kwargs)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    assert torch.equal(runs[True].sequences, ref.sequences)
    assert_same_scores(runs[True].scores, runs[False].scores)
    assert_same_scores(runs[True].scores, ref.scores)
    new_tokens = runs[True].sequences[:, inputs["input_ids"].shape[1]:]
    assert len({tuple(row.tolist()) for row in new_tokens}) > len(LONG_PROMPTS), "samples of a prompt should differ"


@pytest.mark.parametrize("target_modules", ["all-linear", ["embed_tokens", "q_proj", "v_proj"]],
                         ids=["linear-hooks", "peft-adapter-names"])
def test_each_distinct_prompt_is_prefilled_once_in_both_halves(tokenizer, target_modules):
    _, lora = lora_pair(target_modules=target_modules)
    inputs = repeated_prompts(tokenizer, PROMPTS, num_samples=4)
    rows, width = inputs["input_ids"].shape
    runs = {}
    for share in (True, False):
        shapes, handle = record_forward_shapes(lora)
        try:
            torch.manual_seed(0)
            runs[share] = fused_contrastive_generate(lora, inputs["input_ids"], inputs["attention_mask"],
                                                     *configs(max_new_tokens=4, eos_token_id=[], pad_token_id=0),
                                                     share_prefill=share).sequences
        finally:
            handle.remove()
        expected_prefill = (2 * len(PROMPTS), width) if share else (2 * rows, width)
        assert shapes == [expected_prefill] + [(2 * rows, 1)] * 3
    assert torch.equal(runs[True], runs[False])
