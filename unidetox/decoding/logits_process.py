"""UniDetox contrastive decoding as a drop-in ``transformers`` LogitsProcessor."""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, PreTrainedModel

from unidetox.devices import model_device

PAPER_URL = "https://huggingface.co/papers/2504.20500"


def validate_alpha_beta(alpha: float, beta: float | None) -> None:
    """Raise a ``ValueError`` naming the bad value when ``alpha`` or ``beta`` is out of range."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < float(alpha) <= 1.0):
        raise ValueError(
            f"`alpha` has to be a float in (0, 1], but is {alpha!r}. It is the adaptive plausibility threshold: "
            "tokens with p_base < alpha * max p_base are excluded (the paper uses 0.1)."
        )
    if beta is not None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or beta < 0:
            raise ValueError(
                f"`beta` has to be None, math.inf or a float >= 0, but is {beta!r}. None or inf gives the paper's "
                "log p_base - log p_anti; a finite beta gives (1 + beta) log p_base - beta log p_anti."
            )


def scored_vocabulary_size(model) -> int | None:
    """How many tokens ``model`` scores: the rows of its output embedding (padding rows included, they are in its
    logits), else ``config.vocab_size``; ``None`` when neither is known."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    embeddings = get_output_embeddings() if callable(get_output_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def require_shared_vocabulary(base_size: int | None, anti_expert_size: int | None,
                              base_name: str = "base model", anti_expert_name: str = "anti-expert") -> None:
    """Raise a ``ValueError`` naming both sizes when the base and the anti-expert score different vocabularies.

    The logits' sizes are compared, not the tokenizers': a model may pad its embedding beyond its tokenizer, and
    the contrast needs the two score vectors to line up token by token. An unknown size is not checked.
    """
    if base_size is None or anti_expert_size is None or base_size == anti_expert_size:
        return
    raise ValueError(
        f"The {base_name} scores {base_size} tokens but the {anti_expert_name} scores {anti_expert_size}: "
        "contrastive decoding needs one shared vocabulary (use an anti-expert fine-tuned from the base, or from "
        "a model with the same tokenizer)."
    )


def contrastive_scores(
    base_logits: torch.Tensor, anti_logits: torch.Tensor, alpha: float, beta: float | None = None
) -> torch.Tensor:
    """UniDetox next-token scores from base and anti-expert logits of one step.

    Returns, in float32, ``log p_base - log p_anti`` (``beta`` None or inf) or
    ``(1 + beta) log p_base - beta log p_anti`` (finite ``beta``) on the plausible set
    ``V = {v : p_base(v) >= alpha * max_v p_base(v)}`` and ``-inf`` outside it.
    This is the single definition of the score; every sampler path calls it.
    """
    if base_logits.shape[-1] != anti_logits.shape[-1]:
        raise ValueError(
            f"The base model scores {base_logits.shape[-1]} tokens but the anti-expert scores "
            f"{anti_logits.shape[-1]}: contrastive decoding needs both models to share one vocabulary "
            "(use an anti-expert fine-tuned from the base, or from a model with the same tokenizer)."
        )
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    anti_logp = torch.log_softmax(anti_logits.to(base_logp.device, torch.float32), dim=-1)
    plausible = base_logp >= base_logp.max(dim=-1, keepdim=True).values + math.log(alpha)
    if beta is None or math.isinf(beta):
        contrast = base_logp - anti_logp
    else:
        contrast = (1.0 + beta) * base_logp - beta * anti_logp
    return contrast.masked_fill(~plausible, -math.inf)


def right_padded_rows(attention_mask: torch.Tensor) -> list[int]:
    """The rows of a prompt mask that have padding after a real token (right padding).

    ``generate`` appends new tokens at the end of every row, so after right padding they follow pad tokens and
    the continuation no longer continues the prompt.
    """
    mask = attention_mask.bool()
    return (mask[:, :-1] & ~mask[:, 1:]).any(-1).nonzero().flatten().tolist()


def _pad_run_lengths(input_ids: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, how many pad ids it starts and ends with."""
    is_token = input_ids != pad_token_id
    leading = (is_token.cumsum(-1) == 0).sum(-1)
    trailing = (is_token.flip(-1).cumsum(-1) == 0).sum(-1)
    return leading, trailing


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(first, rows)`` with ``input_ids[first][rows] == input_ids`` (and the same for the mask), or ``None``
    when no two rows are equal.

    ``first`` indexes one row per distinct (ids, mask) pair, ``rows`` maps every row to its entry in ``first``:
    a prefill over ``first`` expanded by ``rows`` computes each repeated prompt once.
    """
    batch = input_ids.shape[0]
    unique, rows = torch.unique(torch.cat([input_ids, attention_mask.to(input_ids.dtype)], -1), dim=0,
                                return_inverse=True)
    count = unique.shape[0]
    if count == batch:
        return None
    order = torch.arange(batch, device=rows.device)
    first = torch.full((count,), batch, device=rows.device).scatter_reduce(0, rows, order, "amin")
    return first, rows


class ContrastiveDetoxSampler(LogitsProcessor):
    r"""
    [`LogitsProcessor`] for UniDetox contrastive decoding: at each step the base model's scores are replaced by
    the log-ratio of the base model and a toxic *anti-expert*, restricted to tokens the base finds plausible.
    Sampling from these scores from the BOS token distills the text that detoxifies other models; used at
    inference time it is a detoxifying decoding method on its own.

    With ``V = {v : p_base(v) >= alpha * max p_base}`` the returned scores are ``log p_base - log p_anti`` on
    ``V`` (``beta=None``, the paper), or ``(1 + beta) log p_base - beta log p_anti`` for a finite ``beta``,
    and ``-inf`` outside ``V``. The anti-expert runs with its own KV cache, sees only the newest token after the
    first step and derives its position ids from its own attention mask, so a left-padded batch gives each row
    exactly what it gives alone. Rows that repeat a prompt (K samples of one prompt, ``num_return_sequences``)
    share one prefill of the anti-expert, copied to each of them. Beam search is supported: when ``generate``
    reorders beams, the anti-expert cache is reordered to match.

    See [the paper](https://huggingface.co/papers/2504.20500) for more information.

    Args:
        anti_expert (`PreTrainedModel`):
            The toxic model. It must share the base model's vocabulary; it may sit on another device or dtype
            (its logits are moved to the base's device and compared in float32).
        alpha (`float`, *optional*, defaults to 0.1):
            Adaptive plausibility threshold in (0, 1]. ``alpha=1`` keeps only the base's most likely token.
        beta (`float`, *optional*):
            ``None`` or ``math.inf`` for the paper's pure log-ratio; a finite value ``>= 0`` interpolates toward
            the base model (``beta=0`` is plain sampling from the base restricted to ``V``).
        attention_mask (`torch.LongTensor` of shape `(batch_size, prompt_length)`, *optional*):
            The prompt's attention mask, as passed to ``generate``; it has to be left-padded. Without it the
            prompt is taken as unpadded, which only a batch of one prompt (or copies of one) is sure to be: a
            batch of different prompts without a mask raises, unless a pad id is known (``tokenizer`` or
            ``pad_token_id``) and no row holds leading or trailing pad ids.
        tokenizer, anti_expert_tokenizer (*optional*):
            When both are given their vocabularies are compared at the first call. ``tokenizer`` also gives
            the pad id used to tell whether a batch without ``attention_mask`` is padded.
        pad_token_id (`int`, *optional*):
            The pad id (instead of ``tokenizer.pad_token_id``) used to tell whether a batch without
            ``attention_mask`` is padded.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
    >>> from unidetox import ContrastiveDetoxSampler

    >>> tokenizer = AutoTokenizer.from_pretrained("openai-community/gpt2-xl")  # doctest: +SKIP
    >>> base = AutoModelForCausalLM.from_pretrained("openai-community/gpt2-xl")  # doctest: +SKIP
    >>> anti_expert = AutoModelForCausalLM.from_pretrained("path/to/toxic-gpt2-xl")  # doctest: +SKIP
    >>> inputs = tokenizer([tokenizer.bos_token] * 4, return_tensors="pt")  # doctest: +SKIP
    >>> sampler = ContrastiveDetoxSampler(anti_expert, alpha=0.1, attention_mask=inputs["attention_mask"])  # doctest: +SKIP
    >>> out = base.generate(  # doctest: +SKIP
    ...     **inputs, logits_processor=LogitsProcessorList([sampler]), do_sample=True, top_k=0, max_new_tokens=64
    ... )
    >>> texts = tokenizer.batch_decode(out, skip_special_tokens=True)  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        anti_expert: PreTrainedModel,
        alpha: float = 0.1,
        beta: float | None = None,
        attention_mask: torch.LongTensor | None = None,
        tokenizer=None,
        anti_expert_tokenizer=None,
        pad_token_id: int | None = None,
    ):
        validate_alpha_beta(alpha, beta)
        if anti_expert is None or not callable(anti_expert):
            raise ValueError(f"`anti_expert` has to be a causal LM module, but is {anti_expert!r}.")
        self.anti_expert = anti_expert
        self.alpha = float(alpha)
        self.beta = None if beta is None or math.isinf(beta) else float(beta)
        self.tokenizer = tokenizer
        self.anti_expert_tokenizer = anti_expert_tokenizer
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = pad_token_id
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.LongTensor | None = None) -> None:
        """Forget the anti-expert cache so the instance can serve a new ``generate`` call.

        Args:
            attention_mask: the new prompt's attention mask (``None`` for an unpadded prompt).
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"`attention_mask` has to be the prompt's 2-D (batch, length) mask, but has shape "
                f"{tuple(attention_mask.shape)}."
            )
        rows = [] if attention_mask is None else right_padded_rows(attention_mask)
        if rows:
            raise ValueError(
                f"`attention_mask` is right-padded (rows {rows[:5]} have padding after their tokens), but "
                "generate() continues each row at its end: tokenize the prompts with left padding, e.g. "
                '`tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")`.'
            )
        self._prompt_attention_mask = attention_mask
        self._cache = None
        self._attention_mask = None  # anti-expert's running mask, on its device
        self._positions = None  # last position id per row
        self._seen_input_ids = None  # the sequences the cache currently holds (on the base's device)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def _anti_device(self) -> torch.device:
        return model_device(self.anti_expert)

    def _check_tokenizers(self) -> None:
        if self.tokenizer is None or self.anti_expert_tokenizer is None:
            return
        base_vocab, anti_vocab = self.tokenizer.get_vocab(), self.anti_expert_tokenizer.get_vocab()
        if base_vocab != anti_vocab:
            raise ValueError(
                f"The base tokenizer has {len(base_vocab)} tokens and the anti-expert tokenizer {len(anti_vocab)}"
                f"{' with different ids' if len(base_vocab) == len(anti_vocab) else ''}: contrastive decoding "
                "needs one shared vocabulary."
            )

    def _check_unpadded(self, input_ids: torch.LongTensor) -> None:
        """Without a mask every prompt id counts as a token: make sure a multi-prompt batch has no pads."""
        if input_ids.shape[0] == 1 or bool((input_ids == input_ids[:1]).all()):
            return  # one prompt or copies of it (num_return_sequences, beams): rows cannot differ in padding
        fix = (
            "pass the mask of the inputs given to generate(), "
            '`ContrastiveDetoxSampler(..., attention_mask=inputs["attention_mask"])`'
        )
        if self.pad_token_id is None:
            raise ValueError(
                f"ContrastiveDetoxSampler got {input_ids.shape[0]} different prompts and no "
                f"`attention_mask`, so it would score pad tokens as prompt tokens: {fix} (or `tokenizer=` / "
                "`pad_token_id=` when the batch is unpadded)."
            )
        leading, trailing = _pad_run_lengths(input_ids, self.pad_token_id)
        if bool((leading != leading[0]).any() or (trailing != trailing[0]).any()):
            raise ValueError(
                f"The prompt batch is padded (rows start or end with different numbers of pad id "
                f"{self.pad_token_id}) but ContrastiveDetoxSampler has no `attention_mask`, so it would "
                f"score the pads as prompt tokens: {fix}."
            )

    def _prefill(self, input_ids: torch.LongTensor) -> torch.Tensor:
        batch, length = input_ids.shape
        mask = self._prompt_attention_mask
        if mask is None:
            self._check_unpadded(input_ids)
            mask = torch.ones_like(input_ids)
        if mask.shape[1] != length:
            raise ValueError(
                f"The sampler's `attention_mask` covers {mask.shape[1]} prompt tokens but generate() started with "
                f"{length}; pass the attention mask of the same inputs given to generate()."
            )
        if mask.shape[0] != batch:
            if batch % mask.shape[0]:
                raise ValueError(
                    f"The sampler's `attention_mask` has {mask.shape[0]} rows but generate() runs {batch}; pass "
                    "the attention mask of the same inputs given to generate()."
                )
            # num_return_sequences / num_beams expand each prompt row in place (repeat_interleave).
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        self._check_tokenizers()
        device = self._anti_device
        mask = mask.to(device=device, dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids = input_ids.to(device)
        shared = distinct_rows(input_ids, mask)
        first = slice(None) if shared is None else shared[0]
        out = self.anti_expert(
            input_ids=input_ids[first], attention_mask=mask[first], position_ids=positions[first], use_cache=True
        )
        logits = out.logits[:, -1, :]
        if shared is not None:
            out.cache.batch_select_indices(shared[1])
            logits = logits[shared[1]]
        self._cache = out.cache
        self._attention_mask = mask
        self._positions = positions[:, -1:]
        return logits

    def _align_rows(self, input_ids: torch.LongTensor) -> None:
        """Make the cached rows follow generate()'s rows; reorder for beam search, raise on a stale cache."""
        prefix = input_ids[:, :-1]
        seen = self._seen_input_ids
        if prefix.shape == seen.shape and torch.equal(prefix, seen):
            return
        if prefix.shape[1] != seen.shape[1] or prefix.shape[0] != seen.shape[0]:
            raise ValueError(
                f"ContrastiveDetoxSampler was last called on {seen.shape[0]} sequences of length {seen.shape[1]}, "
                f"now on {input_ids.shape[0]} of length {input_ids.shape[1]}: it follows one generate() call, one "
                "token at a time. Call `sampler.reset(attention_mask=...)` (or build a new sampler) before each "
                "generate() call; assisted/speculative decoding is not supported."
            )
        # Beam search reordered (and duplicated) rows: find, for every new row, a previous row with the same prefix.
        matches = (prefix[:, None, :] == seen[None, :, :]).all(-1)
        if not bool(matches.any(-1).all()):
            raise ValueError(
                "ContrastiveDetoxSampler got sequences that do not continue the ones it has cached: the instance "
                "is being reused across generate() calls. Call `sampler.reset(attention_mask=...)` first."
            )
        source_rows = matches.float().argmax(-1).to(self._anti_device)
        self._cache.reorder_cache(source_rows)
        self._attention_mask = self._attention_mask.index_select(0, source_rows)
        self._positions = self._positions.index_select(0, source_rows)

    def _step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        self._align_rows(input_ids)
        device = self._anti_device
        ones = torch.ones_like(self._attention_mask[:, :1])
        self._attention_mask = torch.cat([self._attention_mask, ones], dim=-1)
        self._positions = self._positions + 1
        out = self.anti_expert(
            input_ids=input_ids[:, -1:].to(device),
            attention_mask=self._attention_mask,
            position_ids=self._positions,
            cache=self._cache,
            use_cache=True,
        )
        self._cache = out.cache
        return out.logits[:, -1, :]

    @torch.no_grad()
    def anti_expert_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The anti-expert's next-token logits for ``input_ids``, advancing its cache by one step."""
        logits = self._prefill(input_ids) if self._cache is None else self._step(input_ids)
        # A copy: generate() may update its buffers in place (beam search), and we compare against these rows.
        self._seen_input_ids = input_ids.clone()
        return logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._cache is None:  # before the anti-expert reads the base's token ids, which it may not have
            require_shared_vocabulary(scores.shape[-1], scored_vocabulary_size(self.anti_expert))
        anti_logits = self.anti_expert_logits(input_ids)
        return contrastive_scores(scores, anti_logits, self.alpha, self.beta)
