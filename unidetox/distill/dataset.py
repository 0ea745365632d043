"""The distilled detoxifying text: a small corpus sampled by contrastive decoding, reused to detox any model.

:meth:`DistilledDetoxDataset.build` samples from a start token by UniDetox contrastive decoding (``log p_base -
log p_anti`` on the base's plausible set, no other truncation), through the fused-or-two-model dispatch of
:func:`~unidetox.contrastive_generate` (:mod:`unidetox.decoding.fused`). The work is cut into global
batches; batch ``i`` is seeded from ``(seed, i)`` and, under ``accelerate launch`` with N processes, rank ``r``
samples the batches with ``i % N == r``, so the merged text does not depend on the number of processes. Every
finished batch is written as a shard at once (temp file + ``os.replace``); a rerun skips finished shards. The main
process merges the shards in batch order into exactly ``num_samples`` rows and writes the dataset with
``metadata.json`` last (its presence marks a complete build).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from huggingface_hub import HfApi
from transformers import GenerationConfig

from unidetox.decoding.config import GenerateOptions, SamplingConfig
from unidetox.decoding.fused import ResolvedModels, generate_resolved, resolve_models
from unidetox.devices import model_device
from unidetox.distill.anti_expert import load_anti_expert
from unidetox.evaluation.scoring import ProfanityCheckScorer
from unidetox.files import atomic_write_json, atomic_write_text, read_json_file
from unidetox.intervals import mean_difference
from unidetox.model_identity import model_id
from unidetox.models import ADAPTER_CONFIG_FILE, load_model, load_model_and_tokenizer, read_adapter_config
from unidetox.processes import process_state, wait_for_everyone
from unidetox.secret_masking import mask_secrets
from unidetox.version import __version__

METADATA_FILE = "metadata.json"
SHARDS_DIR = "shards"
SHARD_CONFIG_FILE = "config.json"
SUMMARY_SAMPLES_FILE = "summary_samples.jsonl"
TEXT_COLUMN = "text"
# The authors' CSV (EminLU/UniDetox) names its column "Text".
TEXT_COLUMN_ALIASES = ("text", "Text", "generated_text", "content")
# Where the distilled dataset lives inside a `recipes/distill.py` output directory.
RECIPE_SUBDIR = "distilled"
# Seed streams: the distilled text, and the plain samples the summary compares it with.
STREAM_DISTILL, STREAM_BASE, STREAM_ANTI = 0, 1, 2

logger = logging.getLogger(__name__)


def batch_seed(seed: int, index: int, stream: int = STREAM_DISTILL) -> int:
    """The RNG seed of global batch ``index``: a function of ``(seed, index, stream)`` only, never of the rank."""
    return (seed * 1_000_003 + stream * 1_000_000_007 + index) % (2**63 - 1)


@dataclass
class DistillConfig:
    """How much text to distill, from which start token, and how big the summary's comparison is."""

    num_samples: int = field(default=640, metadata={"help": "Number of distilled texts (paper: 640)."})
    max_length: int = field(
        default=256, metadata={"help": "Tokens sampled per text after the start token (paper: 256)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Texts sampled together in one generate() call."})
    start_token: str | None = field(
        default=None,
        metadata={"help": "Token every text starts from (None: the tokenizer's bos_token, as the paper does)."},
    )
    summary_num_samples: int = field(
        default=64,
        metadata={"help": "Plain samples of the base (and of the anti-expert) scored next to the distilled text; 0 skips."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Rebuild even if the output directory holds a build with other settings."}
    )
    fused: bool | None = field(
        default=None,
        metadata={"help": "LoRA anti-expert: None/true run base and adapter in one doubled forward per token, false "
                  "as two separate models (same tokens either way)."},
    )

    def __post_init__(self):
        for name in ("num_samples", "max_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` has to be an integer >= 1, but is {value!r}.")
        if self.summary_num_samples < 0:
            raise ValueError(f"`summary_num_samples` has to be >= 0, but is {self.summary_num_samples}.")
        if self.start_token == "":
            raise ValueError("`start_token` is an empty string; use None for the tokenizer's bos_token.")


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
    ``SamplingConfig()``); with ``anti_expert=None`` it is plain sampling from ``base`` with the same settings (the summary's comparison). The generation settings are
    passed explicitly and the models' ``generation_config`` is bypassed, so nothing (e.g. the library default
    top-k of 50) truncates the distribution behind the caller's back. The RNG is seeded with ``seed`` inside a
    forked RNG state, so the global RNG is untouched and the batch depends only on its arguments. Rows end
    before the first EOS token (which is not included).

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
# Helpers for the durable, multi-process build
# ----------------------------------------------------------------------------------------------------------------
def _shard_path(shards: Path, index: int) -> Path:
    return shards / f"batch-{index:06d}.json"


def _batch_rows(index: int, num_samples: int, batch_size: int) -> int:
    """How many texts global batch ``index`` holds: ``batch_size``, fewer in the last batch.

    Computed per batch, never as a list of all batches, so a build of any size starts sampling at once."""
    return min(batch_size, num_samples - index * batch_size)


def _read_shard(path: Path, index: int, seed: int, expected_rows: int) -> dict | None:
    """Shard ``index`` of a build with ``seed``; ``None`` when it is missing or incomplete (it is sampled again).

    A complete shard that records another batch or seed than its name says (a file copied over another) is
    refused: using it would repeat or mix texts, and resampling it would hide that the folder was tampered with.
    """
    try:
        shard = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(shard, dict) or not isinstance(shard.get("token_ids"), list):
        return None
    if len(shard["token_ids"]) != expected_rows:
        return None
    expected_seed = batch_seed(seed, index)
    if shard.get("batch") != index or shard.get("seed") != expected_seed:
        raise ValueError(
            f"{path} holds batch {shard.get('batch')!r} (seed {shard.get('seed')!r}), not batch {index} (seed "
            f"{expected_seed}) as its name says: it was copied or moved from another shard or build. Delete it "
            "and rerun to sample this batch again."
        )
    return shard


def _read_shard_settings(path: Path, overwrite: bool) -> dict | None:
    """The settings the shards in ``path.parent`` were sampled with (``None``: no shards yet).

    Unreadable settings match no build: refused, or with ``overwrite`` discarded with their shards."""
    if not path.is_file():
        return None
    try:
        return read_json_file(path, fix=f"Its shards cannot be matched to any settings: delete the folder "
                                        f"{path.parent} and rerun, or pass overwrite=True to discard them.")
    except ValueError:
        if not overwrite:
            raise
        return {}


_METADATA_FIX = ("Delete it and rerun the build into the same output_dir: it merges the finished shards again and "
                 "rewrites the file.")


def _mean_sem(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, sem


def _text_stats(texts: list[str], num_tokens: list[int], scores: list[float]) -> dict[str, Any]:
    mean, sem = _mean_sem(scores)
    return {
        "n": len(texts),
        "mean_toxicity": mean,
        "sem_toxicity": sem,
        "share_toxic_gt_0_5": sum(s > 0.5 for s in scores) / len(scores) if scores else float("nan"),
        "mean_tokens": statistics.fmean(num_tokens) if num_tokens else float("nan"),
        "mean_words": statistics.fmean(len(t.split()) for t in texts) if texts else float("nan"),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a small Markdown table (one row per text source)."""
    lines = [
        f"| text ({summary.get('scorer', 'scorer')}) | n | mean toxicity ± sem | share > 0.5 | mean tokens |",
        "|---|---|---|---|---|",
    ]
    labels = {"distilled": "distilled (contrastive)", "base": "base, plain samples", "anti_expert": "anti-expert, plain samples"}
    for key, label in labels.items():
        if key in summary:
            s = summary[key]
            lines.append(
                f"| {label} | {s['n']} | {s['mean_toxicity']:.4f} ± {s['sem_toxicity']:.4f} | "
                f"{s['share_toxic_gt_0_5']:.3f} | {s['mean_tokens']:.1f} |"
            )
    diff = summary.get("distilled_vs_base")
    if diff:
        p_value = "n/a" if diff["p_mann_whitney"] is None else f"{diff['p_mann_whitney']:.3g}"
        verdict = "measurably lower" if diff["lower"] else "NOT measurably lower"
        lines.append(
            f"\nDistilled - base mean toxicity: {diff['difference']:+.4f} ({diff['relative']:+.0%}), bootstrap 95% CI "
            f"[{diff['ci95_low']:+.4f}, {diff['ci95_high']:+.4f}], Mann-Whitney p = {p_value}: {verdict}."
        )
    return "\n".join(lines)


def _version_info() -> dict[str, str]:
    import transformers

    return {"unidetox": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass
class DistilledDetoxDataset:
    """Distilled text (``dataset`` with a ``text`` column, plus ``num_tokens`` when built here) and its metadata.

    Build one with :meth:`build` (contrastive decoding between a base model and an anti-expert) or read one
    with :meth:`load`, which takes a directory written by :meth:`save`/:meth:`build` (or a ``recipes/distill.py``
    output directory), or a plain CSV/JSONL file with a text column (the authors' released CSV with its ``Text``
    column loads as is).

    Example:
        >>> from unidetox import DistilledDetoxDataset, load_model_and_tokenizer
        >>> base, tokenizer = load_model_and_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> distilled = DistilledDetoxDataset.build(  # doctest: +SKIP
        ...     base, "runs/distill-default/anti_expert", tokenizer, num_samples=128, max_length=128,
        ...     batch_size=16, seed=0, output_dir="runs/my-distilled", start_token="<|endoftext|>",
        ... )
        >>> distilled.texts[:2]  # doctest: +SKIP
        >>> DistilledDetoxDataset.load("../shared/data/unidetox_reference/generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv")  # doctest: +SKIP
    """

    dataset: datasets.Dataset
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if TEXT_COLUMN not in self.dataset.column_names:
            raise ValueError(
                f"A DistilledDetoxDataset needs a `{TEXT_COLUMN}` column; got columns {self.dataset.column_names}."
            )
        if len(self.dataset) == 0:
            raise ValueError("The distilled dataset is empty: there is no text to fine-tune on.")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def texts(self) -> list[str]:
        return list(self.dataset[TEXT_COLUMN])

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.metadata.get("summary")

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``output_dir`` (HF ``save_to_disk`` layout + ``metadata.json``)."""
        output_dir = Path(output_dir)
        self.dataset.save_to_disk(str(output_dir))
        (output_dir / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, default=str))
        return output_dir

    @classmethod
    def load(cls, path: str | os.PathLike, text_column: str | None = None) -> DistilledDetoxDataset:
        """Load a saved dataset directory (or a distill recipe output dir), or a CSV / JSONL / JSON file."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"No distilled dataset at {path}: pass a directory written by DistilledDetoxDataset.build/save, "
                "or a CSV/JSONL file with a text column."
            )
        if path.is_dir():
            is_saved = (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
            if not is_saved and (path / RECIPE_SUBDIR).is_dir():  # recipes/distill.py's output_dir
                return cls.load(path / RECIPE_SUBDIR, text_column=text_column)
            if (path / SHARDS_DIR).is_dir() and not (path / METADATA_FILE).is_file():
                raise FileNotFoundError(
                    f"{path} holds an unfinished build (shards but no {METADATA_FILE}); rerun the build to resume it."
                )
            if not is_saved:
                raise FileNotFoundError(
                    f"{path} is a directory but not a saved dataset (no dataset_info.json/state.json); "
                    "was the build interrupted? Rerun it to resume."
                )
            dataset = datasets.load_from_disk(str(path))
            meta_file = path / METADATA_FILE
            metadata = read_json_file(meta_file, fix=_METADATA_FIX) if meta_file.is_file() else {}
            return cls(dataset, metadata)
        frame = _read_table(path)
        columns = [str(c) for c in frame.columns]
        column = text_column or next((c for c in TEXT_COLUMN_ALIASES if c in columns), None)
        if column is None or column not in columns:
            raise ValueError(
                f"{path} has no text column (looked for {text_column or TEXT_COLUMN_ALIASES}); its columns are "
                f"{columns}. Pass text_column=..."
            )
        values = frame[column].tolist()
        texts = [v for v in values if isinstance(v, str) and v.strip()]
        not_strings = sum(not isinstance(v, str) for v in values)
        dropped = len(values) - len(texts)
        blank = dropped - not_strings
        if not texts:
            raise ValueError(
                f"{path} has no text in its {column!r} column: {dropped} of {len(values)} rows dropped "
                f"({not_strings} not strings, {blank} blank). Fine-tuning needs non-empty strings; check the "
                "file, or pass text_column=... for another column."
            )
        if dropped:
            logger.warning("%s: dropped %d of %d rows without text in %r (%d not strings, %d blank)", path,
                           dropped, len(values), column, not_strings, blank)
        dataset = datasets.Dataset.from_dict({TEXT_COLUMN: texts})
        return cls(dataset, {"source_file": str(path), "num_samples": len(dataset)})

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload UniDetox distilled detoxifying text",
    ) -> str:
        """Publish the texts as a Hub dataset with a dataset card; returns the repository's URL.

        The card (``README.md``, :func:`~unidetox.distill.dataset_card.render_dataset_card`) and the metadata
        (``unidetox_metadata.json``) are committed first; ``datasets.Dataset.push_to_hub`` then uploads the texts
        as parquet and merges its ``dataset_info``/``configs`` into that card, keeping the card's text. The token
        goes to the Hub client only: no file, card or log line holds it.

        Example:
            >>> distilled = DistilledDetoxDataset.load("runs/distill")  # doctest: +SKIP
            >>> distilled.push_to_hub("my-org/unidetox-smollm2-distilled", private=True)  # doctest: +SKIP
        """
        # dataset_card renders with this module's summary table, so it is imported here, not at the top.
        from unidetox.distill.dataset_card import anti_expert_training_record, render_dataset_card

        if not isinstance(repo_id, str) or not repo_id.strip():
            raise ValueError(f"`repo_id` has to name a Hub dataset repository (e.g. 'my-org/distilled'), got {repo_id!r}.")
        if not isinstance(self.dataset, datasets.Dataset) or len(self.dataset) == 0:
            raise ValueError(
                f"There is no distilled text to push to {repo_id}: the dataset is "
                f"{'empty' if isinstance(self.dataset, datasets.Dataset) else 'missing'}. Build or load one first."
            )
        if not any(text.strip() for text in self.texts):
            raise ValueError(
                f"All {len(self)} distilled texts are blank; there is nothing to push to {repo_id}. Rebuild the "
                "dataset (a start token that is not EOS, a larger `max_length`)."
            )
        card = render_dataset_card(
            self.metadata, self.summary, num_texts=len(self), repo_id=repo_id,
            anti_expert_record=anti_expert_training_record(self.metadata.get("anti_expert")),
        )
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        logger.info("Pushing %d distilled texts to %s", len(self), repo_url.repo_id)
        with tempfile.TemporaryDirectory() as staging:
            Path(staging, "README.md").write_text(card, encoding="utf-8")
            Path(staging, "unidetox_metadata.json").write_text(
                json.dumps(mask_secrets(self.metadata), indent=2, default=str), encoding="utf-8")
            api.upload_folder(repo_id=repo_url.repo_id, repo_type="dataset", folder_path=staging,
                              commit_message=commit_message)
        self.dataset.push_to_hub(repo_url.repo_id, private=private, token=token, commit_message=commit_message)
        return str(repo_url)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        base,
        anti_expert,
        tokenizer,
        num_samples: int,
        max_length: int,
        alpha: float = 0.1,
        beta: float | None = None,
        batch_size: int = 8,
        seed: int = 0,
        output_dir: str | os.PathLike | None = None,
        *,
        start_token: str | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_at_eos: bool = True,
        summary_num_samples: int = 64,
        scorer=None,
        overwrite: bool = False,
        base_id: str | None = None,
        anti_expert_id: str | None = None,
        show_progress: bool = True,
        fused: bool | None = None,
    ) -> DistilledDetoxDataset:
        """Distill detoxifying text by contrastive sampling from ``start_token``.

        Args:
            base: the base causal LM (or a name/path for :func:`unidetox.load_model_and_tokenizer`).
            anti_expert: the toxic model: a separate causal LM, a peft model (LoRA adapter, on ``base`` itself or
                on a copy), or a path / hub id of a saved anti-expert or adapter (a saved adapter is attached to a
                copy of ``base``). ``None`` samples the base alone with the same settings: the control corpus
                (fine-tuning on the base's own text, no contrast).
            tokenizer: the base's tokenizer (``None`` when ``base`` is a name).
            num_samples: texts in the result (exactly).
            max_length: tokens sampled per text after the start token (fewer when EOS comes first).
            alpha, beta: the contrast (see :class:`~unidetox.ContrastiveDetoxSampler`).
            batch_size: texts per ``generate`` call and per shard.
            seed: batch ``i`` is sampled under ``torch.manual_seed(batch_seed(seed, i))``.
            output_dir: where shards and the final dataset go; needed for resuming and for several processes.
                ``None`` keeps everything in memory (one process).
            start_token: the token texts start from (default ``tokenizer.bos_token``).
            temperature, top_k, top_p: applied to the contrastive scores; the defaults (1, 0, 1) are the paper's
                untruncated sampling.
            stop_at_eos: end a text at EOS (the tokenizer's and the generation config's EOS ids).
            summary_num_samples: plain samples of the base and of the anti-expert scored next to the distilled
                texts (0 skips the summary).
            scorer: a :class:`~unidetox.ToxicityScorer` (default :class:`~unidetox.ProfanityCheckScorer`).
            overwrite: discard an existing build in ``output_dir`` made with other settings.
            base_id, anti_expert_id: names recorded in the metadata and fingerprint, which decide whether the
                shards in ``output_dir`` are reused. Default (:func:`model_id`): a saved directory by the digest
                of its weight files, an in-memory model by the digest of its state dict, a hub id by its name.
            show_progress: tqdm progress bar on the main process.
            fused: how a LoRA anti-expert (a peft model, or a saved adapter path) runs: ``None`` (default) fuses
                base and adapter into one doubled forward per token (:mod:`unidetox.decoding.fused`), ``False`` merges the
                adapter into a separate copy (two forwards per token), ``True`` requires fusing. Both give the
                same tokens for the same seed; a separate (non-LoRA) anti-expert always runs as two models.

        Under ``accelerate launch`` with N processes, rank ``r`` samples the batches ``i`` with ``i % N == r``; the
        main process merges them, so the texts are those of a 1-process run with the same seed.
        """
        sampling = SamplingConfig(alpha=alpha, beta=beta, temperature=temperature, top_k=top_k, top_p=top_p,
                                  stop_at_eos=stop_at_eos)
        DistillConfig(num_samples=num_samples, max_length=max_length, batch_size=batch_size, start_token=start_token,
                      summary_num_samples=summary_num_samples)
        state = process_state()
        rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
        if world > 1 and output_dir is None:
            raise ValueError(
                f"Running on {world} processes needs an `output_dir` to collect their shards in; pass one."
            )
        if isinstance(base, (str, os.PathLike)):
            base_id = base_id or model_id(base)
            if tokenizer is None:
                base, tokenizer = load_model_and_tokenizer(base)
            else:
                base = load_model(base, pad_token_id=tokenizer.pad_token_id)
        if tokenizer is None:
            raise ValueError("Pass the base model's `tokenizer`.")
        base_id = base_id or model_id(base)
        if anti_expert is None:
            anti_expert_id = None
        elif anti_expert_id is None:
            anti_expert_id = model_id(anti_expert)
        elif isinstance(anti_expert, (str, os.PathLike)):
            if (Path(anti_expert).expanduser() / ADAPTER_CONFIG_FILE).is_file():
                read_adapter_config(anti_expert)  # a broken adapter fails here, before anything is written

        start_token = start_token if start_token is not None else tokenizer.bos_token
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
        start_id = vocab[start_token]
        eos_ids: list[int] | None = None
        if stop_at_eos:
            gen_eos = base.generation_config.eos_token_id
            gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
            eos_ids = sorted({tokenizer.eos_token_id, *gen_eos} - {None})
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]

        num_batches = math.ceil(num_samples / batch_size)
        fingerprint = {
            "base": base_id,
            "anti_expert": anti_expert_id,
            "start_token": start_token,
            "start_token_id": start_id,
            "max_length": max_length,
            "batch_size": batch_size,
            "seed": seed,
            "eos_token_ids": eos_ids,
            **{k: getattr(sampling, k) for k in ("alpha", "beta", "temperature", "top_k", "top_p", "stop_at_eos")},
        }

        out = Path(output_dir) if output_dir is not None else None
        shards = out / SHARDS_DIR if out is not None else None
        if out is not None:
            meta_file = out / METADATA_FILE
            if meta_file.is_file():
                existing = read_json_file(meta_file, fix=_METADATA_FIX)
                if existing.get("fingerprint") == fingerprint and existing.get("num_samples") == num_samples:
                    logger.info("%s already holds this distilled dataset; loading it", out)
                    return cls.load(out)
            shard_config = shards / SHARD_CONFIG_FILE
            old = _read_shard_settings(shard_config, overwrite)
            if old is not None and old != fingerprint and not overwrite:
                changed = [f"{k}: {old.get(k)!r} -> {value!r}" for k, value in fingerprint.items()
                           if old.get(k) != value]
                raise ValueError(
                    f"{out} holds shards sampled with other settings ({'; '.join(changed)}). Use another "
                    "`output_dir`, or `overwrite=True` to discard them."
                )

        # The models are checked before anything is written: a failed check leaves no settings behind that
        # would refuse the corrected rerun.
        models = _resolve_for_build(base, anti_expert, fused, state.device)  # refuses another vocabulary
        logger.info("Distilling with %s decoding", models.decoding)
        if out is not None:
            wait_for_everyone()  # every rank has read the shard settings before the main process rewrites
            if is_main:
                if overwrite and old is not None and old != fingerprint:
                    shutil.rmtree(shards)
                shards.mkdir(parents=True, exist_ok=True)
                (out / METADATA_FILE).unlink(missing_ok=True)  # the commit marker goes until the new merge is done
                atomic_write_json(shard_config, fingerprint)
            wait_for_everyone()

        started = time.perf_counter()
        mine = range(rank, num_batches, world)  # lazily: the first batch starts at once, whatever the size
        results: dict[int, dict] = {}
        from tqdm.auto import tqdm

        progress = tqdm(total=len(mine), desc=f"distilling (rank {rank}/{world})", unit="batch",
                        disable=not (show_progress and is_main))
        sample_kwargs = dict(sampling=sampling, eos_token_id=eos_ids, pad_token_id=pad_id)
        for i in mine:
            rows_in_batch = _batch_rows(i, num_samples, batch_size)
            shard = _read_shard(_shard_path(shards, i), i, seed, rows_in_batch) if shards is not None else None
            if shard is None:
                t0 = time.perf_counter()
                rows = sample_batch(models.base, models.anti_expert, [start_id], rows_in_batch, max_length,
                                    batch_seed(seed, i), resolved=models, **sample_kwargs)
                shard = {"batch": i, "seed": batch_seed(seed, i), "rank": rank, "token_ids": rows,
                         "generation_time_s": round(time.perf_counter() - t0, 3)}
                if shards is not None:
                    atomic_write_text(_shard_path(shards, i), json.dumps(shard))
                progress.set_postfix(tok_per_s=f"{sum(map(len, rows)) / max(shard['generation_time_s'], 1e-9):.0f}")
            results[i] = shard
            progress.update(1)
        progress.close()
        if out is not None:
            wait_for_everyone()

        result = None
        if is_main:
            all_shards = []
            for i in range(num_batches):
                shard = results.get(i) or _read_shard(_shard_path(shards, i), i, seed,
                                                      _batch_rows(i, num_samples, batch_size))
                if shard is None:
                    raise RuntimeError(f"Shard {i} of {num_batches} is missing or incomplete in {shards} after sampling.")
                all_shards.append(shard)
            token_ids = [row for shard in all_shards for row in shard["token_ids"]][:num_samples]
            texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
            num_tokens = [len(row) for row in token_ids]
            dataset = datasets.Dataset.from_dict({TEXT_COLUMN: texts, "num_tokens": num_tokens})
            metadata = {
                "base": base_id,
                "anti_expert": anti_expert_id,
                "alpha": sampling.alpha,
                "beta": sampling.beta,
                "seed": seed,
                "num_samples": num_samples,
                "max_length": max_length,
                "batch_size": batch_size,
                "num_batches": num_batches,
                "num_processes": world,
                "start_token": start_token,
                "start_token_id": start_id,
                "sampling": {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,
                             "top_p": sampling.top_p, "stop_at_eos": stop_at_eos, "eos_token_ids": eos_ids},
                "total_tokens": sum(num_tokens),
                "mean_tokens": sum(num_tokens) / len(num_tokens),
                "num_empty_texts": sum(1 for t in texts if not t.strip()),
                "generation_time_s": round(sum(s["generation_time_s"] for s in all_shards), 2),
                "decoding": models.decoding,
                "fingerprint": fingerprint,
                "versions": _version_info(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if summary_num_samples > 0:
                summary, samples = _summarize(
                    models, tokenizer, texts, num_tokens, start_id, max_length, batch_size, seed,
                    summary_num_samples, sample_kwargs, scorer, show_progress=show_progress,
                )
                metadata["summary"] = summary
                print(summary_markdown(summary), flush=True)
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(out / SUMMARY_SAMPLES_FILE, "".join(json.dumps(s) + "\n" for s in samples))
            metadata["wall_time_s"] = round(time.perf_counter() - started, 2)
            result = cls(dataset, metadata)
            if out is not None:
                _commit(result, out)
        if out is not None:
            wait_for_everyone()
            if result is None:
                result = cls.load(out)
        return result


def _is_blank_file(path: Path) -> bool:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            if block.strip():
                return False
    return True


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV / JSONL / JSON file as a DataFrame with at least one row; raise naming the file otherwise."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(
            f"Cannot read {path}: expected a saved dataset directory or a .csv/.jsonl/.json file."
        )
    if _is_blank_file(path):
        raise ValueError(f"{path} is empty (no header and no rows): there is no text to load.")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            try:
                frame = pd.read_json(path, dtype=False)
            except ValueError:  # a .json file holding JSON lines
                frame = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"Could not parse {path} as {suffix[1:].upper()}: {err}") from err
    if len(frame) == 0:
        columns = [str(c) for c in frame.columns]
        raise ValueError(f"{path} has no rows (columns: {columns}): there is no text to load.")
    return frame


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


def _commit(result: DistilledDetoxDataset, out: Path) -> None:
    """Stage the dataset next to its final place, move it in, and write metadata.json last (the commit marker)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    result.dataset.save_to_disk(str(staging))
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    staging.rmdir()
    atomic_write_json(out / METADATA_FILE, result.metadata)


def _summarize(models: ResolvedModels, tokenizer, texts, num_tokens, start_id, max_length, batch_size, seed, n,
               sample_kwargs, scorer, show_progress: bool = False):
    """Score the distilled texts next to plain samples of the base and of the anti-expert, drawn the same way."""
    from tqdm.auto import tqdm

    if scorer is None:
        scorer = ProfanityCheckScorer()
    groups = {"distilled": (texts, num_tokens)}
    sources = [("base", models.base, models.base_context, STREAM_BASE)]
    if models.anti_expert is not None:
        sources.append(("anti_expert", models.anti_expert, contextlib.nullcontext, STREAM_ANTI))
    for name, model, context, stream in sources:
        ids: list[list[int]] = []
        for j in tqdm(range(math.ceil(n / batch_size)), desc=f"summary: {name} samples", unit="batch",
                      disable=not show_progress, dynamic_ncols=True):
            size = min(batch_size, n - j * batch_size)
            with context():
                ids += sample_batch(model, None, [start_id], size, max_length, batch_seed(seed, j, stream),
                                    **sample_kwargs)
        groups[name] = (tokenizer.batch_decode(ids, skip_special_tokens=True), [len(r) for r in ids])
    summary: dict[str, Any] = {"scorer": getattr(scorer, "name", type(scorer).__name__)}
    samples = []
    scores = {}
    for name, (group_texts, group_tokens) in groups.items():
        scores[name] = list(scorer(group_texts))
        summary[name] = _text_stats(group_texts, group_tokens, scores[name])
        if name != "distilled":
            samples += [{"source": name, "text": t, "toxicity": s}
                        for t, s in zip(group_texts, scores[name], strict=True)]
    if len(scores["distilled"]) >= 2 and len(scores["base"]) >= 2:
        # A lower mean alone is not evidence: both sit near the scorer's floor, so say whether it is measurable.
        summary["distilled_vs_base"] = mean_difference(scores["distilled"], scores["base"], seed=seed)
    return summary, samples
