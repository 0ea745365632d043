"""Nucleus (top-p) sampling without sorting the whole vocabulary."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper


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


def sampling_warpers(top_p: float, temperature: float) -> LogitsProcessorList:
    """The temperature and nucleus warpers ``generate`` would add for ``top_p`` / ``temperature``, in its order
    (temperature first), with :class:`FastTopPLogitsWarper` in place of the sorting one. Pass them as
    ``logits_processor`` after any custom processor and set ``top_p=1.0, temperature=1.0`` in the generation
    config, so ``generate`` adds none of its own."""
    warpers = LogitsProcessorList()
    if float(temperature) != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if float(top_p) < 1.0:
        warpers.append(FastTopPLogitsWarper(top_p))
    return warpers
