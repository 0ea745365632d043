"""Evaluation sampling (top-p 0.9, the paper's protocol) with transformers' TopPLogitsWarper vs ours.

    python benchmarks/top_p_warper.py                       # gemma3-270m (262k vocabulary), 64 rows x 20 tokens
    python benchmarks/top_p_warper.py --model smollm2-135m  # 49k vocabulary
    python benchmarks/top_p_warper.py --device cuda --batch-size 256

``reference``: ``generate(top_p=0.9)`` (transformers sorts the whole vocabulary every step). ``fast``:
:func:`unidetox.decoding.protocol.generate_samples`, which passes :class:`unidetox.decoding.warpers.FastTopPLogitsWarper`
instead. Both draw with the same seeds on the ToxiGen test prompts; the modes alternate over repeats, the median
is reported with the ratio, and the share of identical samples is printed (expected: all of them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LogitsProcessorList

from unidetox import load_model_and_tokenizer
from unidetox.decoding.protocol import batch_seed, generate_samples, sampling_generation_config
from unidetox.evaluation.prompts import PromptsConfig, load_prompts


def reference_ids(model, tokenizer, prompts, num_samples, max_new_tokens, seed):
    rows = [p for p in prompts for _ in range(num_samples)]
    enc = tokenizer(rows, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    config = sampling_generation_config(model, tokenizer, max_new_tokens, top_p=0.9, temperature=1.0)
    torch.manual_seed(batch_seed(seed, 0))
    out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList())
    return out[:, enc["input_ids"].shape[1]:].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch-size", type=int, default=64, help="rows (prompt x sample) in the one generate call")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.batch_size % args.num_samples:
        parser.error("--batch-size has to be a multiple of --num-samples")
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.to(args.device).eval()
    prompts = [p.text for p in load_prompts(PromptsConfig(split="test", num_prompts=args.batch_size // args.num_samples,
                                                          data_dir=args.data_dir))]
    times = {"reference": [], "fast": []}
    same = None
    for repeat in range(args.repeats):
        start = time.perf_counter()
        ref = reference_ids(model, tokenizer, prompts, args.num_samples, args.max_new_tokens, seed=repeat)
        times["reference"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fast = generate_samples(model, tokenizer, prompts, args.num_samples, args.max_new_tokens, seed=repeat,
                                batch_size=args.batch_size)
        times["fast"].append(time.perf_counter() - start)
        eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id]
                                         if isinstance(model.generation_config.eos_token_id, int)
                                         else model.generation_config.eos_token_id or [])}
        cut = [next((row[:i] for i, t in enumerate(row) if t in eos), row) for row in ref]
        same = sum(s.token_ids == c for s, c in zip(fast, cut, strict=True)) / len(cut)
    tokens = args.batch_size * args.max_new_tokens
    result = {"model": args.model, "vocab_size": model.config.get_text_config().vocab_size,
              "rows": args.batch_size, "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
              **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()},
              **{f"{k}_tokens_per_s": round(tokens / statistics.median(v), 1) for k, v in times.items()},
              "fast_over_reference_speed": round(statistics.median(times["reference"]) / statistics.median(times["fast"]), 3),
              "identical_samples_last_repeat": same}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
