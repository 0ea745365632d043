"""The NLL engine: summed next-token negative log-likelihood of texts under a causal LM, batched and chunked.

:func:`sliding_window_nll` / :func:`perplexity` score a long text with the HF guide's sliding window (WikiText-2);
:func:`conditional_nll` / :func:`conditional_perplexity` score continuations given their prompts (the reference
LM's fluency measure), each distinct prompt run once and its KV cache shared by its samples. The LM head sees only
the positions that predict scored tokens, ``NLL_CHUNK_BYTES`` of float32 logits at a time, so a 262k-token
vocabulary fits in memory.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import tqdm.auto
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from unidetox.devices import model_device


def _max_positions(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


# Float32 logits per log-sum-exp chunk: 256 MiB is 256 positions of gemma3's 262k-token vocabulary (1365 of
# smollm2's 49k). Much smaller chunks slow the LM head down on CPU: every chunk reads all its weights again.
NLL_CHUNK_BYTES = 256 * 2**20


def _chunk_rows(vocab_size: int) -> int:
    """Rows of ``vocab_size`` float32 logits that fit ``NLL_CHUNK_BYTES``."""
    return max(1, NLL_CHUNK_BYTES // (4 * vocab_size))


def _final_logit_softcapping(model, logits):
    cap = model.config.final_logit_softcapping
    return logits if cap is None else (logits / cap).tanh() * cap  # the operations of the model's forward


# The transformers causal LMs whose ``forward`` computes ``post(lm_head(base_model(...).last_hidden_state))``,
# keyed by the class that defines ``forward``; the value is the logit post-processing ``post`` (None: none).
# Any other model (a class that overrides ``forward``, remote code) is scored through its own forward.
_LOGITS_AFTER_HEAD = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": _final_logit_softcapping,
    "Gemma3ForCausalLM": _final_logit_softcapping,
    "GraniteForCausalLM": lambda model, logits: logits / model.config.logits_scaling,
    "CohereForCausalLM": lambda model, logits: logits * model.logit_scale,
    "GPT2LMHeadModel": None,
    "OPTForCausalLM": None,
    "FalconForCausalLM": None,
}


def _lm_head_split(model):
    """``(decoder, lm_head, post)`` whose ``post(lm_head(decoder(...).last_hidden_state))`` are the logits of
    ``model``, or None when the model's forward is not known to be that.

    A PEFT model whose adapters live inside the layers (LoRA; not prompt learning) runs its base model's
    forward, so it splits like the base model, adapters included.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and not peft_config.is_prompt_learning:
        model = model.get_base_model()
    forward = type(model).forward
    owner = getattr(forward, "__qualname__", "").partition(".")[0]
    if owner not in _LOGITS_AFTER_HEAD or not getattr(forward, "__module__", "").startswith("transformers."):
        return None
    decoder, head = model.base_model, model.get_output_embeddings()
    if decoder is model or head is None:
        return None
    post = _LOGITS_AFTER_HEAD[owner]
    return decoder, head, (lambda logits: logits) if post is None else (lambda logits: post(model, logits))


def _token_nll(
    model, rows: Sequence[Sequence[int]], first_targets: Sequence[int], pad_id: int, chunked_head: bool = True
):
    """Summed next-token NLL of ``rows[i][first_targets[i]:]`` given the tokens before, one batched forward.

    Rows are left-padded with position ids from the attention mask (so every row sees exactly what it sees
    alone). With ``chunked_head`` (and a model :func:`_lm_head_split` knows) the decoder runs once and the LM
    head only sees the hidden states of the positions that predict scored tokens, ``NLL_CHUNK_BYTES`` of
    logits at a time; otherwise the model's own forward returns the logits of every position from the first
    scored one (``logits_to_keep`` when the model supports it). Both take the log-sum-exp in float32,
    chunk by chunk. Returns per-row NLL sums (float64) and scored-token counts.
    """
    device = model_device(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, first) in enumerate(zip(rows, first_targets, strict=True)):
        offset = width - len(row)
        ids[i, offset:] = torch.tensor(list(row), dtype=torch.long)
        mask[i, offset:] = 1
        target_mask[i, offset + max(int(first), 1) :] = True
    if not target_mask.any():
        return [0.0] * len(rows), [0] * len(rows)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
              "position_ids": positions.to(device)}
    split = _lm_head_split(model) if chunked_head else None
    if split is None:
        nll = _full_logits_nll(model, inputs, ids, target_mask)
    else:
        nll = _chunked_head_nll(*split, inputs, ids, target_mask)
    return nll.cpu().tolist(), target_mask.sum(-1).tolist()


def _consume_target_nll(logits, targets):
    """``-log_softmax(logits)`` at ``targets``, in float32 and without a second vocabulary-sized tensor: the
    log-sum-exp works in place on ``logits.float()``, so float32 ``logits`` are overwritten (pass a chunk that
    nothing reads afterwards)."""
    logits = logits.float()
    target = logits.gather(-1, targets[..., None].to(logits.device)).squeeze(-1)
    top = logits.amax(-1, keepdim=True)
    return logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1) - target


def _chunked_head_nll(decoder, head, post, inputs, ids, target_mask):
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    predicts = target_mask[:, 1:].to(hidden.device)  # position t predicts token t + 1
    hidden = hidden[:, :-1][predicts]
    targets = ids[:, 1:].to(hidden.device)[predicts]
    return _head_nll(head, post, hidden, targets, predicts.nonzero()[:, 0], len(ids))


def _head_nll(head, post, hidden, targets, row_of, num_rows):
    """Per-row summed NLL of ``targets`` predicted by ``hidden`` (one position each, of row ``row_of``), through
    the LM head ``NLL_CHUNK_BYTES`` of logits at a time."""
    nll = torch.zeros(num_rows, dtype=torch.float64, device=hidden.device)
    rows = _chunk_rows(head.out_features)  # not the weight's shape: ZeRO-3 leaves it empty between forwards
    for start in range(0, len(targets), rows):
        chunk = slice(start, start + rows)
        # The chunk's logits live only inside this call, so two chunks never exist at once.
        token_nll = _consume_target_nll(post(head(hidden[chunk])), targets[chunk])
        nll.index_add_(0, row_of[chunk], token_nll.to(nll.device, nll.dtype))
    return nll


def _shares_prefixes(model, split) -> bool:
    """Whether ``model`` can score continuations from a shared prefix's KV cache: a model whose decoder
    :func:`_lm_head_split` knows, that keeps a ``DynamicCache``, and no PEFT prompt learning (virtual tokens)."""
    peft_config = getattr(model, "active_peft_config", None)
    if split is None or (peft_config is not None and peft_config.is_prompt_learning):
        return False
    base = model.get_base_model() if peft_config is not None else model
    return not base.config.is_encoder_decoder and base._supports_default_dynamic_cache()


def _shared_prefix_nll(decoder, head, post, rows: Sequence[tuple[tuple[int, ...], Sequence[int]]], pad_id: int):
    """Summed NLL of each row's continuation given its prefix, each distinct prefix run through ``decoder`` once.

    ``rows`` holds ``(prefix, continuation)`` ids, prefixes of at least one token and continuations of at least
    one. The distinct prefixes but their last token are prefilled together, left-padded, into one
    ``DynamicCache`` that is then copied to each row; every row then runs its prefix's last token and its
    continuation but the last token, right-padded, on top of its copy. Only those positions predict scored
    tokens, so the LM head sees them alone (:func:`_head_nll`). Positions continue each row's own prefix, so a
    row sees exactly what it sees alone.
    """
    device = model_device(decoder)
    index = {prefix: i for i, prefix in enumerate(dict.fromkeys(prefix for prefix, _ in rows))}
    prefixes = list(index)
    row_prefix = torch.tensor([index[prefix] for prefix, _ in rows], device=device)
    cached = max(len(p) for p in prefixes) - 1
    cache_mask = torch.zeros((len(prefixes), cached), dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        cache_mask[i, cached - len(prefix) + 1 :] = 1
    cache = None
    if cached > 0:
        cache_ids = torch.full((len(prefixes), cached), pad_id, dtype=torch.long)
        for i, prefix in enumerate(prefixes):
            cache_ids[i, cached - len(prefix) + 1 :] = torch.tensor(prefix[:-1], dtype=torch.long)
        cache = DynamicCache(config=decoder.config.get_text_config(decoder=True))
        positions = (cache_mask.cumsum(-1) - 1).clamp(min=0)
        decoder(input_ids=cache_ids.to(device), attention_mask=cache_mask.to(device),
                position_ids=positions.to(device), cache=cache, use_cache=True)
        cache.batch_select_indices(row_prefix)
    width = max(len(cont) for _, cont in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prefix, cont) in enumerate(rows):
        ids[r, : len(cont)] = torch.tensor([prefix[-1], *cont[:-1]], dtype=torch.long)
        targets[r, : len(cont)] = torch.tensor(list(cont), dtype=torch.long)
        mask[r, : len(cont)] = 1
    starts = torch.tensor([len(prefix) - 1 for prefix, _ in rows])
    hidden = decoder(
        input_ids=ids.to(device), attention_mask=torch.cat([cache_mask[row_prefix.cpu()], mask], -1).to(device),
        position_ids=(starts[:, None] + torch.arange(width)).to(device), cache=cache, use_cache=cache is not None,
    ).last_hidden_state
    scored = mask.bool().to(hidden.device)
    return _head_nll(head, post, hidden[scored], targets.to(hidden.device)[scored], scored.nonzero()[:, 0],
                     len(rows))


def _full_logits_nll(model, inputs, ids, target_mask):
    width = ids.shape[1]
    keep = width - int(target_mask.any(0).nonzero()[0]) + 1  # the positions predicting scored tokens
    if _accepts(model, "logits_to_keep"):
        inputs = {**inputs, "logits_to_keep": keep}
    logits = model(**inputs).logits[:, -keep:-1]  # predicts the padded positions [width - keep + 1, width)
    targets = ids[:, width - keep + 1 :].to(logits.device)
    scored = target_mask[:, width - keep + 1 :].to(logits.device)
    nll = torch.zeros(len(ids), dtype=torch.float64, device=logits.device)
    step = max(1, _chunk_rows(logits.shape[-1]) // len(ids))  # positions per chunk of the batch's logits
    for start in range(0, logits.shape[1], step):
        token_nll = _consume_target_nll(logits[:, start : start + step], targets[:, start : start + step])
        nll += (token_nll.double() * scored[:, start : start + step]).sum(-1)
    return nll


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0  # pragma: no cover


def sliding_window_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_target)`` windows of the HF perplexity guide: each token is scored exactly once.

    A window covers tokens ``[begin, end)`` and scores the targets ``[first_target, end)`` (at least position
    ``begin + 1``), i.e. the tokens the previous window did not score, with up to ``max_length - stride`` tokens
    of context before them.
    """
    if max_length < 2:
        raise ValueError(f"`max_length` has to be >= 2, but is {max_length}.")
    if not 1 <= stride <= max_length:
        raise ValueError(f"`stride` has to be in [1, max_length={max_length}], but is {stride}.")
    windows, prev_end = [], 0
    for begin in range(0, max(num_tokens - 1, 0), stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def sliding_window_nll(
    model,
    tokenizer,
    texts: Sequence[str] | str,
    max_length: int | None = 1024,
    stride: int | None = None,
    batch_size: int = 4,
    join: str = "\n\n",
    max_tokens: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool | str = False,
    chunked_head: bool = True,
) -> tuple[float, int]:
    """Summed NLL and scored-token count of ``join.join(texts)`` with the HF guide's sliding window.

    The text is tokenized once (with the tokenizer's special tokens, e.g. BOS), cut to ``max_tokens`` tokens when
    given, and scored in windows of ``max_length`` tokens moving by ``stride`` (default ``max_length // 2``);
    every token after the first is scored exactly once. ``max_length`` is capped by the model's context.
    With several processes, process ``r`` scores windows ``r::num_processes``; sum the results over processes.
    ``chunked_head=False`` scores through the model's own forward and full logits (same numbers, more memory).
    """
    if isinstance(texts, str):
        texts = [texts]
    text = join.join(texts)
    limit = _max_positions(model)
    if max_length is None:
        max_length = limit or 1024
    if limit is not None:
        max_length = min(max_length, limit)
    stride = max_length // 2 if stride is None else stride
    if batch_size < 1:
        raise ValueError(f"`batch_size` has to be >= 1, but is {batch_size}.")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"`max_tokens` has to be None or >= 2, but is {max_tokens}.")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's maximum" is expected here
    try:
        ids = tokenizer(text)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("The text has fewer than 2 tokens: perplexity is undefined.")
    windows = sliding_window_windows(len(ids), max_length, stride)[process_index::num_processes]
    chunks = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    if progress:
        chunks = tqdm.auto.tqdm(chunks, desc=progress if isinstance(progress, str) else "perplexity", unit="batch",
                                dynamic_ncols=True)
    total_nll, total_count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in chunks:
                rows = [ids[b:e] for b, e, _ in chunk]
                firsts = [first - b for b, _, first in chunk]
                nll, count = _token_nll(model, rows, firsts, _pad_id(tokenizer), chunked_head=chunked_head)
                total_nll += sum(nll)
                total_count += int(sum(count))
    finally:
        model.train(was_training)
    return total_nll, total_count


def perplexity(model, tokenizer, texts: Sequence[str] | str, **window) -> float:
    """Perplexity of ``join.join(texts)`` under ``model`` with a sliding window: ``window`` takes the keyword
    arguments of :func:`sliding_window_nll` (``max_length``, ``stride``, ``batch_size``, ``join``, ``max_tokens``,
    ``progress``, ...) with its defaults.

    Example:
        >>> from unidetox import load_model_and_tokenizer
        >>> from unidetox.evaluation.likelihood import perplexity
        >>> model, tokenizer = load_model_and_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> perplexity(model, tokenizer, ["The capital of France is Paris."], max_length=512)  # doctest: +SKIP
    """
    nll, count = sliding_window_nll(model, tokenizer, texts, **window)
    return math.exp(nll / count)


def _continuation_ids(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Ids of ``prompt + continuation`` and the index of the first continuation token.

    Fast tokenizers: the text is tokenized as one string and tokens whose character span ends after the prompt
    are the continuation's (a token straddling the boundary counts as continuation). Slow tokenizers: the prompt
    is tokenized alone and its length is the boundary (the authors' rule).
    """
    full = prompt + continuation
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        boundary = len(ids)
        for i, (start, end) in enumerate(offsets):
            if end > len(prompt) and end > start:
                boundary = i
                break
        return ids, boundary
    ids = tokenizer(full)["input_ids"]
    return ids, min(len(tokenizer(prompt)["input_ids"]), len(ids))


def _encode_conditional(tokenizer, prompts, continuations, limit: int) -> list[tuple[list[int], int]]:
    """Per sample, prompt-major, the ids of prompt + continuation (at most ``limit``, prompt tokens cut from the
    left) and the index of the first scored token (at least 1: token 0 has no context)."""
    prompts, flat_prompts, flat_conts = list(prompts), [], []
    if len(prompts) != len(continuations):
        raise ValueError(f"Got {len(prompts)} prompts but {len(continuations)} continuation entries.")
    for prompt, cont in zip(prompts, continuations, strict=True):
        if isinstance(cont, str):
            flat_prompts.append(prompt)
            flat_conts.append(cont)
        else:
            flat_prompts.extend([prompt] * len(cont))
            flat_conts.extend(cont)
    encoded = []
    for prompt, cont in zip(flat_prompts, flat_conts, strict=True):
        ids, boundary = _continuation_ids(tokenizer, prompt, cont)
        if len(ids) > limit:
            cut = len(ids) - limit
            ids, boundary = ids[cut:], max(boundary - cut, 0)
        encoded.append((ids, max(boundary, 1)))
    return encoded


def conditional_nll(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str] | Sequence[Sequence[str]],
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool | str = False,
    chunked_head: bool = True,
    share_prompts: bool = True,
) -> list[tuple[float, int]]:
    """Per sample, the summed NLL of the continuation's tokens given its prompt, and how many tokens were scored.

    ``continuations`` is either one string per prompt, or one list of K strings per prompt (the output of
    :func:`unidetox.decoding.protocol.generate_continuations`), in which case the result is flattened prompt-major.
    Sequences longer than ``max_length`` (default: the model's context) lose prompt tokens from the left.
    An empty continuation gives ``(0.0, 0)``. ``chunked_head`` as in :func:`sliding_window_nll`.

    With ``share_prompts`` (and a model :func:`_shares_prefixes` accepts), samples are batched by their prompt's
    tokens (``batch_size`` samples a batch) and each distinct prompt of a batch runs once, its KV cache copied to
    its samples (:func:`_shared_prefix_nll`); otherwise every sample runs its whole sequence, left-padded. Both
    give the same numbers up to float rounding.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` has to be >= 1, but is {batch_size}.")
    encoded = _encode_conditional(tokenizer, prompts, continuations, max_length or _max_positions(model) or 2048)
    split = _lm_head_split(model) if chunked_head else None
    share = share_prompts and _shares_prefixes(model, split)
    if share:  # same prompt tokens together, then shorter continuations first: less padding
        scored = [i for i, (ids, first) in enumerate(encoded) if first < len(ids)]
        order = sorted(scored, key=lambda i: (encoded[i][1], encoded[i][0][: encoded[i][1]], len(encoded[i][0])))
    else:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        chunks = tqdm.auto.tqdm(chunks, desc=progress if isinstance(progress, str) else "conditional ppl",
                                unit="batch", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk in chunks:
                rows = [encoded[i][0] for i in chunk]
                firsts = [encoded[i][1] for i in chunk]
                if share:
                    pairs = [(tuple(row[:first]), row[first:]) for row, first in zip(rows, firsts, strict=True)]
                    nll = _shared_prefix_nll(*split, pairs, _pad_id(tokenizer)).cpu().tolist()
                    count = [len(row) - first for row, first in zip(rows, firsts, strict=True)]
                else:
                    nll, count = _token_nll(model, rows, firsts, _pad_id(tokenizer), chunked_head=chunked_head)
                for r, i in enumerate(chunk):
                    results[i] = (float(nll[r]), int(count[r]))
    finally:
        model.train(was_training)
    return results


def aggregate_conditional_perplexity(
    nll_and_counts: Sequence[tuple[float, int]], reduction: str = "mean", max_perplexity: float = 1e4
) -> float:
    """Reduce per-sample ``(nll, count)`` to one perplexity.

    ``reduction="mean"``: mean over samples of ``exp(nll / count)``, skipping empty samples and those at or above
    ``max_perplexity`` (the authors' rule, 1e4). ``reduction="token"``: ``exp(sum nll / sum count)``.
    """
    if reduction not in ("mean", "token"):
        raise ValueError(f"`reduction` has to be 'mean' or 'token', but is {reduction!r}.")
    scored = [(nll, n) for nll, n in nll_and_counts if n > 0]
    if not scored:
        raise ValueError("No sample has a scored continuation token: conditional perplexity is undefined.")
    if reduction == "token":
        return math.exp(sum(nll for nll, _ in scored) / sum(n for _, n in scored))
    values = [math.exp(min(nll / n, 700.0)) for nll, n in scored]
    kept = [v for v in values if v < max_perplexity]
    if not kept:
        raise ValueError(f"Every sample's perplexity is >= max_perplexity={max_perplexity}; raise the cap.")
    return sum(kept) / len(kept)


def conditional_perplexity(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str] | Sequence[Sequence[str]],
    reduction: str = "mean",
    max_perplexity: float = 1e4,
    **scoring,
) -> float:
    """Perplexity of continuations given their prompts under a reference LM (paper: Llama-2-7B).

    The reference model has its own tokenizer, so prompt and continuation are re-tokenized as text.
    ``reduction="mean"`` (default, the paper) averages per-sample perplexities below ``max_perplexity``;
    ``"token"`` pools all continuation tokens. ``scoring`` takes the keyword arguments of :func:`conditional_nll`
    (``batch_size``, ``max_length``, ``progress``, ...) with its defaults.

    Example:
        >>> from unidetox import load_model_and_tokenizer
        >>> from unidetox.evaluation.likelihood import conditional_perplexity
        >>> ref, ref_tok = load_model_and_tokenizer("gemma3-270m")  # doctest: +SKIP
        >>> conditional_perplexity(ref, ref_tok, ["The sky is"], [[" blue today.", " very dark"]])  # doctest: +SKIP
    """
    per_sample = conditional_nll(model, tokenizer, prompts, continuations, **scoring)
    return aggregate_conditional_perplexity(per_sample, reduction=reduction, max_perplexity=max_perplexity)
