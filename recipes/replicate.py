#!/usr/bin/env python
"""The paper's table at CPU scale: one command from the base models to a comparison with baselines.

    accelerate launch --num_processes 1 --cpu recipes/replicate.py                  # experiment=embedded (CPU default)
    accelerate launch --num_processes 1 --cpu recipes/replicate.py experiment=tiny output_dir=/tmp/rep   # CI size
    accelerate launch --num_processes 1 --cpu recipes/replicate.py grid.learning_rates=[5e-4,2e-4] \\
        grid.max_steps=100 grid.save_steps=25 output_dir=runs/replicate-v2        # a larger grid
    accelerate launch recipes/replicate.py experiment=paper                         # template: GPT-2 XL -> 7B models
    accelerate launch --num_processes 1 --cpu recipes/replicate.py launcher.engine=submitit \\
        launcher.cluster=local launcher.max_concurrent_jobs=2 launcher.threads_per_job=1   # stages as 2 jobs

Every stage (anti-expert and distillation per alpha, the validation grid, the chosen configuration applied to
every target, the baselines, the test evaluation) is cached: a rerun only does what is missing, and with
``launcher.engine=submitit`` the stages run as submitit jobs (locally or on SLURM). Writes ``report.{json,md}``
and ``toxicity_vs_perplexity.png`` under ``output_dir``; ``unidetox.replication.pipeline`` documents the layout.
``unidetox replicate --help`` lists the config groups.
"""

import sys

from unidetox.cli import configure_logging
from unidetox.processes import end_process_group
from unidetox.replication.pipeline import parse_args, run

if __name__ == "__main__":
    configure_logging()
    run(parse_args(sys.argv[1:]))
    end_process_group()
