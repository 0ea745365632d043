#!/usr/bin/env python
"""Distill detoxifying text: fine-tune an anti-expert on toxic text, then sample by contrastive decoding.

    accelerate launch recipes/distill.py                                # embedded default: smollm2-135m + local DGHS
    accelerate launch recipes/distill.py output_dir=runs/x distill.num_samples=256 seed=1
    accelerate launch recipes/distill.py experiment=embedded_gemma3      # a base model that writes prose
    accelerate launch recipes/distill.py anti_expert.pretrained_path=runs/distill-default/anti_expert sampler.alpha=0.2
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml recipes/distill.py experiment=paper_gpt2xl

Outputs under ``output_dir``: ``anti_expert/``, ``distilled/``, ``distill_run.{json,md}``, ``config.yaml``. Every
stage is cached, so a rerun skips what is done and an interrupted run resumes from its finished shards.
``unidetox distill --help`` lists the config groups. Copy this file to start a script of your own.
"""

import sys

from unidetox.cli import configure_logging
from unidetox.distill.pipeline import parse_args, run
from unidetox.processes import end_process_group

if __name__ == "__main__":
    configure_logging()
    run(parse_args(sys.argv[1:]))
    end_process_group()
