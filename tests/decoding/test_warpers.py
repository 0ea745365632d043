import pytest
import torch
from tiny import tiny_llama, word_tokenizer
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from unidetox.decoding.protocol import batch_seed, generate_samples, sampling_generation_config
from unidetox.decoding.warpers import FastTopPLogitsWarper, sampling_warpers


def _scores(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0, 30.0])  # flat (full-sort fallback) ... very peaked (top-256)
def test_same_tokens_as_transformers_top_p(top_p, scale):
    scores = _scores(16, 50_000, scale, seed=int(scale * 10))
    fast = FastTopPLogitsWarper(top_p)(None, scores)
    reference = TopPLogitsWarper(top_p)(None, scores)
    assert torch.equal(fast, reference)
    assert not torch.equal(scores, fast) or top_p == 0.99  # something was removed (the warper is not a no-op)


def test_each_candidate_size_and_the_fallback_is_used():
    # Rows of different peakedness in one batch: one fits in 8 candidates, one in 64, one needs the full sort.
    scores = torch.full((3, 5000), -20.0) + _scores(3, 5000, 0.01, 1)
    scores[0, :3] += 20.0  # about 3 plausible tokens
    scores[1, 100:140] += 20.0  # about 40
    scores[2] = _scores(1, 5000, 0.1, 2)  # nearly flat: thousands
    warper = FastTopPLogitsWarper(0.9, candidate_sizes=(8, 64))
    kept = (~warper(None, scores).isinf()).sum(-1).tolist()
    assert kept[0] <= 8 < kept[1] <= 64 < kept[2]
    assert torch.equal(warper(None, scores), TopPLogitsWarper(0.9)(None, scores))


def test_min_tokens_to_keep_and_filter_value():
    scores = torch.tensor([[10.0, 0.0, -1.0, -2.0, -3.0] + [-50.0] * 300])
    fast = FastTopPLogitsWarper(0.5, filter_value=-1e4, min_tokens_to_keep=3, candidate_sizes=(4,))(None, scores)
    reference = TopPLogitsWarper(0.5, filter_value=-1e4, min_tokens_to_keep=3)(None, scores)
    assert torch.equal(fast, reference)
    assert (fast > -1e4).sum() == 3


def test_does_not_modify_scores_in_place_and_top_p_one_is_identity():
    scores = _scores(2, 1000, 5.0, 0)
    before = scores.clone()
    FastTopPLogitsWarper(0.9)(None, scores)
    assert torch.equal(scores, before)
    assert torch.equal(FastTopPLogitsWarper(1.0)(None, scores), scores)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0.9, "min_tokens_to_keep": 0}, "min_tokens"),
     ({"top_p": 0.9, "candidate_sizes": (0,)}, "candidate_sizes")],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastTopPLogitsWarper(**kwargs)


def test_sampling_warpers_order_matches_generate():
    warpers = sampling_warpers(top_p=0.9, temperature=0.7)
    assert [type(w) for w in warpers] == [TemperatureLogitsWarper, FastTopPLogitsWarper]
    assert len(sampling_warpers(top_p=1.0, temperature=1.0)) == 0


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_generate_samples_equals_generate_with_transformers_top_p(temperature):
    """The evaluation's samples are the ones generate(top_p=0.9) draws with the same seed."""
    tokenizer = word_tokenizer(padding_side="left")
    model = tiny_llama(2000, seed=0)  # more ids than the tokenizer: the nucleus is found among 2000 scores
    with torch.no_grad():  # peaked next-token distributions so the top-k path (not only the full sort) runs
        model.lm_head.weight.mul_(40.0)
    prompts = ["the cat sat on", "a good friend helps people in need", "hate"]
    samples = generate_samples(model, tokenizer, prompts, num_samples=2, max_new_tokens=6, seed=5, batch_size=6,
                               top_p=0.9, temperature=temperature)
    enc = tokenizer([p for p in prompts for _ in range(2)], return_tensors="pt", padding=True, padding_side="left")
    config = sampling_generation_config(model, tokenizer, 6, top_p=0.9, temperature=temperature)
    torch.manual_seed(batch_seed(5, 0))
    out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList())
    expected = out[:, enc["input_ids"].shape[1]:]
    eos = {tokenizer.eos_token_id}
    for sample, row in zip(samples, expected.tolist(), strict=True):
        ids = []
        for token in row:
            if token in eos:
                break
            ids.append(token)
        assert sample.token_ids == ids
