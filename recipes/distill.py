#!/usr/bin/env python
"""The main job: anti-expert training, then the distilled detoxifying text.

    accelerate launch recipes/distill.py                                  # embedded default: smollm2-135m + local DGHS
    accelerate launch recipes/distill.py output_dir=runs/x distill.num_samples=256 seed=1
    accelerate launch recipes/distill.py experiment=embedded_gemma3
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/distill.py experiment=paper_gpt2xl

Stages, each skipped when its output exists (an interrupted run resumes where it stopped):
  1. anti_expert: fine-tune the base on the toxic corpus -> ``<output_dir>/anti_expert`` (or use
     ``anti_expert.pretrained_path``). Under N processes every rank trains (DDP through the Trainer).
  2. distill: contrastive sampling -> ``<output_dir>/distilled``; rank r of N samples batches i % N == r.
The resolved config goes to ``<output_dir>/config.yaml``; stage wall times and the toxicity summary to
``<output_dir>/distill_run.json`` and ``distill_run.md``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from unidetox.distill.anti_expert import (  # noqa: E402
    AntiExpertConfig,
    load_anti_expert,
    read_marker,
    train_anti_expert,
)
from unidetox.distill.corpus import ToxicCorpusConfig, load_toxic_corpus  # noqa: E402
from unidetox.distill.dataset import DistillConfig, DistilledDetoxDataset, SamplingConfig, summary_markdown
from unidetox.hydra_config import compose_config, parse_dataclass, save_resolved_config  # noqa: E402
from unidetox.io import atomic_write_json, atomic_write_text  # noqa: E402
from unidetox.processes import end_process_group  # noqa: E402

logger = logging.getLogger("unidetox.recipes.distill")


@dataclass
class ModelArguments:
    """The base model (the `model` config group)."""

    name_or_path: str = field(metadata={"help": "Hub id, local path, or embedded name (smollm2-135m, gemma3-270m)."})
    dtype: str | None = field(
        default=None, metadata={"help": "float32/bfloat16/float16/auto; null: float32 on CPU, auto on GPU."}
    )

    def load_kwargs(self) -> dict:
        import torch

        if self.dtype is None:
            return {}
        return {"dtype": self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)}


def parse_config(overrides):
    """Compose ``conf/distill.yaml`` with ``overrides`` and parse every section into its dataclass."""
    cfg = compose_config("distill", overrides)
    return cfg, {
        "model": parse_dataclass(cfg.model, ModelArguments),
        "data": parse_dataclass(cfg.data, ToxicCorpusConfig),
        "anti_expert": parse_dataclass(cfg.anti_expert, AntiExpertConfig),
        "sampler": parse_dataclass(cfg.sampler, SamplingConfig),
        "distill": parse_dataclass(cfg.distill, DistillConfig),
    }


def main(overrides: list[str] | None = None) -> dict:
    from unidetox.models import load_model_and_tokenizer
    from unidetox.processes import process_state

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = sys.argv[1:] if overrides is None else overrides
    cfg, args = parse_config(overrides)
    state = process_state()
    model_args: ModelArguments = args["model"]
    ae_cfg: AntiExpertConfig = args["anti_expert"]
    sampling: SamplingConfig = args["sampler"]
    distill: DistillConfig = args["distill"]
    seed = int(cfg.seed)
    out = Path(cfg.output_dir)
    if state.is_main_process:
        save_resolved_config(cfg, out)
    load_kwargs = model_args.load_kwargs()
    run: dict = {"output_dir": str(out), "command": " ".join(sys.argv), "num_processes": state.num_processes,
                 "stages": {}}

    # ---- stage 1: anti-expert ------------------------------------------------------------------------------
    start = time.perf_counter()
    if ae_cfg.pretrained_path:
        ae_path, trained = ae_cfg.pretrained_path, False
        logger.info("Using the existing anti-expert %s", ae_path)
        ae_meta = read_marker(ae_path) if Path(ae_path).is_dir() else None
        # Named as the run that trained it names it (path@fingerprint), so texts sampled with it match either way.
        ae_id = f"{ae_path}@{ae_meta['fingerprint'][:12]}" if (ae_meta or {}).get("fingerprint") else ae_path
    else:
        corpus = load_toxic_corpus(args["data"])
        logger.info("Toxic corpus: %d texts", len(corpus))
        model, tokenizer = load_model_and_tokenizer(model_args.name_or_path, **load_kwargs)
        result = train_anti_expert(model, tokenizer, corpus, ae_cfg, base_name_or_path=model_args.name_or_path)
        del model
        ae_path, trained, ae_meta = str(result.path), result.trained, result.metadata
        ae_id = f"{ae_path}@{ae_meta['fingerprint'][:12]}"
    run["stages"]["anti_expert"] = {
        "path": ae_path,
        "trained_now": trained,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "train_wall_time_s": (ae_meta or {}).get("train_wall_time_s"),
        "train_loss": (ae_meta or {}).get("train_loss"),
        "first_logged_loss": (ae_meta or {}).get("first_logged_loss"),
        "last_logged_loss": (ae_meta or {}).get("last_logged_loss"),
        "global_steps": (ae_meta or {}).get("global_steps"),
    }

    # ---- stage 2: distillation -----------------------------------------------------------------------------
    start = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer(model_args.name_or_path, **load_kwargs)
    # A LoRA anti-expert stays an adapter (merge=False): the build then fuses base and adapter into one forward.
    anti_expert = load_anti_expert(ae_path, base_name_or_path=model_args.name_or_path, merge=False, **load_kwargs)
    distilled = DistilledDetoxDataset.build(
        base, anti_expert, tokenizer,
        num_samples=distill.num_samples, max_length=distill.max_length, alpha=sampling.alpha, beta=sampling.beta,
        batch_size=distill.batch_size, seed=seed, output_dir=out / "distilled",
        start_token=distill.start_token, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, stop_at_eos=sampling.stop_at_eos, summary_num_samples=distill.summary_num_samples,
        overwrite=distill.overwrite, base_id=model_args.name_or_path, anti_expert_id=ae_id, fused=distill.fused,
    )
    meta = distilled.metadata
    run["stages"]["distill"] = {
        "path": str(out / "distilled"),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "generation_time_s": meta.get("generation_time_s"),
        "num_samples": len(distilled),
        "total_tokens": meta.get("total_tokens"),
        "mean_tokens": meta.get("mean_tokens"),
        "decoding": meta.get("decoding"),
    }
    run["summary"] = meta.get("summary")
    if state.is_main_process:
        atomic_write_json(out / "distill_run.json", run)
        lines = [
            f"# Distillation run: `{out}`", "",
            "| stage | wall time (s) | notes |", "|---|---|---|",
            f"| anti_expert | {run['stages']['anti_expert']['wall_time_s']} | "
            f"{'trained now' if trained else 'reused'}; training took {run['stages']['anti_expert']['train_wall_time_s']} s, "
            f"loss {run['stages']['anti_expert']['first_logged_loss']} -> {run['stages']['anti_expert']['last_logged_loss']} |",
            f"| distill | {run['stages']['distill']['wall_time_s']} | {len(distilled)} texts, "
            f"{meta.get('total_tokens')} tokens, sampling took {meta.get('generation_time_s')} s ({meta.get('decoding')}) |",
            "",
        ]
        if run["summary"]:
            lines.append(summary_markdown(run["summary"]))
        atomic_write_text(out / "distill_run.md", "\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    state.wait_for_everyone()
    return run


if __name__ == "__main__":
    main()
    end_process_group()
