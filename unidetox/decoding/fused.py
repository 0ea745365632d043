"""Contrastive decoding at nearly the cost of one model when the anti-expert is the base plus a LoRA adapter.

With two separate models every token costs two full forward passes. When the anti-expert is ``base + LoRA``,
both distributions come from ONE forward over a doubled batch ``[x; x]``: the base weights are read once per
step for both halves and only the adapter's small matrices run on the second half. Each half keeps its own KV
cache rows, so the result is the two-model :class:`~unidetox.ContrastiveDetoxSampler` computed differently:
same scores (up to float noise) and, for the same seed, the same tokens (the sampling step draws from the global
torch RNG exactly as ``generate()`` does). Rows that repeat a prompt (K samples of one prompt) share one prefill:
each distinct prompt runs once in each half and its KV cache is copied to its rows.

:func:`resolve_models` is the one place that decides between the fused path and two separate models
(``generate()`` + :class:`~unidetox.ContrastiveDetoxSampler`); :func:`generate_resolved` runs what it
decided. :func:`contrastive_generate` is the entry point for one call; ``DistilledDetoxDataset.build``
resolves once and samples every batch through :func:`generate_resolved`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from unidetox.decoding.config import GenerateOptions, SamplingConfig
from unidetox.decoding.logits_process import (
    ContrastiveDetoxSampler,
    contrastive_scores,
    distinct_rows,
    require_shared_vocabulary,
    scored_vocabulary_size,
)


@dataclass
class ContrastiveGenerateOutput:
    """``sequences``: prompt + new tokens, shape ``(batch, prompt_len + new)``; ``scores``: per-step contrastive
    scores (after temperature / top-k / top-p), only when requested."""

    sequences: torch.LongTensor
    scores: tuple[torch.FloatTensor, ...] | None = None


def _peft_lora_layers(model, adapter_name: str):
    from peft.tuners.lora import LoraLayer

    # Embedding LoRA keeps its weights in `lora_embedding_A/B`, linear/conv LoRA in `lora_A/B`.
    return [
        m for m in model.modules()
        if isinstance(m, LoraLayer) and (adapter_name in m.lora_A or adapter_name in getattr(m, "lora_embedding_A", {}))
    ]


def is_lora_anti_expert(model, adapter_name: str | None = None) -> bool:
    """True when ``model`` is a peft model carrying a LoRA adapter (``adapter_name`` or the active one)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if not isinstance(model, PeftModel):
        return False
    adapter_name = adapter_name or model.active_adapter
    return bool(_peft_lora_layers(model, adapter_name))


def _fast_path_supported(layers, adapter_name: str) -> bool:
    """Plain ``nn.Linear`` LoRA (no DoRA or other variants, not merged) can use the slicing hooks below."""
    import torch.nn as nn

    for layer in layers:
        if adapter_name not in layer.lora_A or not isinstance(layer.get_base_layer(), nn.Linear):
            return False
        if getattr(layer, "merged", False) or adapter_name in getattr(layer, "lora_variant", {}):
            return False
        if getattr(layer, "use_dora", {}).get(adapter_name, False):
            return False
    return True


@contextlib.contextmanager
def lora_on_second_half(peft_model, adapter_name: str) -> Iterator[None]:
    """Within the context, ``peft_model``'s LoRA adapter applies to the second half of every batch's rows only.

    Fast path (plain Linear LoRA): the adapter is disabled, and a forward hook on every LoRA layer adds
    ``B(A(x[half:])) * scaling`` to the second half of the base layer's output (contiguous slices, no index
    lists). Other LoRA flavours use peft's own mixed-batch inference (``adapter_names`` per row). The half is
    read from each batch, so the prefill of the distinct prompts and the decoding steps of all rows can differ
    in size.
    """
    layers = _peft_lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"The model has no LoRA adapter named {adapter_name!r}; adapters: "
                         f"{list(getattr(peft_model, 'peft_config', {}))}.")
    if not _fast_path_supported(layers, adapter_name):
        yield None  # the caller passes adapter_names instead (see _FusedForward)
        return

    def add_lora_delta(module, args, output):
        x = args[0]
        half = x.shape[0] // 2
        lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        delta = lora_b(lora_a(x[half:].to(lora_a.weight.dtype))) * module.scaling[adapter_name]
        output[half:] += delta.to(output.dtype)
        return output

    handles = []
    with peft_model.disable_adapter():
        try:
            handles = [layer.register_forward_hook(add_lora_delta) for layer in layers]
            yield None
        finally:
            for handle in handles:
                handle.remove()


class _FusedForward:
    """Runs a doubled batch through the LoRA model: its first half is the base, its second half the anti-expert."""

    def __init__(self, peft_model, adapter_name: str):
        self.peft_model = peft_model
        self.inner = peft_model.get_base_model()
        self.adapter_name = adapter_name
        self.fast = _fast_path_supported(_peft_lora_layers(peft_model, adapter_name), adapter_name)

    def supports_logits_to_keep(self) -> bool:
        return self.inner._supports_logits_to_keep()

    def __call__(self, **kwargs):
        if self.fast:
            return self.inner(**kwargs)
        half = kwargs["input_ids"].shape[0] // 2
        names = ["__base__"] * half + [self.adapter_name] * half
        return self.peft_model(**kwargs, adapter_names=names)


def _fused_prefill(forward: _FusedForward, input_ids: torch.LongTensor, mask: torch.LongTensor, share: bool):
    """Next-token logits (base rows, then anti-expert rows) and the KV cache of the doubled prompt batch.

    With ``share``, each distinct prompt of ``input_ids`` runs once per half and its cache and logits are copied
    to the rows that repeat it, so K samples of a prompt cost one prefill instead of K.
    """
    shared = distinct_rows(input_ids, mask) if share else None
    prompt_ids, prompt_mask = (input_ids, mask) if shared is None else (input_ids[shared[0]], mask[shared[0]])
    doubled_mask = torch.cat([prompt_mask, prompt_mask])
    positions = (doubled_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are used; the rest would be a full LM-head product per prompt token.
    keep = {"logits_to_keep": 1} if forward.supports_logits_to_keep() else {}
    out = forward(input_ids=torch.cat([prompt_ids, prompt_ids]), attention_mask=doubled_mask,
                  position_ids=positions, use_cache=True, **keep)
    logits, cache = out.logits[:, -1], out.cache
    if shared is not None:
        rows = shared[1]
        doubled_rows = torch.cat([rows, rows + prompt_ids.shape[0]])
        cache.batch_select_indices(doubled_rows)
        logits = logits[doubled_rows]
    return logits, cache


def _warpers(sampling: SamplingConfig) -> LogitsProcessorList:
    # Same warpers, same order and same conditions as generate(): temperature, top-k, top-p.
    warpers = LogitsProcessorList()
    if sampling.temperature is not None and sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k is not None and sampling.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=sampling.top_k, min_tokens_to_keep=1))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=sampling.top_p, min_tokens_to_keep=1))
    return warpers


def _as_id_list(token_ids) -> list[int]:
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    if isinstance(token_ids, torch.Tensor):
        return token_ids.flatten().tolist()
    return list(token_ids)


def _eos_and_pad(model, options: GenerateOptions) -> tuple[list[int], int | None]:
    """The EOS ids and the pad id of a fused call; unset ones come from the model's generation config, as in
    generate()."""
    generation_config = model.get_base_model().generation_config
    eos_token_id, pad_token_id = options.eos_token_id, options.pad_token_id
    if eos_token_id is None:
        eos_token_id = generation_config.eos_token_id
    if pad_token_id is None:
        pad_token_id = generation_config.pad_token_id
        if pad_token_id is None and eos_token_id is not None:
            pad_token_id = _as_id_list(eos_token_id)[0]
    eos_ids = _as_id_list(eos_token_id)
    if eos_ids and pad_token_id is None:
        raise ValueError("`pad_token_id` is needed to fill finished rows when `eos_token_id` is set.")
    return eos_ids, pad_token_id


@dataclass
class _FusedDecoding:
    """One fused decoding call: its settings, resolved once, and the token rule of one step."""

    sampling: SamplingConfig
    options: GenerateOptions
    warpers: LogitsProcessorList
    eos: torch.LongTensor | None
    pad_token_id: int | None
    batch: int

    def next_tokens(self, logits: torch.Tensor, sequences: torch.LongTensor, step: int):
        """``(tokens, scores)`` of one step from the doubled batch's logits (base rows, then anti-expert rows)."""
        logits = logits.float()
        base_logits, anti_logits = logits[: self.batch], logits[self.batch :]
        if step < self.options.min_new_tokens and self.eos is not None:
            # generate() applies MinNewTokensLengthLogitsProcessor to the base logits before our processor.
            base_logits = base_logits.index_fill(-1, self.eos, -math.inf)
        scores = self.warpers(sequences, contrastive_scores(base_logits, anti_logits, self.sampling.alpha,
                                                            self.sampling.beta))
        if self.options.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1), scores
        return scores.argmax(dim=-1), scores


def _decode(forward: _FusedForward, decoding: _FusedDecoding, input_ids, mask, share_prefill: bool):
    """The token loop of :func:`fused_contrastive_generate` (inside ``lora_on_second_half``)."""
    batch, eos = decoding.batch, decoding.eos
    sequences, scores_out = input_ids, []
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    logits, cache = _fused_prefill(forward, input_ids, mask, share_prefill)
    doubled_mask = torch.cat([mask, mask])
    positions = (doubled_mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    max_new_tokens = decoding.options.max_new_tokens
    for step in range(max_new_tokens):
        next_tokens, scores = decoding.next_tokens(logits, sequences, step)
        if decoding.options.output_scores:
            scores_out.append(scores)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, decoding.pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        if eos is not None:
            unfinished = unfinished & ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()):
                break
        if step == max_new_tokens - 1:
            break
        doubled_mask = torch.cat([doubled_mask, doubled_mask.new_ones(2 * batch, 1)], dim=-1)
        positions = positions + 1
        out = forward(input_ids=torch.cat([next_tokens, next_tokens])[:, None], attention_mask=doubled_mask,
                      position_ids=positions, cache=cache, use_cache=True)
        logits, cache = out.logits[:, -1], out.cache
    return sequences, scores_out


@torch.no_grad()
def fused_contrastive_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    sampling: SamplingConfig | None = None,
    options: GenerateOptions | None = None,
    *,
    adapter_name: str | None = None,
    share_prefill: bool = True,
) -> ContrastiveGenerateOutput:
    """UniDetox contrastive decoding with a LoRA anti-expert in one forward per step (see module docstring).

    ``model`` is a peft model: with the adapter disabled it is the base, with ``adapter_name`` (default: the active
    adapter) it is the anti-expert. ``sampling`` is the decoding rule and ``options`` the ``generate()``-style
    arguments (defaults: ``SamplingConfig()``, ``GenerateOptions()``); EOS handling matches ``generate()``
    (finished rows are filled with the pad id; generation stops when every row has finished). ``share_prefill``
    prefills each distinct prompt once (in both halves) and copies its cache to the rows that repeat it; ``False``
    prefills every row. Both draw the same tokens for the same seed, up to floating-point rounding of the prefill.
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    options = options if options is not None else GenerateOptions()
    adapter_name = adapter_name or model.active_adapter
    if not is_lora_anti_expert(model, adapter_name):
        raise ValueError("fused_contrastive_generate needs a peft model with a LoRA adapter as the anti-expert.")
    eos_ids, pad_token_id = _eos_and_pad(model, options)
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device, torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` has shape {tuple(mask.shape)} but `input_ids` {tuple(input_ids.shape)}.")
    decoding = _FusedDecoding(
        sampling, options, _warpers(sampling) if options.do_sample else LogitsProcessorList(),
        torch.tensor(eos_ids, device=device, dtype=torch.long) if eos_ids else None, pad_token_id, input_ids.shape[0],
    )
    forward = _FusedForward(model, adapter_name)
    was_training = model.training
    model.eval()
    try:
        with lora_on_second_half(model, adapter_name):
            sequences, scores = _decode(forward, decoding, input_ids, mask, share_prefill)
    finally:
        model.train(was_training)
    return ContrastiveGenerateOutput(sequences, tuple(scores) if options.output_scores else None)


def _is_adapter_on(base, anti_expert) -> bool:
    """True when ``anti_expert`` is a peft model whose underlying modules are ``base`` itself."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    if not isinstance(anti_expert, PeftModel):
        return False
    inner = anti_expert.get_base_model()
    if inner is base:
        return True
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    return any(p.data_ptr() in base_ptrs for p in inner.parameters())


def _base_weights(peft_model) -> dict[str, torch.Tensor]:
    """The state dict of the model under a peft model's adapter layers, in the plain model's key names."""
    return {
        key.replace(".base_layer.", "."): value
        for key, value in peft_model.get_base_model().state_dict().items()
        if "lora_" not in key
    }


def _same_weights(base, peft_model) -> bool:
    """True when the model under ``peft_model``'s adapter holds exactly ``base``'s weights (e.g. a copy)."""
    own = base.state_dict()
    under = _base_weights(peft_model)
    if own.keys() != under.keys():
        return False
    return all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device)) for a, b in
        ((own[key], under[key]) for key in own)
    )


@dataclass
class ResolvedModels:
    """The models one contrastive decoding runs with, as :func:`resolve_models` decided.

    ``base``/``anti_expert`` draw plain samples (each inside its context: when the adapter sits on ``base``
    itself, the base runs with the adapter disabled). ``lora`` is set when the anti-expert is ``base + LoRA``
    and the fused path is on: the contrastive scores then come from ONE doubled forward per token instead of
    two separate models; the tokens are the same for the same seed. ``anti_expert=None`` is plain sampling
    from ``base``.
    """

    base: Any
    anti_expert: Any
    base_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    lora: Any = None
    adapter_name: str | None = None

    @property
    def decoding(self) -> str:
        if self.anti_expert is None:
            return "plain"
        return "fused-lora" if self.lora is not None else "two-model"

    def underlying_models(self) -> list:
        """The distinct models that run, each as the plain model under its peft wrapper (if any)."""
        found = []
        for model in (self.base, self.anti_expert, self.lora):
            if model is None:
                continue
            get_base_model = getattr(model, "get_base_model", None)
            inner = get_base_model() if get_base_model is not None else model
            if all(inner is not seen for seen in found):
                found.append(inner)
        return found


def _merged_copy(peft_model):
    """An independent plain model with the adapter merged in (the peft model and its base are untouched)."""
    return copy.deepcopy(peft_model).merge_and_unload().eval()


def resolve_models(base, anti_expert=None, *, fused: bool | None = None, adapter_name: str | None = None
                   ) -> ResolvedModels:
    """Decide how contrastive decoding runs: fused (one doubled forward) or two separate models.

    Args:
        base: the base causal LM, or a peft LoRA model whose adapter *is* the anti-expert (then leave
            ``anti_expert`` as ``None`` or pass the same object).
        anti_expert: a separate anti-expert (same vocabulary), or a peft LoRA model: on ``base`` itself, or
            on a model with exactly ``base``'s weights (a copy), either of which can be fused; a LoRA model on
            other weights runs as a separate model, so that the base distribution is always ``base``'s.
        fused: ``None`` fuses whenever it can; ``True`` requires it; ``False`` runs two separate models (a
            LoRA anti-expert is then merged into an independent copy).
        adapter_name: the LoRA adapter that is the anti-expert (default: the active one).
    """
    if anti_expert is None or anti_expert is base:
        if not is_lora_anti_expert(base, adapter_name):
            if anti_expert is base:
                raise ValueError(
                    "`anti_expert` is the base model itself: the contrast would be zero. Pass the fine-tuned "
                    "toxic model, or a peft LoRA model as `base` whose adapter is the anti-expert."
                )
            raise ValueError(
                "Pass `anti_expert`, or a peft LoRA model as `base` whose adapter is the anti-expert."
            )
        if fused is False:
            return ResolvedModels(base, _merged_copy(base), base.disable_adapter)
        return ResolvedModels(base, base, base.disable_adapter, lora=base, adapter_name=adapter_name)
    is_lora = is_lora_anti_expert(anti_expert, adapter_name)
    on_base = _is_adapter_on(base, anti_expert)
    can_fuse = is_lora and (on_base or _same_weights(base, anti_expert))
    if fused and not can_fuse:
        raise ValueError(
            "fused=True needs a peft LoRA anti-expert (base + adapter) whose adapter sits on `base` itself "
            f"or on a model with exactly `base`'s weights; got {type(anti_expert).__name__}"
            f"{' on other weights' if is_lora else ''}. Use fused=None to pick the path automatically."
        )
    base_context = anti_expert.disable_adapter if on_base else contextlib.nullcontext
    require_shared_vocabulary(scored_vocabulary_size(base), scored_vocabulary_size(anti_expert))
    if can_fuse and fused is not False:
        return ResolvedModels(base, anti_expert.eval(), base_context, lora=anti_expert,
                              adapter_name=adapter_name)
    if is_lora or on_base:
        # Two separate models: the adapter merged into an independent copy (the base runs adapter-free).
        return ResolvedModels(base, _merged_copy(anti_expert), base_context)
    return ResolvedModels(base, anti_expert.eval(), base_context)


@torch.no_grad()
def generate_resolved(
    models: ResolvedModels,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    sampling: SamplingConfig | None = None,
    options: GenerateOptions | None = None,
) -> ContrastiveGenerateOutput:
    """Decode with the models :func:`resolve_models` chose: fused, two models, or plain (no anti-expert).

    ``sampling`` is the decoding rule, ``options`` the ``generate()``-style arguments (defaults:
    ``SamplingConfig()``, ``GenerateOptions()``); unset EOS/pad come from the model's generation config, as there.
    """
    sampling = sampling if sampling is not None else SamplingConfig()
    options = options if options is not None else GenerateOptions()
    if models.lora is not None:
        return fused_contrastive_generate(models.lora, input_ids, attention_mask, sampling, options,
                                          adapter_name=models.adapter_name)
    processors = LogitsProcessorList()
    if models.anti_expert is not None:
        processors.append(ContrastiveDetoxSampler(models.anti_expert, alpha=sampling.alpha, beta=sampling.beta,
                                                  attention_mask=attention_mask))
    with models.base_context():
        out = models.base.generate(
            input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
            max_new_tokens=options.max_new_tokens, min_new_tokens=options.min_new_tokens,
            eos_token_id=options.eos_token_id, pad_token_id=options.pad_token_id, return_dict_in_generate=True,
            output_scores=options.output_scores, do_sample=options.do_sample, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p,
        )
    return ContrastiveGenerateOutput(out.sequences, out.scores if options.output_scores else None)


@torch.no_grad()
def contrastive_generate(
    base,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    sampling: SamplingConfig | None = None,
    options: GenerateOptions | None = None,
    *,
    anti_expert=None,
    adapter_name: str | None = None,
    fused: bool | None = None,
) -> ContrastiveGenerateOutput:
    """UniDetox contrastive decoding; fused when the anti-expert is a LoRA adapter on the base.

    Args:
        base: the base causal LM, or a peft LoRA model whose adapter *is* the anti-expert (then leave
            ``anti_expert`` as ``None`` or pass the same object).
        sampling: how each token is drawn (default ``SamplingConfig()``: the paper's alpha 0.1, pure log-ratio).
        options: the ``generate()``-style arguments (default ``GenerateOptions()``: 20 sampled tokens).
        anti_expert: a separate anti-expert model (same vocabulary), or a peft LoRA model on ``base`` (or on a
            copy of it); see :func:`resolve_models`.
        fused: ``None`` picks automatically; ``True`` requires the fused path; ``False`` requires the two-model
            path (``generate()`` + :class:`~unidetox.ContrastiveDetoxSampler`).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from unidetox.decoding.config import GenerateOptions
        >>> from unidetox.decoding.fused import contrastive_generate
        >>> lora_model = get_peft_model(base, LoraConfig(target_modules="all-linear"))  # doctest: +SKIP
        >>> # ... train the adapter on toxic text (unidetox.distill.anti_expert), then:
        >>> out = contrastive_generate(lora_model, input_ids, attention_mask,
        ...                            options=GenerateOptions(max_new_tokens=64))  # doctest: +SKIP
    """
    models = resolve_models(base, anti_expert, fused=fused, adapter_name=adapter_name)
    return generate_resolved(models, input_ids, attention_mask, sampling, options)
