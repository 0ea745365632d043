#!/usr/bin/env python
"""Evaluate several models with the paper's protocol: toxicity, perplexity, diversity, MMLU -> one report.

    accelerate launch recipes/evaluate.py                                   # smollm2-135m, local ToxiGen, paper sizes
    accelerate launch recipes/evaluate.py models=[smollm2-135m,gemma3-270m] eval.num_prompts=100 \\
        eval.num_samples=10 seeds=[0,1] mmlu.limit=2 perplexity.max_tokens=20000 output_dir=runs/eval
    accelerate launch recipes/evaluate.py models=[/path/to/detoxed] prompts.path=rtp.jsonl prompts.field=prompt.text
    accelerate launch recipes/evaluate.py prompts=toxigen_hub scorer=detoxify perplexity.reference_model=meta-llama/Llama-2-7b-hf
    accelerate launch --multi_gpu --num_processes 2 recipes/evaluate.py ... # sharded, gathered once (GPUs or CPUs;
    torchrun --nproc_per_node 2 recipes/evaluate.py ...                     #  `--cpu` alone starts one process)

Writes ``<output_dir>/report.json``, ``report.md``, ``toxicity_vs_perplexity.png``, ``toxicity_by_category.png``,
``generations.jsonl`` and ``config.yaml``; finished (model, seed) parts under ``<output_dir>/parts`` (or ``parts_dir``)
are reused when the run is restarted with the same settings.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from unidetox.decoding.sampling import ToxicityEvalConfig  # noqa: E402
from unidetox.evaluation.harness import DecodingConfig, PerplexityConfig, run_evaluation  # noqa: E402
from unidetox.evaluation.mmlu import MMLUConfig  # noqa: E402
from unidetox.evaluation.prompts import PromptsConfig, load_prompts  # noqa: E402
from unidetox.evaluation.scoring import ScorerConfig  # noqa: E402
from unidetox.hydra_config import compose_config, parse_dataclass, save_resolved_config, to_container  # noqa: E402
from unidetox.processes import end_process_group  # noqa: E402

logger = logging.getLogger("unidetox.recipes.evaluate")


def parse_config(overrides):
    """Compose ``conf/evaluate.yaml`` with ``overrides`` and parse every section into its dataclass."""
    cfg = compose_config("evaluate", overrides, free_form_groups=())
    sections = {
        "eval": parse_dataclass(cfg.eval, ToxicityEvalConfig),
        "prompts": parse_dataclass(cfg.prompts, PromptsConfig),
        "scorer": parse_dataclass(cfg.scorer, ScorerConfig),
        "perplexity": parse_dataclass(cfg.perplexity, PerplexityConfig),
        "mmlu": parse_dataclass(cfg.mmlu, MMLUConfig),
        "decoding": parse_dataclass(cfg.decoding, DecodingConfig),
    }
    models = cfg.models
    if isinstance(models, str):
        models = [models]
    models = [str(m) for m in models]
    seeds = cfg.seeds if not isinstance(cfg.seeds, int) else [cfg.seeds]
    return cfg, sections, models, [int(s) for s in seeds]


def main(overrides: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, sections, models, seeds = parse_config(sys.argv[1:] if overrides is None else overrides)
    prompts_config = sections["prompts"]
    if sections["eval"].num_prompts is not None:
        prompts_config.num_prompts = sections["eval"].num_prompts
    prompts = load_prompts(prompts_config)
    logger.info("%d prompts (%s, split %s); models %s; seeds %s", len(prompts), prompts_config.source,
                prompts_config.split, models, seeds)
    save_resolved_config(cfg, cfg.output_dir)
    report = run_evaluation(
        models, seeds, cfg.output_dir, prompts,
        eval_config=sections["eval"], scorer_config=sections["scorer"], perplexity_config=sections["perplexity"],
        mmlu_config=sections["mmlu"], decoding_config=sections["decoding"],
        prompts_info={"source": prompts_config.source, "path": prompts_config.path, "split": prompts_config.split,
                      "split_seed": prompts_config.split_seed, "subset_seed": prompts_config.subset_seed},
        data_dir=cfg.data_dir, dtype=cfg.dtype, config_dict=to_container(cfg), progress=bool(cfg.progress),
        parts_dir=cfg.get("parts_dir"),
    )
    if report is not None:
        print((Path(cfg.output_dir) / "report.md").read_text())
        print(f"Report: {Path(cfg.output_dir).resolve()}/report.json (wall time {report['wall_time_s']:.0f}s)")
    return report


if __name__ == "__main__":
    main()
    end_process_group()
