"""Nucleus (top-p) sampling without sorting the whole vocabulary."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from unidetox.checks import require_count


class FastTopPLogitsWarper(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that keeps the same tokens as `transformers`' [`TopPLogitsWarper`] but finds them with
    `torch.topk` instead of sorting the whole vocabulary at every step.

    `TopPLogitsWarper` sorts all ``vocab_size`` scores per row; with Gemma's 262k-token vocabulary that sort is
    more than half of the sampling time on a CPU. A nucleus of ``top_p = 0.9`` rarely holds more than a few
    hundred tokens, so this warper takes the ``k`` most likely tokens (``k`` from ``candidate_sizes``), checks
    that the tokens outside them hold at most ``1 - top_p`` of the mass (then every one of them is removed by the
    reference rule too), and applies the reference rule (remove a token when the mass of the tokens ranked at or
    below it is ``<= 1 - top_p``; keep at least ``min_tokens_to_keep``) inside the candidates. Rows whose nucleus
    does not fit the largest candidate size are sorted in full, exactly as the reference does.

    Kept sets equal the reference's up to float rounding of the cumulative sums (a token whose cumulative mass
    lies within ~1e-7 of ``1 - top_p`` may fall on the other side); `tests/decoding/test_warpers.py` checks parity.

    Args:
        top_p (`float`):
            The nucleus mass in (0, 1]; ``1.0`` keeps every token.
        filter_value (`float`, *optional*, defaults to -inf):
            The score given to removed tokens.
        min_tokens_to_keep (`int`, *optional*, defaults to 1):
            Tokens that are never removed (the most likely ones).
        candidate_sizes (`tuple[int, ...]`, *optional*, defaults to `(256, 4096)`):
            The ``k`` tried in turn before a full sort.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import TopPLogitsWarper
    >>> from unidetox.decoding.warpers import FastTopPLogitsWarper

    >>> scores = torch.randn(2, 50_000)
    >>> fast = FastTopPLogitsWarper(top_p=0.9)(None, scores)
    >>> reference = TopPLogitsWarper(top_p=0.9)(None, scores)
    >>> bool(torch.equal(fast.isinf(), reference.isinf()))
    True

    ```
    """

    def __init__(
        self,
        top_p: float,
        filter_value: float = -float("inf"),
        min_tokens_to_keep: int = 1,
        candidate_sizes: tuple[int, ...] = (256, 4096),
    ):
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"`top_p` has to be a float in (0, 1], but is {top_p}.")
        if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"`min_tokens_to_keep` has to be a positive integer, but is {min_tokens_to_keep}.")
        if not candidate_sizes or any(int(k) < 1 for k in candidate_sizes):
            raise ValueError(f"`candidate_sizes` has to list positive integers, but is {candidate_sizes}.")
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep
        self.candidate_sizes = tuple(sorted(int(k) for k in candidate_sizes))

    def _reference(self, scores: torch.Tensor) -> torch.Tensor:
        """The removal mask of `TopPLogitsWarper` (a full sort)."""
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep :] = False
        return remove.scatter(1, sorted_indices, remove)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.top_p >= 1.0:
            return scores
        vocab = scores.shape[-1]
        remove = torch.ones_like(scores, dtype=torch.bool)
        pending = torch.arange(scores.shape[0], device=scores.device)
        all_probs = scores.softmax(dim=-1)  # once; each candidate size looks at the rows still pending
        for k in self.candidate_sizes:
            if k >= vocab or pending.numel() == 0:
                break
            probs = all_probs[pending]
            top_probs, top_indices = probs.topk(k, dim=-1, sorted=True)  # descending
            outside = (probs.sum(dim=-1) - top_probs.sum(dim=-1)).clamp_min(0.0)
            # Every token outside the candidates has a cumulative mass <= `outside`; when that is <= 1 - top_p,
            # the reference removes all of them, and inside the candidates the rule only needs their own sums.
            fits = outside <= (1 - self.top_p)
            if fits.any():
                ascending = top_probs[fits].flip(-1)
                cumulative = outside[fits, None] + ascending.cumsum(dim=-1)
                drop = cumulative <= (1 - self.top_p)
                drop[..., -self.min_tokens_to_keep :] = False
                row_mask = torch.ones_like(probs[fits], dtype=torch.bool)
                row_mask.scatter_(1, top_indices[fits].flip(-1), drop)
                remove[pending[fits]] = row_mask
            pending = pending[~fits]
        if pending.numel():
            remove[pending] = self._reference(scores[pending])
        return scores.masked_fill(remove, self.filter_value)


class TopKNucleusDraw(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that DRAWS each row's next token from its top-p nucleus, looked for among the row's
    ``top_k`` most likely tokens, and returns scores that are 0 at the drawn token and ``-inf`` elsewhere, so that
    ``generate(do_sample=False)`` (an argmax) emits it. It has to be the last processor of the list.

    With ``do_sample=True``, ``generate`` applies a softmax and ``torch.multinomial`` to the whole vocabulary,
    and the CPU multinomial makes one random number per vocabulary entry; with Gemma's 262k-token vocabulary
    that draw and the nucleus search are over 40% of a decode step. Here a row's draw looks at ``top_k`` tokens:
    when they hold at least ``top_p`` of the row's mass, every token outside them is outside the nucleus too, and
    the nucleus (the rule of [`TopPLogitsWarper`], as in :class:`FastTopPLogitsWarper`) and its renormalised
    distribution are found inside them. A row whose ``top_k`` tokens hold less takes the full-vocabulary path of
    ``generate``: :class:`FastTopPLogitsWarper`, softmax, ``torch.multinomial``. Those rows are drawn first, so
    when every row of a step falls back the step consumes the random stream exactly as ``generate`` does and
    draws the same tokens.

    The distribution of each token is the nucleus distribution of ``generate`` (up to the float rounding of the
    cumulative sums, as for :class:`FastTopPLogitsWarper`), but rows that fit draw from another tensor than
    ``generate`` would: the random stream, and so the tokens, differ from the full-vocabulary draw.
    `tests/decoding/test_topk_nucleus.py` checks the distribution with a chi-square test of known power.

    Args:
        top_p (`float`):
            The nucleus mass in (0, 1); with 1 the nucleus is the whole vocabulary and nothing can be preselected.
        top_k (`int`):
            How many of the most likely tokens are looked at before falling back to the whole vocabulary.

    Examples:

    ```python
    >>> import torch
    >>> from unidetox.decoding.warpers import TopKNucleusDraw

    >>> scores = torch.tensor([[4.0, 3.0, 0.0, -2.0, -3.0]])
    >>> _ = torch.manual_seed(0)
    >>> drawn = TopKNucleusDraw(top_p=0.9, top_k=3)(None, scores)
    >>> int(drawn.argmax()) in (0, 1), int(drawn.isfinite().sum())
    (True, 1)

    ```
    """

    def __init__(self, top_p: float, top_k: int, filter_value: float = -float("inf")):
        top_p = float(top_p)
        if not 0.0 < top_p < 1.0:
            raise ValueError(f"`top_p` has to be a float in (0, 1) to preselect a nucleus, but is {top_p}; "
                             "with 1.0 draw from the whole vocabulary.")
        require_count("top_k", top_k)
        self.top_p, self.top_k, self.filter_value = top_p, top_k, filter_value
        self.fallback = FastTopPLogitsWarper(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        probs = scores.softmax(dim=-1)
        top_probs, top_indices = probs.topk(min(self.top_k, scores.shape[-1]), dim=-1, sorted=True)  # descending
        outside = (1.0 - top_probs.sum(dim=-1)).clamp_min(0.0)
        fits = outside <= (1 - self.top_p)
        rows_left = (~fits).nonzero().squeeze(1)
        if rows_left.numel():  # first, so that a step where no row fits draws as generate() does
            warped = self.fallback(None if input_ids is None else input_ids[rows_left], scores[rows_left])
            tokens[rows_left] = torch.multinomial(warped.softmax(dim=-1), num_samples=1).squeeze(1)
        if rows_left.numel() < scores.shape[0]:
            ascending = top_probs[fits].flip(-1)
            # The reference rule: drop a token when the mass ranked at or below it is <= 1 - top_p; keep the top one.
            drop = (outside[fits, None] + ascending.cumsum(dim=-1)) <= (1 - self.top_p)
            drop[..., -1] = False
            pick = torch.multinomial(ascending.masked_fill(drop, 0.0), num_samples=1)  # weights need no normalising
            tokens[fits] = top_indices[fits].flip(-1).gather(1, pick).squeeze(1)
        # `probs` is this call's own buffer: reused for the one-hot scores instead of allocating another.
        return probs.fill_(self.filter_value).scatter_(1, tokens[:, None], 0.0)


def sampling_warpers(top_p: float, temperature: float, preselect_top_k: int | None = None) -> LogitsProcessorList:
    """The temperature and nucleus warpers ``generate`` would add for ``top_p`` / ``temperature``, in its order
    (temperature first), with :class:`FastTopPLogitsWarper` in place of the sorting one. Pass them as
    ``logits_processor`` after any custom processor and set ``top_p=1.0, temperature=1.0`` in the generation
    config, so ``generate`` adds none of its own.

    With ``preselect_top_k`` (and ``top_p < 1``) the nucleus warper is a :class:`TopKNucleusDraw` instead, which
    draws the token itself: the caller then generates with ``do_sample=False`` (see
    :func:`draws_its_own_tokens`)."""
    warpers = LogitsProcessorList()
    if float(temperature) != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if float(top_p) < 1.0:
        warpers.append(FastTopPLogitsWarper(top_p) if preselect_top_k is None else TopKNucleusDraw(top_p, preselect_top_k))
    return warpers


def draws_its_own_tokens(processors: LogitsProcessorList) -> bool:
    """Whether the last of ``processors`` draws the token (:class:`TopKNucleusDraw`): ``generate`` then has to
    take the argmax (``do_sample=False``) instead of sampling again."""
    return bool(processors) and isinstance(processors[-1], TopKNucleusDraw)
