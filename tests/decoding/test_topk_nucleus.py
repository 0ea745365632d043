"""Top-p on a preselected top-k (:class:`TopKNucleusDraw`): the same nucleus distribution as ``generate``'s draw.

The preselected draw uses another random stream than ``generate``'s multinomial over the whole vocabulary, so its
tokens cannot be compared one for one. Instead, many draws from fixed logits are compared with the exact nucleus
distribution (float64) by a chi-square goodness-of-fit test, and the same test is shown to reject samplers that are
slightly wrong (a nucleus of 0.85 instead of 0.9, a temperature 5 % off), so that its passing means something.
Seeds are fixed, so each test draws the same tokens at every run: the alpha is far below the p-values of the right
samplers and far above those of the wrong ones.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from tiny import tiny_llama, word_tokenizer

from unidetox.decoding.protocol import ToxicityEvalConfig, generate_samples
from unidetox.decoding.warpers import (
    FastTopPLogitsWarper,
    TopKNucleusDraw,
    draws_its_own_tokens,
    sampling_warpers,
)

TOP_P = 0.9
ALPHA = 1e-3  # a right sampler's p-value must be above it, a wrong one's below it by many orders of magnitude
WRONG_BELOW = 1e-9


def heavy_tailed_logits(vocab: int, exponent: float, seed: int) -> torch.Tensor:
    """Zipf-like logits (token of rank r has probability ~ r^-exponent, plus noise) over shuffled token ids."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    logits = -exponent * ranks.log() + 0.1 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    return logits[torch.randperm(vocab, generator=generator)].float()


def flat_logits(vocab: int, seed: int) -> torch.Tensor:
    """Logits whose nucleus holds most of the vocabulary: no top-k of a few dozen tokens holds it."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 0.5


def exact_nucleus(logits: torch.Tensor, top_p: float = TOP_P) -> np.ndarray:
    """The nucleus distribution of ``TopPLogitsWarper`` + softmax, in float64 (zero outside the nucleus)."""
    probs = torch.softmax(logits.double(), dim=-1)
    ascending, order = probs.sort()
    cumulative = ascending.cumsum(-1)
    remove = cumulative <= 1 - top_p
    remove[-1] = False
    # No token may sit on the boundary within float32 rounding, or the float32 samplers could keep another set.
    assert float((cumulative - (1 - top_p)).abs().min()) > 1e-5
    kept = torch.zeros_like(probs).scatter(0, order, (~remove).double()) * probs
    return (kept / kept.sum()).numpy()


def draw_preselected(logits: torch.Tensor, num: int, seed: int, top_p: float = TOP_P, top_k: int = 256,
                     rows_per_call: int = 200) -> np.ndarray:
    """``num`` tokens from :class:`TopKNucleusDraw` (as ``generate(do_sample=False)`` would pick them)."""
    sampler = TopKNucleusDraw(top_p, top_k)
    torch.manual_seed(seed)
    tokens = [sampler(None, logits.expand(min(rows_per_call, num - i), -1)).argmax(-1) for i in range(0, num, rows_per_call)]
    return torch.cat(tokens).numpy()


def draw_full_vocabulary(logits: torch.Tensor, num: int, seed: int, rows_per_call: int = 200) -> np.ndarray:
    """``num`` tokens as ``generate(do_sample=True)`` draws them with the protocol's warper (today's path)."""
    warper = FastTopPLogitsWarper(TOP_P)
    torch.manual_seed(seed)
    tokens = [torch.multinomial(warper(None, logits.expand(min(rows_per_call, num - i), -1)).softmax(-1), 1)[:, 0]
              for i in range(0, num, rows_per_call)]
    return torch.cat(tokens).numpy()


def goodness_of_fit(tokens: np.ndarray, expected: np.ndarray, min_expected: float = 50.0) -> float:
    """The chi-square p-value of ``tokens`` against the distribution ``expected`` (0 if any token lies outside its
    support). Tokens are taken most likely first; consecutive ones are pooled until a cell expects
    ``min_expected`` draws (a last, smaller cell joins the one before)."""
    observed = np.bincount(tokens, minlength=expected.size)
    if observed[expected == 0].any():
        return 0.0
    order = np.argsort(-expected, kind="stable")
    order = order[expected[order] > 0]
    cell_of, cell, pooled = np.empty(order.size, dtype=np.int64), 0, 0.0
    for i, count in enumerate(expected[order] * tokens.size):
        cell_of[i] = cell
        pooled += count
        if pooled >= min_expected:
            cell, pooled = cell + 1, 0.0
    if pooled > 0 and cell > 0:
        cell_of[cell_of == cell] = cell - 1
    observed_cells = np.bincount(cell_of, weights=observed[order])
    expected_cells = np.bincount(cell_of, weights=expected[order] * tokens.size)
    assert expected_cells.size >= 10  # enough cells for the test to see a shape
    return float(chisquare(observed_cells, expected_cells).pvalue)


# name -> (logits, top_k, draws, a wrong temperature): a Gemma-size vocabulary whose nucleus (200 tokens) fits the
# top 256; a smaller heavy-tailed one, cheap enough to draw from with today's full-vocabulary path too; a flat one
# that never fits (a nucleus of 3,211 nearly equal tokens, where 5,000 draws see a temperature 20 % off, not 5 %).
CASES = {
    "heavy_tailed_262k": (lambda: heavy_tailed_logits(262_144, 1.4, seed=0), 256, 3_000, 0.95),
    "heavy_tailed_16k": (lambda: heavy_tailed_logits(16_384, 1.4, seed=1), 256, 5_000, 0.95),
    "flat_4k": (lambda: flat_logits(4_096, seed=2), 64, 5_000, 0.8),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, top_k, draws, wrong_temperature = CASES[request.param]
    logits = make()
    return request.param, logits, top_k, draws, exact_nucleus(logits), wrong_temperature


def test_the_cases_fit_the_top_k_or_not_as_intended(case):
    name, logits, top_k, _, expected, _ = case
    top_mass = float(torch.softmax(logits.double(), -1).topk(top_k).values.sum())
    assert (top_mass >= TOP_P) == name.startswith("heavy_tailed")
    assert 30 <= (expected > 0).sum() <= 300 or name == "flat_4k"


def test_preselected_draw_has_the_nucleus_distribution(case):
    _, logits, top_k, draws, expected, _ = case
    assert goodness_of_fit(draw_preselected(logits, draws, seed=0, top_k=top_k), expected) > ALPHA


def test_the_test_rejects_a_slightly_wrong_nucleus_or_temperature(case):
    """Its power: a nucleus of 0.85 instead of 0.9, or a temperature a little off (samples all inside the right
    nucleus, only their shares differ), fail it by many orders of magnitude."""
    _, logits, top_k, draws, expected, wrong_temperature = case
    assert goodness_of_fit(draw_preselected(logits, draws, seed=0, top_p=0.85, top_k=top_k), expected) < WRONG_BELOW
    wrong = draw_preselected(logits / wrong_temperature, draws, seed=0, top_k=top_k)
    assert expected[wrong].all()  # a sharper distribution: every draw inside the right nucleus
    assert goodness_of_fit(wrong, expected) < WRONG_BELOW


@pytest.mark.parametrize("name", ["heavy_tailed_16k", "flat_4k"])
def test_todays_full_vocabulary_draw_passes_the_same_test(name):
    make, _, draws, _ = CASES[name]
    logits = make()
    assert goodness_of_fit(draw_full_vocabulary(logits, draws, seed=0), exact_nucleus(logits)) > ALPHA


def test_rows_that_never_fit_draw_exactly_todays_tokens():
    """A batch whose top-k never holds the nucleus takes the full-vocabulary path for every row, in the same
    random stream as ``generate``'s draw: the same tokens."""
    scores = torch.randn(32, 4_096, generator=torch.Generator().manual_seed(3)) * 0.5
    torch.manual_seed(7)
    preselected = TopKNucleusDraw(TOP_P, 64)(None, scores)
    torch.manual_seed(7)
    today = torch.multinomial(FastTopPLogitsWarper(TOP_P)(None, scores).softmax(-1), 1)[:, 0]
    assert torch.equal(preselected.argmax(-1), today)
    assert torch.equal(preselected.isfinite().sum(-1), torch.ones(32, dtype=torch.long))  # one-hot rows


def test_each_row_takes_its_own_path_in_a_mixed_batch():
    """Rows that fit and rows that fall back in one batch: each row's draws follow its own nucleus."""
    heavy, flat = heavy_tailed_logits(4_096, 1.4, seed=4), flat_logits(4_096, seed=5)
    batch = torch.stack([heavy, flat] * 100)
    sampler = TopKNucleusDraw(TOP_P, 256)
    torch.manual_seed(0)
    tokens = torch.cat([sampler(None, batch).argmax(-1)[None] for _ in range(25)])  # 2,500 draws per row kind
    assert goodness_of_fit(tokens[:, 0::2].flatten().numpy(), exact_nucleus(heavy)) > ALPHA
    assert goodness_of_fit(tokens[:, 1::2].flatten().numpy(), exact_nucleus(flat)) > ALPHA
    assert goodness_of_fit(tokens[:, 1::2].flatten().numpy(), exact_nucleus(flat, top_p=0.85)) < WRONG_BELOW


def test_settings_are_checked():
    with pytest.raises(ValueError, match="preselect_top_k"):
        ToxicityEvalConfig(preselect_top_k=0)
    with pytest.raises(ValueError, match="preselect_top_k"):
        ToxicityEvalConfig(preselect_top_k=True)
    with pytest.raises(ValueError, match="top_p"):
        TopKNucleusDraw(1.0, 8)
    # top_p 1 keeps the whole vocabulary: nothing to preselect, today's warpers (none) and draw
    assert not draws_its_own_tokens(sampling_warpers(1.0, 1.0, preselect_top_k=8))
    assert draws_its_own_tokens(sampling_warpers(0.9, 0.7, preselect_top_k=8))


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


PROMPTS = ["the cat sat on", "a good friend helps people in need", "hate", "", "science helps us"]


def test_generate_samples_equal_todays_when_no_row_ever_fits(tokenizer):
    """A tiny random model's next-token distributions are nearly flat: one token never holds 0.9 of the mass,
    so every row of every step falls back, and the samples are today's token for token."""
    model = tiny_llama(len(tokenizer), seed=0, initializer_range=0.002)
    kwargs = dict(num_samples=3, max_new_tokens=6, seed=1, batch_size=8)
    today = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    preselected = generate_samples(model, tokenizer, PROMPTS, preselect_top_k=1, **kwargs)
    assert [s.to_dict() for s in preselected] == [s.to_dict() for s in today]


def test_generate_samples_draw_from_the_top_k_when_it_holds_the_nucleus(tokenizer):
    """With k = the vocabulary every row fits: the preselected draw runs, so the samples are another draw than
    today's, and each is a continuation of the protocol's shape."""
    model = tiny_llama(len(tokenizer), seed=0)
    kwargs = dict(num_samples=4, max_new_tokens=6, seed=1, batch_size=8, temperature=0.7)
    today = generate_samples(model, tokenizer, PROMPTS, **kwargs)
    preselected = generate_samples(model, tokenizer, PROMPTS, preselect_top_k=len(tokenizer), **kwargs)
    assert [s.token_ids for s in preselected] != [s.token_ids for s in today]
    assert [(s.prompt_index, s.sample_index) for s in preselected] == [(s.prompt_index, s.sample_index) for s in today]
    assert all(len(s.token_ids) == s.num_tokens <= 6 for s in preselected)
