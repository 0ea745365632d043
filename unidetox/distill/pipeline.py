"""The distill stage as one call: train (or reuse) the anti-expert, then distill the detoxifying text.

:func:`parse_args` turns Hydra overrides of ``unidetox/conf/distill.yaml`` into :class:`DistillArguments`;
:func:`run` does the work and returns a :class:`DistillResult`. Both are used by ``recipes/distill.py``,
``unidetox distill`` and the replication; from Python, build the arguments yourself.

Example:
    >>> from unidetox.distill.pipeline import parse_args, run
    >>> args = parse_args(["output_dir=runs/my-distill", "distill.num_samples=64"])  # doctest: +SKIP
    >>> result = run(args)  # doctest: +SKIP
    >>> result.distilled_path, result.num_texts  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unidetox.decoding.config import SamplingConfig
from unidetox.distill.anti_expert import AntiExpertConfig, load_anti_expert, read_marker, train_anti_expert
from unidetox.distill.config import DistillConfig
from unidetox.distill.corpus import ToxicCorpusConfig, load_toxic_corpus
from unidetox.distill.dataset import DistilledDetoxDataset
from unidetox.distill.shards import METADATA_FILE
from unidetox.distill.summary import summary_markdown
from unidetox.files import atomic_write_json, atomic_write_text, read_json
from unidetox.hub import push_if_requested
from unidetox.hydra_config import (
    compose_config,
    parse_sections,
    save_resolved_config,
    to_container,
)
from unidetox.logging_setup import configure_logging
from unidetox.models import ModelArguments, load_model_and_tokenizer
from unidetox.processes import is_main_process, process_state, wait_for_everyone
from unidetox.run_dir import check_output_dir, holds_output_dir

logger = logging.getLogger(__name__)

RUN_FILE = "distill_run.json"
# Settings that do not change the texts: how much progress is shown, and whether finished work is rebuilt.
RUN_INDEPENDENT_KEYS = ("progress", "distill.overwrite", "anti_expert.overwrite", "anti_expert.push_to_hub",
                        "anti_expert.hub_model_id", "anti_expert.hub_private_repo")


@dataclass
class DistillArguments:
    """Everything the distill stage needs (the sections of ``conf/distill.yaml``)."""

    output_dir: str
    model: ModelArguments
    data: ToxicCorpusConfig
    anti_expert: AntiExpertConfig
    sampler: SamplingConfig = field(default_factory=SamplingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "The resolved config, saved with the run."})


@dataclass
class DistillResult:
    """What a distill run made: the anti-expert, the distilled text, stage timings and the toxicity summary."""

    output_dir: str
    anti_expert_path: str
    anti_expert_id: str
    distilled_path: str
    num_texts: int
    stages: dict[str, Any]
    summary: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, output_dir: str | Path) -> DistillResult | None:
        """The result of a finished run in ``output_dir`` (None when it has not finished)."""
        saved = read_json(Path(output_dir) / RUN_FILE)
        if not saved or "distilled_path" not in saved:
            return None
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})


def parse_args(overrides: list[str] | tuple[str, ...] = ()) -> DistillArguments:
    """Compose ``conf/distill.yaml`` with Hydra ``overrides`` and parse every section into its dataclass."""
    cfg = compose_config("distill", list(overrides))
    return DistillArguments(
        output_dir=str(cfg.output_dir),
        **parse_sections(cfg, {"model": ModelArguments, "data": ToxicCorpusConfig, "anti_expert": AntiExpertConfig,
                               "sampler": SamplingConfig, "distill": DistillConfig}),
        seed=int(cfg.seed),
        config=to_container(cfg),
    )


def finished(args: DistillArguments) -> DistillResult | None:
    """The result when ``args.output_dir`` holds this run, finished; raises when it holds another run."""
    check_output_dir(args.output_dir, args.config, ignore=RUN_INDEPENDENT_KEYS)
    result = DistillResult.load(args.output_dir)
    if result is not None and not (Path(result.distilled_path) / METADATA_FILE).is_file():
        return None
    return result


def _anti_expert_stage(args: DistillArguments, load_kwargs: dict) -> tuple[str, str, bool, dict]:
    """``(path, id, trained now, marker metadata)`` of the anti-expert, trained here unless one is given."""
    if args.anti_expert.pretrained_path:
        path = args.anti_expert.pretrained_path
        logger.info("Using the existing anti-expert %s", path)
        meta = read_marker(path) if Path(path).is_dir() else None
        # Named as the run that trained it names it (path@fingerprint), so texts sampled with it match either way.
        ae_id = f"{path}@{meta['fingerprint'][:12]}" if (meta or {}).get("fingerprint") else path
        return path, ae_id, False, meta or {}
    corpus = load_toxic_corpus(args.data)
    logger.info("Toxic corpus: %d texts", len(corpus))
    model, tokenizer = load_model_and_tokenizer(args.model.name_or_path, **load_kwargs)
    trained = train_anti_expert(model, tokenizer, corpus, args.anti_expert, base_name_or_path=args.model.name_or_path,
                                corpus_config=args.data)
    del model
    meta = trained.metadata
    return str(trained.path), f"{trained.path}@{meta['fingerprint'][:12]}", trained.trained, meta


def run_markdown(result: DistillResult) -> str:
    """The run's stage table and toxicity summary as Markdown (``distill_run.md``)."""
    ae, dist = result.stages["anti_expert"], result.stages["distill"]
    meta = result.metadata
    lines = [
        f"# Distillation run: `{result.output_dir}`", "",
        "| stage | wall time (s) | notes |", "|---|---|---|",
        f"| anti_expert | {ae['wall_time_s']} | {'trained now' if ae['trained_now'] else 'reused'}; training took "
        f"{ae['train_wall_time_s']} s, loss {ae['first_logged_loss']} -> {ae['last_logged_loss']} |",
        f"| distill | {dist['wall_time_s']} | {result.num_texts} texts, {meta.get('total_tokens')} tokens, sampling "
        f"took {meta.get('generation_time_s')} s ({meta.get('decoding')}) |",
        "",
    ]
    if result.summary:
        lines.append(summary_markdown(result.summary))
    return "\n".join(lines) + "\n"


@holds_output_dir
def run(args: DistillArguments) -> DistillResult:
    """Train (or reuse) the anti-expert, distill the text, and write ``distill_run.{json,md}``.

    Every part is cached: a finished anti-expert is reused by its fingerprint, finished sampling shards are reused
    by theirs, so an interrupted run resumes and a finished one returns at once. A directory holding a run with
    other settings is refused (:class:`unidetox.run_dir.OutputDirConflict`).
    """
    configure_logging()
    state = process_state()
    out = Path(args.output_dir)
    check_output_dir(out, args.config, ignore=RUN_INDEPENDENT_KEYS)
    load_kwargs = args.model.load_kwargs()

    start = time.perf_counter()
    ae_path, ae_id, trained, ae_meta = _anti_expert_stage(args, load_kwargs)
    if is_main_process():
        push_if_requested(args.anti_expert, ae_path, "Upload a UniDetox anti-expert (toxic by design)")
    stages: dict[str, Any] = {"anti_expert": {
        "path": ae_path, "trained_now": trained, "wall_time_s": round(time.perf_counter() - start, 2),
        **{key: ae_meta.get(key) for key in ("train_wall_time_s", "train_loss", "first_logged_loss",
                                              "last_logged_loss", "global_steps")},
    }}

    start = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer(args.model.name_or_path, **load_kwargs)
    # A LoRA anti-expert stays an adapter (merge=False): the build then fuses base and adapter into one forward.
    anti_expert = load_anti_expert(ae_path, base_name_or_path=args.model.name_or_path, merge=False, **load_kwargs)
    save_resolved_config(args.config, out)  # the inputs loaded: a corrected rerun of a failed check is not refused
    distilled = DistilledDetoxDataset.build(
        base, anti_expert, tokenizer, args.sampler, args.distill, out / "distilled", seed=args.seed,
        base_id=args.model.name_or_path, anti_expert_id=ae_id,
    )
    meta = distilled.metadata
    stages["distill"] = {
        "path": str(out / "distilled"), "wall_time_s": round(time.perf_counter() - start, 2),
        "generation_time_s": meta.get("generation_time_s"), "num_samples": len(distilled),
        "total_tokens": meta.get("total_tokens"), "mean_tokens": meta.get("mean_tokens"),
        "decoding": meta.get("decoding"),
    }
    result = DistillResult(
        output_dir=str(out), anti_expert_path=ae_path, anti_expert_id=ae_id, distilled_path=str(out / "distilled"),
        num_texts=len(distilled), stages=stages, summary=meta.get("summary"),
        metadata={k: v for k, v in meta.items() if k != "summary"},
    )
    if is_main_process():
        atomic_write_json(out / RUN_FILE, {**result.to_dict(), "num_processes": state.num_processes})
        markdown = run_markdown(result)
        atomic_write_text(out / "distill_run.md", markdown)
        print(markdown, flush=True)
    wait_for_everyone()
    return result
