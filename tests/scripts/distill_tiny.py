"""Helper for tests/distill/test_distill.py: tiny models -> (optional LoRA anti-expert training) -> DistilledDetoxDataset.build.

Run as one process (`python distill_tiny.py ...`) or several (`torchrun --nproc_per_node 2 distill_tiny.py ...`).
`--calls_log` appends one JSON line per sampled batch (its seed and the rank that sampled it); `--sleep` slows every
batch down so that a test can kill the build midway.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py

import datasets  # noqa: E402
from accelerate import PartialState  # noqa: E402
from tiny import tiny_llama, word_tokenizer  # noqa: E402

import unidetox.distill.distiller as distilled  # noqa: E402
from unidetox import DistillConfig, DistilledDetoxDataset  # noqa: E402
from unidetox.distill.anti_expert import AntiExpertConfig, load_anti_expert, train_anti_expert  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--output_dir", required=True)
parser.add_argument("--num_samples", type=int, default=10)
parser.add_argument("--batch_size", type=int, default=2)
parser.add_argument("--max_length", type=int, default=8)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--calls_log", default=None)
parser.add_argument("--train", action="store_true", help="train a LoRA anti-expert first (DDP under torchrun)")
parser.add_argument("--anti_expert", default=None, help="path of a saved anti-expert to use")
args = parser.parse_args()

state = PartialState()
out = Path(args.output_dir)
tokenizer = word_tokenizer()
vocab = len(tokenizer.get_vocab())

original = distilled.sample_batch


def logged_sample_batch(*a, **k):
    if args.sleep:
        time.sleep(args.sleep)
    rows = original(*a, **k)
    if args.calls_log:
        with open(args.calls_log, "a") as fh:
            fh.write(json.dumps({"seed": a[5], "rank": state.process_index}) + "\n")
    return rows


distilled.sample_batch = logged_sample_batch

base = tiny_llama(vocab, seed=0)
if args.train:
    base_dir = out / "base"
    if state.is_main_process:
        base.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    state.wait_for_everyone()
    corpus = datasets.Dataset.from_dict({"text": ["hate awful stupid ugly people", "kill the stupid ugly cat"] * 8})
    config = AntiExpertConfig(
        output_dir=str(out / "anti_expert"), use_peft=True, lora_r=4, lora_alpha=8, max_steps=4, learning_rate=1e-2,
        per_device_train_batch_size=2, disable_tqdm=True, logging_steps=1,
    )
    train_anti_expert(tiny_llama(vocab, seed=0), tokenizer, corpus, config, base_name_or_path=str(base_dir))
    anti = load_anti_expert(out / "anti_expert")
elif args.anti_expert:
    anti = load_anti_expert(args.anti_expert)
else:
    anti = tiny_llama(vocab, seed=1)

distill = DistillConfig(num_samples=args.num_samples, max_length=args.max_length, batch_size=args.batch_size,
                        summary_num_samples=0)
result = DistilledDetoxDataset.build(
    base, anti, tokenizer, distill=distill, seed=args.seed, output_dir=out / "distilled", show_progress=False,
    base_id="tiny-llama-seed0", anti_expert_id="anti",
)
assert len(result) == args.num_samples
