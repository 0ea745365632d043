"""The replication's baselines: what the comparison needs beyond the three stages, importable without Hydra.

* :func:`build_plain_sample_dataset`: the *control* data, plain samples of the base from the same start token,
  with the same count, length and per-batch seeds as the distilled text (contrast switched off, nothing else).
* :func:`build_text_dataset`: human text from local files (DGHS ``label == nothate`` rows) as a dataset dir with a
  given number of texts.
* :func:`negate_task_vector`: ``base - lambda * (anti_expert - base)`` (LoRA: every ``lora_B`` scaled by
  ``-lambda`` then merged), saved as a plain HF model directory.

Every builder writes its marker file last, so a directory with the marker is complete and a rerun skips it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from unidetox.checks import require_count
from unidetox.decoding.config import SamplingConfig
from unidetox.distill.config import DistillConfig
from unidetox.distill.corpus import corpus_fingerprint, load_toxic_corpus
from unidetox.distill.dataset import DistilledDetoxDataset
from unidetox.distill.shards import METADATA_FILE, commit
from unidetox.files import atomic_write_json, read_json
from unidetox.models import load_model_and_tokenizer, parse_dtype

logger = logging.getLogger(__name__)

TASK_VECTOR_MARKER = "unidetox_task_vector.json"


# ================================================================================================================
# 1. Control data: plain samples of the base
# ================================================================================================================
def build_plain_sample_dataset(
    base,
    tokenizer,
    num_samples: int,
    max_length: int,
    start_token: str | None,
    seed: int,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_at_eos: bool = True,
    base_id: str | None = None,
    show_progress: bool = True,
):
    """Plain samples of ``base`` from ``start_token``, written as a :class:`~unidetox.DistilledDetoxDataset` dir.

    The control of the replication: the same count, length, start token, sampling settings and per-batch seeds
    (:func:`unidetox.distill.shards.batch_seed` of the distilled stream) as the distilled text, only without the
    anti-expert (:meth:`DistilledDetoxDataset.build` with ``anti_expert=None``). Fine-tuning on it separates
    "fine-tuning on benign self-generated text" from the contrastive effect.

    Resumable like the distilled build: each batch is a shard written at once; a rerun skips finished shards, and a
    directory whose ``metadata.json`` carries the same fingerprint is loaded without sampling anything.

    Example:
        >>> from unidetox import load_model_and_tokenizer
        >>> from unidetox.replication.baselines import build_plain_sample_dataset
        >>> base, tok = load_model_and_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> control = build_plain_sample_dataset(base, tok, 128, 128, "<|endoftext|>", 42, "runs/control")  # doctest: +SKIP
    """

    # DistilledDetoxDataset.build without an anti-expert samples the base alone, with the distilled stream's
    # per-batch seeds: same draws, same shards/resume/atomic commit as the distilled text.
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, stop_at_eos=stop_at_eos)
    distill = DistillConfig(num_samples=num_samples, max_length=max_length, batch_size=batch_size,
                            start_token=start_token, summary_num_samples=0)
    return DistilledDetoxDataset.build(base, None, tokenizer, sampling, distill, output_dir, seed=seed,
                                       base_id=base_id, show_progress=show_progress)


def plain_sample_settings(distilled_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`build_plain_sample_dataset` that make the control match a distilled set."""
    sampling = distilled_metadata.get("sampling") or {}
    missing = [k for k in ("num_samples", "max_length", "seed") if k not in distilled_metadata]
    if missing:
        raise ValueError(
            f"The distilled dataset's metadata lacks {missing}: it was not built by DistilledDetoxDataset.build, so "
            "the control cannot copy its settings."
        )
    return {
        "num_samples": int(distilled_metadata["num_samples"]), "max_length": int(distilled_metadata["max_length"]),
        "start_token": distilled_metadata.get("start_token"), "seed": int(distilled_metadata["seed"]),
        "batch_size": int(distilled_metadata.get("batch_size", 16)),
        "temperature": float(sampling.get("temperature", 1.0)), "top_k": int(sampling.get("top_k", 0)),
        "top_p": float(sampling.get("top_p", 1.0)), "stop_at_eos": bool(sampling.get("stop_at_eos", True)),
    }


# ================================================================================================================
# 2. Human text (DGHS nothate) as a dataset dir
# ================================================================================================================
def build_text_dataset(corpus_config, num_texts: int, output_dir: str | os.PathLike, kind: str = "nothate"):
    """``num_texts`` rows of a local corpus (a :class:`~unidetox.distill.corpus.ToxicCorpusConfig`: files + column filters),
    written as a :class:`~unidetox.DistilledDetoxDataset` directory (``metadata.json`` last; skipped when complete).

    The replication's SFT baseline on non-toxic human text uses DGHS ``label == nothate`` rows. All of them have
    ``target == none`` in the local files, so the paper's 34-identity filter (meant for hate rows) is NOT applied:
    it would keep no row. The texts are a seeded shuffle (``corpus_config.shuffle_seed``) of the filtered rows.
    """
    require_count("num_texts", num_texts)
    out = Path(output_dir)
    settings = {"kind": kind, "paths": [str(p) for p in corpus_config.resolved_paths()],
                "hub_id": corpus_config.hub_id, "text_column": corpus_config.text_column,
                "filters": corpus_config.filters, "num_texts": num_texts, "shuffle_seed": corpus_config.shuffle_seed}
    meta = read_json(out / METADATA_FILE)
    if meta and meta.get("settings") == settings:
        logger.info("%s already holds this %s text; loading it", out, kind)
        return DistilledDetoxDataset.load(out)
    corpus = load_toxic_corpus(replace(corpus_config, max_samples=None))
    if len(corpus) < num_texts:
        raise ValueError(
            f"The {kind} corpus has {len(corpus)} rows after filtering ({corpus_config.filters}) but {num_texts} are "
            "needed to match the distilled text; add files or lower the count."
        )
    corpus = corpus.shuffle(seed=corpus_config.shuffle_seed).select(range(num_texts)).flatten_indices()
    metadata = {"kind": kind, "num_samples": num_texts, "settings": settings,
                "corpus_fingerprint": corpus_fingerprint(corpus), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result = DistilledDetoxDataset(corpus, metadata)
    commit(result.dataset, result.metadata, out)
    return result


# ================================================================================================================
# 3. Task-vector negation
# ================================================================================================================
def _load_base(base_name_or_path, dtype=None):
    import torch

    # merging in float32 by default: a bf16 round trip would blur small deltas
    return load_model_and_tokenizer(str(base_name_or_path), dtype=parse_dtype(dtype) or torch.float32)


def negate_task_vector(
    base_name_or_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    lam: float,
    output_dir: str | os.PathLike,
    dtype=None,
) -> Path:
    """Save ``base - lam * (anti_expert - base)`` as a normal HF model directory (with the base's tokenizer).

    With a LoRA anti-expert (``adapter_dir`` holds ``adapter_config.json``) the task vector is the adapter's delta
    ``scaling * B @ A`` of every adapted layer: every ``lora_B`` is scaled by ``-lam`` and the adapter merged into the
    base (``merge_and_unload``). With a fully fine-tuned anti-expert (a model directory) every parameter becomes
    ``base + (-lam) * (anti - base)``. ``lam = 0`` is the base itself; the paper's task-vector baseline (Ilharco
    et al., 2023) picks ``lam`` on validation data (:func:`choose_configuration`).

    A directory whose ``unidetox_task_vector.json`` carries the same settings is returned without recomputing.

    Example:
        >>> from unidetox.replication.baselines import negate_task_vector
        >>> negate_task_vector("smollm2-135m", "runs/distill/anti_expert", 0.5, "runs/taskvec/lam0.5")  # doctest: +SKIP
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` (the negation strength lambda) has to be a finite number >= 0, but is {lam!r}.")
    adapter_dir = Path(adapter_dir).expanduser()
    out = Path(output_dir)
    settings = {"base": str(base_name_or_path), "anti_expert": str(adapter_dir), "lambda": float(lam),
                "dtype": str(dtype)}
    marker = read_json(out / TASK_VECTOR_MARKER)
    if marker and marker.get("settings") == settings and (out / "config.json").is_file():
        logger.info("%s already holds this negated model", out)
        return out
    started = time.perf_counter()
    base, tokenizer = _load_base(base_name_or_path, dtype)
    if (adapter_dir / "adapter_config.json").is_file():
        model = _negate_lora_adapter(base, adapter_dir, lam)
    elif (adapter_dir / "config.json").is_file():
        model = _negate_fine_tuned_model(base, base_name_or_path, adapter_dir, lam)
    else:
        raise FileNotFoundError(
            f"No anti-expert at {adapter_dir}: pass a saved LoRA adapter (adapter_config.json) or a model directory "
            "(config.json), e.g. the distill recipe's <output_dir>/anti_expert."
        )
    _replace_model_directory(model, tokenizer, out)
    atomic_write_json(out / TASK_VECTOR_MARKER, {"settings": settings,
                                                 "wall_time_s": round(time.perf_counter() - started, 2),
                                                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return out


def _negate_lora_adapter(base, adapter_dir: Path, lam: float):
    """``base`` merged with the LoRA adapter at ``adapter_dir``, every ``lora_B`` scaled by ``-lam`` first."""
    import torch
    from peft import PeftModel

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA" or adapter_config.get("use_dora"):
        raise ValueError(
            f"{adapter_dir} is a {adapter_config.get('peft_type')} adapter (use_dora="
            f"{adapter_config.get('use_dora')}); task-vector negation by scaling lora_B needs a plain LoRA adapter."
        )
    if adapter_config.get("modules_to_save"):
        raise ValueError(
            f"{adapter_dir} also trains full modules {adapter_config['modules_to_save']} (modules_to_save), whose "
            "delta is not a LoRA product; negate a plain LoRA adapter or a fully fine-tuned model."
        )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    scaled = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            # delta W = scaling * B @ A, linear in B: scaling B by -lam turns the merge into W - lam * delta W.
            if "lora_B" in name:
                param.mul_(-float(lam))
                scaled += 1
    if scaled == 0:
        raise ValueError(f"{adapter_dir} has no lora_B weights to scale; is it a LoRA adapter?")
    return model.merge_and_unload()


def _negate_fine_tuned_model(base, base_name_or_path, anti_expert_dir: Path, lam: float):
    """``base`` with every parameter moved to ``base + (-lam) * (anti - base)`` (in place: the loaded copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    anti = AutoModelForCausalLM.from_pretrained(str(anti_expert_dir), dtype=next(base.parameters()).dtype)
    anti_params = dict(anti.named_parameters())
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name not in anti_params or anti_params[name].shape != param.shape:
                raise ValueError(
                    f"The anti-expert {anti_expert_dir} does not match the base {base_name_or_path} at parameter "
                    f"{name}; a task vector needs the same architecture."
                )
            param.add_(anti_params[name] - param, alpha=-float(lam))
    del anti
    return base


def _replace_model_directory(model, tokenizer, out: Path) -> None:
    """Save ``model`` and ``tokenizer`` beside ``out`` and move the files in (the marker dropped first, so a
    directory caught half-replaced is never taken for complete)."""
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    out.mkdir(parents=True, exist_ok=True)
    (out / TASK_VECTOR_MARKER).unlink(missing_ok=True)
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
