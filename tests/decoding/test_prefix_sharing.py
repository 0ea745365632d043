"""Prefix-shared sampling: each distinct prompt of a batch is prefilled once and its KV cache copied to its rows.
Length bucketing: prompts of similar token length share batches, with a plan every process computes alike.

The shared layout keeps the batches, seeds and random stream of the row-per-sample layout (``share_prefill=False``),
so the only difference is the floating-point rounding of a prefill computed over fewer rows and without the last
prompt token (which ``generate`` then runs on the cache). On these tiny float32 models that rounding never moves a
sample, so the two layouts are compared token for token.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_gemma3, tiny_gpt2, tiny_llama

from unidetox import ContrastiveDetoxSampler
from unidetox.decoding.protocol import (
    ToxicityEvalConfig,
    count_padding_tokens,
    generate_samples,
    left_padded_batch,
    plan_batches,
    prefill_shared_prompts,
    prompt_token_lengths,
)

# Different lengths (left padding), a prompt longer than the gemma3 sliding window (8), a repeated prompt text,
# and an empty prompt (BOS only).
PROMPTS = [
    "the cat sat on",
    "a good friend helps people in need",
    "hate",
    "the weather is nice today and the sun is bright and the cat sat on the mat near the door",
    "science helps us",
    "hate",
    "",
]
MAKERS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model(request, tokenizer):
    return MAKERS[request.param](len(tokenizer), seed=0)


def as_dicts(samples):
    return [s.to_dict() for s in samples]


def forward_shapes(model):
    """Record the (rows, length) of every forward of ``model``; returns the list and the hook handle."""
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, handle


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch_size", [3, 8, 64])
def test_shared_prefill_samples_equal_row_per_sample_layout(model, tokenizer, seed, batch_size):
    """Batch sizes 3 and 8 split a prompt's 5 samples over two batches; 64 puts every prompt in one batch."""
    kwargs = dict(num_samples=5, max_new_tokens=8, seed=seed, batch_size=batch_size)
    expected = generate_samples(model, tokenizer, PROMPTS, share_prefill=False, **kwargs)
    shared = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    assert as_dicts(shared) == as_dicts(expected)
    assert len({tuple(s.token_ids) for s in shared}) > len(PROMPTS)  # samples of one prompt differ


def test_each_distinct_prompt_is_prefilled_once(tokenizer):
    model = tiny_llama(len(tokenizer), seed=0)
    batches = plan_batches(len(PROMPTS), 5, 8)
    shapes, handle = forward_shapes(model)
    try:
        generate_samples(model, tokenizer, PROMPTS, num_samples=5, max_new_tokens=3, batch_size=8)
    finally:
        handle.remove()
    widths = [left_padded_batch(tokenizer, [PROMPTS[p] for p, _ in rows])["input_ids"].shape[1] for rows in batches]
    # per batch: one prefill of its distinct prompt texts without their last token, then one token per step
    # (a batch of one-token prompts has nothing to prefill)
    expected = []
    for rows, width in zip(batches, widths, strict=True):
        distinct = len({PROMPTS[p] for p, _ in rows})
        expected += ([(distinct, width - 1)] if width > 1 else []) + [(len(rows), 1)] * 3
    assert widths[-1] == 1 and min(widths[:-1]) > 1
    assert shapes == expected


def test_shared_prefill_sharded_equals_one_process(tokenizer):
    model = tiny_gemma3(len(tokenizer), seed=0)
    kwargs = dict(num_samples=5, max_new_tokens=6, seed=4, batch_size=6)
    full = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    shards = [generate_samples(model, tokenizer, PROMPTS, process_index=r, num_processes=2, **kwargs) for r in range(2)]
    assert {s.batch_index % 2 for s in shards[1]} == {1}
    key = lambda s: (s.prompt_index, s.sample_index)  # noqa: E731
    assert as_dicts(sorted(shards[0] + shards[1], key=key)) == as_dicts(sorted(full, key=key))
    assert as_dicts(full) == as_dicts(generate_samples(model, tokenizer, PROMPTS, share_prefill=False, **kwargs))


def test_lora_peft_model_samples_equal_row_per_sample_layout(tokenizer):
    """The validation callback samples a PEFT model during LoRA training: its prefill goes through the adapter."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(len(tokenizer), seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                      init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    kwargs = dict(num_samples=4, max_new_tokens=6, seed=5, batch_size=6)
    shared = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    assert as_dicts(shared) == as_dicts(generate_samples(model, tokenizer, PROMPTS, share_prefill=False, **kwargs))
    with model.disable_adapter():
        plain = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    assert as_dicts(shared) != as_dicts(plain)


def test_contrastive_sampler_factory_samples_equal_row_per_sample_layout(tokenizer):
    base, anti = tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), seed=1)
    shapes, handle = forward_shapes(anti)
    try:
        runs = [
            generate_samples(base, tokenizer, PROMPTS, num_samples=4, max_new_tokens=6, seed=seed, batch_size=10,
                             sampler_factory=lambda mask: ContrastiveDetoxSampler(anti, alpha=0.1, attention_mask=mask),
                             share_prefill=share)
            for seed in (0, 1) for share in (False, True)
        ]
    finally:
        handle.remove()
    assert as_dicts(runs[1]) == as_dicts(runs[0]) and as_dicts(runs[3]) == as_dicts(runs[2])
    assert as_dicts(runs[0]) != as_dicts(runs[2])
    # the anti-expert prefills each distinct prompt of a batch once too
    prefills = [rows for rows, length in shapes if length > 1]
    distinct = [len({PROMPTS[p] for p, _ in rows}) for rows in plan_batches(len(PROMPTS), 4, 10)]
    assert prefills == distinct * 4


def test_one_token_prompts_have_nothing_to_share(model, tokenizer):
    enc = left_padded_batch(tokenizer, ["", ""])
    assert enc["input_ids"].shape[1] == 1
    assert prefill_shared_prompts(model, enc["input_ids"], enc["attention_mask"], torch.tensor([0, 0, 1])) is None
    kwargs = dict(num_samples=3, max_new_tokens=5, seed=0, batch_size=4)
    assert as_dicts(generate_samples(model, tokenizer, ["", ""], **kwargs)) == as_dicts(
        generate_samples(model, tokenizer, ["", ""], share_prefill=False, **kwargs)
    )


def test_model_asking_for_its_own_cache_samples_without_sharing(tokenizer):
    """generate() refuses a given cache when the generation config names a cache implementation."""
    model = tiny_llama(len(tokenizer), seed=0)
    model.generation_config.cache_implementation = "dynamic"
    enc = left_padded_batch(tokenizer, PROMPTS[:2])
    assert prefill_shared_prompts(model, enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 1])) is None
    kwargs = dict(num_samples=3, max_new_tokens=5, seed=0, batch_size=4)
    assert as_dicts(generate_samples(model, tokenizer, PROMPTS, **kwargs)) == as_dicts(
        generate_samples(model, tokenizer, PROMPTS, share_prefill=False, **kwargs)
    )


def test_prefilled_cache_continues_each_row_like_its_own_prefill(model, tokenizer):
    """The next-token logits of the rows' last prompt token on the shared cache equal a full prefill's."""
    texts = PROMPTS[:4]
    enc = left_padded_batch(tokenizer, texts)
    rows = torch.tensor([2, 0, 0, 3, 1, 2])
    ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = prefill_shared_prompts(model, enc["input_ids"], enc["attention_mask"], rows)
        assert cache.get_seq_length() == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], cache=cache).logits
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def sample_key(sample):
    return sample.prompt_index, sample.sample_index


@pytest.mark.parametrize("batch_size", [4, 7])
def test_bucketed_samples_in_prompt_order_and_the_same_for_any_process_split(model, tokenizer, batch_size):
    kwargs = dict(num_samples=3, max_new_tokens=6, seed=2, batch_size=batch_size, bucket_by_length=True)
    full = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    assert [sample_key(s) for s in full] == [(p, s) for p in range(len(PROMPTS)) for s in range(3)]
    # the batches are the bucketed plan's, not the prompt-major one's
    plan = plan_batches(len(PROMPTS), 3, batch_size, prompt_lengths=prompt_token_lengths(tokenizer, PROMPTS))
    assert plan != plan_batches(len(PROMPTS), 3, batch_size)
    batch_of = {row: b for b, rows in enumerate(plan) for row in rows}
    assert [s.batch_index for s in full] == [batch_of[sample_key(s)] for s in full]
    for num_processes in (2, 3):
        shards = [generate_samples(model, tokenizer, PROMPTS, process_index=r, num_processes=num_processes, **kwargs)
                  for r in range(num_processes)]
        assert all(shard == sorted(shard, key=sample_key) for shard in shards)
        gathered = sorted((s for shard in shards for s in shard), key=sample_key)
        assert as_dicts(gathered) == as_dicts(full)
    assert as_dicts(full) == as_dicts(generate_samples(model, tokenizer, PROMPTS, share_prefill=False, **kwargs))


def test_bucketing_cuts_the_left_padding_of_mixed_length_prompts(tokenizer):
    lengths = prompt_token_lengths(tokenizer, PROMPTS)
    assert lengths == [len(left_padded_batch(tokenizer, [p])["input_ids"][0]) for p in PROMPTS]
    for batch_size in (3, 8, 12):  # each splits or mixes prompts (5 would hold one prompt per batch)
        plain = plan_batches(len(PROMPTS), 5, batch_size)
        bucketed = plan_batches(len(PROMPTS), 5, batch_size, prompt_lengths=lengths)
        assert sorted(row for rows in bucketed for row in rows) == sorted(row for rows in plain for row in rows)
        assert [len(rows) for rows in bucketed] == [len(rows) for rows in plain]
        assert count_padding_tokens(bucketed, lengths) < count_padding_tokens(plain, lengths)
        # the pad count is what left_padded_batch actually adds
        pads = sum(int((left_padded_batch(tokenizer, [PROMPTS[p] for p, _ in rows])["attention_mask"] == 0).sum())
                   for rows in bucketed)
        assert count_padding_tokens(bucketed, lengths) == pads


def test_bucketed_plan_takes_the_longest_prompts_first_ties_in_prompt_order():
    assert plan_batches(4, 2, 3, prompt_lengths=[2, 5, 2, 7]) == [
        [(3, 0), (3, 1), (1, 0)], [(1, 1), (0, 0), (0, 1)], [(2, 0), (2, 1)]
    ]


def test_bucketing_settings_are_checked():
    with pytest.raises(ValueError, match="bucket_by_length"):
        ToxicityEvalConfig(bucket_by_length="yes")
    with pytest.raises(ValueError, match="prompt_lengths"):
        plan_batches(3, 2, 4, prompt_lengths=[1, 2])
