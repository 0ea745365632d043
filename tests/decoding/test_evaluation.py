import pytest
import torch
from tiny import tiny_gpt2, tiny_llama, word_tokenizer
from transformers import LogitsProcessor, PreTrainedTokenizerFast

from unidetox import ContrastiveDetoxSampler
from unidetox.decoding.protocol import (
    ToxicityEvalConfig,
    batch_seed,
    cut_continuations,
    generate_continuations,
    generate_samples,
    group_by_prompt,
    plan_batches,
    sampling_generation_config,
)

PROMPTS = ["the cat sat on", "a good friend helps people in need", "hate", "science helps us"]


def test_shapes_and_determinism(model, tokenizer):
    a = generate_continuations(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=5, seed=7, batch_size=5)
    b = generate_continuations(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=5, seed=7, batch_size=5)
    c = generate_continuations(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=5, seed=8, batch_size=5)
    assert len(a) == len(PROMPTS) and all(len(x) == 3 for x in a)
    assert a == b
    assert a != c


def test_sharded_batches_equal_single_process(model, tokenizer):
    kwargs = dict(num_samples=3, max_new_tokens=6, seed=3, batch_size=4)
    full = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    shards = [generate_samples(model, tokenizer, PROMPTS, process_index=r, num_processes=3, **kwargs) for r in range(3)]
    merged = sorted((s for shard in shards for s in shard), key=lambda s: (s.prompt_index, s.sample_index))
    assert [s.to_dict() for s in merged] == [s.to_dict() for s in sorted(full, key=lambda s: (s.prompt_index, s.sample_index))]
    assert {s.batch_index for s in shards[1]} == {1}


def test_continuation_is_the_generated_ids_with_left_padding(tokenizer):
    """Prompts of different lengths in one batch: each continuation equals what the row generates alone (greedy
    reference with correct positions), so the cut is by tokens and left padding is handled."""
    model = tiny_gpt2(len(tokenizer), seed=0)  # absolute positions: wrong position ids would change outputs
    prompts = ["the cat sat on the mat near the door", "hate"]
    samples = generate_samples(model, tokenizer, prompts, num_samples=1, max_new_tokens=4, top_p=1e-6, batch_size=2)
    for sample, prompt in zip(sorted(samples, key=lambda s: s.prompt_index), prompts, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=4, pad_token_id=0, eos_token_id=None)
        expected = out[0, ids.shape[1] :].tolist()
        assert sample.token_ids == expected
        assert sample.continuation == tokenizer.decode(expected, skip_special_tokens=True)
        assert prompt not in sample.continuation or prompt == "hate"


def test_cut_at_first_eos(tokenizer):
    ids = torch.tensor([[5, 6, 2, 7, 0], [2, 5, 5, 5, 5], [5, 6, 7, 8, 9]])
    out = cut_continuations(ids, tokenizer, {2})
    assert [n for _, _, n in out] == [2, 0, 5]
    assert out[1][0] == ""
    assert out[0][1] == [5, 6]


def test_generation_config_pins_protocol(model, tokenizer):
    model.generation_config.top_k = 64
    model.generation_config.repetition_penalty = 1.3
    try:
        config = sampling_generation_config(model, tokenizer, 20, 0.9, 1.0)
        merged, _ = model._prepare_generation_config(config)
        assert merged.top_k == 0 and merged.repetition_penalty == 1.0 and merged.top_p == 0.9
        assert merged.do_sample
    finally:
        model.generation_config.top_k = None
        model.generation_config.repetition_penalty = None


def test_sampler_factory_called_once_per_batch(model, tokenizer):
    anti = tiny_llama(len(tokenizer), seed=1)
    made = []

    def factory(mask):
        sampler = ContrastiveDetoxSampler(anti, alpha=0.1, attention_mask=mask)
        made.append(sampler)
        return sampler

    out = generate_continuations(model, tokenizer, PROMPTS, 2, max_new_tokens=4, batch_size=3, sampler_factory=factory)
    assert len(made) == len(plan_batches(len(PROMPTS), 2, 3)) == 3
    plain = generate_continuations(model, tokenizer, PROMPTS, 2, max_new_tokens=4, batch_size=3)
    assert out != plain


def test_sampler_restricts_to_its_tokens(model, tokenizer):
    allowed = tokenizer.convert_tokens_to_ids(["cat", "mat"])

    class Only(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, -float("inf"))
            out[:, allowed] = scores[:, allowed]
            return out

    conts = generate_continuations(model, tokenizer, PROMPTS, 2, max_new_tokens=3, sampler_factory=lambda m: Only())
    assert all(set(c.split()) <= {"cat", "mat"} and c for row in conts for c in row)


def test_plan_batches_and_seeds():
    batches = plan_batches(3, 2, 4)
    assert batches == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1)]]
    assert batch_seed(0, 1) != batch_seed(1, 0) and batch_seed(0, 1) == batch_seed(0, 1)


def test_group_by_prompt_detects_missing(model, tokenizer):
    samples = generate_samples(model, tokenizer, PROMPTS, 2, max_new_tokens=2, batch_size=2, process_index=0, num_processes=2)
    with pytest.raises(RuntimeError, match="missing"):
        group_by_prompt(samples, len(PROMPTS), 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_samples": 0}, "num_samples"), ({"top_p": 0.0}, "top_p"), ({"temperature": 0}, "temperature")],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToxicityEvalConfig(**kwargs)


def test_rejects_single_string(model, tokenizer):
    with pytest.raises(TypeError, match="list of prompts"):
        generate_continuations(model, tokenizer, "the cat", 2)


class AttributeOnlyPadding(PreTrainedTokenizerFast):
    """Pads on ``self.padding_side`` whatever the call asks, as remote-code tokenizers that predate the
    ``padding_side`` argument do."""

    def __call__(self, *args, padding_side=None, **kwargs):
        return super().__call__(*args, **kwargs)


class AlwaysRightPadding(PreTrainedTokenizerFast):
    """Pads on the right whatever it is told."""

    def __call__(self, *args, padding_side=None, **kwargs):
        return super().__call__(*args, padding_side="right", **kwargs)


def rebuilt(cls, padding_side):
    base = word_tokenizer()
    return cls(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
               unk_token="<unk>", padding_side=padding_side)


@pytest.mark.parametrize("make", [lambda: word_tokenizer(padding_side="right"),
                                  lambda: rebuilt(AttributeOnlyPadding, "right")])
def test_right_padding_tokenizer_samples_like_a_left_padding_one(model, make):
    kwargs = dict(num_samples=2, max_new_tokens=5, seed=11, batch_size=3)
    expected = generate_samples(model, word_tokenizer(padding_side="left"), PROMPTS, **kwargs)
    right = make()
    samples = generate_samples(model, right, PROMPTS, **kwargs)
    assert [s.to_dict() for s in samples] == [s.to_dict() for s in expected]
    assert right.padding_side == "right"  # the caller's tokenizer is left as it was


def test_tokenizer_that_cannot_pad_left_raises(model):
    tokenizer = rebuilt(AlwaysRightPadding, "right")
    with pytest.raises(ValueError, match="right-padded"):
        generate_samples(model, tokenizer, PROMPTS, num_samples=1, max_new_tokens=2, batch_size=4)
    assert tokenizer.padding_side == "right"
