#!/usr/bin/env python
"""Detox any causal LM with the distilled text and ONE configuration, validating every checkpoint.

    accelerate launch recipes/detox.py                                   # smollm2-135m, the universal config, CPU
    accelerate launch recipes/detox.py recipe=runs/replicate-embedded/chosen_recipe.yaml model=gemma3-270m
    accelerate launch recipes/detox.py --config-dir my_configs recipe=my_recipe model=ANY   # my_configs/recipe/
    accelerate launch recipes/detox.py experiment=embedded_gemma3 data.path=runs/distill-default
    accelerate launch recipes/detox.py trainer.learning_rate=2e-4 trainer.max_steps=100 trainer.save_steps=25
    accelerate launch recipes/detox.py model=meta-llama/Llama-2-7b-hf trainer=paper data=authors_reference
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/detox.py experiment=paper_llama2_7b

Outputs under ``output_dir``: ``checkpoint-N/`` (all kept), the final model (LoRA: adapter + ``merged/``), its
model card, ``detox_eval.jsonl`` (validation at step 0 and every save), ``selected_checkpoint.json`` (least toxic
within +10 % perplexity), ``train_summary.{json,md}``, ``loss.png``. Started again with the same settings it
resumes from its newest checkpoint. The default trainer preset, ``universal``, is the configuration the replication
v2 chose (lr 2e-4, a 100-step schedule stopped at step 50, LoRA r=16); ``unidetox detox --help`` lists the groups.
"""

import sys

from unidetox.cli import configure_logging
from unidetox.detox.pipeline import parse_args, run
from unidetox.processes import end_process_group

if __name__ == "__main__":
    configure_logging()
    run(parse_args(sys.argv[1:]))
    end_process_group()
