import math

import pytest
import torch
from tiny import tiny_gemma3, tiny_llama, word_tokenizer
from transformers import LogitsProcessorList

from unidetox import ContrastiveDetoxSampler
from unidetox.decoding.logits_process import contrastive_scores, distinct_rows

VOCAB = 64
PROMPTS = ["the cat sat on", "a good", "science helps us understand the"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(VOCAB, seed=0)


@pytest.fixture(scope="module")
def anti():
    return tiny_llama(VOCAB, seed=1)


def reference_scores(base, anti, input_ids, attention_mask, alpha, beta=None):
    """From-scratch UniDetox scores: both models on the full sequence, no cache, positions from the mask."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        lb = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1].double()
        la = anti(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1].double()
    pb, pa = lb.softmax(-1), la.softmax(-1)
    if beta is None:
        s = pb.log() - pa.log()
    else:
        s = (1 + beta) * pb.log() - beta * pa.log()
    keep = pb >= alpha * pb.max(-1, keepdim=True).values
    return torch.where(keep, s, torch.full_like(s, -math.inf))


def run_generate(base, sampler, inputs, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("do_sample", False)
    return base.generate(
        **inputs, logits_processor=LogitsProcessorList([sampler]), return_dict_in_generate=True,
        output_scores=True, pad_token_id=0, eos_token_id=None, **kwargs,
    )


def assert_scores_match(actual, expected):
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "plausible sets differ"
    torch.testing.assert_close(actual[finite].double(), expected[finite], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("beta", [None, 0.5])
def test_step_scores_and_greedy_equal_cache_free_reference(base, anti, tokenizer, beta):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    sampler = ContrastiveDetoxSampler(anti, alpha=0.1, beta=beta, attention_mask=inputs["attention_mask"])
    out = run_generate(base, sampler, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    for step, step_scores in enumerate(out.scores):
        ids = out.sequences[:, : prompt_len + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(PROMPTS), step, dtype=torch.long)], dim=1)
        assert_scores_match(step_scores, reference_scores(base, anti, ids, mask, 0.1, beta))
        # greedy on the contrastive scores picks the reference argmax
        ref = reference_scores(base, anti, ids, mask, 0.1, beta)
        assert torch.equal(out.sequences[:, prompt_len + step], ref.argmax(-1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_equals_rows_alone(arch, tokenizer):
    from tiny import tiny_gpt2

    make = tiny_llama if arch == "llama" else tiny_gpt2
    base, anti = make(VOCAB, seed=0), make(VOCAB, seed=1)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the batch must actually be padded"
    batched = run_generate(base, ContrastiveDetoxSampler(anti, attention_mask=inputs["attention_mask"]), inputs)
    prompt_len = inputs["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        single = tokenizer([prompt], return_tensors="pt")
        alone = run_generate(base, ContrastiveDetoxSampler(anti), single)
        assert torch.equal(batched.sequences[row, prompt_len:], alone.sequences[0, single["input_ids"].shape[1]:])
        for step in range(len(alone.scores)):
            assert_scores_match(batched.scores[step][row], alone.scores[step][0].double())


def test_alpha_one_is_greedy_on_base(base, anti, tokenizer):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    sampler = ContrastiveDetoxSampler(anti, alpha=1.0, attention_mask=inputs["attention_mask"])
    torch.manual_seed(0)
    sampled = base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), do_sample=True, top_k=0,
                            max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    greedy = base.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
    assert torch.equal(sampled, greedy)


def test_sampling_only_emits_plausible_tokens(base, anti, tokenizer):
    inputs = tokenizer(PROMPTS * 4, return_tensors="pt", padding=True)
    sampler = ContrastiveDetoxSampler(anti, alpha=0.3, attention_mask=inputs["attention_mask"])
    torch.manual_seed(0)
    out = base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), do_sample=True, top_k=0,
                        top_p=1.0, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    prompt_len = inputs["input_ids"].shape[1]
    distinct_choices = 0
    for step in range(10):
        ids = out[:, : prompt_len + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ids), step, dtype=torch.long)], dim=1)
        ref = reference_scores(base, anti, ids, mask, 0.3)
        chosen = out[:, prompt_len + step]
        assert torch.isfinite(ref.gather(1, chosen[:, None])).all()
        distinct_choices += int((chosen != ref.argmax(-1)).any())
    assert distinct_choices > 0, "sampling never left the argmax; the test would not detect masking bugs"


def test_scores_are_not_modified_in_place(base, anti, tokenizer):
    inputs = tokenizer(["the cat"], return_tensors="pt")
    sampler = ContrastiveDetoxSampler(anti)
    scores = base(**inputs).logits[:, -1].detach()
    before = scores.clone()
    new = sampler(inputs["input_ids"], scores)
    assert torch.equal(scores, before)
    assert new.data_ptr() != scores.data_ptr()


def test_reused_instance_raises_and_reset_recovers(base, anti, tokenizer):
    a = tokenizer(["the cat sat"], return_tensors="pt")
    b = tokenizer(["a good friend helps"], return_tensors="pt")
    sampler = ContrastiveDetoxSampler(anti)
    first = run_generate(base, sampler, a)
    with pytest.raises(ValueError, match="reset"):
        run_generate(base, sampler, b)
    sampler.reset()
    again = run_generate(base, sampler, b)
    fresh = run_generate(base, ContrastiveDetoxSampler(anti), b)
    assert torch.equal(again.sequences, fresh.sequences)
    # same length prompt, different content: still detected
    sampler.reset()
    run_generate(base, sampler, a)
    c = tokenizer(["the dog sat"], return_tensors="pt")
    with pytest.raises(ValueError, match="reset"):
        run_generate(base, sampler, c)
    assert first.sequences.shape[1] == a["input_ids"].shape[1] + 6


class StatelessReferenceSampler:
    """Recomputes the anti-expert on the full sequence each step: correct under any row reordering."""

    def __init__(self, anti, alpha, prompt_mask, num_beams):
        self.anti, self.alpha = anti, alpha
        self.prompt_mask = prompt_mask.repeat_interleave(num_beams, 0)

    def __call__(self, input_ids, scores):
        extra = input_ids.shape[1] - self.prompt_mask.shape[1]
        mask = torch.cat([self.prompt_mask, torch.ones(len(input_ids), extra, dtype=torch.long)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            anti = self.anti(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        return contrastive_scores(scores, anti, self.alpha)


def test_beam_search_reorders_the_anti_expert_cache(base, anti, tokenizer):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(num_beams=4, num_return_sequences=2, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    sampler = ContrastiveDetoxSampler(anti, alpha=0.001, attention_mask=inputs["attention_mask"])
    ours = base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), **kwargs)
    ref_sampler = StatelessReferenceSampler(anti, 0.001, inputs["attention_mask"], 4)
    ref = base.generate(**inputs, logits_processor=LogitsProcessorList([ref_sampler]), **kwargs)
    assert torch.equal(ours, ref)


def test_num_return_sequences_expands_the_prompt_mask(base, anti, tokenizer):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    sampler = ContrastiveDetoxSampler(anti, attention_mask=inputs["attention_mask"])
    torch.manual_seed(0)
    out = base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), do_sample=True, top_k=0,
                        num_return_sequences=3, max_new_tokens=5, pad_token_id=0, eos_token_id=None,
                        return_dict_in_generate=True, output_scores=True)
    mask = inputs["attention_mask"].repeat_interleave(3, 0)
    prompt_len = mask.shape[1]
    for step, step_scores in enumerate(out.scores):
        ids = out.sequences[:, : prompt_len + step]
        full = torch.cat([mask, torch.ones(len(ids), step, dtype=torch.long)], 1)
        assert_scores_match(step_scores, reference_scores(base, anti, ids, full, 0.1))


def test_rows_repeating_a_prompt_share_one_anti_expert_prefill(base, anti, tokenizer):
    """Repeated prompts in any order (K samples of a prompt): one prefill row per distinct prompt, and every
    step's scores still equal the cache-free reference of each row."""
    inputs = tokenizer([PROMPTS[i] for i in (2, 0, 2, 1, 0, 2)], return_tensors="pt", padding=True)
    sampler = ContrastiveDetoxSampler(anti, attention_mask=inputs["attention_mask"])
    prefill_rows = []
    handle = anti.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True,
    )
    try:
        torch.manual_seed(0)
        out = run_generate(base, sampler, inputs, do_sample=True, top_k=0)
    finally:
        handle.remove()
    assert prefill_rows == [3]
    prompt_len = inputs["input_ids"].shape[1]
    for step, step_scores in enumerate(out.scores):
        ids = out.sequences[:, : prompt_len + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ids), step, dtype=torch.long)], 1)
        assert_scores_match(step_scores, reference_scores(base, anti, ids, mask, 0.1))


def test_distinct_rows_tells_rows_apart_by_ids_and_mask():
    ids = torch.tensor([[0, 5], [4, 5], [0, 5], [0, 5], [4, 5]])
    mask = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1], [1, 1]])  # rows 0 and 3: same ids, different mask
    first, rows = distinct_rows(ids, mask)
    assert torch.equal(ids[first][rows], ids) and torch.equal(mask[first][rows], mask)
    assert len(first) == 3 and rows[0] == rows[2] and rows[1] == rows[4] and rows[0] != rows[3]
    assert distinct_rows(ids[:2], mask[:2]) is None


def test_anti_expert_on_other_dtype(base, tokenizer):
    anti16 = tiny_llama(VOCAB, seed=1).to(torch.bfloat16)
    anti32 = tiny_llama(VOCAB, seed=1)
    inputs = tokenizer(["the cat sat on"], return_tensors="pt")
    s16 = run_generate(base, ContrastiveDetoxSampler(anti16), inputs)
    s32 = run_generate(base, ContrastiveDetoxSampler(anti32), inputs)
    assert s16.scores[0].dtype == torch.float32
    torch.testing.assert_close(s16.scores[0], s32.scores[0], atol=0.1, rtol=0.05)


def test_gemma3_sliding_window_anti_expert_matches_reference(tokenizer):
    base = tiny_gemma3(VOCAB, seed=0)
    anti = tiny_gemma3(VOCAB, seed=1)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    sampler = ContrastiveDetoxSampler(anti, alpha=0.05, attention_mask=inputs["attention_mask"])
    out = run_generate(base, sampler, inputs, max_new_tokens=12)  # longer than the sliding window of 8
    prompt_len = inputs["input_ids"].shape[1]
    for step, step_scores in enumerate(out.scores):
        ids = out.sequences[:, : prompt_len + step]
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ids), step, dtype=torch.long)], dim=1)
        assert_scores_match(step_scores, reference_scores(base, anti, ids, mask, 0.05))


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan"), "0.1", True])
def test_alpha_out_of_range_raises_naming_value(anti, alpha):
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveDetoxSampler(anti, alpha=alpha)


@pytest.mark.parametrize("beta", [-1.0, float("nan"), "x"])
def test_bad_beta_raises(anti, beta):
    with pytest.raises(ValueError, match="beta"):
        ContrastiveDetoxSampler(anti, beta=beta)


def test_beta_inf_equals_none(base, anti, tokenizer):
    inputs = tokenizer(["the cat sat on"], return_tensors="pt")
    a = run_generate(base, ContrastiveDetoxSampler(anti, beta=None), inputs)
    b = run_generate(base, ContrastiveDetoxSampler(anti, beta=math.inf), inputs)
    assert torch.equal(a.scores[0], b.scores[0])


def test_vocabulary_mismatch_names_both_sizes(base, tokenizer):
    other = tiny_llama(VOCAB + 7, seed=1)
    inputs = tokenizer(["the cat"], return_tensors="pt")
    with pytest.raises(ValueError, match=rf"{VOCAB}.*{VOCAB + 7}"):
        run_generate(base, ContrastiveDetoxSampler(other), inputs)


def test_tokenizer_mismatch_is_detected(base, anti, tokenizer):
    from tiny import char_tokenizer

    inputs = tokenizer(["the cat"], return_tensors="pt")
    sampler = ContrastiveDetoxSampler(anti, tokenizer=tokenizer, anti_expert_tokenizer=char_tokenizer())
    with pytest.raises(ValueError, match="tokenizer"):
        run_generate(base, sampler, inputs)


def test_mask_that_does_not_fit_the_prompt_raises(base, anti, tokenizer):
    inputs = tokenizer(["the cat sat"], return_tensors="pt")
    sampler = ContrastiveDetoxSampler(anti, attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        run_generate(base, sampler, inputs)


# --- padding checks -----------------------------------------------------------------------------------------
def test_padded_batch_without_mask_raises(base, anti, tokenizer):
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r'attention_mask=inputs\["attention_mask"\]'):
        run_generate(base, ContrastiveDetoxSampler(anti), inputs)


@pytest.mark.parametrize("pad_source", ["tokenizer", "pad_token_id"])
def test_known_pad_id_detects_padding_without_mask(base, anti, tokenizer, pad_source):
    known = {"tokenizer": tokenizer} if pad_source == "tokenizer" else {"pad_token_id": 0}
    padded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"padded.*attention_mask=inputs\[\"attention_mask\"\]"):
        run_generate(base, ContrastiveDetoxSampler(anti, **known), padded)
    # rows of one length hold no padding: the all-ones default is right, as with the explicit mask
    unpadded = tokenizer(["the cat sat", "a good friend"], return_tensors="pt", padding=True)
    assert bool(unpadded["attention_mask"].all())
    ones = unpadded["attention_mask"]
    without = run_generate(base, ContrastiveDetoxSampler(anti, **known), unpadded)
    explicit = run_generate(base, ContrastiveDetoxSampler(anti, attention_mask=ones), unpadded)
    assert torch.equal(without.sequences, explicit.sequences)


def test_copies_of_one_prompt_need_no_mask(base, anti, tokenizer):
    """Identical rows (one prompt repeated, as distillation samples from BOS) cannot be padded differently."""
    inputs = tokenizer(["the cat sat on"] * 3, return_tensors="pt")
    torch.manual_seed(0)
    without = run_generate(base, ContrastiveDetoxSampler(anti), inputs, do_sample=True, top_k=0)
    torch.manual_seed(0)
    explicit = run_generate(base, ContrastiveDetoxSampler(anti, attention_mask=inputs["attention_mask"]),
                            inputs, do_sample=True, top_k=0)
    assert torch.equal(without.sequences, explicit.sequences)


def test_right_padded_mask_raises():
    right = word_tokenizer(padding_side="right")
    inputs = right(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"right-padded.*padding_side=\"left\""):
        ContrastiveDetoxSampler(tiny_llama(VOCAB, seed=1), attention_mask=inputs["attention_mask"])
    sampler = ContrastiveDetoxSampler(tiny_llama(VOCAB, seed=1))
    with pytest.raises(ValueError, match="right-padded"):
        sampler.reset(attention_mask=inputs["attention_mask"])
