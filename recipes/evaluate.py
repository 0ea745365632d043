#!/usr/bin/env python
"""Evaluate several models with the paper's protocol: toxicity, perplexity, diversity, MMLU -> one report.

    accelerate launch recipes/evaluate.py                                 # smollm2-135m, local ToxiGen, paper sizes
    accelerate launch recipes/evaluate.py models=[smollm2-135m,gemma3-270m] prompts.num_prompts=100 \\
        eval.num_samples=10 seeds=[0,1] mmlu.limit=2 perplexity.max_tokens=20000 output_dir=runs/eval
    accelerate launch recipes/evaluate.py models=[/path/to/detoxed] prompts.path=rtp.jsonl prompts.field=prompt.text
    accelerate launch recipes/evaluate.py prompts=toxigen_hub scorer=detoxify
    accelerate launch --multi_gpu --num_processes 2 recipes/evaluate.py ...  # sharded, gathered once

Writes ``report.{json,md}``, ``toxicity_vs_perplexity.png``, ``toxicity_by_category.png``, ``generations.jsonl``
and ``config.yaml`` under ``output_dir``; finished (model, seed) parts under ``parts/`` (or ``parts_dir``) are
reused when the run is started again. ``unidetox evaluate --help`` lists the config groups.
"""

import sys

from unidetox.cli import configure_logging
from unidetox.evaluation.pipeline import parse_args, run
from unidetox.processes import end_process_group

if __name__ == "__main__":
    configure_logging()
    run(parse_args(sys.argv[1:]))
    end_process_group()
