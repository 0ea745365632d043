"""The distiller: sampling the distilled detoxifying text by contrastive decoding, batch by batch.

:func:`build_distilled` (:meth:`unidetox.DistilledDetoxDataset.build`) samples from a start token by
UniDetox contrastive decoding (``log p_base - log p_anti`` on the base's plausible set, no other truncation),
through the fused-or-two-model dispatch of :func:`~unidetox.contrastive_generate` (:mod:`unidetox.decoding.fused`).
The work is cut into global batches; batch ``i`` is seeded from ``(seed, i)`` and, under ``accelerate launch`` with
N processes, rank ``r`` samples the batches with ``i % N == r``, so the merged text does not depend on the number of
processes. Every finished batch is written as a shard at once (:mod:`unidetox.distill.shards`); a rerun skips
finished shards. The main process merges the shards in batch order into exactly ``num_samples`` rows and commits
the dataset with ``metadata.json`` last (its presence marks a complete build).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
import transformers
from transformers import GenerationConfig

from unidetox.decoding.config import GenerateOptions, SamplingConfig
from unidetox.decoding.fused import ResolvedModels, generate_resolved, resolve_models
from unidetox.devices import model_device
from unidetox.distill.anti_expert import load_anti_expert, load_if_named
from unidetox.distill.config import DistillConfig
from unidetox.distill.corpus import TEXT_COLUMN
from unidetox.distill.shards import (
    METADATA_FILE,
    METADATA_FIX,
    SHARD_CONFIG_FILE,
    SHARDS_DIR,
    STREAM_ANTI,
    STREAM_BASE,
    SUMMARY_SAMPLES_FILE,
    batch_rows,
    batch_seed,
    commit,
    read_committed,
    read_shard,
    read_shard_settings,
    shard_path,
)
from unidetox.distill.summary import summarize, summary_markdown
from unidetox.files import atomic_write_json, atomic_write_text, read_json_file
from unidetox.model_identity import model_id
from unidetox.models import ADAPTER_CONFIG_FILE, read_adapter_config
from unidetox.processes import process_state, wait_for_everyone
from unidetox.version import __version__

logger = logging.getLogger(__name__)
# The dataset container a build returns (``DistilledDetoxDataset``): made from ``(dataset, metadata)``.
_Container = TypeVar("_Container")
# The sampling settings a build's fingerprint records, in this order.
FINGERPRINTED_SAMPLING = ("alpha", "beta", "temperature", "top_k", "top_p", "stop_at_eos")


# ----------------------------------------------------------------------------------------------------------------
# Sampling one batch
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _only_explicit_generation_config(models, eos_token_id, pad_token_id, bos_token_id):
    """Swap in a bare GenerationConfig so the models' own files cannot inject top-k, penalties or min-p."""
    saved = [model.generation_config for model in models]
    for model in models:
        model.generation_config = GenerationConfig(
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id
        )
    try:
        yield
    finally:
        for model, config in zip(models, saved, strict=True):
            model.generation_config = config


@torch.no_grad()
def sample_batch(
    base,
    anti_expert,
    prompt_ids: list[int],
    batch_size: int,
    max_new_tokens: int,
    seed: int,
    *,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    resolved: ResolvedModels | None = None,
) -> list[list[int]]:
    """Sample ONE batch: ``batch_size`` continuations of ``prompt_ids``, as lists of new token ids.

    With an ``anti_expert`` each token is drawn from UniDetox's contrastive scores (``sampling``, default
    ``SamplingConfig()``); with ``anti_expert=None`` it is plain sampling from ``base`` with the same settings (the
    summary's comparison). The generation settings are passed explicitly and the models' ``generation_config`` is
    bypassed, so nothing (e.g. the library default top-k of 50) truncates the distribution behind the caller's
    back. The RNG is seeded with ``seed`` inside a forked RNG state, so the global RNG is untouched and the batch
    depends only on its arguments. Rows end before the first EOS token (which is not included).

    Whether base and anti-expert run fused (a LoRA anti-expert on the base: one doubled forward per token) or
    as two models is decided by :func:`unidetox.decoding.fused.resolve_models`, as for
    :func:`~unidetox.contrastive_generate`; both give the same tokens for the same seed. ``resolved`` reuses
    one such decision (``resolve_models(base, anti_expert)``) across batches.
    """
    if resolved is None:
        resolved = ResolvedModels(base, None) if anti_expert is None else resolve_models(base, anti_expert)
    elif resolved.base is not base or resolved.anti_expert is not anti_expert:
        raise ValueError(
            "`resolved` holds other models than `base` and `anti_expert`; pass the `base` and `anti_expert` "
            "of the ResolvedModels, or leave `resolved` as None."
        )
    device = model_device(resolved.lora if resolved.lora is not None else resolved.base)
    input_ids = torch.tensor([list(prompt_ids)] * batch_size, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    fork_devices = [device] if device.type == "cuda" else []
    eos_ids = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    bos = prompt_ids[0] if prompt_ids else None
    bare_config = _only_explicit_generation_config(
        resolved.underlying_models(), eos_token_id, pad_token_id, bos
    )
    with torch.random.fork_rng(devices=fork_devices), bare_config:
        torch.manual_seed(seed)
        options = GenerateOptions(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        out = generate_resolved(resolved, input_ids, attention_mask, sampling, options).sequences
    return _cut_at_eos(out[:, input_ids.shape[1] :].tolist(), eos_ids)


def _cut_at_eos(rows: list[list[int]], eos_ids: set[int]) -> list[list[int]]:
    """Each row up to (not including) its first EOS token."""
    return [row[: next((k for k, tok in enumerate(row) if tok in eos_ids), len(row))] for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# One build, step by step
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DistillPlan:
    """What one build samples, resolved once from its inputs: the settings, the start and end tokens, the names of
    the models, the fingerprint that identifies its shards, and where they go (``out`` None: in memory)."""

    sampling: SamplingConfig
    distill: DistillConfig
    seed: int
    tokenizer: Any
    base_id: str
    anti_expert_id: str | None
    start_token: str
    start_id: int
    eos_ids: list[int] | None
    pad_id: int
    out: Path | None

    @property
    def shards(self) -> Path | None:
        return self.out / SHARDS_DIR if self.out is not None else None

    @property
    def num_batches(self) -> int:
        return math.ceil(self.distill.num_samples / self.distill.batch_size)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What decides the texts; a build in ``out`` with another fingerprint is refused (or discarded)."""
        return {
            "base": self.base_id,
            "anti_expert": self.anti_expert_id,
            "start_token": self.start_token,
            "start_token_id": self.start_id,
            "max_length": self.distill.max_length,
            "batch_size": self.distill.batch_size,
            "seed": self.seed,
            "eos_token_ids": self.eos_ids,
            **{k: getattr(self.sampling, k) for k in FINGERPRINTED_SAMPLING},
        }

    def sample(self, rows: int, seed: int, base, anti_expert=None, resolved: ResolvedModels | None = None
               ) -> list[list[int]]:
        """``rows`` texts from the start token, drawn with this build's settings under ``seed``."""
        return sample_batch(base, anti_expert, [self.start_id], rows, self.distill.max_length, seed,
                            sampling=self.sampling, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                            resolved=resolved)


def _model_names(base, anti_expert, base_id: str | None, anti_expert_id: str | None) -> tuple[str, str | None]:
    """The names a build records for its models (:func:`model_id` unless given); a broken saved adapter fails here,
    before anything is written."""
    base_id = base_id or model_id(base)
    if anti_expert is None:
        return base_id, None
    if anti_expert_id is None:
        return base_id, model_id(anti_expert)
    if isinstance(anti_expert, (str, os.PathLike)) and (Path(anti_expert).expanduser() / ADAPTER_CONFIG_FILE).is_file():
        read_adapter_config(anti_expert)
    return base_id, anti_expert_id


def _start_and_stop_tokens(base, tokenizer, sampling: SamplingConfig, distill: DistillConfig):
    """``(start token, its id, EOS ids or None, pad id)`` of a build; a start token outside the vocabulary raises."""
    start_token = distill.start_token if distill.start_token is not None else tokenizer.bos_token
    if start_token is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no bos_token; pass `start_token` (e.g. the document separator "
            f"{tokenizer.eos_token!r})."
        )
    vocab = tokenizer.get_vocab()
    if start_token not in vocab:
        raise ValueError(
            f"`start_token` {start_token!r} is not a token of this tokenizer's vocabulary (bos: "
            f"{tokenizer.bos_token!r}, eos: {tokenizer.eos_token!r}); pass one of its tokens, or None for the bos "
            "token (recipes: `distill.start_token=...`)."
        )
    eos_ids: list[int] | None = None
    if sampling.stop_at_eos:
        gen_eos = base.generation_config.eos_token_id
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        eos_ids = sorted({tokenizer.eos_token_id, *gen_eos} - {None})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    return start_token, vocab[start_token], eos_ids, pad_id


def _committed(plan: DistillPlan) -> tuple[datasets.Dataset, dict] | None:
    """The dataset in ``plan.out`` when it holds this build, complete; ``None`` otherwise."""
    meta_file = plan.out / METADATA_FILE if plan.out is not None else None
    if meta_file is None or not meta_file.is_file():
        return None
    existing = read_json_file(meta_file, fix=METADATA_FIX)
    if existing.get("fingerprint") == plan.fingerprint and existing.get("num_samples") == plan.distill.num_samples:
        logger.info("%s already holds this distilled dataset; loading it", plan.out)
        return read_committed(plan.out)
    return None


def _checked_shard_settings(plan: DistillPlan) -> dict | None:
    """The settings of the shards already in ``plan.out`` (None: none); other settings raise unless overwritten."""
    if plan.out is None:
        return None
    old = read_shard_settings(plan.shards / SHARD_CONFIG_FILE, plan.distill.overwrite)
    fingerprint = plan.fingerprint
    if old is not None and old != fingerprint and not plan.distill.overwrite:
        changed = [f"{k}: {old.get(k)!r} -> {value!r}" for k, value in fingerprint.items() if old.get(k) != value]
        raise ValueError(
            f"{plan.out} holds shards sampled with other settings ({'; '.join(changed)}). Use another "
            "`output_dir`, or `overwrite=True` to discard them."
        )
    return old


def _start_shards(plan: DistillPlan, old: dict | None, is_main: bool) -> None:
    """Record this build's settings next to its shards (discarding shards of other settings with ``overwrite``)."""
    if plan.out is None:
        return
    wait_for_everyone()  # every rank has read the shard settings before the main process rewrites
    if is_main:
        if plan.distill.overwrite and old is not None and old != plan.fingerprint:
            shutil.rmtree(plan.shards)
        plan.shards.mkdir(parents=True, exist_ok=True)
        (plan.out / METADATA_FILE).unlink(missing_ok=True)  # the commit marker goes until the new merge is done
        atomic_write_json(plan.shards / SHARD_CONFIG_FILE, plan.fingerprint)
    wait_for_everyone()


def _sample_own_batches(plan: DistillPlan, models: ResolvedModels, state, show_progress: bool) -> dict[int, dict]:
    """The shards of this process's batches (``i % processes == rank``): read when finished before, else sampled
    and written at once."""
    rank, world = state.process_index, state.num_processes
    from tqdm.auto import tqdm  # looked up at each call, like every bar of the package

    mine = range(rank, plan.num_batches, world)  # lazily: the first batch starts at once, whatever the size
    results: dict[int, dict] = {}
    progress = tqdm(total=len(mine), desc=f"distilling (rank {rank}/{world})", unit="batch",
                    disable=not (show_progress and state.is_main_process))
    for i in mine:
        rows_in_batch = batch_rows(i, plan.distill.num_samples, plan.distill.batch_size)
        shard = read_shard(shard_path(plan.shards, i), i, plan.seed, rows_in_batch) if plan.shards else None
        if shard is None:
            t0 = time.perf_counter()
            rows = plan.sample(rows_in_batch, batch_seed(plan.seed, i), models.base, models.anti_expert, models)
            shard = {"batch": i, "seed": batch_seed(plan.seed, i), "rank": rank, "token_ids": rows,
                     "generation_time_s": round(time.perf_counter() - t0, 3)}
            if plan.shards is not None:
                atomic_write_text(shard_path(plan.shards, i), json.dumps(shard))
            progress.set_postfix(tok_per_s=f"{sum(map(len, rows)) / max(shard['generation_time_s'], 1e-9):.0f}")
        results[i] = shard
        progress.update(1)
    progress.close()
    return results


def _merged_shards(plan: DistillPlan, results: dict[int, dict]) -> list[dict]:
    """Every batch's shard in batch order: this process's from ``results``, the others' read from the store."""
    merged = []
    for i in range(plan.num_batches):
        shard = results.get(i) or read_shard(shard_path(plan.shards, i), i, plan.seed,
                                             batch_rows(i, plan.distill.num_samples, plan.distill.batch_size))
        if shard is None:
            raise RuntimeError(
                f"Shard {i} of {plan.num_batches} is missing or incomplete in {plan.shards} after sampling."
            )
        merged.append(shard)
    return merged


def _plain_samples(plan: DistillPlan, models: ResolvedModels, show_progress: bool) -> dict[str, tuple[list, list]]:
    """Plain samples of the base (and of the anti-expert), drawn like the distilled text from their own seed
    streams: the texts the summary compares the distilled text with."""
    from tqdm.auto import tqdm  # looked up at each call, like every bar of the package

    n, batch_size = plan.distill.summary_num_samples, plan.distill.batch_size
    sources = [("base", models.base, models.base_context, STREAM_BASE)]
    if models.anti_expert is not None:
        sources.append(("anti_expert", models.anti_expert, contextlib.nullcontext, STREAM_ANTI))
    groups = {}
    for name, model, context, stream in sources:
        ids: list[list[int]] = []
        for j in tqdm(range(math.ceil(n / batch_size)), desc=f"summary: {name} samples", unit="batch",
                      disable=not show_progress, dynamic_ncols=True):
            with context():
                ids += plan.sample(min(batch_size, n - j * batch_size), batch_seed(plan.seed, j, stream), model)
        groups[name] = (plan.tokenizer.batch_decode(ids, skip_special_tokens=True), [len(r) for r in ids])
    return groups


def _version_info() -> dict[str, str]:
    return {"unidetox": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _metadata(plan: DistillPlan, models: ResolvedModels, shards: list[dict], texts: list[str],
              num_tokens: list[int], num_processes: int) -> dict[str, Any]:
    """The build's ``metadata.json`` (without the summary and the wall time, which come last)."""
    sampling = plan.sampling
    return {
        "base": plan.base_id,
        "anti_expert": plan.anti_expert_id,
        "alpha": sampling.alpha,
        "beta": sampling.beta,
        "seed": plan.seed,
        "num_samples": plan.distill.num_samples,
        "max_length": plan.distill.max_length,
        "batch_size": plan.distill.batch_size,
        "num_batches": plan.num_batches,
        "num_processes": num_processes,
        "start_token": plan.start_token,
        "start_token_id": plan.start_id,
        "sampling": {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,
                     "top_p": sampling.top_p, "stop_at_eos": sampling.stop_at_eos, "eos_token_ids": plan.eos_ids},
        "total_tokens": sum(num_tokens),
        "mean_tokens": sum(num_tokens) / len(num_tokens),
        "num_empty_texts": sum(1 for t in texts if not t.strip()),
        "generation_time_s": round(sum(s["generation_time_s"] for s in shards), 2),
        "decoding": models.decoding,
        "fingerprint": plan.fingerprint,
        "versions": _version_info(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _merge_and_commit(plan: DistillPlan, models: ResolvedModels, results: dict[int, dict], num_processes: int,
                      scorer, show_progress: bool, started: float) -> tuple[datasets.Dataset, dict]:
    """On the main process: the merged texts, their summary, and the metadata, committed to ``plan.out``."""
    shards = _merged_shards(plan, results)
    token_ids = [row for shard in shards for row in shard["token_ids"]][: plan.distill.num_samples]
    texts = plan.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    num_tokens = [len(row) for row in token_ids]
    dataset = datasets.Dataset.from_dict({TEXT_COLUMN: texts, "num_tokens": num_tokens})
    metadata = _metadata(plan, models, shards, texts, num_tokens, num_processes)
    if plan.distill.summary_num_samples > 0:
        groups = {"distilled": (texts, num_tokens), **_plain_samples(plan, models, show_progress)}
        summary, samples = summarize(groups, scorer, seed=plan.seed)
        metadata["summary"] = summary
        print(summary_markdown(summary), flush=True)
        if plan.out is not None:
            plan.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(plan.out / SUMMARY_SAMPLES_FILE, "".join(json.dumps(s) + "\n" for s in samples))
    metadata["wall_time_s"] = round(time.perf_counter() - started, 2)
    if plan.out is not None:
        commit(dataset, metadata, plan.out)
    return dataset, metadata


def _resolve_for_build(base, anti_expert, fused: bool | None, device) -> ResolvedModels:
    """The models a build samples with, on ``device``: a path is loaded (a saved adapter is attached to a copy
    of ``base``, so the base given is the base used), then :func:`~unidetox.decoding.fused.resolve_models`
    decides between fused and two-model decoding."""
    base.to(device).eval()
    if anti_expert is None:
        if fused:
            raise ValueError("fused=True needs a LoRA anti-expert; `anti_expert` is None (plain sampling).")
        return ResolvedModels(base, None)
    if isinstance(anti_expert, (str, os.PathLike)):
        # merge=False: a saved adapter stays an adapter so that the fused path can use it.
        anti_expert = load_anti_expert(anti_expert, merge=False, base_model=base)
    anti_expert.to(device)
    return resolve_models(base, anti_expert, fused=fused)


def _plan_build(base, anti_expert, tokenizer, sampling: SamplingConfig, distill: DistillConfig, output_dir,
                seed: int, base_id: str | None, anti_expert_id: str | None) -> tuple[DistillPlan, Any]:
    """The plan of a build and its base model (loaded when given by name), once the arguments are checked."""
    if isinstance(base, (str, os.PathLike)):
        base_id = base_id or model_id(base)
    base, tokenizer = load_if_named(base, tokenizer)
    base_id, anti_expert_id = _model_names(base, anti_expert, base_id, anti_expert_id)
    plan = DistillPlan(sampling, distill, seed, tokenizer, base_id, anti_expert_id,
                       *_start_and_stop_tokens(base, tokenizer, sampling, distill),
                       out=Path(output_dir) if output_dir is not None else None)
    return plan, base


def build_distilled(
    cls: type[_Container],
    base,
    anti_expert,
    tokenizer,
    sampling: SamplingConfig | None = None,
    distill: DistillConfig | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    scorer=None,
    base_id: str | None = None,
    anti_expert_id: str | None = None,
    show_progress: bool = True,
) -> _Container:
    """Distill detoxifying text by contrastive sampling from a start token, as a ``cls`` (a
    :class:`~unidetox.DistilledDetoxDataset`: this is its :meth:`~unidetox.DistilledDetoxDataset.build`).

    Args:
        base: the base causal LM (or a name/path for :func:`unidetox.load_model_and_tokenizer`).
        anti_expert: the toxic model: a separate causal LM, a peft model (LoRA adapter, on ``base`` itself or
            on a copy), or a path / hub id of a saved anti-expert or adapter (a saved adapter is attached to a
            copy of ``base``). ``None`` samples the base alone with the same settings: the control corpus
            (fine-tuning on the base's own text, no contrast).
        tokenizer: the base's tokenizer (``None`` when ``base`` is a name).
        sampling: how each token is drawn (default ``SamplingConfig()``: the paper's alpha 0.1, pure log-ratio,
            no truncation); the contrast is :class:`~unidetox.ContrastiveDetoxSampler`'s.
        distill: how many texts of how many tokens, batched how, from which start token (default: the
            tokenizer's bos), the summary's size (``summary_num_samples``, 0 skips it), ``overwrite`` (discard
            a build in ``output_dir`` made with other settings) and ``fused`` (how a LoRA anti-expert runs:
            ``None`` fuses base and adapter into one doubled forward per token, ``False`` merges the adapter
            into a separate copy, ``True`` requires fusing; the tokens are the same for the same seed).
            Default ``DistillConfig()``: the paper's 640 texts of 256 tokens.
        output_dir: where shards and the final dataset go; needed for resuming and for several processes.
            ``None`` keeps everything in memory (one process).
        seed: batch ``i`` is sampled under ``torch.manual_seed(batch_seed(seed, i))``.
        scorer: a :class:`~unidetox.ToxicityScorer` for the summary (default
            :class:`~unidetox.ProfanityCheckScorer`).
        base_id, anti_expert_id: names recorded in the metadata and fingerprint, which decide whether the
            shards in ``output_dir`` are reused. Default (:func:`~unidetox.model_identity.model_id`): a saved
            directory by the digest of its weight files, an in-memory model by the digest of its state dict,
            a hub id by its name.
        show_progress: tqdm progress bar on the main process.

    Under ``accelerate launch`` with N processes, rank ``r`` samples the batches ``i`` with ``i % N == r``; the
    main process merges them, so the texts are those of a 1-process run with the same seed.
    """
    state = process_state()
    if state.num_processes > 1 and output_dir is None:
        raise ValueError(
            f"Running on {state.num_processes} processes needs an `output_dir` to collect their shards in; pass one."
        )
    sampling = sampling if sampling is not None else SamplingConfig()
    distill = distill if distill is not None else DistillConfig()
    plan, base = _plan_build(base, anti_expert, tokenizer, sampling, distill, output_dir, seed, base_id, anti_expert_id)
    committed = _committed(plan)
    if committed is not None:
        return cls(*committed)
    old = _checked_shard_settings(plan)
    # The models are checked before anything is written: a failed check leaves no settings behind that would
    # refuse the corrected rerun.
    models = _resolve_for_build(base, anti_expert, distill.fused, state.device)  # refuses another vocabulary
    logger.info("Distilling with %s decoding", models.decoding)
    _start_shards(plan, old, state.is_main_process)
    started = time.perf_counter()
    results = _sample_own_batches(plan, models, state, show_progress)
    if plan.out is not None:
        wait_for_everyone()
    built = None
    if state.is_main_process:
        built = _merge_and_commit(plan, models, results, state.num_processes, scorer, show_progress, started)
    if plan.out is not None:
        wait_for_everyone()
        if built is None:
            built = read_committed(plan.out)
    return cls(*built)
