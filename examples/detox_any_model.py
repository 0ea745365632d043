#!/usr/bin/env python
"""Detox any causal LM with distilled detoxifying text: the library, without Hydra.

    python examples/detox_any_model.py --model gemma3-270m --data runs/distill-default/distilled --max-steps 100
    python examples/detox_any_model.py --model meta-llama/Llama-2-7b-hf --full --max-steps 3000   # the paper, GPU

The same configuration works for every target (the UniDetox claim); the text is re-tokenized for the target.
"""

import argparse

from peft import LoraConfig

from unidetox import UniversalDetoxConfig, UniversalDetoxTrainer
from unidetox.detox.callbacks import DetoxEvalCallback, DetoxEvalConfig
from unidetox.detox.merge import merge_lora_checkpoint
from unidetox.detox.selection import select_checkpoint
from unidetox.evaluation.prompts import load_prompts
from unidetox.logging_setup import configure_logging
from unidetox.paths import default_data_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local path or embedded name")
parser.add_argument("--data", default=str(default_data_dir() / "unidetox_reference"
                                          / "generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv"),
                    help="a saved DistilledDetoxDataset or a CSV/JSONL file (default: the authors' text)")
parser.add_argument("--output-dir", default="runs/example-detox")
parser.add_argument("--max-steps", type=int, default=100)
parser.add_argument("--full", action="store_true", help="full fine-tuning at the paper's lr 5e-5 instead of LoRA")
cli = parser.parse_args()
configure_logging()

args = UniversalDetoxConfig(
    output_dir=cli.output_dir,
    max_steps=cli.max_steps,
    save_steps=max(cli.max_steps // 4, 1),
    learning_rate=5e-5 if cli.full else 5e-4,
    max_length=256 if cli.full else 128,
    gradient_checkpointing=cli.full,
    save_merged_model=not cli.full,
)
callback = DetoxEvalCallback(
    load_prompts(source="toxigen_local", split="validation", num_prompts=20),  # never the test prompts
    perplexity_texts=(default_data_dir() / "wikitext2" / "wiki.test.raw").read_text().replace("\r\n", "\n"),
    config=DetoxEvalConfig(num_samples=5, ppl_max_tokens=4096, ppl_batch_size=1),
)
trainer = UniversalDetoxTrainer(
    model=cli.model,
    args=args,
    train_dataset=cli.data,
    peft_config=None if cli.full else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"),
    callbacks=[callback],
)
trainer.train()
trainer.save_model()  # model (or adapter + merged/) with a model card

choice = select_checkpoint(cli.output_dir, max_ppl_increase=0.1)
print(f"least toxic checkpoint within +10% perplexity: {choice.path} "
      f"(EMT {choice.metrics['expected_max_toxicity']:.3f}, perplexity {choice.perplexity_increase:+.1%})")
if not cli.full:
    print("merged:", merge_lora_checkpoint(choice.path))
